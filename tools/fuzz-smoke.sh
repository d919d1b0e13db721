#!/usr/bin/env bash
# A short fuzzing run of every cargo-fuzz target in protocol/fuzz: FUZZ_SECONDS each (default 20).
# Installs cargo-fuzz if it is missing. Exits non-zero if a target fails to build, panics, hangs
# on one input (> 10 s) or exceeds 2 GiB; the crashing input is left in
# protocol/fuzz/artifacts/TARGET/ (replay it with `cargo fuzz run -s none TARGET FILE`).
#
# Toolchains: cargo-fuzz normally wants nightly for AddressSanitizer (-Zsanitizer). The decoders
# are safe Rust, so by default this runs without a sanitizer (`-s none`), which works on a stable
# toolchain as is. FUZZ_SANITIZER=address turns ASan on; on a stable toolchain that needs
# RUSTC_BOOTSTRAP=1, which the script then sets. FUZZ_TOOLCHAIN=nightly uses `cargo +nightly`.
set -euo pipefail
cd "$(dirname "$0")/../protocol/fuzz"

seconds="${FUZZ_SECONDS:-20}"
sanitizer="${FUZZ_SANITIZER:-none}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

fuzz=(cargo)
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
  fuzz+=("+$FUZZ_TOOLCHAIN")
elif [ "$sanitizer" != "none" ] && ! rustc --version | grep -q nightly; then
  export RUSTC_BOOTSTRAP=1
fi
fuzz+=(fuzz)

targets=$("${fuzz[@]}" list)
[ -n "$targets" ] || { echo "no fuzz targets found" >&2; exit 1; }

failed=()
for target in $targets; do
  mkdir -p "corpus/$target"
  corpora=("corpus/$target")
  [ -d "seeds/$target" ] && corpora+=("seeds/$target")
  echo "== fuzz $target for ${seconds}s (sanitizer: $sanitizer)"
  if ! "${fuzz[@]}" run -s "$sanitizer" "$target" "${corpora[@]}" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
    failed+=("$target")
    echo "!! $target failed; crashing inputs: $(ls -d "artifacts/$target"/* 2>/dev/null | tr '\n' ' ')" >&2
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz smoke FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz smoke passed: $(echo $targets) (${seconds}s each)"
