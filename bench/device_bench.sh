#!/usr/bin/env bash
# Clean-machine run of the CPU weight-product tests and benchmarks (the dev box is shared and noisy):
# builds ops_tests + ops_bench in build-dev, runs the tests that need no model file, then
# ops_bench --synthetic and, when TW_GGML_LIB points at llama.cpp's libggml, the ggml reference.
set -euo pipefail
cd "$(dirname "$0")/.."
J=${J:-$(nproc)}
cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DTWILIGHT_CUDA=OFF > /dev/null
ninja -C build-dev -j"$J" ops_tests ops_bench > /dev/null
lscpu | grep -E "Model name" || true
./build-dev/ops_tests --gtest_filter='Dequant*:ActQuant*:Matvec*:Matmul*:Simd*:-*RealTensor*' 2>&1 | tail -3
for s in avx2 avx512; do TWILIGHT_SIMD=$s ./build-dev/ops_tests --gtest_filter='Simd*' 2>&1 | tail -1; done
./build-dev/ops_bench --synthetic ${QUICK:+--quick}
if [ -n "${TW_GGML_LIB:-}" ]; then python3 scripts/bench_ggml_matmul.py --synthetic; fi
