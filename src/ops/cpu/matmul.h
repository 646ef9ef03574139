// Weight-matrix products on the CPU: quantised matrix-vector (decode) and matrix-matrix (prefill).
// Numerics follow llama.cpp: the activations are quantised once per call to the weight type's
// "vec_dot type" (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the k-quants, fp16/bf16
// rounding for F16/BF16) and each block is an integer dot product scaled in fp32.
// The SIMD level (scalar / AVX2 / AVX-512 VNNI) is picked at run time from the CPU, or forced with
// TWILIGHT_SIMD=scalar|avx2|avx512.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/threadpool.h"
#include "gguf/gguf.h"

namespace tw::ops {

// A weight matrix view: rows x cols, row-major, each row = row_bytes bytes of blocks of `type`.
struct QMatrix {
  gguf::Type type = gguf::Type::F32;
  int64_t rows = 0, cols = 0;      // (out_features, in_features): GGUF ne[1], ne[0]
  const uint8_t* data = nullptr;
  size_t row_bytes = 0;
};
QMatrix as_matrix(const gguf::TensorInfo& t);  // 2-D tensors only; tw::Error otherwise

// y[rows] = W · x[cols]. Threads split the rows.
void matvec(const QMatrix& W, const float* x, float* y, ThreadPool& pool);
// Y[n][rows] = X[n][cols] · W^T (row i of Y is W · row i of X). For prefill chunks (n up to ~512).
void matmul(const QMatrix& W, const float* X, int64_t n, float* Y, ThreadPool& pool);
// Dequantise row r of W into out[cols] (embedding lookup).
void get_row(const QMatrix& W, int64_t r, float* out);

// ---- SIMD level (tests and benchmarks pin it; the three functions above use active_simd()) ----
enum class Simd { Scalar = 0, AVX2 = 1, AVX512 = 2 };
const char* simd_name(Simd s);
bool simd_supported(Simd s);          // the CPU (and this build) can run it
Simd best_simd();                     // highest supported level
// TWILIGHT_SIMD if set (tw::Error for an unknown or unsupported value), else best_simd().
// Read once; later calls return the cached level.
Simd active_simd();
Simd parse_simd(const char* name);    // "scalar" | "avx2" | "avx512"; tw::Error otherwise

void matvec(const QMatrix& W, const float* x, float* y, ThreadPool& pool, Simd level);
void matmul(const QMatrix& W, const float* X, int64_t n, float* Y, ThreadPool& pool, Simd level);

// True for the weight types matvec/matmul/get_row accept.
bool matmul_supported(gguf::Type t);

}  // namespace tw::ops
