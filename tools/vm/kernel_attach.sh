#!/usr/bin/env bash
# rdbd's own kernel attach, run inside the VM by `tools/vm/run.sh tools/vm/kernel_attach.sh`:
# a two-node resource on this VM's loopback (alpha with nbd-device /dev/nbd0, beta /dev/nbd1),
# `primary` gives alpha /dev/nbd0 (fio with libaio and O_DIRECT on it, a checksummed pass), XFS
# on it, `secondary` is refused while it is mounted
# (naming the mount); alpha's daemon SIGKILLed under the mounted file system is replaced by a
# new one that takes the device back (the writes made meanwhile complete); `secondary` takes the
# device away once unmounted, and beta, promoted, shows the same files on /dev/nbd1; last, alpha
# attaches with the ioctl interface (the fallback where the netlink family is missing).
set -Eeuo pipefail

# shellcheck source=tools/vm/lib.sh
source "$(dirname "$0")/lib.sh"
# Control sockets cannot live on the 9p-shared work directory: the guest's own /run holds them.
mkdir -p /run/rdbd
export RDBD_CONFIG_DIR="$WORK/etc" RDBD_RUN_DIR=/run/rdbd
LOGS="$RDBD_RUN_DIR/r0.alpha.log $RDBD_RUN_DIR/r0.beta.log"
MNT="$WORK/mnt"
trap on_error ERR
cleanup() {
  mountpoint -q "$MNT" 2>/dev/null && umount "$MNT" || true
  for n in alpha beta; do "$RDBD" down r0 --node "$n" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

rdbd() { "$RDBD" "$1" r0 --node "$2" "${@:3}"; }
status_field() { "$RDBD" status r0 --node "$1" --json | /usr/bin/python3 -c "import json,sys; print(json.load(sys.stdin)$2)"; }
wait_for() { # NODE PY-EXPR VALUE: poll status until the field has the value (20 s)
  for _ in $(seq 200); do
    [ "$(status_field "$1" "$2" 2>/dev/null)" = "$3" ] && return 0
    sleep 0.1
  done
  echo "$1: status$2 is not $3 after 20 s" >&2
  return 1
}

cd "$WORK"
step "kernel $(uname -r): modprobe nbd"
run modprobe nbd nbds_max=4
for _ in $(seq 50); do [ -b /dev/nbd1 ] && break; sleep 0.1; done

step "resource r0: alpha (nbd-device /dev/nbd0) and beta (/dev/nbd1) on loopback, 512M disks"
mkdir -p "$RDBD_CONFIG_DIR" "$RDBD_RUN_DIR" "$MNT"
cat > "$RDBD_CONFIG_DIR/r0.toml" <<EOF
[net]
shared-secret = "vm-test"
connect-interval = "500ms"

[[node]]
name = "alpha"
address = "127.0.0.1:7789"
disk = "$WORK/alpha.img"
nbd-device = "/dev/nbd0"

[[node]]
name = "beta"
address = "127.0.0.1:7790"
disk = "$WORK/beta.img"
nbd-device = "/dev/nbd1"
EOF
truncate -s 512M "$WORK/alpha.img" "$WORK/beta.img"
for n in alpha beta; do run rdbd create-md "$n"; done
for n in alpha beta; do run rdbd up "$n"; done
wait_for alpha "['connection']" Connected
run test ! -e /sys/block/nbd0/pid # a Secondary has no device

step "primary --force on alpha: /dev/nbd0 appears; initial sync"
run rdbd primary alpha --force
run rdbd wait-sync alpha --timeout 120s
run test "$(status_field alpha "['nbd_device']")" = /dev/nbd0
run test -e /sys/block/nbd0/pid
size=$(blockdev --getsize64 /dev/nbd0)
data=$(rdbd show-md alpha | awk '/^data-size/ {print $2}')
echo "    /dev/nbd0: $size bytes (data area $data)"
run test "$size" -eq "$data"
run test ! -e /sys/block/nbd1/pid

step "fio on /dev/nbd0: 4k random writes, libaio, O_DIRECT, then a checksummed write/verify pass"
echo "    (figures under software emulation are no performance figures: this checks it runs)"
fio_summary='err=|IOPS=|^fio:'
run_brief fio-randwrite "$fio_summary" fio --name=attach --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
  --iodepth=16 --size=64M --runtime=5 --time_based=1 --filename=/dev/nbd0
run_brief fio-verify "$fio_summary" fio --name=attach-verify --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
  --iodepth=16 --size=8M --offset=128M --verify=crc32c --do_verify=1 --filename=/dev/nbd0

step "mkfs.xfs on /dev/nbd0, mount, write files, fsync"
run mkfs.xfs -f -q /dev/nbd0
run mount -t xfs /dev/nbd0 "$MNT"
run dd if=/dev/urandom of="$MNT/data" bs=1M count=32 conv=fsync status=none
sum=$(sha256sum < "$MNT/data")
run sync

step "secondary is refused while /dev/nbd0 is mounted, naming the mount"
if out=$(rdbd secondary alpha 2>&1); then
  echo "    secondary succeeded with /dev/nbd0 mounted: $out" >&2
  false
fi
echo "    refused: $out"
run grep -q "mounted at $MNT" <<< "$out"

step "SIGKILL of alpha's daemon with the file system mounted; a new daemon takes /dev/nbd0 back"
pid=$(status_field alpha "['pid']")
run kill -9 "$pid"
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
# Written while no daemon serves the device: the kernel holds the I/O (dead-connection timeout).
dd if=/dev/urandom of="$MNT/during" bs=1M count=8 conv=fsync status=none &
writer=$!
sleep 1
run rdbd up alpha
run rdbd primary alpha
echo "+ wait for the writer"; wait "$writer" # (not through run: a pipeline is no parent of it)
run test -e /sys/block/nbd0/pid
run test "$(status_field alpha "['nbd_device']")" = /dev/nbd0
during=$(sha256sum < "$MNT/during")
echo 3 > /proc/sys/vm/drop_caches
run test "$(sha256sum < "$MNT/data")" = "$sum"
run rdbd wait-sync alpha --timeout 120s

step "unmount; the file system is clean; secondary takes /dev/nbd0 away"
run umount "$MNT"
run xfs_repair -n /dev/nbd0
run rdbd secondary alpha
for _ in $(seq 50); do [ ! -e /sys/block/nbd0/pid ] && break; sleep 0.1; done
run test ! -e /sys/block/nbd0/pid

step "primary on beta: /dev/nbd1 holds the same file system and data"
run rdbd primary beta
run test -e /sys/block/nbd1/pid
run mount -t xfs /dev/nbd1 "$MNT"
run test "$(sha256sum < "$MNT/data")" = "$sum"
run test "$(sha256sum < "$MNT/during")" = "$during"
run umount "$MNT"
run rdbd secondary beta

step "the ioctl interface (RDBD_NBD_NETLINK=0, as nbd-client -nonetlink): alpha attaches /dev/nbd0 with it"
run rdbd down alpha
RDBD_NBD_NETLINK=0 run rdbd up alpha
wait_for alpha "['connection']" Connected
run rdbd wait-sync alpha --timeout 120s
run rdbd primary alpha
run grep -q 'kernel device attached device=/dev/nbd0 interface="ioctl"' "$RDBD_RUN_DIR/r0.alpha.log"
run test -e /sys/block/nbd0/pid
run mount -t xfs /dev/nbd0 "$MNT"
run test "$(sha256sum < "$MNT/data")" = "$sum"
run dd if=/dev/urandom of="$MNT/ioctl" bs=1M count=4 conv=fsync status=none
run umount "$MNT"
run rdbd secondary alpha
for _ in $(seq 50); do [ ! -e /sys/block/nbd0/pid ] && break; sleep 0.1; done
run test ! -e /sys/block/nbd0/pid
for n in alpha beta; do run rdbd down "$n"; done
run test ! -e /sys/block/nbd1/pid

step "kernel attach passed"
