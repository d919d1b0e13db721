#!/usr/bin/env bash
# A failing backing disk on a real kernel, run inside the VM by
# `tools/vm/run.sh tools/vm/disk_failure.sh`: two nodes (network and mount namespaces,
# tools/vm/nodes.sh), each on a device-mapper disk over a loop device (a `linear` table, swapped
# to `error` to fail every I/O and back to `linear` to repair it), `on-io-error = "detach"` (the
# default). Alpha is Primary with XFS on /dev/nbd0 and a writer that fsyncs files, keeping the
# list of those acknowledged. Then:
#   1. beta's disk fails under the writer: beta goes Diskless (with the error in its status),
#      alpha stays Primary and its file system writable with every acknowledged file intact;
#      beta is never promoted; repaired and attached, it resyncs and verify finds 0 blocks out of
#      sync; xfs_repair -n finds the file system clean;
#   2. alpha's disk fails under the writer: alpha goes Diskless but stays Primary, serving
#      through beta (fsyncs go on succeeding, files read back with the page cache dropped);
#      xfs_repair -n through alpha's /dev/nbd0 is clean; `attach` is refused while Primary; the
#      roles switch, beta mounts the same files, alpha's repaired disk is attached and resynced,
#      verify finds 0 blocks out of sync;
#   3. a bad region on beta's disk (an error target in the middle of the linear table), under a
#      file written before case 1: beta, now Primary, reads it, the read fails and alpha answers
#      it (the file reads back intact), beta goes Diskless; the repair loses what the region
#      held (zeroes, as a drive that remaps bad sectors), and after the switch back to alpha and
#      `attach`, the resync must restore it: verify finds 0 blocks out of sync, xfs_repair -n is
#      clean and the data areas of both disks are byte-identical.
set -Eeuo pipefail

# shellcheck source=tools/vm/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tools/vm/nodes.sh
source "$(dirname "$0")/nodes.sh"

ALPHA=$SUBNET.1
BETA=$SUBNET.2
# mkfs.xfs wants 300 MB at least; the metadata takes a little of the disk.
DISK_SIZE=384M
DATA=/srv/data # in each node's own /srv
export RDBD_CONFIG_DIR="$WORK/etc" RDBD_RUN_DIR=/run/rdbd
LOGS="$NODES_DIR/alpha.run/rdbd/r0.alpha.log $NODES_DIR/beta.run/rdbd/r0.beta.log $WORK/writer.err"

# Besides lib.sh's report: both nodes' status, the writer's failure, the disks' tables and any
# task blocked in the kernel (a hung I/O shows there).
on_failure() {
  local rc=$? n
  trap - ERR
  for n in alpha beta; do
    [ -e "$NODES_DIR/$n.mnt" ] || continue
    echo "-- $n: rdbd status" >&2
    timeout 10 nsenter --mount="$NODES_DIR/$n.mnt" --net="/run/netns/$n" -- "$RDBD" status r0 --node "$n" 2>&1 |
      sed 's/^/    /' >&2 || true
  done
  echo "-- device-mapper tables:" >&2
  dmsetup table 2>&1 | sed 's/^/    /' >&2 || true
  echo "-- tasks in uninterruptible sleep:" >&2
  ps -eo pid,stat,wchan:32,args | awk 'NR == 1 || $2 ~ /^D/' | sed 's/^/    /' >&2 || true
  exit_with "$rc" || on_error
}
exit_with() { return "$1"; }
trap on_failure ERR

cleanup() {
  local n
  touch "$WORK/stop" 2>/dev/null || true
  for n in alpha beta; do
    [ -e "$NODES_DIR/$n.mnt" ] && timeout 20 nsenter --mount="$NODES_DIR/$n.mnt" umount "$DATA" 2>/dev/null || true
  done
  nodes_down
  # The daemons' logs, kept with $WORK when the run fails (RDBD_VM_KEEP=1 keeps it anyway).
  cp "$NODES_DIR"/*.run/rdbd/r0.*.log "$WORK/" 2>/dev/null || true
}
trap cleanup EXIT

# Each node's disk: /dev/mapper/disk-NODE, a linear table over a loop device on a sparse file
# in a tmpfs of the guest (reading $WORK, 9p under emulation, ran at 9 MiB/s: each verify took
# 45 s; the files hold only what was written).
DISKS=/run/vm-disks
disk_create() {
  local node=$1 loop
  loop=$(losetup --find --show "$DISKS/$node.img")
  echo "$loop" > "$WORK/$node.loop"
  dmsetup create "disk-$node" --table "0 $(blockdev --getsz "$loop") linear $loop 0"
  echo "    /dev/mapper/disk-$node: linear over $loop"
}
# disk_table NODE TABLE: swaps the live table of NODE's disk (in-flight I/O completes first).
disk_table() {
  dmsetup suspend "disk-$1"
  dmsetup load "disk-$1" <<< "$2"
  dmsetup resume "disk-$1"
  dmsetup table "disk-$1" | sed "s/^/    disk-$1: /"
}
# Every I/O of NODE's disk fails from now on; and the repair: the same loop device again.
disk_fail() { disk_table "$1" "0 $(blockdev --getsz "$(cat "$WORK/$1.loop")") error"; }
disk_repair() {
  local loop
  loop=$(cat "$WORK/$1.loop")
  disk_table "$1" "0 $(blockdev --getsz "$loop") linear $loop 0"
}

# writer NODE PREFIX COUNT: files of 128 KiB written on NODE's file system with fsync, at most
# COUNT or until $WORK/stop exists; a name goes to $WORK/acked only once its fsync returned.
# The first failure ends it with status 1 and its reason in $WORK/writer.err.
mkdir -p "$WORK/src"
: > "$WORK/acked"
writer() {
  local node=$1 prefix=$2 i out
  for i in $(seq "$3"); do
    [ ! -e "$WORK/stop" ] || return 0
    head -c 128K /dev/urandom > "$WORK/src/$prefix$i"
    if ! out=$(on "$node" dd if="$WORK/src/$prefix$i" of="$DATA/$prefix$i" bs=128K conv=fsync status=none 2>&1); then
      echo "writer: $prefix$i on $node failed after $(acked_count) acknowledged files: $out" | tee -a "$WORK/writer.err" >&2
      return 1
    fi
    echo "$prefix$i" >> "$WORK/acked"
  done
}
writer_start() {
  rm -f "$WORK/stop"
  writer "$@" &
  writer_pid=$!
}
# Stops the writer; fails if it had failed.
writer_stop() {
  touch "$WORK/stop"
  echo "+ stop the writer"
  wait "$writer_pid" # (not through run: a pipeline is no parent of it)
  echo "    $(acked_count) files acknowledged"
}
acked_count() { wc -l < "$WORK/acked"; }
# wait_acked N [SECONDS]: until N more files than now are acknowledged; fails at once if the
# writer failed.
wait_acked() {
  local limit=${2:-60}
  local target=$(($(acked_count) + $1)) deadline=$((SECONDS + limit))
  while [ "$(acked_count)" -lt "$target" ]; do
    if ! kill -0 "$writer_pid" 2>/dev/null; then
      echo "the writer ended with $(acked_count) files acknowledged, fewer than $target" >&2
      return 1
    fi
    [ "$SECONDS" -lt "$deadline" ] || { echo "fewer than $target files acknowledged after $limit s (the writer hangs)" >&2; return 1; }
    sleep 0.2
  done
}
# check_files NODE: every acknowledged file reads back as written from NODE's file system, read
# from the device (the page cache dropped first).
check_files() {
  sync
  echo 3 > /proc/sys/vm/drop_caches
  echo "+ compare $(acked_count) acknowledged files on $1"
  # shellcheck disable=SC2016
  on "$1" bash -c 'bad=0
    while read -r f; do cmp -s "$0/src/$f" "$1/$f" || { echo "    $f differs or is missing" >&2; bad=1; }; done < "$0/acked"
    exit "$bad"' "$WORK" "$DATA"
  echo "    all $(acked_count) acknowledged files intact"
}

# refused NODE PATTERN VERB [ARGS]: the verb fails with one line matching PATTERN.
refused() {
  local node=$1 pattern=$2 out
  shift 2
  echo "+ rdbd $1 r0 --node $node ${*:2} (must be refused)"
  if out=$(rdbd "$1" "$node" "${@:2}" 2>&1); then
    echo "    $1 succeeded on $node: $out" >&2
    return 1
  fi
  echo "    refused: $out"
  [ "$(wc -l <<< "$out")" = 1 ] || { echo "    not one line" >&2; return 1; }
  grep -Eq -- "$pattern" <<< "$out" || { echo "    does not match /$pattern/" >&2; return 1; }
}

# expect_diskless NODE: Diskless after an I/O error, with it in the status.
expect_diskless() {
  local node=$1 err
  wait_for "$node" "['disk']" Diskless 60
  err=$(status_field "$node" "['disk_error']")
  echo "    $node: disk_error: $err"
  grep -q "local disk .* failed" <<< "$err"
  rdbd status "$node" | grep -q "disk:Diskless (local disk"
}

# resync_and_verify NODE PEER [WHAT]: after `attach` on NODE, the resync from PEER; verify from
# PEER finds nothing out of sync (else WHAT, if given, says what the resync missed).
resync_and_verify() {
  local node=$1 peer=$2 oos
  wait_for "$node" "['connection']" Connected 60
  run rdbd wait-sync "$node" --timeout 180s
  for n in "$node" "$peer"; do
    run test "$(status_field "$n" "['disk']")" = UpToDate
    run test "$(status_field "$n" "['replication']")" = Established
  done
  echo "    $node resynced $(resynced_mib "$node") MiB of $DISK_SIZE"
  run rdbd verify "$peer"
  oos=$(status_field "$peer" "['last_verify']['out_of_sync_blocks']")
  if [ "$oos" != 0 ]; then
    echo "    verify found $oos blocks out of sync after the resync${3:+: $3}" >&2
    return 1
  fi
}

cd "$WORK"
mkdir -p "$RDBD_CONFIG_DIR"

step "kernel $(uname -r): modules; nodes alpha ($ALPHA, /dev/nbd0) and beta ($BETA, /dev/nbd1) on bridge br0"
nodes_pair_up "$ALPHA" "$BETA"
run modprobe -a loop dm-mod
for n in alpha beta; do on "$n" mkdir -p "$DATA"; done

step "disks: dm linear over a loop device each ($DISK_SIZE)"
mkdir -p "$DISKS"
mount -t tmpfs -o size=1G vm-disks "$DISKS"
truncate -s "$DISK_SIZE" "$DISKS/alpha.img" "$DISKS/beta.img"
for n in alpha beta; do run disk_create "$n"; done

step "r0: create-md and up on both nodes; blank disks: new-current-uuid --clear-bitmap, primary on alpha"
cat > "$RDBD_CONFIG_DIR/r0.toml" <<EOF
[net]
shared-secret = "vm-test"
connect-interval = "500ms"
ping-interval = "1s"
ping-timeout = "1500ms"
timeout = "4s"
# Digests for verify: crc32c is enough to compare replicas, and cheap under emulation.
verify-alg = "crc32c"
# A disk attached again after a failure is resynced in full: with checksums only the blocks that
# differ are sent and written (the disks live in a tmpfs of this 1 GiB guest, and a full copy of
# their sparse zeroes would fill it).
csums-alg = "crc32c"

[disk]
on-io-error = "detach"

[[node]]
name = "alpha"
address = "$ALPHA:7789"
disk = "/dev/mapper/disk-alpha"
nbd-device = "/dev/nbd0"

[[node]]
name = "beta"
address = "$BETA:7789"
disk = "/dev/mapper/disk-beta"
nbd-device = "/dev/nbd1"
EOF
for n in alpha beta; do run rdbd create-md "$n"; done
for n in alpha beta; do run rdbd up "$n"; done
wait_for alpha "['connection']" Connected
wait_for alpha "['peer']['disk']" Inconsistent
# Both disks are zeroes (sparse files): identical, no initial sync needed; the final cmp and
# each verify compare the whole data areas anyway.
run rdbd new-current-uuid alpha --clear-bitmap
run rdbd wait-sync alpha --timeout 60s
run rdbd primary alpha
run test -e /sys/block/nbd0/pid

step "alpha: XFS on /dev/nbd0, mounted at $DATA"
run on alpha mkfs.xfs -q -K /dev/nbd0 # -K: no discard of the whole device, slow here
run on alpha mount -t xfs /dev/nbd0 "$DATA"
# A cold file (case 3 fails a region of it); 16 MiB in one extent on a fresh file system.
run dd if=/dev/urandom of="$WORK/src/cold" bs=1M count=16 status=none
run on alpha dd if="$WORK/src/cold" of="$DATA/cold" bs=1M conv=fsync status=none
echo cold >> "$WORK/acked"

step "1. beta's disk fails (dm error table) while alpha's writer fsyncs files"
writer_start alpha a 1000
wait_acked 5
run disk_fail beta
expect_diskless beta
wait_for alpha "['peer']['disk']" Diskless 60
echo "    beta Diskless with $(acked_count) files acknowledged"
run test "$(status_field alpha "['role']")" = Primary
run test "$(status_field alpha "['disk']")" = UpToDate
run rdbd status alpha

step "alpha's file system stays writable: more fsyncs succeed"
wait_acked 10
run on alpha mountpoint -q "$DATA"
writer_stop
check_files alpha

step "beta, Diskless, is never promoted"
refused beta "Diskless" primary
refused beta "Diskless" primary --force
run test "$(status_field beta "['role']")" = Secondary

step "beta's disk repaired (linear again), attach; resync; verify finds 0 blocks out of sync"
run disk_repair beta
run test "$(status_field beta "['disk']")" = Diskless # a working disk again, but not attached
run rdbd attach beta
resync_and_verify beta alpha
check_files alpha

step "unmount; xfs_repair -n finds the file system clean"
run on alpha umount "$DATA"
run_brief xfs-repair-1 'Phase 7|corrupt|error' on alpha xfs_repair -n /dev/nbd0

step "2. alpha's (the Primary's) disk fails while its writer fsyncs files"
run on alpha mount -t xfs /dev/nbd0 "$DATA"
writer_start alpha b 1000
wait_acked 5
run disk_fail alpha
expect_diskless alpha
echo "    alpha Diskless with $(acked_count) files acknowledged"
run test "$(status_field alpha "['role']")" = Primary
run test "$(status_field alpha "['peer']['disk']")" = UpToDate
wait_for beta "['peer']['disk']" Diskless 60
run rdbd status alpha

step "alpha serves through beta: more fsyncs succeed, files read back from the device"
wait_acked 10
run on alpha mountpoint -q "$DATA"
writer_stop
check_files alpha
run test "$(status_field alpha "['disk']")" = Diskless
run test "$(status_field alpha "['role']")" = Primary

step "attach is refused on a Primary"
refused alpha "Primary" attach

step "unmount; xfs_repair -n through alpha's /dev/nbd0 (its peer's disk) finds it clean"
run on alpha umount "$DATA"
run_brief xfs-repair-2 'Phase 7|corrupt|error' on alpha xfs_repair -n /dev/nbd0

step "switch over: alpha secondary, beta primary, mount on /dev/nbd1: the same files"
run rdbd secondary alpha
for _ in $(seq 50); do [ ! -e /sys/block/nbd0/pid ] && break; sleep 0.1; done
run test ! -e /sys/block/nbd0/pid
refused alpha "Diskless" primary
run rdbd primary beta
run test -e /sys/block/nbd1/pid
run on beta mount -t xfs /dev/nbd1 "$DATA"
check_files beta

step "alpha's disk repaired, attach; resync from beta; verify finds 0 blocks out of sync"
run disk_repair alpha
run test "$(status_field alpha "['disk']")" = Diskless
run rdbd attach alpha
resync_and_verify alpha beta
check_files beta

step "3. a bad region on beta's (the Primary's) disk, in a cold file: reading it fails, alpha answers"
# A 1 MiB window at a 4 MiB boundary inside $DATA/cold: an activity-log extent that holds nothing
# else and that nobody wrote since before case 1, so that neither node's log nor bitmap covers it.
read -r first last < <(on beta xfs_io -r -c fiemap "$DATA/cold" | awk '$1 == "0:" { split($3, r, /\.\./); print r[1], r[2] }')
bad=$(((first + 8191) / 8192 * 8192)) bad_len=2048 # in sectors
echo "    $DATA/cold: first extent at sectors $first..$last; bad region at sectors $bad..$((bad + bad_len - 1))"
run test "$((bad + bad_len))" -le "$((last + 1))"
writer_start beta c 1000
wait_acked 3
loop=$(cat "$WORK/beta.loop")
sectors=$(blockdev --getsz "$loop")
run disk_table beta "0 $bad linear $loop 0
$bad $bad_len error
$((bad + bad_len)) $((sectors - bad - bad_len)) linear $loop $((bad + bad_len))"
sync
echo 3 > /proc/sys/vm/drop_caches
run on beta cmp "$WORK/src/cold" "$DATA/cold"
expect_diskless beta
offset=$(grep -Eo "read at offset 0x[0-9a-f]+" <<< "$(status_field beta "['disk_error']")" | awk '{print $4}')
run test -n "$offset"
# (a read of the file that reaches into the region: it may start before it)
run test "$((offset))" -ge "$((first * 512))" -a "$((offset))" -lt "$(((bad + bad_len) * 512))"
run test "$(status_field beta "['role']")" = Primary
wait_for alpha "['peer']['disk']" Diskless 60
wait_acked 10
writer_stop
check_files beta

step "switch over to alpha; beta's disk repaired and attached; the resync covers the failed read; verify finds 0"
run on beta umount "$DATA"
run rdbd secondary beta
run rdbd primary alpha
run on alpha mount -t xfs /dev/nbd0 "$DATA"
check_files alpha
# What the bad region held is lost: the drive that remaps it reads zeroes there once repaired.
# Only a resync that covers the failed read restores it (DRBD marks a failed read out of sync).
run dd if=/dev/zero of="$loop" bs=512 seek="$bad" count="$bad_len" oflag=direct status=none
run disk_repair beta
echo 3 > /proc/sys/vm/drop_caches
run rdbd attach beta
resync_and_verify beta alpha "the bad region at $(printf %#x $((bad * 512))) ($((bad_len / 2)) KiB), whose read failed and \
whose data the repair lost, was not resynced: the failed read was not marked out of sync"
check_files alpha

step "tear down; xfs_repair -n clean; the data areas of both disks are byte-identical"
run on alpha umount "$DATA"
run_brief xfs-repair-3 'Phase 7|corrupt|error' on alpha xfs_repair -n /dev/nbd0
run rdbd secondary alpha
data=$(rdbd show-md alpha | awk '/^data-size/ {print $2}')
for n in alpha beta; do run rdbd down "$n"; done
sync
echo 3 > /proc/sys/vm/drop_caches
run cmp -n "$data" /dev/mapper/disk-alpha /dev/mapper/disk-beta
if grep -h "panicked" $LOGS 2> /dev/null; then
  echo "    a daemon panicked" >&2
  false
fi

step "disk failure passed"
