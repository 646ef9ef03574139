// GGML tensor types and their block layouts, pinned byte for byte to the GGUF format
// (ggml-common.h). A row of a quantised tensor is a sequence of blocks; ne[0] (the row length)
// must be a multiple of the block size.
#pragma once
#include <cstddef>
#include <cstdint>

namespace tw::gguf {

enum class Type : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};

constexpr int QK = 32;     // elements per block of the 32-element types
constexpr int QK_K = 256;  // elements per super-block of the k-quants
constexpr int K_SCALE_SIZE = 12;

using half = uint16_t;  // IEEE fp16 bits

struct block_q4_0 { half d; uint8_t qs[QK / 2]; };                       // x = (q - 8) * d
struct block_q4_1 { half d, m; uint8_t qs[QK / 2]; };                    // x = q * d + m
struct block_q5_0 { half d; uint8_t qh[4]; uint8_t qs[QK / 2]; };        // x = (q - 16) * d, 5th bit in qh
struct block_q5_1 { half d, m; uint8_t qh[4]; uint8_t qs[QK / 2]; };     // x = q * d + m
struct block_q8_0 { half d; int8_t qs[QK]; };                            // x = q * d
struct block_q8_1 { half d, s; int8_t qs[QK]; };                         // s = d * sum(qs)
struct block_q4_K { half d, dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qs[QK_K / 2]; };  // 8 sub-blocks of 32, 6-bit scales/mins
struct block_q5_K { half d, dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; };
struct block_q6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; half d; };  // 16 sub-blocks of 16
struct block_q8_K { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; };  // activations for k-quant dots

static_assert(sizeof(block_q4_0) == 18);
static_assert(sizeof(block_q4_1) == 20);
static_assert(sizeof(block_q5_0) == 22);
static_assert(sizeof(block_q5_1) == 24);
static_assert(sizeof(block_q8_0) == 34);
static_assert(sizeof(block_q8_1) == 36);
static_assert(sizeof(block_q4_K) == 144);
static_assert(sizeof(block_q5_K) == 176);
static_assert(sizeof(block_q6_K) == 210);
static_assert(sizeof(block_q8_K) == 292);

struct TypeTraits {
  const char* name;
  int block_elems;   // elements per block (1 for float types)
  int block_bytes;   // bytes per block
  bool supported;    // we can dequantise / compute with it
};

// Traits for any type id read from a file; unknown ids give {"unknown", 0, 0, false}.
TypeTraits type_traits(uint32_t type_id);
inline TypeTraits type_traits(Type t) { return type_traits(static_cast<uint32_t>(t)); }

// Bytes of a row of n elements; n must be a multiple of the block size (checked by the caller).
inline size_t row_bytes(Type t, int64_t n) {
  const TypeTraits tr = type_traits(t);
  return static_cast<size_t>(n / tr.block_elems) * tr.block_bytes;
}

// Dequantise n elements (a multiple of the block size) of type t from src into dst.
// Reference scalar code; throws tw::Error for an unsupported type.
void dequantize_row(Type t, const void* src, float* dst, int64_t n);

}  // namespace tw::gguf
