# Shared by the scenarios that run inside the VM (sourced): timed steps, commands shown with
# their output, and a failure report naming the step with the daemons' logs and the kernel's.
# A scenario sets LOGS (files whose tails a failure shows) and calls `trap on_error ERR`.

# Only inside the VM, through run.sh: modprobe, mkfs and nbd-client -d are not for the
# developer's machine.
: "${RDBD:?run through tools/vm/run.sh}" "${WORK:?run through tools/vm/run.sh}"
grep -q virtme /proc/cmdline || { echo "$(basename "$0") runs inside the VM: tools/vm/run.sh $0" >&2; exit 2; }

t0=$EPOCHREALTIME
current="start"

elapsed() { awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $t0 }"; }
step() {
  current="$*"
  echo "== [$(elapsed) s] $*"
}
# Runs a command, its output indented; a failure is reported by the ERR trap with the step.
run() {
  echo "+ $*"
  "$@" 2>&1 | sed 's/^/    /'
}
# Same for a talkative command: its output goes to $WORK/NAME.log, and only the lines matching
# PATTERN are shown, unless it fails.
run_brief() {
  local name=$1 pattern=$2
  shift 2
  echo "+ $*"
  if ! "$@" > "$WORK/$name.log" 2>&1; then
    sed 's/^/    /' "$WORK/$name.log"
    return 1
  fi
  grep -E -- "$pattern" "$WORK/$name.log" | sed 's/^/    /'
}

rdbd_pid=""
on_error() {
  local rc=$?
  trap - ERR
  echo "!! FAILED (exit $rc) in step: $current" >&2
  # Warnings first and short: a long failure report may be cut in its middle.
  for log in ${LOGS:-}; do
    if [ -f "$log" ]; then
      echo "-- $log (last 12 warnings and errors):" >&2
      grep -E ' (WARN|ERROR) ' "$log" | tail -n 12 >&2 || true
    fi
  done
  for log in ${LOGS:-}; do
    if [ -f "$log" ]; then echo "-- $log (last 25 lines):" >&2; tail -n 25 "$log" >&2; fi
  done
  echo "-- kernel log (last 20 lines):" >&2
  dmesg | tail -n 20 >&2
  exit "$rc"
}
