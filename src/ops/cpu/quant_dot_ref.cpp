// Scalar reference code: activation quantisation (shared by every SIMD level), dequantisation and
// the integer block dot products. Plain loops, written for clarity; the SIMD kernels must agree.
#include <cmath>
#include <cstring>

#include "common/error.h"
#include "common/fp16.h"
#include "ops/cpu/quant_dot.h"

namespace tw::ops::detail {

using gguf::Type;
using namespace tw::gguf;  // block structs

ActKind act_kind(Type wt) {
  switch (wt) {
    case Type::Q4_0: case Type::Q5_0: case Type::Q8_0: return ActKind::Q8_0;
    case Type::Q4_1: case Type::Q5_1: return ActKind::Q8_1;
    case Type::Q4_K: case Type::Q5_K: case Type::Q6_K: return ActKind::Q8_K;
    case Type::F32: return ActKind::F32;
    case Type::F16: return ActKind::F16;
    case Type::BF16: return ActKind::BF16;
    default: break;
  }
  fail("matmul: weight type ", type_traits(wt).name, " (id ", static_cast<uint32_t>(wt), ") is not supported");
}

size_t act_row_bytes(Type wt, int64_t cols) {
  switch (act_kind(wt)) {
    case ActKind::Q8_0: case ActKind::Q8_1: return static_cast<size_t>(cols / QK) * sizeof(ActQ8);
    case ActKind::Q8_K: return static_cast<size_t>(cols / QK_K) * sizeof(ActQ8K);
    default: return static_cast<size_t>(cols) * sizeof(float);  // F32/F16/BF16: rounded floats
  }
}

int cols_per_call(int simd_level) { return simd_level >= 2 ? 8 : 4; }

void unpack_k4_scales(const uint8_t* q, uint8_t* sc16) {
  // get_scale_min_k4 of ggml: 6-bit scale j and min j; j >= 4 borrow their top 2 bits from bytes 0..7.
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      sc16[j] = q[j] & 63;
      sc16[8 + j] = q[j + 4] & 63;
    } else {
      sc16[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
      sc16[8 + j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
  }
}

// ---- activation quantisation -------------------------------------------------------------------

static inline int nearest_int(float f) {  // ggml's magic-number rounding (half to even), |f| < 2^22
  float val = f + 12582912.f;
  int i;
  std::memcpy(&i, &val, sizeof(int));
  return (i & 0x007fffff) - 0x00400000;
}

static void quantize_q8_32(const float* x, int64_t cols, ActQ8* y) {
  for (int64_t b = 0; b < cols / QK; ++b, x += QK) {
    float amax = 0.0f;
    for (int j = 0; j < QK; ++j) {
      const float ax = std::fabs(x[j]);
      amax = ax > amax ? ax : amax;  // not std::fmax: that is a libm call at the x86-64 baseline
    }
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;  // llama.cpp's AVX path: 127/amax, not 1/d
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
      const int q = nearest_int(x[j] * id);  // round half to even, like _mm256_round_ps(_MM_ROUND_NEAREST)
      y[b].qs[j] = static_cast<int8_t>(q);
      sum += q;
    }
    y[b].d = fp16_to_fp32(fp32_to_fp16(d));
    y[b].s = fp16_to_fp32(fp32_to_fp16(d * static_cast<float>(sum)));
    y[b].sum = sum;
  }
}

static void quantize_q8_K(const float* x, int64_t cols, ActQ8K* y) {
  for (int64_t b = 0; b < cols / QK_K; ++b, x += QK_K) {
    float max = 0, amax = 0;
    for (int j = 0; j < QK_K; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) { amax = ax; max = x[j]; }
    }
    if (amax == 0.0f) {
      std::memset(&y[b], 0, sizeof(y[b]));
      continue;
    }
    const float iscale = -127.f / max;
    for (int j = 0; j < QK_K; ++j) {
      const int v = nearest_int(iscale * x[j]);
      y[b].qs[j] = static_cast<int8_t>(v < 127 ? v : 127);
    }
    for (int j = 0; j < QK_K / 16; ++j) {
      int sum = 0;
      for (int i = 0; i < 16; ++i) sum += y[b].qs[j * 16 + i];
      y[b].bsums[j] = static_cast<int16_t>(sum);
    }
    y[b].d = 1 / iscale;
    for (int j = 0; j < 8; ++j) y[b].sum32[j] = y[b].d * static_cast<float>(y[b].bsums[2 * j] + y[b].bsums[2 * j + 1]);
  }
}

void quantize_act_row(Type wt, const float* x, int64_t cols, uint8_t* dst) {
  switch (act_kind(wt)) {
    case ActKind::Q8_0:
    case ActKind::Q8_1: quantize_q8_32(x, cols, reinterpret_cast<ActQ8*>(dst)); return;
    case ActKind::Q8_K: quantize_q8_K(x, cols, reinterpret_cast<ActQ8K*>(dst)); return;
    case ActKind::F32: std::memcpy(dst, x, static_cast<size_t>(cols) * sizeof(float)); return;
    case ActKind::F16: {
      float* o = reinterpret_cast<float*>(dst);
      for (int64_t i = 0; i < cols; ++i) o[i] = fp16_to_fp32(fp32_to_fp16(x[i]));
      return;
    }
    case ActKind::BF16: {
      float* o = reinterpret_cast<float*>(dst);
      for (int64_t i = 0; i < cols; ++i) o[i] = bf16_to_fp32(fp32_to_bf16(x[i]));
      return;
    }
  }
}

// ---- dequantisation ----------------------------------------------------------------------------

template <typename B>
static const B* blocks(const uint8_t* p) { return reinterpret_cast<const B*>(p); }

void dequantize_row_ref(Type t, const uint8_t* src, int64_t n, float* y) {
  switch (t) {
    case Type::F32: std::memcpy(y, src, static_cast<size_t>(n) * 4); return;
    case Type::F16: {
      for (int64_t i = 0; i < n; ++i) { uint16_t h; std::memcpy(&h, src + 2 * i, 2); y[i] = fp16_to_fp32(h); }
      return;
    }
    case Type::BF16: {
      for (int64_t i = 0; i < n; ++i) { uint16_t h; std::memcpy(&h, src + 2 * i, 2); y[i] = bf16_to_fp32(h); }
      return;
    }
    case Type::Q4_0: {
      const auto* x = blocks<block_q4_0>(src);
      for (int64_t b = 0; b < n / QK; ++b, y += QK) {
        const float d = fp16_to_fp32(x[b].d);
        for (int j = 0; j < 16; ++j) {
          y[j] = ((x[b].qs[j] & 0xF) - 8) * d;
          y[j + 16] = ((x[b].qs[j] >> 4) - 8) * d;
        }
      }
      return;
    }
    case Type::Q4_1: {
      const auto* x = blocks<block_q4_1>(src);
      for (int64_t b = 0; b < n / QK; ++b, y += QK) {
        const float d = fp16_to_fp32(x[b].d), m = fp16_to_fp32(x[b].m);
        for (int j = 0; j < 16; ++j) {
          y[j] = (x[b].qs[j] & 0xF) * d + m;
          y[j + 16] = (x[b].qs[j] >> 4) * d + m;
        }
      }
      return;
    }
    case Type::Q5_0:
    case Type::Q5_1: {
      const bool has_min = t == Type::Q5_1;
      const size_t bs = has_min ? sizeof(block_q5_1) : sizeof(block_q5_0);
      for (int64_t b = 0; b < n / QK; ++b, y += QK) {
        const uint8_t* p = src + b * bs;
        uint16_t dh, mh = 0;
        std::memcpy(&dh, p, 2);
        if (has_min) std::memcpy(&mh, p + 2, 2);
        const uint8_t* qhp = p + (has_min ? 4 : 2);
        const uint8_t* qs = qhp + 4;
        uint32_t qh;
        std::memcpy(&qh, qhp, 4);
        const float d = fp16_to_fp32(dh), m = has_min ? fp16_to_fp32(mh) : 0.0f;
        const int off = has_min ? 0 : 16;
        for (int j = 0; j < 16; ++j) {
          const int x0 = ((qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - off;
          const int x1 = ((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - off;
          y[j] = has_min ? x0 * d + m : x0 * d;
          y[j + 16] = has_min ? x1 * d + m : x1 * d;
        }
      }
      return;
    }
    case Type::Q8_0: {
      const auto* x = blocks<block_q8_0>(src);
      for (int64_t b = 0; b < n / QK; ++b, y += QK) {
        const float d = fp16_to_fp32(x[b].d);
        for (int j = 0; j < QK; ++j) y[j] = x[b].qs[j] * d;
      }
      return;
    }
    case Type::Q4_K:
    case Type::Q5_K: {
      const bool q5 = t == Type::Q5_K;
      for (int64_t b = 0; b < n / QK_K; ++b) {
        const uint8_t *scales, *qs, *qh = nullptr;
        uint16_t dh, mh;
        if (q5) {
          const auto& x = blocks<block_q5_K>(src)[b];
          dh = x.d; mh = x.dmin; scales = x.scales; qs = x.qs; qh = x.qh;
        } else {
          const auto& x = blocks<block_q4_K>(src)[b];
          dh = x.d; mh = x.dmin; scales = x.scales; qs = x.qs;
        }
        const float d = fp16_to_fp32(dh), dmin = fp16_to_fp32(mh);
        uint8_t sc[16];
        unpack_k4_scales(scales, sc);
        // 4 chunks of 64: low nibbles = sub-block 2j, high nibbles = sub-block 2j+1.
        for (int j = 0; j < 4; ++j, qs += 32) {
          const float d1 = d * sc[2 * j], m1 = dmin * sc[8 + 2 * j];
          const float d2 = d * sc[2 * j + 1], m2 = dmin * sc[8 + 2 * j + 1];
          for (int l = 0; l < 32; ++l) {
            const int h1 = q5 ? ((qh[l] >> (2 * j)) & 1) << 4 : 0;
            const int h2 = q5 ? ((qh[l] >> (2 * j + 1)) & 1) << 4 : 0;
            y[l] = d1 * ((qs[l] & 0xF) | h1) - m1;
            y[l + 32] = d2 * ((qs[l] >> 4) | h2) - m2;
          }
          y += 64;
        }
      }
      return;
    }
    case Type::Q6_K: {
      const auto* x = blocks<block_q6_K>(src);
      for (int64_t b = 0; b < n / QK_K; ++b) {
        const float d = fp16_to_fp32(x[b].d);
        const uint8_t* ql = x[b].ql;
        const uint8_t* qh = x[b].qh;
        const int8_t* sc = x[b].scales;
        for (int half = 0; half < 2; ++half) {
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is + 0] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
          }
          y += 128; ql += 64; qh += 32; sc += 8;
        }
      }
      return;
    }
    default: break;
  }
  fail("dequantize: weight type ", type_traits(t).name, " is not supported");
}

// ---- reference dots ----------------------------------------------------------------------------

// Unpacked integer weights of one 32-element block (value = q), for the 32-element types.
static void unpack32(Type t, const uint8_t* p, int* q, float* d, float* m) {
  uint16_t dh, mh = 0;
  std::memcpy(&dh, p, 2);
  *d = fp16_to_fp32(dh);
  *m = 0;
  switch (t) {
    case Type::Q4_0: case Type::Q4_1: {
      const bool has_min = t == Type::Q4_1;
      if (has_min) { std::memcpy(&mh, p + 2, 2); *m = fp16_to_fp32(mh); }
      const uint8_t* qs = p + (has_min ? 4 : 2);
      for (int j = 0; j < 16; ++j) {
        q[j] = (qs[j] & 0xF) - (has_min ? 0 : 8);
        q[j + 16] = (qs[j] >> 4) - (has_min ? 0 : 8);
      }
      return;
    }
    case Type::Q5_0: case Type::Q5_1: {
      const bool has_min = t == Type::Q5_1;
      if (has_min) { std::memcpy(&mh, p + 2, 2); *m = fp16_to_fp32(mh); }
      uint32_t qh;
      std::memcpy(&qh, p + (has_min ? 4 : 2), 4);
      const uint8_t* qs = p + (has_min ? 8 : 6);
      for (int j = 0; j < 16; ++j) {
        q[j] = ((qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - (has_min ? 0 : 16);
        q[j + 16] = ((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - (has_min ? 0 : 16);
      }
      return;
    }
    case Type::Q8_0: {
      for (int j = 0; j < 32; ++j) q[j] = static_cast<int8_t>(p[2 + j]);
      return;
    }
    default: fail("unpack32: not a 32-element type");
  }
}

float dot_ref(Type wt, const uint8_t* w, const uint8_t* act, int64_t cols) {
  float sumf = 0.0f;
  switch (wt) {
    case Type::F32: case Type::F16: case Type::BF16: {
      const float* a = reinterpret_cast<const float*>(act);
      const int eb = type_traits(wt).block_bytes;
      for (int64_t i = 0; i < cols; ++i) {
        float v;
        if (wt == Type::F32) {
          std::memcpy(&v, w + 4 * i, 4);
        } else {
          uint16_t h;
          std::memcpy(&h, w + eb * i, 2);
          v = wt == Type::F16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
        }
        sumf += v * a[i];
      }
      return sumf;
    }
    case Type::Q4_0: case Type::Q4_1: case Type::Q5_0: case Type::Q5_1: case Type::Q8_0: {
      const ActQ8* y = reinterpret_cast<const ActQ8*>(act);
      const int bb = type_traits(wt).block_bytes;
      int q[32];
      for (int64_t b = 0; b < cols / QK; ++b) {
        float d, m;
        unpack32(wt, w + b * bb, q, &d, &m);
        int sumi = 0;
        for (int j = 0; j < 32; ++j) sumi += q[j] * y[b].qs[j];
        sumf += (d * y[b].d) * static_cast<float>(sumi);
        if (wt == Type::Q4_1 || wt == Type::Q5_1) sumf += m * y[b].s;  // min term via q8_1's s
      }
      return sumf;
    }
    case Type::Q4_K: case Type::Q5_K: {
      const bool q5 = wt == Type::Q5_K;
      const ActQ8K* y = reinterpret_cast<const ActQ8K*>(act);
      for (int64_t b = 0; b < cols / QK_K; ++b) {
        const uint8_t *scales, *qs, *qh = nullptr;
        uint16_t dh, mh;
        if (q5) {
          const auto& x = blocks<block_q5_K>(w)[b];
          dh = x.d; mh = x.dmin; scales = x.scales; qs = x.qs; qh = x.qh;
        } else {
          const auto& x = blocks<block_q4_K>(w)[b];
          dh = x.d; mh = x.dmin; scales = x.scales; qs = x.qs;
        }
        uint8_t sc[16];
        unpack_k4_scales(scales, sc);
        int isum = 0, msum = 0;
        for (int j = 0; j < 4; ++j) {
          int s1 = 0, s2 = 0;
          for (int l = 0; l < 32; ++l) {
            const int h1 = q5 ? ((qh[l] >> (2 * j)) & 1) << 4 : 0;
            const int h2 = q5 ? ((qh[l] >> (2 * j + 1)) & 1) << 4 : 0;
            s1 += ((qs[32 * j + l] & 0xF) | h1) * y[b].qs[64 * j + l];
            s2 += ((qs[32 * j + l] >> 4) | h2) * y[b].qs[64 * j + 32 + l];
          }
          isum += sc[2 * j] * s1 + sc[2 * j + 1] * s2;
        }
        for (int j = 0; j < 8; ++j) msum += sc[8 + j] * (y[b].bsums[2 * j] + y[b].bsums[2 * j + 1]);
        sumf += (fp16_to_fp32(dh) * y[b].d) * static_cast<float>(isum) -
                (fp16_to_fp32(mh) * y[b].d) * static_cast<float>(msum);
      }
      return sumf;
    }
    case Type::Q6_K: {
      const block_q6_K* x = blocks<block_q6_K>(w);
      const ActQ8K* y = reinterpret_cast<const ActQ8K*>(act);
      for (int64_t b = 0; b < cols / QK_K; ++b) {
        int q[QK_K];
        const uint8_t* ql = x[b].ql;
        const uint8_t* qh = x[b].qh;
        for (int half = 0; half < 2; ++half, ql += 64, qh += 32) {
          int* o = q + 128 * half;
          for (int l = 0; l < 32; ++l) {
            o[l] = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            o[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            o[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            o[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
          }
        }
        int isum = 0;
        for (int s = 0; s < 16; ++s) {
          int si = 0;
          for (int l = 0; l < 16; ++l) si += q[16 * s + l] * y[b].qs[16 * s + l];
          isum += x[b].scales[s] * si;
        }
        sumf += (fp16_to_fp32(x[b].d) * y[b].d) * static_cast<float>(isum);
      }
      return sumf;
    }
    default: break;
  }
  fail("dot_ref: weight type ", type_traits(wt).name, " is not supported");
}

}  // namespace tw::ops::detail
