#!/usr/bin/env bash
# compute-sanitizer over every GPU kernel's tests, for the GPU machine: memcheck (out-of-bounds and
# misaligned global / shared accesses, leaks) on every GPU test; racecheck (shared-memory hazards) and
# synccheck (barrier misuse) on every test but the real-model ones, whose kernels are the same as the
# random tests' at larger sizes. One process per test and tool, JOBS at a time on the one GPU; a
# table per test on stdout and in $OUT/summary.txt, each run's log in $LOG (default $OUT/logs), all of
# them also in $OUT/sanitizer_logs.tgz.
#
#   device tool: run command="OUT=$OUT LOG=/tmp/san_logs PART=1/2 bash scripts/gpu_sanitize.sh"
#                carry=["build-gtest-src","build-dumps"]   (then PART=2/2; the tool brings back few files)
#   REAL_KV=build-dumps/qwen15b-emma-8192.kv   the *.RealModelDump tests too (memcheck)
#   TESTS_BIN=path                             a cuda_tests built elsewhere for sm_90a (no build here)
#   TOOLS="memcheck racecheck synccheck"       FILTER=gtest filter (default: every GPU test)
#   PART=k/n                                   the k-th of n parts of the runs (1-based; the heaviest
#                                              runs first, dealt round-robin): the whole sweep is
#                                              ~2 device calls' work (docs/CUDA.md), PART=1/2 and 2/2
#   SHARDS="Test.tool=n ..."                   runs split over n processes by config (TW_TEST_SHARD,
#                                              src/ops/cuda/cuda_test_util.h); default: the Quest sweep's
#                                              racecheck (72 configs, over 7 minutes in one process)
#
# Exit status 0 only when every run finished with 0 errors / hazards and its tests passed. A run past
# LIMIT seconds is a failure ("timeout": not checked), never clean. Left out: the tests that need the
# model files (QmatvecCudaModel.*, QmatvecCudaFixture.*: too big to carry), the disabled benchmarks, and
# initcheck (the kernels read workspace that an earlier kernel of the step wrote, which it reports).
# Tests with no CUDA call (host-side plan rules and argument checks) are listed as "host", not checked.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_sanitize}
LOG=${LOG:-$OUT/logs}
BUILD=${BUILD:-build-gpu}
JOBS=${JOBS:-12}
LIMIT=${LIMIT:-540}
TOOLS=${TOOLS:-memcheck racecheck synccheck}
FILTER=${FILTER:-'-QmatvecCudaModel.*:QmatvecCudaFixture.*'}
SHARDS=${SHARDS:-QuestCuda.MatchesCpuSelectQuest.racecheck=8}
PART=${PART:-1/1}
# Runs that took minutes on the H200 (racecheck on the sweeps, memcheck on the real-model append):
# started first, so that the long ones do not start last and overrun LIMIT.
HEAVY=${HEAVY:-'racecheck [0-9]|PageInputMatchesTokenInput racecheck|LongListOverSixteenBlocks racecheck|RandomBatchesMatchCpu racecheck|KvAppendCuda.RealModelDump memcheck'}
[[ $PART =~ ^([0-9]+)/([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -ge 1 ] && [ "${BASH_REMATCH[1]}" -le "${BASH_REMATCH[2]}" ] ||
  { echo "PART=$PART: expected k/n with 1 <= k <= n"; exit 2; }
part_k=${BASH_REMATCH[1]} part_n=${BASH_REMATCH[2]}
mkdir -p "$OUT" "$LOG"
rm -f "$LOG"/*.log  # a previous sweep's logs would go into this one's tarball
t0=$(date +%s)
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
[ -x "$SAN" ] || { echo "compute-sanitizer not found"; exit 2; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$SAN" --version | tail -1

if [ -n "${TESTS_BIN:-}" ]; then
  BIN=$TESTS_BIN
else
  . scripts/gpu_common.sh
  gpu_configure || exit $?
  ninja -C "$BUILD" cuda_tests >"$LOG/build.log" 2>&1 || { grep -E "error" "$LOG/build.log" | head -30; exit 4; }
  BIN=$BUILD/cuda_tests
  echo "build done in $(( $(date +%s) - t0 )) s"
fi
[ -x "$BIN" ] || { echo "no test binary at $BIN"; exit 2; }

mapfile -t tests < <("$BIN" --gtest_filter="$FILTER" --gtest_list_tests |
  awk '/^[^ ]/{s=$1} /^  /{print s $1}' | grep -v DISABLED_)
[ ${#tests[@]} -gt 0 ] || { echo "no tests match $FILTER"; exit 2; }
export BIN SAN LOG LIMIT
export TW_REAL_KV=${REAL_KV:-}
# One run (test, tool, optional shard i/n): prints "test[i/n] tool status seconds summary".
one() {
  local t=$1 tool=$2 shard=${3:-} name=$1 s0 rc status summary
  [ -n "$shard" ] && name="$t[$shard]"
  local log="$LOG/$t.$tool${shard:+.${shard/\//of}}.log"
  s0=$(date +%s)
  TW_TEST_SHARD=$shard timeout "$LIMIT" "$SAN" --tool "$tool" --error-exitcode 9 --print-limit 20 "$BIN" \
    --gtest_filter="$t" >"$log" 2>&1
  rc=$?
  summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$log" | tail -1 | sed 's/^========= //')
  if [ $rc = 124 ]; then status=timeout
  elif grep -qE '^\[  SKIPPED \] 1 test' "$log"; then status=skipped
  elif grep -q 'terminated before first instrumented API call' "$log" && grep -qE '^\[  PASSED  \] 1 test' "$log"; then
    status=host summary="no CUDA call"
  elif [ $rc = 0 ] && grep -qE '^\[  PASSED  \] 1 test' "$log" && [[ $summary == *"SUMMARY: 0 "* ]]; then status=clean
  else status="FAIL(rc=$rc)"
  fi
  echo "$name $tool $status $(( $(date +%s) - s0 )) ${summary:-no summary}"
}
export -f one
for t in "${tests[@]}"; do
  for tool in $TOOLS; do
    case "$t.$tool" in *RealModelDump.racecheck | *RealModelDump.synccheck) continue ;; esac
    n=1
    for sh in $SHARDS; do [ "${sh%=*}" = "$t.$tool" ] && n=${sh#*=}; done
    if [ "$n" -gt 1 ]; then
      for ((i = 0; i < n; ++i)); do echo "$t $tool $i/$n"; done
    else
      echo "$t $tool"
    fi
  done
done >"$OUT/runs.txt"
{ grep -E "$HEAVY" "$OUT/runs.txt"; grep -vE "$HEAVY" "$OUT/runs.txt"; } | awk -v k="$part_k" -v n="$part_n" '(NR - 1) % n == k - 1' |
  xargs -P "$JOBS" -L 1 bash -c 'one "$0" "$1" "${2:-}"' | sort >"$OUT/summary.txt"

awk '{ r = $5; for (i = 6; i <= NF; ++i) r = r " " $i; printf "%-46s %-9s %-8s %4ss  %s\n", $1, $2, $3, $4, r }' "$OUT/summary.txt"
[ -n "${REAL_KV:-}" ] || echo "real-model tests (*.RealModelDump) skipped: no REAL_KV"
[ "$PART" = 1/1 ] || echo "part $PART of the runs only"
n=$(wc -l <"$OUT/summary.txt")
count() { awk -v s="$1" '$3 == s' "$OUT/summary.txt" | wc -l; }
bad=$(awk '$3 != "clean" && $3 != "skipped" && $3 != "host"' "$OUT/summary.txt" | wc -l)
echo "runs: $n, clean: $(count clean), host only: $(count host), skipped: $(count skipped), failed or timed out: $bad;" \
  "total $(( $(date +%s) - t0 )) s"
tar czf "$OUT/sanitizer_logs.tgz" -C "$(dirname "$LOG")" "$(basename "$LOG")"
# Nothing checked (no GPU: every test skipped) is a failure too, not a clean sweep.
[ "$bad" = 0 ] && [ "$(count clean)" -gt 0 ]
