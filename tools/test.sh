#!/usr/bin/env bash
# The project's full check: installs the test dependencies, then runs formatting, lints, every
# test (unit, proptest, and integration tests against real NBD clients), and a short fuzz run.
# This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install-test-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== cargo test"
# Missing test tools are failures here, not skips.
RDBD_REQUIRE_TOOLS=1 cargo test --workspace

echo "== simulator"
bash tools/sim-check.sh

if [ -x tools/fuzz-smoke.sh ]; then
  echo "== fuzz smoke"
  FUZZ_SECONDS="${FUZZ_SECONDS:-15}" bash tools/fuzz-smoke.sh
fi
echo "== all checks passed"
