// Quantised matrix-vector product on the GPU: y = W x, W in a GGUF block layout (read directly,
// never dequantised to memory), x and y fp32.
//
// Numerics: each weight is dequantised to fp32 and multiplied by the fp32 x, accumulated in fp32.
// The CPU path (like llama.cpp) instead quantises x to Q8 and does integer dots, so the two agree
// only to the Q8 rounding of x (~1e-2 relative); against an fp32/fp64 dequantise-and-dot reference
// this kernel agrees to fp32 rounding (~1e-6 relative). Tests use the latter reference.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "gguf/quants.h"

namespace tw::cuda {

// A quantised matrix in device memory: `rows` rows of `cols` elements (cols = GGUF ne[0], the input
// length; rows = ne[1], the output length), rows stored back to back, each gguf::row_bytes(type,
// cols) bytes. Non-owning view.
struct DeviceQMatrix {
  const void* data = nullptr;     // device pointer, 16-byte aligned (cudaMalloc gives 256)
  gguf::Type type = gguf::Type::F32;
  int64_t rows = 0;
  int64_t cols = 0;               // a multiple of the type's block size
};

// Types qmatvec_cuda handles: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K (all weight types of our models).
bool qmatvec_supported(gguf::Type t);

// y[r] = sum_c W[r, c] * x[c] for r < rows. x_dev: cols floats, y_dev: rows floats (device, 16-byte
// aligned, not overlapping W). Asynchronous on `stream`. Unsupported type, bad shape or pointer ->
// tw::Error before launch; a failed launch -> tw::Error.
void qmatvec_cuda(const DeviceQMatrix& w, const float* x_dev, float* y_dev, cudaStream_t stream = nullptr);

}  // namespace tw::cuda
