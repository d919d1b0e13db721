#!/usr/bin/env bash
# tools/vm/run.sh SCRIPT [ARGS...]: boots a VM (software emulation, Debian's kernel from
# tools/vm/install.sh, the host's / read-only) and runs `bash SCRIPT ARGS` in it as root, bounded
# in time, its output streamed; exits with SCRIPT's status.
#
# Inside, the script finds:
#   RDBD   the rdbd binary: $RDBD_BIN, else the newer of target/release/rdbd and target/debug/rdbd
#   WORK   a writable directory (a host directory shared with the guest), removed afterwards
#          unless the run failed or RDBD_VM_KEEP=1
#   REPO   the repository (read-only); the script starts there
#
# Exit status: SCRIPT's; 77 when the VM cannot run here (not installed, not x86_64, or RDBD_VM=0),
# so a SCRIPT exits 77 only to mean "skip"; 124 when the time ran out (RDBD_VM_TIMEOUT seconds for
# the script, default 600, plus the boot); other codes from vng or qemu when the VM fails to boot.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${RDBD_VM_CACHE:-/var/lib/rdbd-vm}"
TIMEOUT="${RDBD_VM_TIMEOUT:-600}"
BOOT_ALLOWANCE=120 # boot and power-off under emulation take ~15 s; generous for a loaded host

skip() {
  echo "SKIP: cannot run the VM: $*" >&2
  exit 77
}

[ "$#" -ge 1 ] || { echo "usage: $0 SCRIPT [ARGS...]" >&2; exit 2; }
script="$(realpath "$1")"
shift
[ -f "$script" ] || { echo "vm: no such script: $script" >&2; exit 2; }

[ "${RDBD_VM:-1}" != 0 ] || skip "RDBD_VM=0"
[ "$(uname -m)" = x86_64 ] || skip "the VM needs an x86_64 host (this is $(uname -m))"
VNG="$CACHE/venv/bin/vng"
QEMU="$CACHE/qemu/usr/bin/qemu-system-x86_64"
[ -x "$VNG" ] || skip "virtme-ng is not installed ($VNG); run tools/vm/install.sh"
[ -x "$QEMU" ] || skip "qemu is not installed ($QEMU); run tools/vm/install.sh"
kver="$(cat "$CACHE/kernel-version" 2>/dev/null || true)"
KIMG="$CACHE/kernel/boot/vmlinuz-$kver"
[ -n "$kver" ] && [ -f "$KIMG" ] || skip "no kernel in $CACHE/kernel; run tools/vm/install.sh"

rdbd="${RDBD_BIN:-}"
if [ -z "$rdbd" ]; then
  for b in "$REPO/target/release/rdbd" "$REPO/target/debug/rdbd"; do
    if [ -x "$b" ] && { [ -z "$rdbd" ] || [ "$b" -nt "$rdbd" ]; }; then rdbd="$b"; fi
  done
fi
[ -n "$rdbd" ] && [ -x "$rdbd" ] || { echo "vm: no rdbd binary: cargo build first, or set RDBD_BIN" >&2; exit 2; }
rdbd="$(realpath "$rdbd")" # the guest sees the host's / at the same paths

# Not under /tmp, /var/tmp or /var/cache: the guest covers those with an overlay or a tmpfs.
workdir="${RDBD_VM_WORKDIR:-$CACHE/work}"
mkdir -p "$workdir" 2>/dev/null && [ -w "$workdir" ] || skip "cannot write $workdir (set RDBD_VM_WORKDIR)"
work="$(mktemp -d "$workdir/run.XXXXXX")"
chmod 755 "$work"

# The guest runs this entry script: environment, then the scenario under its own time bound.
{
  echo "set -euo pipefail"
  printf 'export RDBD=%q WORK=%q REPO=%q PATH=%q\n' "$rdbd" "$work" "$REPO" "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  echo 'echo "vm: guest up after $(cut -d" " -f1 /proc/uptime) s (its own clock)"'
  printf 'cd %q\n' "$REPO"
  printf 'exec timeout --kill-after=10 %q bash %q' "$TIMEOUT" "$script"
  printf ' %q' "$@"
  echo
} > "$work/.vm-entry.sh"

echo "vm: kernel $kver, rdbd $rdbd, work $work, script $(basename "$script") (timeout ${TIMEOUT}s)"
start=$(date +%s)
# --disable-kvm: /dev/kvm exists on these machines but KVM guests hang. --force-9p: virtiofsd is
# not installed. -L: the unpacked qemu looks for its firmware beside itself; point it at the
# Debian packages' directories. stdin from /dev/null and output through cat: qemu sets
# O_NONBLOCK on its stdio, which must not leak into a terminal or a pipe shared with the caller.
set +e
timeout --kill-after=10 $((TIMEOUT + BOOT_ALLOWANCE)) \
  env PATH="$CACHE/venv/bin:$PATH" "$VNG" \
  --run "$KIMG" --qemu "$QEMU" \
  --qemu-opts="-L /usr/share/qemu -L /usr/share/seabios -L /usr/lib/ipxe/qemu" \
  --disable-kvm --force-9p --cpus "${RDBD_VM_CPUS:-2}" --memory "${RDBD_VM_MEMORY:-1G}" \
  --user root --rwdir "$work" --cwd / \
  --exec "bash $work/.vm-entry.sh" \
  < /dev/null 2> >(cat >&2) | cat
rc=${PIPESTATUS[0]}
set -e
wait # for the stderr copier
echo "vm: exit status $rc after $(($(date +%s) - start)) s (boot included)"

if [ "$rc" -eq 0 ] && [ "${RDBD_VM_KEEP:-0}" != 1 ]; then
  rm -rf "$work"
else
  echo "vm: work directory kept: $work"
fi
exit "$rc"
