// RMSNorm on the GPU: y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:], fp32 throughout,
// the formula of llama.cpp's rms_norm followed by the weight multiply.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace tw::cuda {

// x, y: device pointers to rows x cols floats, row-major (y may equal x: in place is allowed).
// weight: device pointer to cols floats. Asynchronous on `stream`. Bad arguments throw tw::Error
// before anything is launched; a failed launch throws tw::Error too.
void rmsnorm_cuda(const float* x, const float* weight, float* y, int64_t rows, int64_t cols, float eps,
                  cudaStream_t stream = nullptr);

}  // namespace tw::cuda
