#!/usr/bin/env bash
# Smoke scenario for the VM test bed, run inside it by `tools/vm/run.sh tools/vm/smoke.sh`:
# the kernel modules load, and rdbd serves a disk that the kernel's NBD client (/dev/nbd0 via
# Debian's nbd-client) carries an XFS on, and takes a short fio run on.
set -Eeuo pipefail # -E: the ERR trap also fires inside functions

PORT=10809
EXPORT=smoke
DEV=/dev/nbd0
MNT="$WORK/mnt"
# shellcheck source=tools/vm/lib.sh
source "$(dirname "$0")/lib.sh"
LOGS="$WORK/rdbd.log"
trap on_error ERR
cleanup() {
  mountpoint -q "$MNT" 2>/dev/null && umount "$MNT" || true
  [ -e /sys/block/nbd0/pid ] && nbd-client -d "$DEV" >/dev/null 2>&1 || true
  [ -n "$rdbd_pid" ] && kill "$rdbd_pid" 2>/dev/null || true
}
trap cleanup EXIT

cd "$WORK" # the repository is read-only in the guest; fio keeps its state files here
step "kernel $(uname -r): loading nbd, dm-mod, xfs, nfsd"
run modprobe nbd nbds_max=4
run modprobe dm-mod
run modprobe xfs
run modprobe nfsd
lsmod | grep -E '^(nbd|dm_mod|xfs|nfsd) ' | sed 's/^/    /'
# udev or devtmpfs creates the node shortly after the module loads.
for _ in $(seq 50); do [ -b "$DEV" ] && break; sleep 0.1; done
run test -b "$DEV"
run ls -l /dev/nbd0 /dev/nbd3 /dev/mapper/control

step "rdbd serve on $WORK/disk.img (512M) at 127.0.0.1:$PORT, export \"$EXPORT\""
RDBD_LOG=info "$RDBD" serve --file "$WORK/disk.img" --size 512M --listen "127.0.0.1:$PORT" \
  --export "$EXPORT" > "$WORK/rdbd.out" 2> "$WORK/rdbd.log" &
rdbd_pid=$!
for _ in $(seq 100); do
  grep -q "listening on nbd://" "$WORK/rdbd.out" && break
  kill -0 "$rdbd_pid" 2>/dev/null || break # it exited: the log says why
  sleep 0.1
done
run cat "$WORK/rdbd.out"
run grep -q "listening on nbd://" "$WORK/rdbd.out"

step "nbd-client attaches $DEV (kernel NBD client, netlink)"
run nbd-client 127.0.0.1 "$PORT" "$DEV" -N "$EXPORT"
size=$(blockdev --getsize64 "$DEV")
echo "    $DEV: $size bytes"
run test "$size" -eq $((512 << 20))

step "mkfs.xfs, mount, write, sync, unmount, mount again and read back"
run mkfs.xfs -f -q "$DEV"
mkdir -p "$MNT"
run mount -t xfs "$DEV" "$MNT"
run dd if=/dev/urandom of="$MNT/data" bs=1M count=16 status=none
sum=$(sha256sum < "$MNT/data")
run sync
run umount "$MNT"
run mount -t xfs "$DEV" "$MNT"
echo 3 > /proc/sys/vm/drop_caches # read from the device, not the page cache
run test "$(sha256sum < "$MNT/data")" = "$sum"
run df -h "$MNT"
run umount "$MNT"
# What the kernel wrote went through rdbd into the backing file: XFS's superblock is there.
run test "$(head -c 4 "$WORK/disk.img")" = XFSB

step "fio 4k random writes, libaio, O_DIRECT, 5 s on $DEV"
echo "    (figures under software emulation are no performance figures: this checks it runs)"
fio_summary='err=|IOPS=|^fio:'
run_brief fio-randwrite "$fio_summary" fio --name=smoke --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=64M \
  --runtime=5 --filename="$DEV"
# And what it writes reads back: fio checks a checksum in every block.
run_brief fio-verify "$fio_summary" fio --name=smoke-verify --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
  --size=8M --offset=256M --verify=crc32c --do_verify=1 --filename="$DEV"

step "nbd-client -d detaches $DEV; rdbd stops on SIGTERM"
run nbd-client -d "$DEV"
for _ in $(seq 50); do [ ! -e /sys/block/nbd0/pid ] && break; sleep 0.1; done
run test ! -e /sys/block/nbd0/pid
run kill -0 "$rdbd_pid"
kill -TERM "$rdbd_pid"
wait "$rdbd_pid"
rdbd_pid=""

step "smoke passed"
