#!/usr/bin/env bash
# CPU speed: twilight bench and llama.cpp (llama-cpp-python) on the same GGUF files, same thread
# count, same rows, one after the other on a quiet machine. Prints both tables and the ratios.
#   scripts/bench_cpu.sh [threads=2] [reps=5]
# Needs the Release build (build/twilight) and llama-cpp-python (scripts/setup.sh --reference).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T=${1:-2}
R=${2:-5}
CACHE=${TWILIGHT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/twilight}
[[ -n "${TWILIGHT_CACHE:-}" ]] && CACHE=$TWILIGHT_CACHE
[[ -x "$CACHE/venv/bin/python3" ]] && PY=$CACHE/venv/bin/python3 || PY=python3
echo "# $(date -u +%F' '%H:%M' UTC') | $(lscpu | sed -n 's/^Model name: *//p') | $(nproc) cores | threads $T | reps $R | $(git -C "$ROOT" rev-parse --short HEAD)"
for m in SmolLM2-135M-Instruct-Q4_1.gguf Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf; do
  f=$CACHE/models/$m
  echo; echo "## $m"
  # pp512, tg128 from an empty cache; tg128 after 4096 cached tokens (the depth fill is not timed).
  "$ROOT/build/twilight" bench -m "$f" -t "$T" -r "$R" -p 512 -n 128 -o json >/tmp/tw_bench.json
  "$ROOT/build/twilight" bench -m "$f" -t "$T" -r "$R" -p 0 -n 128 -d 4096 -o json >/tmp/tw_bench_d.json
  "$PY" "$ROOT/scripts/bench_llamacpp.py" -m "$f" -t "$T" -r "$R" -p 512 -n 128 -o json >/tmp/lc_bench.json
  "$PY" "$ROOT/scripts/bench_llamacpp.py" -m "$f" -t "$T" -r "$R" -p 0 -n 128 -d 4096 -o json >/tmp/lc_bench_d.json
  "$PY" - <<'PY'
import json
tw = {r["test"]: r for f in ("/tmp/tw_bench.json", "/tmp/tw_bench_d.json") for r in json.load(open(f))}
lc = {r["test"]: r for f in ("/tmp/lc_bench.json", "/tmp/lc_bench_d.json") for r in json.load(open(f))}
print("| test | twilight t/s | llama.cpp t/s | time per token, twilight / llama.cpp |")
print("| --- | ---: | ---: | ---: |")
for k, a in tw.items():
    b = lc[k]
    print(f"| {k} | {a['avg_ts']:.2f} ± {a['stddev_ts']:.2f} | {b['avg_ts']:.2f} ± {b['stddev_ts']:.2f} | {b['avg_ts'] / a['avg_ts']:.2f}x |")
PY
done
