#!/usr/bin/env bash
# The project's checks, in tiers:
#   tools/test.sh fast      unit, proptest and simulator tests, and the integration tests that
#                           need no daemon, tool or root: seconds after a build, nothing installed
#   tools/test.sh process   integration tests that start rdbd daemons and real NBD clients on this
#                           machine (loopback; those that need root or a tool skip without it)
#   tools/test.sh vm        the VM test bed (tests/vm_*.rs) and the network-namespace tests
#   tools/test.sh           what CI runs (.ci/run): installs the test dependencies, then fmt,
#                           clippy, every tier with missing tools as failures, doc tests and
#                           examples, the simulator's long tier and a short fuzz run
# Arguments after the tier go to `cargo test` (e.g. `tools/test.sh process -- --nocapture`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Every integration test file (tests/NAME.rs) is in exactly one tier; check_tiers enforces it.
FAST_TESTS=(simulator config_cli metadata_cli durability replication_core scripted_peer)
PROCESS_TESTS=(smoke bad_input clients nbdsh cluster events failover resync split_brain witness
  ocf_agent disk_errors power_loss block_device xfs_over_nbdfuse promotion)
VM_TESTS=(vm_smoke vm_kernel_attach vm_nfs_failover vm_ha_failover vm_disk_failure ha_partitions)

check_tiers() {
  local listed bad=0 f name n
  listed=$(printf '%s\n' "${FAST_TESTS[@]}" "${PROCESS_TESTS[@]}" "${VM_TESTS[@]}")
  for f in tests/*.rs tests/*/main.rs; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .rs)
    [ "$name" = main ] && name=$(basename "$(dirname "$f")")
    n=$(grep -cx "$name" <<< "$listed" || true)
    if [ "$n" -ne 1 ]; then
      echo "tools/test.sh: $f is in $n tiers: list it in exactly one (FAST_TESTS, PROCESS_TESTS, VM_TESTS)" >&2
      bad=1
    fi
  done
  for name in $listed; do
    if [ ! -e "tests/$name.rs" ] && [ ! -e "tests/$name/main.rs" ]; then
      echo "tools/test.sh: tier lists name $name, but there is no tests/$name.rs" >&2
      bad=1
    fi
  done
  [ "$bad" = 0 ] || exit 1
}

# `cargo test` of the named integration test files.
run_tests() {
  local tier=$1 args=() name
  shift
  for name in "$@"; do args+=(--test "$name"); done
  echo "== $tier tier: cargo test ${args[*]}"
  cargo test "${args[@]}" "${EXTRA[@]}"
}

fast() {
  echo "== fast tier: unit tests (every crate)"
  cargo test --workspace --lib --bins "${EXTRA[@]}"
  run_tests fast "${FAST_TESTS[@]}"
}

check_tiers
tier="${1:-ci}"
[ $# -gt 0 ] && shift
EXTRA=("$@")
case "$tier" in
  fast) fast ;;
  process) run_tests process "${PROCESS_TESTS[@]}" ;;
  vm) run_tests vm "${VM_TESTS[@]}" ;;
  ci)
    bash tools/install-test-deps.sh

    echo "== cargo fmt --check"
    cargo fmt --all -- --check

    echo "== cargo clippy"
    cargo clippy --workspace --all-targets --quiet -- -D warnings

    # Missing test tools are failures here, not skips.
    export RDBD_REQUIRE_TOOLS=1
    fast
    run_tests process "${PROCESS_TESTS[@]}"
    run_tests vm "${VM_TESTS[@]}"
    # The rest of what `cargo test --workspace` covers: doc tests, and examples that build.
    echo "== doc tests, examples"
    cargo test --workspace --doc
    cargo build --workspace --examples --quiet

    echo "== simulator"
    bash tools/sim-check.sh

    if [ -x tools/fuzz-smoke.sh ]; then
      echo "== fuzz smoke"
      FUZZ_SECONDS="${FUZZ_SECONDS:-15}" bash tools/fuzz-smoke.sh
    fi
    echo "== all checks passed"
    ;;
  *)
    echo "usage: tools/test.sh [fast|process|vm] [cargo test arguments]" >&2
    exit 2
    ;;
esac
