#!/usr/bin/env bash
# Installs what tools/vm/run.sh needs to boot a VM under software emulation with Debian's kernel
# and the host's userland (idempotent). The host kernel lacks nbd, device-mapper and nfsd; the VM
# has them. Everything VM-specific lives in $RDBD_VM_CACHE (default /var/lib/rdbd-vm): the
# host's /boot, /lib/modules and its qemu-utils stay untouched. Not under /var/cache or /var/tmp:
# the guest mounts tmpfs over those, and it must see the kernel's modules at the host's path.
set -euo pipefail

CACHE="${RDBD_VM_CACHE:-/var/lib/rdbd-vm}"
VIRTME_NG_VERSION="1.42" # pinned: run.sh relies on how it finds a kernel's modules

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "vm: installing ${missing[*]}"
  if [ -z "${APT_UPDATED:-}" ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# What the guest boots with (virtme-ng's initramfs is made of busybox, kmod and cpio; `file`
# tells it the kernel version) and what the scenarios use inside (the guest sees the host's /).
# udev: virtme-ng-init needs it to name the virtio serial ports that carry the script's stdout,
# stderr and exit status; without it the output goes to the console and the status is lost.
# Later steps: nbd-client, LVM and the kernel NFS server; arping (announcing the service address)
# and fuser (the mount service stops the users of a mount) for the HA supervisor.
apt_install kmod busybox-static cpio file udev python3-venv \
  nbd-client lvm2 xfsprogs fio nfs-kernel-server nfs-common rpcbind iputils-arping psmisc

# qemu-system-x86: Debian 12's package depends on qemu-system-common 7.2, which the machine's
# newer qemu-utils (a backport, not re-installable from Debian 12's archive) Breaks, so
# `apt-get install qemu-system-x86` would remove it. The firmware and data packages and the
# libraries install cleanly; the two conflicting packages are unpacked into the cache instead.
QEMU="$CACHE/qemu/usr/bin/qemu-system-x86_64"
qemu_deps() {
  apt-cache depends --no-recommends --no-suggests "$@" |
    sed -n 's/^ *|\{0,1\}Depends: \([^<].*\)$/\1/p' | grep -v -x -e qemu-system-common -e qemu-system-x86 | sort -u
}
if [ -z "${APT_UPDATED:-}" ] && ! apt-cache show qemu-system-x86 >/dev/null 2>&1; then
  $SUDO apt-get update -qq; APT_UPDATED=1
fi
mapfile -t deps < <(qemu_deps qemu-system-x86 qemu-system-common)
apt_install "${deps[@]}"

$SUDO mkdir -p "$CACHE/debs"
# apt-get download runs as _apt when it can write the directory (otherwise it warns).
if id _apt >/dev/null 2>&1; then $SUDO chown _apt "$CACHE/debs"; fi

fetch_deb() { # PACKAGE -> path of its .deb in the cache
  local f
  f=$(find "$CACHE/debs" -maxdepth 1 -name "$1_*.deb" | sort | tail -n1)
  if [ -z "$f" ]; then
    (cd "$CACHE/debs" && $SUDO apt-get download -qq "$1")
    f=$(find "$CACHE/debs" -maxdepth 1 -name "$1_*.deb" | sort | tail -n1)
  fi
  echo "$f"
}

if [ ! -x "$QEMU" ]; then
  echo "vm: unpacking qemu-system-x86 into $CACHE/qemu"
  tmp="$CACHE/qemu.tmp"
  $SUDO rm -rf "$tmp"
  $SUDO mkdir -p "$tmp"
  for p in qemu-system-x86 qemu-system-common; do $SUDO dpkg-deb -x "$(fetch_deb "$p")" "$tmp"; done
  $SUDO rm -rf "$CACHE/qemu"
  $SUDO mv "$tmp" "$CACHE/qemu"
fi
if ldd "$QEMU" | grep -q 'not found'; then
  echo "vm: $QEMU misses libraries:" >&2
  ldd "$QEMU" | grep 'not found' >&2
  exit 1
fi

# The kernel: the one Debian's linux-image-amd64 names, unpacked (not installed) into the cache.
# virtme-ng finds the modules from the image's path (KERNEL/boot/vmlinuz-V -> KERNEL/lib/modules/V).
kpkg="${RDBD_VM_KERNEL_PACKAGE:-$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1)}"
[ -n "$kpkg" ] || { echo "vm: cannot tell which kernel linux-image-amd64 names" >&2; exit 1; }
kver="${kpkg#linux-image-}"
KERNEL="$CACHE/kernel"
if [ ! -f "$KERNEL/boot/vmlinuz-$kver" ] || [ ! -f "$KERNEL/lib/modules/$kver/modules.dep" ]; then
  echo "vm: unpacking $kpkg into $KERNEL"
  $SUDO mkdir -p "$KERNEL"
  $SUDO dpkg-deb -x "$(fetch_deb "$kpkg")" "$KERNEL"
  $SUDO depmod -b "$KERNEL" "$kver"
fi
echo "$kver" | $SUDO tee "$CACHE/kernel-version" >/dev/null

# virtme-ng from PyPI, in a venv on Debian's python: python3 on PATH may be pyenv's, which can
# change under us, and Debian's own python is externally managed (no --break-system-packages
# needed this way). The venv sits in the cache with the kernel.
VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/vng" ] || [ "$("$VENV/bin/vng" --version 2>/dev/null)" != "virtme-ng $VIRTME_NG_VERSION" ]; then
  echo "vm: installing virtme-ng $VIRTME_NG_VERSION into $VENV"
  $SUDO rm -rf "$VENV" # a venv does not survive a move or a python upgrade: start afresh
  $SUDO /usr/bin/python3 -m venv "$VENV"
  $SUDO "$VENV/bin/pip" install -q --disable-pip-version-check "virtme-ng==$VIRTME_NG_VERSION"
fi

echo "vm: ready (kernel $kver, $("$QEMU" --version | head -n1), $("$VENV/bin/vng" --version))"
