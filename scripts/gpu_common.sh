# Sourced by the GPU machine's scripts (gpu_check.sh, gpu_bench.sh, gpu_sanitize.sh): configure the
# CUDA build for sm_90a into $BUILD. Needs $BUILD and $LOG (where the configure logs go).
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
