// Internal pieces of the CPU weight products: activation quantisation, scalar reference dots and
// dequantisation (the ground truth the SIMD kernels are tested against), and the per-level kernel
// tables. Everything works on whole rows; cols must be a multiple of the weight's block size.
#pragma once
#include <cstddef>
#include <cstdint>

#include "gguf/quants.h"

namespace tw::ops::detail {

// Activation block for the 32-element types (llama.cpp's block_q8_0 / block_q8_1, unpacked to
// floats so kernels need no fp16 conversion). d is already rounded to fp16 precision like the
// fp16 field llama.cpp stores; s = fp16(d_unrounded * sum(qs)) as in block_q8_1 (only Q4_1/Q5_1 use it);
// sum = sum(qs) exactly (the interleaved GEMM subtracts offset * sum for the symmetric types).
struct ActQ8 {
  float d;
  float s;
  int32_t sum;
  int8_t qs[32];
};
static_assert(sizeof(ActQ8) == 44);

// Activation super-block for the k-quants: llama.cpp's block_q8_K plus sum32[j] = d * (sum of the
// 32 qs of sub-block j), which lets the SIMD kernels fold the Q4_K/Q5_K min term into one fp32 FMA.
struct ActQ8K {
  float d;
  int8_t qs[256];
  int16_t bsums[16];  // sums of 16 qs
  float sum32[8];
};
static_assert(sizeof(ActQ8K) == 324);

// Activation kind a weight type is paired with.
enum class ActKind { Q8_0, Q8_1, Q8_K, F32, F16, BF16 };
ActKind act_kind(gguf::Type wt);  // tw::Error for an unsupported weight type

// Bytes of one quantised activation row of `cols` elements for weight type wt.
size_t act_row_bytes(gguf::Type wt, int64_t cols);

// Quantise x[cols] into dst (act_row_bytes bytes) for weight type wt. One implementation for all
// SIMD levels, so every level sees the same quantised activations (llama.cpp x86 numerics:
// Q8_0/Q8_1 use id = 127/amax and round-half-even; Q8_K follows quantize_row_q8_K_ref; F16/BF16
// round x to that format; F32 copies).
void quantize_act_row(gguf::Type wt, const float* x, int64_t cols, uint8_t* dst);

// Reference scalar dequantisation of one row (n elements) of weight type t.
void dequantize_row_ref(gguf::Type t, const uint8_t* src, int64_t n, float* dst);

// Reference scalar dot of one weight row with one quantised activation row: integer dot product per
// block, scaled in fp32, accumulated in the order of llama.cpp's generic C kernels.
float dot_ref(gguf::Type wt, const uint8_t* wrow, const uint8_t* act, int64_t cols);

// A SIMD row kernel: out[c] = dot(wrow, acts[c]) for c < nc (1 <= nc <= kMaxCols). The weight row
// is read once for all nc activation rows (the register-level reuse of the prefill GEMM).
constexpr int kMaxCols = 8;
// Activation rows per kernel call the GEMM should use at a level (what fits in the registers:
// 8 with AVX-512's 32 vector registers, 4 with AVX2's 16).
int cols_per_call(int simd_level);
using RowKernel = void (*)(const uint8_t* wrow, const uint8_t* const* acts, int nc, int64_t cols, float* out);

// Kernel tables per level; nullptr when the type has no kernel at that level or the build lacks it.
RowKernel avx2_kernel(gguf::Type wt);
RowKernel avx512_kernel(gguf::Type wt);

// Interleaved GEMM path (AVX-512 level; Q4_K and the 32-element types): 8 weight rows are repacked so that one vector holds
// 4 quant bytes of each of the 8 rows, with their scales, mins and d as 8-lane vectors. A vpdpbusd
// with a broadcast group of 4 activation bytes then yields 8 rows' partial dots at once: no
// horizontal sums, and scales/mins applied to 8 rows per instruction.
struct Interleaved8 {
  size_t (*packed_bytes)(int64_t cols) = nullptr;  // bytes of one repacked 8-row group
  // Repack rows w, w + row_bytes, ..., w + 7 * row_bytes (cols columns) into dst.
  void (*repack)(const uint8_t* w, size_t row_bytes, int64_t cols, uint8_t* dst) = nullptr;
  // out[c][0..7] = the 8 rows' dots with activation row acts[c], c < nc (1 <= nc <= 4).
  void (*kernel)(const uint8_t* packed, const uint8_t* const* acts, int nc, int64_t cols, float* const* out) = nullptr;
};
Interleaved8 avx512_interleaved8(gguf::Type wt);  // empty (nullptrs) when the type has none

// Q4_K/Q5_K 6-bit scales and mins of a super-block: sc[0..7] scales, sc[8..15] mins.
void unpack_k4_scales(const uint8_t* scales12, uint8_t* sc16);

}  // namespace tw::ops::detail
