// Resident blocks per SM of a kernel, asked once: the planners of the decode kernels size their grids
// and work items by it (registers bound it for them, two blocks of the decode tiles at d = 128).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>

#include "ops/cuda/cuda_check.h"

namespace tw::attn::cuda {

// Blocks of kernel K that fit on one SM at `threads` threads and no dynamic shared memory (at least 1).
// One query per kernel: K is always launched with the same threads.
template <auto K>
int resident_blocks(int threads) {
  static const int n = [threads] {
    int k = 0;
    TW_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&k, K, threads, 0));
    return std::max(k, 1);
  }();
  return n;
}

}  // namespace tw::attn::cuda
