#!/usr/bin/env bash
# End-to-end checks of the twilight executable: bad input gives one clear message and a non-zero
# exit (never a crash: exit codes >= 128 are signals), and the happy paths work on the real model.
#   tests/cli/cli_test.sh path/to/twilight
set -u
BIN=$1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
pass=0 fail=0

# expect RC REGEX -- ARGS...: exit code RC and stderr matching REGEX
expect() {
  local want_rc=$1 regex=$2
  shift 3
  local out err rc
  "$BIN" "$@" >"$TMP/out" 2>"$TMP/err" </dev/null
  rc=$?
  if [[ $rc == "$want_rc" ]] && grep -qE -- "$regex" "$TMP/err" "$TMP/out"; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
    echo "FAIL: twilight $* -> rc $rc (want $want_rc), wanted /$regex/ in:"
    sed 's/^/    /' "$TMP/err" | tail -5
  fi
}

MODEL=${TWILIGHT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/twilight}/models/SmolLM2-135M-Instruct-Q4_1.gguf
[[ -n "${TWILIGHT_CACHE:-}" ]] && MODEL=$TWILIGHT_CACHE/models/SmolLM2-135M-Instruct-Q4_1.gguf

# --- files
expect 1 "cannot open model file '/nonexistent/x.gguf': No such file" -- generate -m /nonexistent/x.gguf -p hi
expect 1 "is not a regular file" -- generate -m "$TMP" -p hi
printf 'hello, I am not a model\n' >"$TMP/text.gguf"
expect 1 "not a GGUF file \(wrong magic\)" -- generate -m "$TMP/text.gguf" -p hi
: >"$TMP/empty.gguf"
expect 1 "is empty" -- generate -m "$TMP/empty.gguf" -p hi
head -c 100000 "$MODEL" >"$TMP/trunc.gguf"
expect 1 "truncated GGUF file|exceeds the file" -- generate -m "$TMP/trunc.gguf" -p hi
chmod 000 "$TMP/text.gguf"
if [[ $(id -u) != 0 ]]; then expect 1 "cannot open model file.*Permission denied" -- generate -m "$TMP/text.gguf" -p hi; fi
# A valid GGUF of an architecture we do not run: header v3, 0 tensors, 1 key general.architecture = "bloom".
{ printf 'GGUF\x03\x00\x00\x00'; printf '\x00\x00\x00\x00\x00\x00\x00\x00'; printf '\x01\x00\x00\x00\x00\x00\x00\x00'
  printf '\x14\x00\x00\x00\x00\x00\x00\x00general.architecture'; printf '\x08\x00\x00\x00'
  printf '\x05\x00\x00\x00\x00\x00\x00\x00bloom'; } >"$TMP/bloom.gguf"
expect 1 "unsupported architecture 'bloom'" -- generate -m "$TMP/bloom.gguf" -p hi
# One Q2_K tensor (type 10): a type twilight does not support.
{ printf 'GGUF\x03\x00\x00\x00'; printf '\x01\x00\x00\x00\x00\x00\x00\x00'; printf '\x00\x00\x00\x00\x00\x00\x00\x00'
  printf '\x01\x00\x00\x00\x00\x00\x00\x00w'; printf '\x01\x00\x00\x00'; printf '\x00\x01\x00\x00\x00\x00\x00\x00'
  printf '\x0a\x00\x00\x00'; printf '\x00\x00\x00\x00\x00\x00\x00\x00'; head -c 200 /dev/zero; } >"$TMP/q2k.gguf"
expect 1 "type Q2_K, which twilight does not support" -- generate -m "$TMP/q2k.gguf" -p hi
expect 1 "cannot read prompt file '/nonexistent/prompt.txt'" -- generate -f /nonexistent/prompt.txt

# --- flags
expect 1 "--top-p must be in \(0, 1\], got 0" -- generate -m "$MODEL" -p hi --top-p 0
expect 1 "--top-p must be in" -- generate -m "$MODEL" -p hi --top-p 1.5
expect 1 "--top-p: expected a number, got 'abc'" -- generate -p hi --top-p abc
expect 1 "--temp: expected a number, got 'nan'" -- generate -p hi --temp nan
expect 1 "-n must be in \[0, 16777216\], got -5" -- generate -p hi -n -5
expect 1 "-t must be in \[1, 1024\], got 0" -- generate -p hi -t 0
expect 1 "--min-p must be in \[0, 1\]" -- generate -p hi --min-p 2
expect 1 "unknown option '--frobnicate'" -- generate -p hi --frobnicate
expect 1 "option -p needs a value" -- generate -p
expect 1 "give either -p or -f, not both" -- generate -p hi -f /etc/hostname
expect 1 "no prompt" -- generate -m "$MODEL"
expect 1 "-o must be md or json" -- bench -o xml
expect 1 "-p: expected a comma-separated list" -- bench -p 1,x
expect 2 "unknown command 'frobnicate'" -- frobnicate
expect 1 "context size 4 out of range" -- generate -m "$MODEL" -p hi -c 4

# --- attention flags
expect 1 "--attn-p must be in \(0, 1\], got 1.5" -- generate -m "$MODEL" -p hi --attn twilight --attn-p 1.5
expect 1 "unknown attention 'sparse'" -- generate -p hi --attn sparse
expect 1 "\(--attn ds\) needs its channel file: --attn-ds-file FILE" -- generate -p hi --attn ds
expect 1 "\(--attn-base ds\) needs its channel file" -- generate -p hi --attn twilight --attn-base ds
expect 1 "cannot read Double Sparsity channel file '/nonexistent/ds.txt'" -- generate -m "$MODEL" -p hi --attn ds --attn-ds-file /nonexistent/ds.txt
expect 1 "calibrate needs a text: -f FILE" -- calibrate -m "$MODEL" -o "$TMP/x.ds"
expect 1 "calibrate needs an output file" -- calibrate -m "$MODEL" -f /etc/hostname
expect 1 "cannot read calibration text '/nonexistent/t.txt'" -- calibrate -m "$MODEL" -f /nonexistent/t.txt -o "$TMP/x.ds"
expect 1 "--ds-channels 65 exceeds the head dim 64" -- calibrate -m "$MODEL" -f /etc/hostname -o "$TMP/x.ds" --ds-channels 65
expect 1 "unknown base selector 'magic'" -- generate -p hi --attn-base magic
expect 1 "cannot read attention config '/nonexistent/a.conf'" -- generate -p hi --attn-config /nonexistent/a.conf
printf 'attn = twilight\nattn-p = 2\n' >"$TMP/bad.conf"
expect 1 "--attn-p must be in" -- generate -p hi --attn-config "$TMP/bad.conf"
printf 'attn = twilight\nbogus\n' >"$TMP/bad2.conf"
expect 1 "bad2.conf:2: expected 'key = value'" -- generate -p hi --attn-config "$TMP/bad2.conf"

# --- prompt longer than the context: error before any generation, nothing on stdout
python3 -c "print('word ' * 200)" >"$TMP/long.txt" 2>/dev/null || for i in $(seq 200); do printf 'word '; done >"$TMP/long.txt"
expect 1 "prompt of [0-9]+ tokens is longer than the context of 32 tokens" -- generate -m "$MODEL" -f "$TMP/long.txt" -c 32
if [[ -s "$TMP/out" ]]; then echo "FAIL: partial output on stdout after a context error"; fail=$((fail + 1)); else pass=$((pass + 1)); fi

# --- happy paths on the real model
expect 0 "generated 8 tokens" -- generate -m "$MODEL" -p "The capital of France is" -n 8 --temp 0 -t 2
if grep -q "The capital of France is" "$TMP/out"; then pass=$((pass + 1)); else echo "FAIL: prompt not echoed"; fail=$((fail + 1)); fi
expect 0 "context [0-9]+ / 8192 tokens \| KV cache" -- generate -m "$MODEL" --chat -p "Say hello." -n 8 --temp 0.7 --seed 3
expect 0 "\| pp16 \| .* ± .*\|" -- bench -m "$MODEL" -p 16 -n 4 -r 2 -t 2
expect 0 "\"test\": \"tg4 @ d32\"" -- bench -m "$MODEL" -p 0 -n 4 -d 32 -r 1 -o json
expect 0 "usage: twilight generate" -- generate --help
# Twilight on a prompt long enough to go sparse (>= 1024 tokens): budgets table and JSON written.
python3 -c "print(' '.join(str(i) for i in range(700)))" >"$TMP/numbers.txt" 2>/dev/null || seq 700 | tr '\n' ' ' >"$TMP/numbers.txt"
expect 0 "sparse layers attend [0-9.]+% of the context" -- generate -m "$MODEL" -f "$TMP/numbers.txt" -n 4 --temp 0 --attn twilight --attn-b0 512 --attn-stats "$TMP/budgets.json"
if grep -q '"avg_i1"' "$TMP/budgets.json" 2>/dev/null && [[ ! -e "$TMP/budgets.json.tmp" ]]; then pass=$((pass + 1)); else echo "FAIL: budgets JSON"; fail=$((fail + 1)); fi
# Double Sparsity: calibrate on a short text, then decode with the channel file (ds alone, and as
# Twilight's level 1 through a config file); a file for another model is an error before any work.
head -c 3000 "$TMP/numbers.txt" >"$TMP/calib.txt"
expect 0 "wrote .*smol.ds \(30 x 3 lists of 16 channels" -- calibrate -m "$MODEL" -f "$TMP/calib.txt" -c 256 -o "$TMP/smol.ds" -t 2
expect 0 "sparse layers attend [0-9.]+% of the context" -- generate -m "$MODEL" -f "$TMP/numbers.txt" -n 4 --temp 0 --attn ds --attn-b0 512 --attn-ds-file "$TMP/smol.ds"
grep -q "attention: ds, B0 512" "$TMP/err" && grep -q "sparse layers attend" "$TMP/err" && pass=$((pass + 1)) || { echo "FAIL: ds budgets"; fail=$((fail + 1)); }
printf 'attn = twilight\nattn-base = ds\nattn-ds-file = %s\n' "$TMP/smol.ds" >"$TMP/ds.conf"
expect 0 "twilight \(p 0.95, base ds\)" -- generate -m "$MODEL" -f "$TMP/numbers.txt" -n 2 --temp 0 --attn-b0 512 --attn-config "$TMP/ds.conf"
sed 's/^fingerprint .*/fingerprint 0123456789abcdef/' "$TMP/smol.ds" >"$TMP/other.ds"
expect 1 "was calibrated for another model.*fingerprint 0123456789abcdef" -- generate -m "$MODEL" -p hi --attn ds --attn-ds-file "$TMP/other.ds"
sed 's/^head_dim 64/head_dim 128/' "$TMP/smol.ds" >"$TMP/other.ds"
expect 1 "was calibrated for another model.*d 128\), this model has 30 layers, 3 kv heads, d 64" -- generate -m "$MODEL" -p hi --attn ds --attn-ds-file "$TMP/other.ds"

echo "$pass passed, $fail failed"
((fail == 0))
