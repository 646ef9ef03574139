#include "gguf/quants.h"

#include <cstddef>
#include <cstring>

#include "common/error.h"
#include "common/fp16.h"

namespace tw::gguf {

TypeTraits type_traits(uint32_t id) {
  switch (static_cast<Type>(id)) {
    case Type::F32: return {"F32", 1, 4, true};
    case Type::F16: return {"F16", 1, 2, true};
    case Type::BF16: return {"BF16", 1, 2, true};
    case Type::Q4_0: return {"Q4_0", QK, sizeof(block_q4_0), true};
    case Type::Q4_1: return {"Q4_1", QK, sizeof(block_q4_1), true};
    case Type::Q5_0: return {"Q5_0", QK, sizeof(block_q5_0), true};
    case Type::Q5_1: return {"Q5_1", QK, sizeof(block_q5_1), true};
    case Type::Q8_0: return {"Q8_0", QK, sizeof(block_q8_0), true};
    case Type::Q8_1: return {"Q8_1", QK, sizeof(block_q8_1), false};
    case Type::Q2_K: return {"Q2_K", QK_K, 84, false};
    case Type::Q3_K: return {"Q3_K", QK_K, 110, false};
    case Type::Q4_K: return {"Q4_K", QK_K, sizeof(block_q4_K), true};
    case Type::Q5_K: return {"Q5_K", QK_K, sizeof(block_q5_K), true};
    case Type::Q6_K: return {"Q6_K", QK_K, sizeof(block_q6_K), true};
    case Type::Q8_K: return {"Q8_K", QK_K, sizeof(block_q8_K), false};
  }
  return {"unknown", 0, 0, false};
}

// ---- dequantize_row ------------------------------------------------------------------------
// Scalar reference, a line-by-line transcription of ggml's dequantize_row_* (ggml-quants.c), with
// the same float operation order so results are bit-identical to ggml and gguf-py. Blocks are read
// through byte offsets + memcpy, never by casting src to a block pointer: rows inside a mapped file
// or a fuzzer buffer need not be 2-byte aligned, and a misaligned half load would be UB.

// Keep a*b+c as two roundings like ggml's reference and numpy (clang would otherwise fuse it into
// an FMA on FMA-capable targets; GCC in ISO mode does not contract).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace {

inline float load_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}

void deq_f32(const uint8_t* x, float* y, int64_t n) { std::memcpy(y, x, static_cast<size_t>(n) * 4); }

void deq_f16(const uint8_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = load_half(x + 2 * i);
}

void deq_bf16(const uint8_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, x + 2 * i, 2);
    y[i] = bf16_to_fp32(h);
  }
}

void deq_q4_0(const uint8_t* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, x += sizeof(block_q4_0), y += QK) {
    const float d = load_half(x + offsetof(block_q4_0, d));
    const uint8_t* qs = x + offsetof(block_q4_0, qs);
    for (int j = 0; j < QK / 2; ++j) {  // low nibbles are elements 0..15, high nibbles 16..31
      const int x0 = (qs[j] & 0x0F) - 8;
      const int x1 = (qs[j] >> 4) - 8;
      y[j] = x0 * d;
      y[j + QK / 2] = x1 * d;
    }
  }
}

void deq_q4_1(const uint8_t* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, x += sizeof(block_q4_1), y += QK) {
    const float d = load_half(x + offsetof(block_q4_1, d));
    const float m = load_half(x + offsetof(block_q4_1, m));
    const uint8_t* qs = x + offsetof(block_q4_1, qs);
    for (int j = 0; j < QK / 2; ++j) {
      const int x0 = qs[j] & 0x0F;
      const int x1 = qs[j] >> 4;
      y[j] = x0 * d + m;
      y[j + QK / 2] = x1 * d + m;
    }
  }
}

// Q5_0/Q5_1: qh is a little-endian u32 whose bit j is the 5th bit of element j (0..31).
void deq_q5_0(const uint8_t* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, x += sizeof(block_q5_0), y += QK) {
    const float d = load_half(x + offsetof(block_q5_0, d));
    const uint8_t* h = x + offsetof(block_q5_0, qh);
    const uint32_t qh = uint32_t(h[0]) | uint32_t(h[1]) << 8 | uint32_t(h[2]) << 16 | uint32_t(h[3]) << 24;
    const uint8_t* qs = x + offsetof(block_q5_0, qs);
    for (int j = 0; j < QK / 2; ++j) {
      const uint8_t xh_0 = ((qh >> (j + 0)) << 4) & 0x10;
      const uint8_t xh_1 = ((qh >> (j + 12))) & 0x10;
      const int32_t x0 = ((qs[j] & 0x0F) | xh_0) - 16;
      const int32_t x1 = ((qs[j] >> 4) | xh_1) - 16;
      y[j] = x0 * d;
      y[j + QK / 2] = x1 * d;
    }
  }
}

void deq_q5_1(const uint8_t* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, x += sizeof(block_q5_1), y += QK) {
    const float d = load_half(x + offsetof(block_q5_1, d));
    const float m = load_half(x + offsetof(block_q5_1, m));
    const uint8_t* h = x + offsetof(block_q5_1, qh);
    const uint32_t qh = uint32_t(h[0]) | uint32_t(h[1]) << 8 | uint32_t(h[2]) << 16 | uint32_t(h[3]) << 24;
    const uint8_t* qs = x + offsetof(block_q5_1, qs);
    for (int j = 0; j < QK / 2; ++j) {
      const uint8_t xh_0 = ((qh >> (j + 0)) << 4) & 0x10;
      const uint8_t xh_1 = ((qh >> (j + 12))) & 0x10;
      const int x0 = (qs[j] & 0x0F) | xh_0;
      const int x1 = (qs[j] >> 4) | xh_1;
      y[j] = x0 * d + m;
      y[j + QK / 2] = x1 * d + m;
    }
  }
}

void deq_q8_0(const uint8_t* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, x += sizeof(block_q8_0), y += QK) {
    const float d = load_half(x + offsetof(block_q8_0, d));
    const uint8_t* qs = x + offsetof(block_q8_0, qs);
    for (int j = 0; j < QK; ++j) y[j] = static_cast<int8_t>(qs[j]) * d;
  }
}

// 6-bit scale and min of sub-block j (0..7) packed in 12 bytes (ggml get_scale_min_k4): bytes 0..3
// hold scales 0..3 (low 6 bits) and the top 2 bits of scales 4..7; bytes 4..7 the same for mins;
// bytes 8..11 hold the low 4 bits of scale (low nibble) and min (high nibble) 4..7.
inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

void deq_q4_K(const uint8_t* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, x += sizeof(block_q4_K)) {
    const float d = load_half(x + offsetof(block_q4_K, d));
    const float min = load_half(x + offsetof(block_q4_K, dmin));
    const uint8_t* scales = x + offsetof(block_q4_K, scales);
    const uint8_t* q = x + offsetof(block_q4_K, qs);
    int is = 0;
    uint8_t sc, m;
    for (int j = 0; j < QK_K; j += 64) {  // 32 bytes of qs give 64 elements: low nibbles, then high
      get_scale_min_k4(is + 0, scales, &sc, &m);
      const float d1 = d * sc, m1 = min * m;
      get_scale_min_k4(is + 1, scales, &sc, &m);
      const float d2 = d * sc, m2 = min * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
      q += 32;
      is += 2;
    }
  }
}

void deq_q5_K(const uint8_t* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, x += sizeof(block_q5_K)) {
    const float d = load_half(x + offsetof(block_q5_K, d));
    const float min = load_half(x + offsetof(block_q5_K, dmin));
    const uint8_t* scales = x + offsetof(block_q5_K, scales);
    const uint8_t* ql = x + offsetof(block_q5_K, qs);
    const uint8_t* qh = x + offsetof(block_q5_K, qh);  // bit 2k / 2k+1 of qh[l]: 5th bit of sub-block 2k / 2k+1
    int is = 0;
    uint8_t sc, m;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0; j < QK_K; j += 64) {
      get_scale_min_k4(is + 0, scales, &sc, &m);
      const float d1 = d * sc, m1 = min * m;
      get_scale_min_k4(is + 1, scales, &sc, &m);
      const float d2 = d * sc, m2 = min * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
      ql += 32;
      is += 2;
      u1 <<= 2;
      u2 <<= 2;
    }
  }
}

void deq_q6_K(const uint8_t* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, x += sizeof(block_q6_K)) {
    const float d = load_half(x + offsetof(block_q6_K, d));
    const uint8_t* ql = x + offsetof(block_q6_K, ql);
    const uint8_t* qh = x + offsetof(block_q6_K, qh);
    const int8_t* sc = reinterpret_cast<const int8_t*>(x + offsetof(block_q6_K, scales));
    // Each half (128 elements) uses 64 bytes of ql (low 4 bits), 32 of qh (2 high bits each) and
    // 8 scales, one per 16 elements.
    for (int n = 0; n < QK_K; n += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int8_t q1 = static_cast<int8_t>((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int8_t q2 = static_cast<int8_t>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int8_t q3 = static_cast<int8_t>((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int8_t q4 = static_cast<int8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l + 0] = d * sc[is + 0] * q1;
        y[l + 32] = d * sc[is + 2] * q2;
        y[l + 64] = d * sc[is + 4] * q3;
        y[l + 96] = d * sc[is + 6] * q4;
      }
      y += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
  }
}

}  // namespace

void dequantize_row(Type t, const void* src, float* dst, int64_t n) {
  const TypeTraits tr = type_traits(t);
  if (!tr.supported) fail("dequantize_row: type ", tr.name, " (id ", static_cast<uint32_t>(t), ") is not supported");
  if (n < 0 || n % tr.block_elems != 0)
    fail("dequantize_row: ", n, " elements is not a multiple of the ", tr.name, " block size ", tr.block_elems);
  if (n == 0) return;  // src/dst may be null for an empty row
  const auto* x = static_cast<const uint8_t*>(src);
  const int64_t nb = n / tr.block_elems;
  switch (t) {
    case Type::F32: return deq_f32(x, dst, n);
    case Type::F16: return deq_f16(x, dst, n);
    case Type::BF16: return deq_bf16(x, dst, n);
    case Type::Q4_0: return deq_q4_0(x, dst, nb);
    case Type::Q4_1: return deq_q4_1(x, dst, nb);
    case Type::Q5_0: return deq_q5_0(x, dst, nb);
    case Type::Q5_1: return deq_q5_1(x, dst, nb);
    case Type::Q8_0: return deq_q8_0(x, dst, nb);
    case Type::Q4_K: return deq_q4_K(x, dst, nb);
    case Type::Q5_K: return deq_q5_K(x, dst, nb);
    case Type::Q6_K: return deq_q6_K(x, dst, nb);
    default: break;
  }
  fail("dequantize_row: type ", tr.name, " has no dequantiser");  // traits say supported but no case: a bug
}

}  // namespace tw::gguf
