#!/usr/bin/env bash
# Build the GGUF fuzzer (clang + libFuzzer + ASan/UBSan) in build-fuzz and run it for N seconds
# (default 300) on a seed corpus of small valid GGUF files written by fuzz/make_seeds.py.
# Needs clang++ and libFuzzer (Debian: apt-get install clang libclang-rt-14-dev), python3 + gguf.
# Crash inputs land in build-fuzz/crashes/; the run log in build-fuzz/fuzz.log, and (with llvm-cov)
# the reader's line coverage reached by the corpus in build-fuzz/coverage.txt. Exit status is
# libFuzzer's: non-zero when it found a crash.
set -euo pipefail
secs=${1:-300}
root=$(cd "$(dirname "$0")/.." && pwd)
build=$root/build-fuzz
cxx=${CXX_FUZZ:-clang++}
cc=${CC_FUZZ:-clang}

cmake -S "$root" -B "$build" -G Ninja -DTWILIGHT_FUZZ=ON -DTWILIGHT_TESTS=OFF -DTWILIGHT_CUDA=OFF \
  -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_C_COMPILER="$cc" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C "$build" -j2 gguf_fuzz gguf_fuzz_cov
rm -rf "$build/seeds"
python3 "$root/fuzz/make_seeds.py" "$build/seeds"
mkdir -p "$build/corpus" "$build/crashes"
# corpus/ is the working corpus (kept between runs); seeds/ is read-only input.
"$build/fuzz/gguf_fuzz" "$build/corpus" "$build/seeds" -dict="$root/fuzz/gguf.dict" \
  -max_total_time="$secs" -max_len=16384 -rss_limit_mb=2048 -timeout=10 \
  -artifact_prefix="$build/crashes/" -print_final_stats=1 2>&1 | tee "$build/fuzz.log"

# Source coverage of the reader reached by the corpus (replayed once, no mutation).
profdata=$(command -v llvm-profdata || command -v llvm-profdata-14 || true)
cov=$(command -v llvm-cov || command -v llvm-cov-14 || true)
if [[ -n "$profdata" && -n "$cov" ]]; then
  rm -f "$build"/cov-*.profraw
  LLVM_PROFILE_FILE="$build/cov-%p.profraw" "$build/fuzz/gguf_fuzz_cov" -runs=0 "$build/corpus" "$build/seeds" \
    >"$build/cov-replay.log" 2>&1
  "$profdata" merge -sparse "$build"/cov-*.profraw -o "$build/cov.profdata"
  "$cov" report "$build/fuzz/gguf_fuzz_cov" -instr-profile="$build/cov.profdata" \
    "$root/src/gguf/gguf.cpp" "$root/src/gguf/quants.cpp" | tee "$build/coverage.txt"
else
  echo "llvm-profdata / llvm-cov not found (Debian package llvm-14): no coverage report"
fi
