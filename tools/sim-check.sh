#!/usr/bin/env bash
# The simulator's CI tier: SIM_SEEDS seeds (default 20,000) of the whole-cluster simulation must
# break no invariant, and every bug `rdbd-sim bugs` lists, once planted, must be found within
# 10,000 seeds — a simulator that finds nothing is only proof when it can find these.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet --bin rdbd-sim
sim=target/release/rdbd-sim

"$sim" run --seeds "${SIM_SEEDS:-20000}"

for bug in $("$sim" bugs | awk '{print $1}'); do
  if out=$("$sim" run --seeds 10000 --inject-bug "$bug" --first); then
    echo "planted bug '$bug' was not found in 10,000 seeds:"
    echo "$out"
    exit 1
  fi
  echo "planted bug '$bug' found: $(echo "$out" | head -1)"
done
