// Error checking for CUDA runtime calls: every failure becomes a tw::Error naming the call, the
// file and line, and CUDA's own message. Kernels launch asynchronously, so after a launch call
// TW_CUDA_CHECK_LAUNCH() to catch bad configurations at once (faults inside the kernel surface at
// the next synchronising call, which is checked too).
#pragma once
#include <cuda_runtime_api.h>

#include "common/error.h"

namespace tw::cuda {

[[noreturn]] inline void cuda_fail(cudaError_t e, const char* what, const char* file, int line) {
  fail("CUDA error at ", file, ":", line, ": ", what, " -> ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

}  // namespace tw::cuda

#define TW_CUDA_CHECK(expr)                                                \
  do {                                                                     \
    const cudaError_t tw_cuda_err_ = (expr);                               \
    if (tw_cuda_err_ != cudaSuccess)                                       \
      ::tw::cuda::cuda_fail(tw_cuda_err_, #expr, __FILE__, __LINE__);      \
  } while (0)

#define TW_CUDA_CHECK_LAUNCH() TW_CUDA_CHECK(cudaGetLastError())
