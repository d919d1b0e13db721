#!/usr/bin/env bash
# The HA supervisor on a real kernel, run inside the VM by `tools/vm/run.sh tools/vm/ha_failover.sh`:
# nodes alpha and beta (tools/vm/nodes.sh) and a quorum witness (its own network namespace) on
# one bridge; r0 has an [ha] table and the service chain lvm vg0 -> mount XFS -> nfs-server
# (state directory on the replicated file system) -> nfs-export -> service address. The NFS
# client mounts the service address once and keeps writing files with fsync.
#   1. The supervisor promotes alpha (preferred) and starts the chain.
#   2. Alpha dies (link cut, daemon SIGKILLed, its kernel state torn down as a power-off would):
#      beta takes the lease, promotes, and starts the chain; the client's mount carries on and
#      every acknowledged file is intact.
#   3. Alpha comes back: Secondary, outdated, it resyncs from beta; then `failback = "always"`
#      moves the service back (beta stops its chain in reverse and demotes, alpha promotes and
#      starts it); the client carries on again.
#   4. A planned `switchover` to beta and back: the chain moves each time, the client carries
#      on, and failback does not undo the operator's move.
#   5. An online verify finds 0 blocks out of sync; `down` stops the chain before detaching.
set -Eeuo pipefail

# shellcheck source=tools/vm/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tools/vm/nodes.sh
source "$(dirname "$0")/nodes.sh"
# shellcheck source=tools/vm/nfs_client.sh
source "$(dirname "$0")/nfs_client.sh"

ALPHA=$SUBNET.1
BETA=$SUBNET.2
WITNESS=$SUBNET.3
SERVICE_IP=$SUBNET.100
export RDBD_CONFIG_DIR="$WORK/etc" RDBD_RUN_DIR=/run/rdbd RDBD_WITNESS_SECRET=vm-witness
LOGS="$NODES_DIR/alpha.run/rdbd/r0.alpha.log $NODES_DIR/beta.run/rdbd/r0.beta.log $WORK/witness.log"
trap on_error ERR
cleanup() {
  nodes_down
  [ -n "${witness_pid:-}" ] && kill "$witness_pid" 2>/dev/null || true
}
trap cleanup EXIT

# The chain's states on NODE, e.g. "running running running running running".
chain_states() { status_field "$1" "['ha']['services']" | /usr/bin/python3 -c "import ast,sys; print(' '.join(s['state'] for s in ast.literal_eval(sys.stdin.read())))"; }
wait_chain_running() { # NODE SECONDS
  local deadline=$((SECONDS + $2)) all="running running running running running"
  until [ "$(chain_states "$1" 2>/dev/null)" = "$all" ]; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "$1's chain: $(chain_states "$1" 2>&1)" >&2; return 1; }
    sleep 0.5
  done
  echo "    $1: Primary, chain running ($(status_field "$1" "['ha']['last_action']"))"
}
# What a power-off takes with it, which in this one kernel must be undone by hand: the device
# (its I/O fails, XFS shuts down), nfsd's threads and export cache (they hold the file system),
# the processes, the mounts, the mapping (beta needs its name, XFS the file system's UUID).
power_off_alpha() {
  run nbd-client -d /dev/nbd0
  on alpha sh -c 'echo 0 > /proc/fs/nfsd/threads' || true
  local f
  for f in nfsd.export nfsd.fh auth.unix.ip; do
    on alpha sh -c "echo $(date +%s) > /proc/net/rpc/$f/flush" 2>/dev/null || true
  done
  for p in $(ip netns pids alpha); do kill -9 "$p" 2>/dev/null || true; done
  on alpha umount -l /var/lib/nfs || true
  run on alpha umount -l "$EXPORT_DIR"
  on alpha umount /proc/fs/nfsd || true
  for _ in $(seq 60); do on alpha dmsetup remove vg0-lv0 2>/dev/null && return 0; sleep 0.5; done
  dmsetup info vg0-lv0 >&2 || true
  grep -l vg0 /proc/[0-9]*/mountinfo >&2 || true
  return 1
}
# Why the client does not get through: its view, and the serving node's.
nfs_diagnostics() {
  local n
  echo "-- client: neighbours, connections, NFS mounts" >&2
  ip neigh show >&2 || true
  ss -tn >&2 || true
  grep nfs /proc/mounts >&2 || true
  ss -tan >&2 || true
  grep -E "^\s+xprt|device .* nfs" /proc/self/mountstats >&2 || true
  ps -eo pid,stat,wchan:24,args | grep -E "dd |client_write|bash" | grep -v grep >&2 || true
  tail -n 3 "$WORK/acked" >&2
  for n in alpha beta; do
    echo "-- $n: addresses, listeners, exports, nfsd threads" >&2
    on "$n" ip -br addr >&2 || true
    on "$n" ss -tln >&2 || true
    on "$n" exportfs -v >&2 || true
    on "$n" cat /proc/fs/nfsd/threads >&2 || true
  done
}

cd "$WORK"
mkdir -p "$RDBD_CONFIG_DIR"

step "kernel $(uname -r): modules; alpha ($ALPHA), beta ($BETA), witness ($WITNESS) on bridge br0"
nodes_pair_up "$ALPHA" "$BETA"
host_create witness "$WITNESS" # the witness needs only a network namespace
# A longer lease than the default 2 s: the test tears down the "dead" node's kernel state (a real
# power-off does that at once) before the survivor may take over.
nsenter --net=/run/netns/witness "$RDBD" witness --listen "$WITNESS:7788" --lease 6s \
  --state "$WORK/witness.json" > "$WORK/witness.log" 2>&1 &
witness_pid=$!

step "r0 with [ha] (witness, preferred alpha, failback always) and the chain lvm -> mount -> nfs-server -> nfs-export -> ip"
cat > "$RDBD_CONFIG_DIR/r0.toml" <<EOF
[net]
shared-secret = "vm-test"
connect-interval = "500ms"
ping-interval = "1s"
# Under emulation an online verify beside the NFS load can hold a ping's answer past 500 ms.
ping-timeout = "1500ms"
timeout = "4s"

[ha]
witness = "$WITNESS:7788"
witness-secret = "$RDBD_WITNESS_SECRET"
preferred-nodes = ["alpha"]
failback = "always"
monitor-interval = "5s"

[[service]]
kind = "lvm"
volume-group = "vg0"

[[service]]
kind = "mount"
device = "/dev/vg0/lv0"
directory = "$EXPORT_DIR"
fstype = "xfs"

[[service]]
kind = "nfs-server"
state-dir = "$EXPORT_DIR/.nfs"
grace-time = "10s"                 # the kernel's 90 s default would dominate every move
lease-time = "10s"

[[service]]
kind = "nfs-export"
directory = "$EXPORT_DIR"
clients = "$CLIENT_IP"
options = "rw,sync,no_root_squash"
fsid = 1

[[service]]
kind = "ip"
address = "$SERVICE_IP/24"
interface = "eth0"

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
run "$RDBD" dump r0 --node alpha > /dev/null
truncate -s 640M "$WORK/alpha.img" "$WORK/beta.img"
for n in alpha beta; do run rdbd create-md "$n"; done
for n in alpha beta; do run rdbd up "$n"; done
wait_for alpha "['connection']" Connected
run rdbd status alpha

step "first setup by hand: primary --force on alpha (initial sync), LVM and XFS on /dev/nbd0, secondary"
run rdbd primary alpha --force
run rdbd wait-sync alpha --timeout 180s
run on alpha pvcreate -q /dev/nbd0
run on alpha vgcreate -q vg0 /dev/nbd0
run on alpha lvcreate -q -n lv0 -l 100%FREE vg0
run on alpha mkfs.xfs -q /dev/vg0/lv0
run on alpha vgchange -an vg0
run rdbd secondary alpha

step "1. the supervisor promotes alpha (the preferred node) and starts the chain"
wait_for alpha "['role']" Primary 60
wait_chain_running alpha 120
run rdbd status alpha
run on alpha ip -br addr show eth0
client_mount "$SERVICE_IP"
client_write a 16
echo "    $(acked_count) files acknowledged through $SERVICE_IP"

step "2. alpha dies under load: link cut, daemon SIGKILLed, its kernel state gone (a power-off)"
client_write b 5000 &
writer=$!
wait_acked 5
pid=$(status_field alpha "['pid']")
killed=$SECONDS
# The link first: the dying node's I/O errors must not reach the client, as with a power cut.
run link_cut alpha
run kill -9 "$pid"
echo "    killed with $(acked_count) files acknowledged"
power_off_alpha
run on alpha ip addr del "$SERVICE_IP/24" dev eth0

step "beta takes over on its own: lease, promotion, chain; the client's mount carries on"
wait_for beta "['role']" Primary 90
wait_chain_running beta 120
wait_acked 3 120 || { nfs_diagnostics; false; }
echo "    the client wrote again $((SECONDS - killed)) s after the kill (under emulation: no performance figure)"
run rdbd status beta
client_check

step "3. alpha comes back: Secondary, outdated by the witness, resyncs from beta"
run link_mend alpha
run rdbd up alpha
wait_for alpha "['connection']" Connected 120
run rdbd wait-sync alpha --timeout 180s
echo "    alpha resynced $(resynced_mib alpha) MiB"

step "failback (preferred alpha, failback always): beta stops its chain and demotes, alpha takes over"
t=$SECONDS
wait_for beta "['role']" Secondary 120
echo "    beta stopped its chain and demoted after $((SECONDS - t)) s"
wait_for alpha "['role']" Primary 120
wait_chain_running alpha 120
echo "    alpha's chain running after $((SECONDS - t)) s"
wait_acked 3 180
echo "    the client wrote again after $((SECONDS - t)) s"
client_check

step "4. planned switchover to beta: alpha stops its chain in reverse and demotes, beta takes over"
t=$SECONDS
run rdbd switchover alpha --to beta
wait_chain_running beta 120
wait_acked 3 180
echo "    the client wrote again $((SECONDS - t)) s after the switchover began"
sleep 8
run test "$(status_field beta "['role']")" = Primary  # failback is for outages, not for a move

step "and back: switchover on beta"
t=$SECONDS
run rdbd switchover beta
wait_chain_running alpha 120
wait_acked 3 180
echo "    the client wrote again $((SECONDS - t)) s after the switchover began"

step "5. online verify: 0 blocks out of sync; down stops the chain"
kill "$writer" 2>/dev/null || true
wait "$writer" 2>/dev/null || true
run rdbd verify alpha
run test "$(status_field alpha "['last_verify']['out_of_sync_blocks']")" = 0
client_check
run umount "$CLIENT_MNT"
run rdbd down beta
run rdbd down alpha
run on alpha sh -c "! mountpoint -q $EXPORT_DIR"
run test ! -e /sys/block/nbd0/pid

step "ha failover passed"
