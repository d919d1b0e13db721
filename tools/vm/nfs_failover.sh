#!/usr/bin/env bash
# The whole stack on a real kernel, run inside the VM by `tools/vm/run.sh tools/vm/nfs_failover.sh`:
# two nodes (network and mount namespaces, tools/vm/nodes.sh) replicate r0; the Primary carries
# LVM -> XFS -> the kernel NFS server on its /dev/nbdX, and an NFS client (the root namespace)
# writes files with fsync, keeping a list of those acknowledged. Then:
#   1. alpha's daemon is SIGKILLed under load; beta takes over; every acknowledged file is intact;
#      alpha rejoins as Secondary, resyncing only what changed; the service fails back to alpha;
#   2. alpha's link is cut under load; beta takes over; alpha, which wrote alone meanwhile, rejoins
#      and is discarded by after-sb-1pri = discard-secondary, again resyncing only what changed;
#   3. a split brain as operators meet it (disconnect, both Primary, divergent writes, connect:
#      both StandAlone), recovered with `connect --discard-my-data` on the victim and `connect` on
#      the survivor; an online verify under writes finds 0 blocks out of sync, and the data areas
#      of both disks end byte-identical.
# The activity log's idle extents retire within seconds, so the resync after the crash in 1 is
# the extents written last plus beta's changes, not every extent mkfs touched.
set -Eeuo pipefail

# shellcheck source=tools/vm/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tools/vm/nodes.sh
source "$(dirname "$0")/nodes.sh"
# shellcheck source=tools/vm/nfs_client.sh
source "$(dirname "$0")/nfs_client.sh"

ALPHA=$SUBNET.1
BETA=$SUBNET.2
DISK_SIZE=640M
# Each node's control socket and log are in its own /run (nodes.sh).
export RDBD_CONFIG_DIR="$WORK/etc" RDBD_RUN_DIR=/run/rdbd
LOGS="$NODES_DIR/alpha.run/rdbd/r0.alpha.log $NODES_DIR/beta.run/rdbd/r0.beta.log"
trap on_error ERR
trap nodes_down EXIT

cd "$WORK"
mkdir -p "$RDBD_CONFIG_DIR"

step "kernel $(uname -r): modules; nodes alpha ($ALPHA, /dev/nbd0) and beta ($BETA, /dev/nbd1) on bridge br0"
nodes_pair_up "$ALPHA" "$BETA"
run on alpha ip -br addr show eth0

step "r0: create-md and up on both nodes ($DISK_SIZE disks), primary --force on alpha, initial sync"
cat > "$RDBD_CONFIG_DIR/r0.toml" <<EOF
[net]
shared-secret = "vm-test"
connect-interval = "500ms"
ping-interval = "1s"
# Under emulation an online verify beside the NFS load can hold a ping's answer past 500 ms.
ping-timeout = "1500ms"
timeout = "4s"
# The isolated Primary of step 2 wrote alone; once it is Secondary, its writes are the ones to go.
after-sb-1pri = "discard-secondary"

[[node]]
name = "alpha"
address = "$ALPHA:7789"
disk = "$WORK/alpha.img"
nbd-device = "/dev/nbd0"

[[node]]
name = "beta"
address = "$BETA:7789"
disk = "$WORK/beta.img"
nbd-device = "/dev/nbd1"
EOF
truncate -s "$DISK_SIZE" "$WORK/alpha.img" "$WORK/beta.img"
for n in alpha beta; do run rdbd create-md "$n"; done
for n in alpha beta; do run rdbd up "$n"; done
wait_for alpha "['connection']" Connected
run rdbd primary alpha --force
run rdbd wait-sync alpha --timeout 180s
run test "$(status_field alpha "['nbd_device']")" = /dev/nbd0
run test -e /sys/block/nbd0/pid
run test ! -e /sys/block/nbd1/pid # a Secondary has no device

step "alpha: LVM on /dev/nbd0, XFS, NFS export; the client mounts it and writes"
run on alpha pvcreate -q /dev/nbd0
run on alpha vgcreate -q vg0 /dev/nbd0
run on alpha lvcreate -q -n lv0 -l 100%FREE vg0
run on alpha mkfs.xfs -q /dev/vg0/lv0
run stack_up alpha
client_mount "$ALPHA"
client_write a 16
echo "    $(acked_count) files acknowledged"

# mkfs wrote (and discarded) every extent; idle ones leave the activity log within seconds.
wait_for_small_activity_log() {
  local deadline=$((SECONDS + 60))
  while [ "$(status_field alpha "['activity_log_extents']")" -gt 8 ]; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "alpha's activity log still holds more than 8 extents" >&2; return 1; }
    sleep 0.5
  done
}
wait_for_small_activity_log
echo "    alpha's activity log: $(status_field alpha "['activity_log_extents']") extents"

step "1. SIGKILL of alpha's daemon while the client writes"
client_write b 400 &
writer=$!
wait_acked 5
pid=$(status_field alpha "['pid']")
extents=$(status_field alpha "['activity_log_extents']")
run kill -9 "$pid"
echo "    killed with $(acked_count) files acknowledged, $extents extents in alpha's activity log"
wait_for beta "['connection']" Connecting

step "alpha is fenced: its /dev/nbd0 disconnected, its stack taken down"
run fence alpha /dev/nbd0
client_abandon
echo "    $(acked_count) files acknowledged in all"

step "beta takes over: primary, vgchange -ay, mount (XFS replays its log), export"
run rdbd primary beta
run test "$(status_field beta "['nbd_device']")" = /dev/nbd1
run stack_up beta
client_mount "$BETA"
client_check
client_write c 16

step "alpha rejoins as Secondary and resyncs only what changed"
run rdbd up alpha
wait_for alpha "['connection']" Connected
run rdbd wait-sync alpha --timeout 120s
run test ! -e /sys/block/nbd0/pid
mib=$(resynced_mib alpha)
echo "    resynced ${mib} MiB of $DISK_SIZE"
run test "$mib" -lt 64

step "fail back to alpha: unmount, demote beta, promote alpha, mount, export"
run umount "$CLIENT_MNT"
if out=$(rdbd secondary beta 2>&1); then
  echo "    secondary succeeded with the volume group active: $out" >&2
  false
fi
echo "    refused while LVM holds /dev/nbd1: $out"
run grep -Eq "held by dm-[0-9]+ \(vg0-lv0\)" <<< "$out"
run stack_down beta
run rdbd secondary beta
run rdbd primary alpha
run stack_up alpha
client_mount "$ALPHA"
client_check

step "2. alpha's link cut while the client writes"
client_write d 400 &
writer=$!
wait_acked 5
run link_cut alpha
wait_for beta "['connection']" Connecting
wait_for alpha "['connection']" Connecting
echo "    cut with $(acked_count) files acknowledged"

step "alpha, isolated, is fenced: stack down, Secondary"
client_abandon
run stack_down alpha
run rdbd secondary alpha

step "beta takes over"
run rdbd primary beta
run stack_up beta
client_mount "$BETA"
client_check
client_write e 16

step "the link mended: alpha's own writes meet beta's (split brain), after-sb-1pri discards alpha's"
run link_mend alpha
wait_for alpha "['connection']" Connected 60
run rdbd wait-sync alpha --timeout 120s
run grep -h "split brain resolved by after-sb-1pri discard-secondary" "$NODES_DIR/alpha.run/rdbd/r0.alpha.log"
mib=$(resynced_mib alpha)
echo "    resynced ${mib} MiB of $DISK_SIZE"
run test "$mib" -lt 64
client_check

step "3. split brain: disconnect, alpha Primary too, divergent writes on both"
run rdbd disconnect alpha
run rdbd disconnect beta
client_write f 8
run rdbd primary alpha
run test -e /sys/block/nbd0/pid
# Raw writes into the logical volume's area: beta has the volume group active, so alpha cannot.
run dd if=/dev/urandom of=/dev/nbd0 bs=1M count=4 seek=300 oflag=direct conv=fsync status=none

step "connect on both: both Primary with changes, after-sb-2pri = disconnect leaves both StandAlone"
run rdbd connect alpha
run rdbd connect beta
wait_for alpha "['connection']" StandAlone
wait_for beta "['connection']" StandAlone
for n in alpha beta; do run grep -q "split brain detected" <<< "$(status_field "$n" "['last_error']")"; done
run rdbd status beta
run test -e /sys/block/nbd0/pid

step "recover: alpha secondary + connect --discard-my-data, beta connect"
run rdbd secondary alpha
run rdbd connect alpha --discard-my-data
run rdbd connect beta
wait_for alpha "['connection']" Connected
run rdbd wait-sync alpha --timeout 120s
mib=$(resynced_mib alpha)
echo "    resynced ${mib} MiB of $DISK_SIZE"
run test "$mib" -ge 4
run test "$mib" -lt 64

step "online verify from beta while the client writes: 0 blocks out of sync"
client_write g 16 &
writer=$!
run rdbd verify beta
echo "+ wait for the writer"
wait "$writer"
run test "$(status_field beta "['last_verify']['out_of_sync_blocks']")" = 0
client_check

step "tear down; the data areas of both disks are byte-identical"
run umount "$CLIENT_MNT"
run stack_down beta
run rdbd secondary beta
data=$(rdbd show-md alpha | awk '/^data-size/ {print $2}')
for n in alpha beta; do run rdbd down "$n"; done
run cmp -n "$data" "$WORK/alpha.img" "$WORK/beta.img"

step "nfs failover passed"
