# Sourced by the GPU machine's scripts (gpu_check.sh, gpu_bench.sh, gpu_sanitize.sh): configure the
# CUDA build for sm_90a into $BUILD (needs $BUILD and $LOG, where the configure logs go), and the sparse
# attention's tests in its two work-split modes.
# GoogleTest: the system one when cmake finds it, else built from the source in build-gtest-src (a
# copy of /usr/src/googletest; /build*/ is git-ignored, so it must be carried).
gpu_configure() {
  local prefix=()
  if ! ls /usr/lib/x86_64-linux-gnu/cmake/GTest /usr/local/lib/cmake/GTest /usr/lib64/cmake/GTest >/dev/null 2>&1; then
    [ -f build-gtest-src/CMakeLists.txt ] || { echo "no GoogleTest here and build-gtest-src not carried"; return 2; }
    if [ ! -f /tmp/gtest/lib/cmake/GTest/GTestConfig.cmake ] && [ ! -f /tmp/gtest/lib64/cmake/GTest/GTestConfig.cmake ]; then
      cmake -S build-gtest-src -B /tmp/gtest-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_GMOCK=OFF \
            -DCMAKE_INSTALL_PREFIX=/tmp/gtest >"$LOG/gtest_build.log" 2>&1 &&
        ninja -C /tmp/gtest-build install >>"$LOG/gtest_build.log" 2>&1 || { tail -20 "$LOG/gtest_build.log"; return 2; }
    fi
    prefix=(-DCMAKE_PREFIX_PATH=/tmp/gtest)
  fi
  cmake -S . -B "$BUILD" -G Ninja -DTWILIGHT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a "${prefix[@]}" >"$LOG/configure.log" 2>&1 ||
    { tail -30 "$LOG/configure.log"; return 3; }
}

# The sparse attention plans its work split only from a wave of lists (sparse_decode.cu); a plain test
# run takes the planned path in two configurations only. This runs the sparse and step tests again with
# the split forced each way (TW_SPARSE_SPLIT=1: planned at every size, 2: never). Args: the cuda_tests
# binary, the log folder. Returns non-zero when either run fails.
gpu_sparse_split_tests() {
  local bin=$1 dir=$2 r=0 m
  for m in 1 2; do
    if TW_SPARSE_SPLIT=$m TW_REAL_KV="${REAL_KV:-}" "$bin" --gtest_filter='SparseDecodeCuda.*:StepCuda.*' \
        >"$dir/tests_split$m.log" 2>&1; then
      echo "sparse tests, TW_SPARSE_SPLIT=$m: $(grep -E '^\[ *(PASSED|SKIPPED) *\] [0-9]' "$dir/tests_split$m.log" | tr '\n' ' ')"
    else
      r=1
      echo "sparse tests, TW_SPARSE_SPLIT=$m: FAILED"; grep -E '^\[ *FAILED *\]|Failure' "$dir/tests_split$m.log" | head -10
    fi
  done
  return $r
}
