// Small device helpers shared by the CUDA kernels (device code only; include from .cu files).
#pragma once
#include <cuda_fp16.h>

#include <cstdint>

namespace tw::cuda::detail {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// IEEE fp16 bits (as stored in GGUF blocks) to float.
__device__ __forceinline__ float half_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }

}  // namespace tw::cuda::detail
