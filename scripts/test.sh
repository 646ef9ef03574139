#!/usr/bin/env bash
# Build and run every test: set-up, Release build + ctest, ASan/UBSan build + ctest, fuzz smoke.
#
#   scripts/test.sh [--no-setup] [--no-asan] [--no-fuzz]
#
# CPU tests always run; GPU tests (label `gpu`, built when nvcc is found) skip without a GPU and
# ctest reports them as skipped, never as passed. A build with no tests at all is a FAILURE
# (ctest --no-tests=error, set in CMakePresets.json): "nothing ran" must not look green.
# The fuzz smoke runs `fuzz/run.sh SECONDS`, when it exists, with SECONDS = $TWILIGHT_FUZZ_SECONDS
# (default 60).
# Env: TWILIGHT_JOBS (default: number of cores) for the build and for ctest.
# Exit status: 0 only when every stage passed; a summary of the stages is printed at the end.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
SETUP=1 ASAN=1 FUZZ=1
for a in "$@"; do
  case "$a" in
    --no-setup) SETUP=0 ;;
    --no-asan) ASAN=0 ;;
    --no-fuzz) FUZZ=0 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "test.sh: unknown option $a" >&2; exit 2 ;;
  esac
done
JOBS=${TWILIGHT_JOBS:-$(nproc)}
if [[ -n "${TWILIGHT_CACHE:-}" ]]; then CACHE=$TWILIGHT_CACHE
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then CACHE=$XDG_CACHE_HOME/twilight
else CACHE=${HOME:-.}/.cache/twilight; fi
FUZZ_SECONDS=${TWILIGHT_FUZZ_SECONDS:-60}
T0=$SECONDS
RESULTS=()
FAILED=0

stage() {  # stage NAME CMD...: run, time and record a stage
  local name=$1 t=$SECONDS rc
  shift
  printf '\n==== [test.sh] %s\n' "$name"
  "$@"
  rc=$?
  RESULTS+=("$(printf '%-28s %-6s %4ss' "$name" "$([[ $rc == 0 ]] && echo ok || echo FAIL)" $((SECONDS - t)))")
  ((rc == 0)) || FAILED=1
  return $rc
}

if ((SETUP)); then
  stage "setup" scripts/setup.sh || { echo "[test.sh] set-up failed: stopping" >&2; exit 1; }
fi

# Tests and fuzz/ call python3 with gguf/numpy: use the pinned tooling venv set up above.
if [[ -x "$CACHE/venv/bin/python3" ]]; then export PATH="$CACHE/venv/bin:$PATH"; fi

run_ctest() {  # $1: preset; keeps ctest's own output and adds the counts to the stage summary
  local log rc
  log=$(mktemp)
  ctest --preset "$1" -j "$JOBS" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  CTEST_NOTE="$(grep -oE '[0-9]+ tests failed out of [0-9]+' "$log" | tail -1), $(grep -cE '\((Skipped|Disabled)\)$' "$log") skipped/disabled"
  rm -f "$log"
  return "$rc"
}
build_and_test() {  # $1: preset
  CTEST_NOTE=""
  stage "configure ($1)" cmake --preset "$1" &&
    stage "build ($1)" cmake --build --preset "$1" -j "$JOBS" &&
    stage "ctest ($1)" run_ctest "$1"
  if [[ -n "$CTEST_NOTE" ]]; then RESULTS[-1]+="  ($CTEST_NOTE)"; fi
}
build_and_test default
if ((ASAN)); then build_and_test asan; fi

if ((FUZZ)) && [[ -f fuzz/run.sh ]]; then
  stage "fuzz smoke (${FUZZ_SECONDS}s)" bash fuzz/run.sh "$FUZZ_SECONDS"
elif ((FUZZ)); then
  RESULTS+=("$(printf '%-28s %-6s' "fuzz smoke" "absent (no fuzz/run.sh)")")
fi

printf '\n==== [test.sh] summary (%s s)\n' $((SECONDS - T0))
printf '  %s\n' "${RESULTS[@]}"
if ((FAILED)); then echo "[test.sh] FAILED"; exit 1; fi
echo "[test.sh] all stages passed"
