# Sourced by the GPU scripts (needs $OUT). `step NAME SECONDS COMMAND...` runs COMMAND under a
# time limit into $OUT/NAME.txt, so that one step that hangs or faults leaves the rest to run,
# then prints its exit status and a summary: the lines matching $STEP_GREP when set (the last 24
# of them), else the last $STEP_TAIL lines (default 40).
step() {
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name: exit $?"
  if [ -n "${STEP_GREP:-}" ]; then
    grep -E "$STEP_GREP" "$OUT/$name.txt" | cut -c1-220 | tail -n 24
  else
    tail -n "${STEP_TAIL:-40}" "$OUT/$name.txt" | cut -c1-200
  fi
}
