#!/usr/bin/env bash
# The main job on a fresh clone: set-up, Release build, then long-context `twilight generate` with
# the default model (SmolLM2-135M-Instruct Q4_1) and generate's default attention, Twilight (budgets
# table at the end). Arguments go to `twilight generate`; without -m a default model is passed,
# without -p/-f a default long prompt: ~5,500 tokens of the GPL-3 text (on every Debian system, in
# base-files) followed by a question about it.
#
#   scripts/run.sh                                # default long prompt
#   scripts/run.sh -p "Write a haiku about dusk" -n 64 --temp 0.7
#   scripts/run.sh -m ~/.cache/twilight/models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf -p "def fib(n):"
#
# Env: TWILIGHT_SKIP_SETUP=1 skips scripts/setup.sh; TWILIGHT_JOBS sets the build parallelism.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -n "${TWILIGHT_CACHE:-}" ]]; then CACHE=$TWILIGHT_CACHE
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then CACHE=$XDG_CACHE_HOME/twilight
else CACHE=${HOME:-.}/.cache/twilight; fi

if [[ "${TWILIGHT_SKIP_SETUP:-0}" != 1 ]]; then
  scripts/setup.sh --only smollm2 >&2
fi
cmake --preset default >/dev/null
cmake --build --preset default -j "${TWILIGHT_JOBS:-$(nproc)}" --target twilight >&2

have_model=0 have_prompt=0
for a in "$@"; do
  case "$a" in
    -m|--model|--model=*) have_model=1 ;;
    -p|--prompt|--prompt=*|-f|--file|--file=*) have_prompt=1 ;;
  esac
done
args=(generate)
((have_model)) || args+=(-m "$CACHE/models/SmolLM2-135M-Instruct-Q4_1.gguf")
if ((!have_prompt)); then
  prompt=$(mktemp /tmp/twilight-prompt.XXXXXX)
  trap 'rm -f "$prompt"' EXIT
  { head -c 24000 /usr/share/common-licenses/GPL-3; printf '\n\nQuestion: what does the license above require when you convey a modified version of the program? Answer:'; } >"$prompt"
  args+=(--chat -f "$prompt" -n 64 --temp 0)
fi
build/twilight "${args[@]}" "$@"
