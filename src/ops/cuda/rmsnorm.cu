#include "ops/cuda/rmsnorm.h"

#include <climits>
#include <cmath>

#include "common/error.h"
#include "ops/cuda/common.cuh"
#include "ops/cuda/cuda_check.h"

namespace tw::cuda {
namespace {

constexpr int kThreads = 256;  // one block per row; 8 warps cover a 1536-wide row in 6 steps each

__global__ void __launch_bounds__(kThreads) rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                                           float* y, int cols, float eps) {
  // No __restrict__ on y: in-place calls pass y == x. Each thread rereads and writes only its own
  // elements, after the barrier, so in place is safe.
  const size_t base = static_cast<size_t>(blockIdx.x) * cols;
  const float* xr = x + base;
  float ss = 0.f;
  for (int i = threadIdx.x; i < cols; i += kThreads) {
    const float v = xr[i];
    ss = fmaf(v, v, ss);
  }
  ss = detail::warp_sum(ss);
  __shared__ float part[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) part[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    float v = lane < kThreads / 32 ? part[lane] : 0.f;
    v = detail::warp_sum(v);
    if (lane == 0) part[0] = v;
  }
  __syncthreads();
  const float scale = rsqrtf(part[0] / static_cast<float>(cols) + eps);
  float* yr = y + base;
  for (int i = threadIdx.x; i < cols; i += kThreads) yr[i] = (xr[i] * scale) * w[i];
}

}  // namespace

void rmsnorm_cuda(const float* x, const float* weight, float* y, int64_t rows, int64_t cols, float eps,
                  cudaStream_t stream) {
  TW_CHECK(x && weight && y, "rmsnorm_cuda: null pointer (x=", x, ", weight=", weight, ", y=", y, ")");
  TW_CHECK(rows > 0 && cols > 0, "rmsnorm_cuda: bad shape ", rows, " x ", cols);
  TW_CHECK(rows <= INT_MAX && cols <= INT_MAX, "rmsnorm_cuda: shape ", rows, " x ", cols, " is too large");
  TW_CHECK(std::isfinite(eps) && eps >= 0.f, "rmsnorm_cuda: eps must be finite and >= 0, got ", eps);
  rmsnorm_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, weight, y, static_cast<int>(cols), eps);
  TW_CUDA_CHECK_LAUNCH();
}

}  // namespace tw::cuda
