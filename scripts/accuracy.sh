#!/usr/bin/env bash
# Regenerate the sparse-attention accuracy tables of docs/ACCURACY.md, one line per table.
#
#   scripts/accuracy.sh TABLE...      TABLE: ppl-smollm2 needle-smollm2 ppl-qwen15 needle-qwen15 (or all)
#
# Needs build/twilight (Release), the models and the Austen text (scripts/setup.sh). Results go to
# $TWILIGHT_RESULTS (default ~/.cache/twilight/results): <table>.md (the markdown table), .json (raw),
# .log. Runs are niced; the machine's other load slows them (the logs carry the t/s). Times on 2 cores,
# quiet machine, roughly: ppl-smollm2 3 min, needle-smollm2 15 min, ppl-qwen15 15 min, needle-qwen15 1.5 h
# (16k prefills of the 1.5B model dominate; needle_grid.py resumes an interrupted grid).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n "${TWILIGHT_CACHE:-}" ]]; then CACHE=$TWILIGHT_CACHE
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then CACHE=$XDG_CACHE_HOME/twilight
else CACHE=${HOME:-.}/.cache/twilight; fi
RES=${TWILIGHT_RESULTS:-$CACHE/results}
BIN=$ROOT/build/twilight
TEXT=$CACHE/data/austen/all.txt
SMOL=$CACHE/models/SmolLM2-135M-Instruct-Q4_1.gguf
QWEN=$CACHE/models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf
T=${TWILIGHT_THREADS:-2}
mkdir -p "$RES"
(($#)) || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ "$*" == all ]] && set -- ppl-smollm2 needle-smollm2 ppl-qwen15 needle-qwen15

# The configurations of the perplexity tables: the noise floor (p = 1, no selector: every token,
# = dense up to rounding), Quest at fixed budgets (n/8 = 512 at 4096, 1024 at 8192), Twilight.
# needle-smollm2 stops at 8168 = 8192 (SmolLM2's trained context) - 24 answer tokens.
ppl() {  # $1 table, $2 model, $3 prefix, $4 n/8
  nice "$BIN" perplexity -m "$2" -f "$TEXT" --prefix "$3" --score 256 -t "$T" -o "$RES/$1.json" \
    --compare "twilight p=1 base=none" --compare "quest b0=256" --compare "quest b0=1024" --compare "quest b0=$4" \
    --compare "twilight p=0.85" --compare "twilight p=0.9" --compare "twilight p=0.95" \
    --compare "twilight p=0.95 gqa=head" >"$RES/$1.md" 2>"$RES/$1.log"
}
for t in "$@"; do
  echo "[accuracy] $t -> $RES/$t.md" >&2
  case $t in
    ppl-smollm2) ppl "$t" "$SMOL" 4096 512 ;;
    ppl-qwen15) ppl "$t" "$QWEN" 8192 1024 ;;
    needle-smollm2) nice python3 "$ROOT/scripts/needle_grid.py" --model "$SMOL" --lengths 2048,4096,8168 -t "$T" \
                      --out "$RES/$t" >"$RES/$t.md" 2>"$RES/$t.log" ;;
    needle-qwen15) nice python3 "$ROOT/scripts/needle_grid.py" --model "$QWEN" --lengths 4096,8192,16384 --depths 0.1,0.5,0.9 -t "$T" \
                     --out "$RES/$t" >"$RES/$t.md" 2>"$RES/$t.log" ;;
    *) echo "accuracy.sh: unknown table '$t'" >&2; exit 2 ;;
  esac
  cat "$RES/$t.md"
done
