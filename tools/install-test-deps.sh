#!/usr/bin/env bash
# Installs what the test suite and benchmarks need, from Debian's packages (idempotent).
# Run as root, or with sudo available.
set -euo pipefail

PACKAGES=(
  fio            # fio with the nbd ioengine (built against libnbd)
  libnbd-bin     # nbdinfo, nbdcopy, nbdsh, nbdfuse
  python3-libnbd # libnbd from Python (for /usr/bin/python3 scripts)
  nbdkit         # peer server for benchmarks and differential checks
  qemu-utils     # qemu-img, qemu-io, qemu-nbd
  xfsprogs       # mkfs.xfs
  fuse3          # fusermount3
  util-linux     # losetup, mount
  iproute2       # ss -K: cutting a replication link under the nodes; ip netns for the HA tests
  resource-agents # ocf-tester and ocf-shellfuncs, for the Pacemaker agent (tools/ocf/rdbd)
  libxml2-utils  # xmllint: ocf-tester checks the agent's meta-data with it
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# qemu-utils may be present as a newer build that dpkg knows under the same name; the binaries
# are what matter.
if [[ " ${missing[*]} " == *" qemu-utils "* ]] && command -v qemu-io >/dev/null && command -v qemu-img >/dev/null; then
  missing=("${missing[@]/qemu-utils}")
fi
read -r -a missing <<< "${missing[*]}"

if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The VM test bed (tests/vm_smoke.rs): Debian's kernel with nbd, dm-mod, xfs and nfsd under
# software emulation, since the host kernel has none of them. RDBD_VM=0 leaves it out.
if [ "${RDBD_VM:-1}" != 0 ]; then
  bash "$(dirname "$0")/vm/install.sh"
fi
echo "test dependencies present"
