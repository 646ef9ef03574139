#!/usr/bin/env bash
# The GPU attention command (issue 4), for the GPU machine: build, check every kernel against the CPU
# reference (cuda_tests), then the benchmark table: ours (dense / Quest / Twilight per stage) and
# PyTorch SDPA anchors in the same call, merged into a table and a plot. Results in $OUT, logs in $LOG.
#
#   device tool: run command="bash scripts/gpu_bench.sh" carry=["build-gtest-src"]
#   quick:       BATCH=16 CTX=32768 bash scripts/gpu_bench.sh
#   real input:  REAL_KV=build-dumps/qwen15b-emma-8192.kv bash scripts/gpu_bench.sh   (carry build-dumps too)
#   concentrated synthetic rows too: CONC_STD=2.5 bash scripts/gpu_bench.sh
#   FlashInfer's paged batch decode as a dense anchor too: bash scripts/fetch_anchor_wheels.sh here, then
#   carry build-wheels (FI_WHEELS); without the wheels the run says so and the tables show "n/a"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_bench}
BUILD=${BUILD:-build-gpu}
BATCH=${BATCH:-1,16,64}
CTX=${CTX:-8192,32768,131072}
EXTRA=${EXTRA:-}
LOG=${LOG:-$OUT/logs}  # logs apart: the device tool brings back at most 8 files of $OUT
mkdir -p "$OUT" "$LOG"
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$LOG/gpu.txt"

. scripts/gpu_common.sh
configure() { gpu_configure || exit $?; }
# TW_BIN: a twilight binary built elsewhere with the CUDA backend (the device lease is short): the
# benchmark starts at once and cuda_tests builds beside it; otherwise build both first.
if [ -n "${TW_BIN:-}" ] && [ -x "$TW_BIN" ]; then
  BIN=$TW_BIN
  configure
  (ninja -C "$BUILD" cuda_tests >"$LOG/build.log" 2>&1; echo $? >"$LOG/build.rc") &
  build_pid=$!
else
  BIN=$BUILD/twilight
  configure
  ninja -C "$BUILD" cuda_tests twilight >"$LOG/build.log" 2>&1 || { grep -E "error" "$LOG/build.log" | head -30; exit 4; }
  echo 0 >"$LOG/build.rc"
  build_pid=
  echo "build done in $(( $(date +%s) - t0 )) s"
fi

rc=0
"$BIN" bench --gpu --batch "$BATCH" --ctx "$CTX" --json "$OUT/ours.jsonl" $EXTRA 2>"$LOG/ours.err" | tee "$LOG/ours.md" ||
  { echo "bench --gpu failed"; tail -5 "$LOG/ours.err"; rc=1; }
PYTHONUNBUFFERED=1 python3 scripts/gpu_sdpa_anchor.py --batch "$BATCH" --ctx "$CTX" --json "$OUT/sdpa.jsonl" >"$LOG/sdpa.log" 2>&1 ||
  { echo "sdpa anchor failed"; tail -5 "$LOG/sdpa.log"; rc=1; }
# FlashInfer (JIT: compiles its two decode kernels with this machine's nvcc on first use, ~30 s).
FI_WHEELS=${FI_WHEELS:-build-wheels}
FI_SITE=/tmp/twilight-fi-site
have_fi=0
if ls "$FI_WHEELS"/flashinfer_python-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$FI_SITE" \
    "$FI_WHEELS"/*.whl >"$LOG/fi_install.log" 2>&1 && have_fi=1 ||
    { echo "FlashInfer wheels did not install"; tail -5 "$LOG/fi_install.log"; rc=1; }
else
  echo "FlashInfer anchor not run: no wheels in $FI_WHEELS (scripts/fetch_anchor_wheels.sh, then carry it)"
fi
fi_anchor() {  # args: batches contexts json [shape flags]
  local b=$1 c=$2 j=$3; shift 3
  FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a} PYTHONPATH="$FI_SITE${PYTHONPATH:+:$PYTHONPATH}" \
    PYTHONUNBUFFERED=1 python3 scripts/gpu_flashinfer_anchor.py --batch "$b" --ctx "$c" --json "$j" "$@"
}
fi_args=()
if [ $have_fi = 1 ]; then
  fi_anchor "$BATCH" "$CTX" "$OUT/fi.jsonl" >"$LOG/fi.log" 2>&1 && fi_args=(--fi "$OUT/fi.jsonl") ||
    { echo "FlashInfer anchor failed"; tail -5 "$LOG/fi.log"; rc=1; }
fi
python3 scripts/gpu_bench_report.py "$OUT/ours.jsonl" "$OUT/sdpa.jsonl" "$OUT/report.md" "$OUT/speedup.png" "${fi_args[@]}" || rc=1

# Concentrated synthetic input (CONC_STD = the logit std, e.g. 2.5): budgets near the real models' (the
# default std 1 is the diffuse hard case); same shape, so the same SDPA anchors apply.
if [ -n "${CONC_STD:-}" ]; then
  "$BIN" bench --gpu --batch "$BATCH" --ctx "$CTX" --logit-std "$CONC_STD" --attn-b0 "${CONC_B0:-8192}" \
    --json "$OUT/conc.jsonl" $EXTRA 2>"$LOG/conc.err" | tee "$LOG/conc.md" ||
    { echo "bench --gpu (concentrated) failed"; tail -5 "$LOG/conc.err"; rc=1; }
  python3 scripts/gpu_bench_report.py "$OUT/conc.jsonl" "$OUT/sdpa.jsonl" "$OUT/report_conc.md" "${fi_args[@]}" || rc=1
fi

# Real-model attention (a KV dump of the CPU engine, `twilight bench --attn-dump`; carry its folder):
# the dump's own shape, anchors at that shape.
if [ -n "${REAL_KV:-}" ]; then
  RB=${REAL_BATCH:-1,16}; RC=${REAL_CTX:-8192,32768}
  "$BIN" bench --gpu --kv "$REAL_KV" --batch "$RB" --ctx "$RC" --json "$OUT/real.jsonl" 2>"$LOG/real.err" | tee "$LOG/real.md" ||
    { echo "bench --gpu --kv failed"; tail -5 "$LOG/real.err"; rc=1; }
  shape=$(python3 -c "import json,sys; d=[json.loads(l) for l in open(sys.argv[1])][0]; print(d['heads'], d['kv_heads'], d['head_dim'])" "$OUT/real.jsonl") &&
  read -r H HKV D <<<"$shape" &&
  PYTHONUNBUFFERED=1 python3 scripts/gpu_sdpa_anchor.py --batch "$RB" --ctx "$RC" --heads "$H" --kv-heads "$HKV" --head-dim "$D" \
    --json "$OUT/real_sdpa.jsonl" >"$LOG/real_sdpa.log" 2>&1 || { echo "real-shape sdpa anchor failed"; rc=1; }
  real_fi=()
  if [ $have_fi = 1 ]; then
    fi_anchor "$RB" "$RC" "$OUT/real_fi.jsonl" --heads "$H" --kv-heads "$HKV" --head-dim "$D" >"$LOG/real_fi.log" 2>&1 &&
      real_fi=(--fi "$OUT/real_fi.jsonl") || { echo "real-shape FlashInfer anchor failed"; tail -5 "$LOG/real_fi.log"; rc=1; }
  fi
  python3 scripts/gpu_bench_report.py "$OUT/real.jsonl" "$OUT/real_sdpa.jsonl" "$OUT/report_real.md" "${real_fi[@]}" || rc=1
fi
# Every kernel against the CPU reference (the model-file tests need files too big to carry).
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  [ -n "$build_pid" ] && wait "$build_pid"
  if [ "$(cat "$LOG/build.rc" 2>/dev/null)" = 0 ]; then
    # TW_REAL_KV: the *.RealModelDump tests run every kernel on the real model's K / V / queries too;
    # without REAL_KV they skip, and this says so.
    TW_REAL_KV="${REAL_KV:-}" "$BUILD/cuda_tests" --gtest_filter='-QmatvecCudaModel.*:QmatvecCudaFixture.*' \
      >"$OUT/tests.log" 2>&1 || rc=$?
    grep -E '^\[ *(PASSED|FAILED|SKIPPED) *\]|tests ran|^real-model' "$OUT/tests.log" | head -40
    [ -n "${REAL_KV:-}" ] || echo "real-model kernel tests (*.RealModelDump) skipped: no REAL_KV"
    echo "cuda_tests rc=$rc"
    gpu_sparse_split_tests "$BUILD/cuda_tests" "$OUT" || rc=1
    # The read ceiling of scattered chunks (the side structures' gathers): GatherCudaBench.
    "$BUILD/cuda_tests" --gtest_also_run_disabled_tests --gtest_filter='GatherCudaBench.*' 2>&1 |
      grep BENCH | tee "$OUT/gather.log"
    # The issue's pruner case: 32 sequences x 8 kv heads = 256 lists of B0 = 8192 (PrunerCudaBench).
    "$BUILD/cuda_tests" --gtest_also_run_disabled_tests --gtest_filter='PrunerCudaBench.*' 2>&1 |
      grep BENCH | tee "$OUT/pruner.log"
  else
    echo "cuda_tests build failed"; grep -E "error" "$LOG/build.log" | head -20; rc=1
  fi
fi
echo "total $(( $(date +%s) - t0 )) s"
exit $rc
