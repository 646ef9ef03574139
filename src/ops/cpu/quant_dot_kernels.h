// SIMD row kernels, written once and compiled twice: quant_dot_avx2.cpp (AVX2 + FMA + F16C) and
// quant_dot_avx512.cpp (adds AVX-512 VL/BW/VNNI). Both files include every system header first and
// then switch the target with #pragma GCC target, so nothing outside this code is compiled for the
// wider ISA; everything here has internal linkage (anonymous namespace) so no AVX-512 code can be
// merged into a generic inline function by the linker.
//
// TW_VNNI=1 (the AVX-512 level) replaces the AVX2 multiply-add chains (maddubs+madd+add) by
// vpdpbusd / vpdpwssd, uses 512-bit row kernels for the k-quants, and adds the interleaved 8-row
// GEMM kernels (Interleaved8). The 32-element row kernels stay 256 bits wide: a block is one ymm.
//
// Every row kernel computes out[c] = dot(w, act_c) for NC activation rows at once: each weight block
// is loaded and unpacked once and reused NC times (register blocking for the prefill GEMM).
// Block integer sums are exact, so the only difference from dot_ref is the fp32 summation order.
// No include guard: included once per SIMD level.

namespace {

using tw::gguf::block_q4_K;
using tw::gguf::block_q5_K;
using tw::gguf::block_q6_K;
using tw::gguf::QK;
using tw::gguf::QK_K;
using tw::ops::detail::ActQ8;
using tw::ops::detail::ActQ8K;

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hsum4(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float h2f(const void* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i loadu256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// Sum of u8*s8 products in groups of 4 -> 8 x i32. u <= 255 for VNNI; the AVX2 path needs
// 2*u*|s| <= 32767 (maddubs saturates): u <= 128 with |s| <= 127 holds for every caller.
inline __m256i mul_sum_us8(__m256i u, __m256i s) {
#if TW_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// acc += pairwise i16 products (p16 * scale16) as i32.
inline __m256i madd_acc(__m256i acc, __m256i p16, __m256i scale16) {
#if TW_VNNI
  return _mm256_dpwssd_epi32(acc, p16, scale16);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, scale16));
#endif
}

// 32 bits -> 32 bytes of 0xFF (bit set) / 0x00 (ggml's bytes_from_bits_32).
inline __m256i bytes_from_bits_32(const uint8_t* x) {
  uint32_t x32;
  std::memcpy(&x32, x, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x32)), shuf);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

// 16 packed nibbles -> 32 bytes: low nibbles are elements 0..15, high nibbles 16..31.
inline __m256i nibbles_32(const uint8_t* qs) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

// ---- 32-element types (activations: ActQ8) ------------------------------------------------------

enum class W32 { Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 };

template <W32 T> constexpr size_t kBlockBytes = T == W32::Q4_0 ? 18 : T == W32::Q4_1 ? 20 : T == W32::Q5_0 ? 22 : T == W32::Q5_1 ? 24 : 34;
template <W32 T> constexpr bool kHasMin = T == W32::Q4_1 || T == W32::Q5_1;

// The 32 weights of a block as bytes: signed (q - offset) for the _0 types, unsigned q for _1.
template <W32 T>
inline __m256i unpack32(const uint8_t* p) {
  if constexpr (T == W32::Q4_0) {
    return _mm256_sub_epi8(nibbles_32(p + 2), _mm256_set1_epi8(8));
  } else if constexpr (T == W32::Q4_1) {
    return nibbles_32(p + 4);
  } else if constexpr (T == W32::Q5_0) {
    // 0xF0 where the 5th bit is clear: as int8, (q | 0xF0) = q - 16 and q | 0x10 - 16 = q.
    const __m256i hi = _mm256_andnot_si256(bytes_from_bits_32(p + 2), _mm256_set1_epi8(static_cast<char>(0xF0)));
    return _mm256_or_si256(nibbles_32(p + 6), hi);
  } else if constexpr (T == W32::Q5_1) {
    const __m256i hi = _mm256_and_si256(bytes_from_bits_32(p + 4), _mm256_set1_epi8(0x10));
    return _mm256_or_si256(nibbles_32(p + 8), hi);
  } else {
    return loadu256(p + 2);
  }
}

template <W32 T, int NC>
void kern32(const uint8_t* w, const uint8_t* const* acts, int64_t cols, float* out) {
  const ActQ8* y[NC];
  __m256 acc[NC][2];
  float summ[NC];
  for (int c = 0; c < NC; ++c) {
    y[c] = reinterpret_cast<const ActQ8*>(acts[c]);
    acc[c][0] = acc[c][1] = _mm256_setzero_ps();
    summ[c] = 0.0f;
  }
  const int64_t nb = cols / QK;
  auto block = [&](int64_t b, int k) {
    const uint8_t* p = w + b * kBlockBytes<T>;
    const __m256i qx = unpack32<T>(p);
    const float dx = h2f(p);
    if constexpr (kHasMin<T>) {
      const float mx = h2f(p + 2);
      for (int c = 0; c < NC; ++c) {
        const __m256i s = mul_sum_us8(qx, loadu256(y[c][b].qs));  // q <= 31: no saturation
        acc[c][k] = _mm256_fmadd_ps(_mm256_set1_ps(dx * y[c][b].d), _mm256_cvtepi32_ps(s), acc[c][k]);
        summ[c] += mx * y[c][b].s;
      }
    } else {
      // Signed x signed via |x| * sign(y, x): |x| <= 128, |y| <= 127 keeps maddubs exact.
      const __m256i ax = _mm256_sign_epi8(qx, qx);
      for (int c = 0; c < NC; ++c) {
        const __m256i sy = _mm256_sign_epi8(loadu256(y[c][b].qs), qx);
        const __m256i s = mul_sum_us8(ax, sy);
        acc[c][k] = _mm256_fmadd_ps(_mm256_set1_ps(dx * y[c][b].d), _mm256_cvtepi32_ps(s), acc[c][k]);
      }
    }
  };
  int64_t b = 0;
  if constexpr (NC <= 2) {
    for (; b + 2 <= nb; b += 2) {  // two accumulator chains hide the FMA latency
      block(b, 0);
      block(b + 1, 1);
    }
  }
  for (; b < nb; ++b) block(b, 0);
  for (int c = 0; c < NC; ++c) out[c] = hsum8(_mm256_add_ps(acc[c][0], acc[c][1])) + summ[c];
}

// ---- k-quants (activations: ActQ8K) ---------------------------------------------------------

// Scales (bytes 0..7) and mins (bytes 8..15) of a Q4_K/Q5_K super-block (ggml's kmask trick).
inline __m256i k4_scales_mins(const uint8_t* scales12) {
  uint32_t u[4];
  std::memcpy(u, scales12, 12);
  constexpr uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
  u[3] = ((u[2] >> 4) & kmask2) | (((u[1] >> 6) & kmask3) << 4);
  const uint32_t uaux = u[1] & kmask1;
  u[1] = (u[2] & kmask2) | (((u[0] >> 6) & kmask3) << 4);
  u[2] = uaux;
  u[0] &= kmask1;
  return _mm256_cvtepu8_epi16(_mm_set_epi32(static_cast<int>(u[3]), static_cast<int>(u[2]), static_cast<int>(u[1]), static_cast<int>(u[0])));
}

// Broadcast i16 element k of each 128-bit lane.
inline __m256i bcast16(__m256i v, int k) {
  return _mm256_shuffle_epi8(v, _mm256_set1_epi16(static_cast<short>(((2 * k + 1) << 8) | (2 * k))));
}

template <bool Q5, int NC>
void kern_q45K(const uint8_t* w, const uint8_t* const* acts, int64_t cols, float* out) {
  using Block = std::conditional_t<Q5, block_q5_K, block_q4_K>;
  // One vpdpwssd chain per column is latency-bound when few columns share the loop: split it.
  constexpr int kChains = NC <= 2 ? 2 : 1;
  const ActQ8K* y[NC];
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) {
    y[c] = reinterpret_cast<const ActQ8K*>(acts[c]);
    acc[c] = _mm256_setzero_ps();
  }
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const int64_t nb = cols / QK_K;
  for (int64_t b = 0; b < nb; ++b) {
    const Block& x = reinterpret_cast<const Block*>(w)[b];
    const float d = h2f(&x.d), dmin = h2f(&x.dmin);
    const __m256i sm = k4_scales_mins(x.scales);
    const __m128i sc128 = _mm256_castsi256_si128(sm);
    const __m256i scales = _mm256_set_m128i(sc128, sc128);
    // Min term, in fp32: sum_j (dmin * m_j) * (d_y * sum of q8 in sub-block j) (ActQ8K::sum32).
    const __m256 mins = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(sm, 1))));
    __m256i sumi[NC][kChains];
    for (int c = 0; c < NC; ++c) {
      acc[c] = _mm256_fnmadd_ps(mins, _mm256_loadu_ps(y[c][b].sum32), acc[c]);
      for (int k = 0; k < kChains; ++k) sumi[c][k] = _mm256_setzero_si256();
    }
    __m256i hbits;
    if constexpr (Q5) hbits = loadu256(x.qh);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256i scale_l = bcast16(scales, 2 * j), scale_h = bcast16(scales, 2 * j + 1);
      const __m256i qb = loadu256(x.qs + 32 * j);
      __m256i ql = _mm256_and_si256(qb, m4);
      __m256i qh = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
      if constexpr (Q5) {
        const __m256i one = _mm256_set1_epi8(1);
        ql = _mm256_or_si256(ql, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j), one), 4));
        qh = _mm256_or_si256(qh, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j + 1), one), 4));
      }
      for (int c = 0; c < NC; ++c) {
        const __m256i p16l = _mm256_maddubs_epi16(ql, loadu256(y[c][b].qs + 64 * j));  // q <= 31: exact
        const __m256i p16h = _mm256_maddubs_epi16(qh, loadu256(y[c][b].qs + 64 * j + 32));
        sumi[c][0] = madd_acc(sumi[c][0], p16l, scale_l);
        sumi[c][kChains - 1] = madd_acc(sumi[c][kChains - 1], p16h, scale_h);
      }
    }
    const __m256 vd = _mm256_set1_ps(d);
    for (int c = 0; c < NC; ++c) {
      __m256i si = sumi[c][0];
      if constexpr (kChains == 2) si = _mm256_add_epi32(si, sumi[c][1]);
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(vd, _mm256_broadcast_ss(&y[c][b].d)), _mm256_cvtepi32_ps(si), acc[c]);
    }
  }
  for (int c = 0; c < NC; ++c) out[c] = hsum8(acc[c]);
}

// Byte shuffles selecting Q6_K scale s for elements 0..7 and s+1 for 8..15 (then sign-extended).
alignas(16) const uint8_t kQ6ScaleShuf[8][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},         {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},         {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},         {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13}, {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};

template <int NC>
void kern_q6K(const uint8_t* w, const uint8_t* const* acts, int64_t cols, float* out) {
  const ActQ8K* y[NC];
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) {
    y[c] = reinterpret_cast<const ActQ8K*>(acts[c]);
    acc[c] = _mm256_setzero_ps();
  }
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i m2 = _mm256_set1_epi8(0x03);
  const int64_t nb = cols / QK_K;
  for (int64_t b = 0; b < nb; ++b) {
    const block_q6_K& x = reinterpret_cast<const block_q6_K*>(w)[b];
    const float d = h2f(&x.d);
    const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x.scales));
    // The weights are q6 - 32 with q6 unsigned: sum sc*(q6.y) - 32 * sum sc*bsum, all integer.
    const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
    constexpr bool kTwo = NC <= 2;  // two accumulation chains per column when few columns
    __m256i sumi[NC], sum2[NC];
    for (int c = 0; c < NC; ++c) sum2[c] = _mm256_setzero_si256();
    for (int c = 0; c < NC; ++c)
      sumi[c] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(loadu256(y[c][b].bsums), sc16), 5));
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      const __m256i b1 = loadu256(x.ql + 64 * half);
      const __m256i b2 = loadu256(x.ql + 64 * half + 32);
      const __m256i bh = loadu256(x.qh + 32 * half);
      __m256i q[4];
      q[0] = _mm256_or_si256(_mm256_and_si256(b1, m4), _mm256_slli_epi16(_mm256_and_si256(bh, m2), 4));
      q[1] = _mm256_or_si256(_mm256_and_si256(b2, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 2), m2), 4));
      q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 4), m2), 4));
      q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 6), m2), 4));
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const __m256i scale = _mm256_cvtepi8_epi16(
            _mm_shuffle_epi8(sc8, _mm_load_si128(reinterpret_cast<const __m128i*>(kQ6ScaleShuf[4 * half + k]))));
        for (int c = 0; c < NC; ++c) {
          const __m256i p16 = _mm256_maddubs_epi16(q[k], loadu256(y[c][b].qs + 128 * half + 32 * k));  // q6 <= 63
          if (kTwo && (k & 1)) sum2[c] = madd_acc(sum2[c], p16, scale);
          else sumi[c] = madd_acc(sumi[c], p16, scale);
        }
      }
    }
    const __m256 vd = _mm256_set1_ps(d);
    for (int c = 0; c < NC; ++c) {
      const __m256i si = kTwo ? _mm256_add_epi32(sumi[c], sum2[c]) : sumi[c];
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(vd, _mm256_broadcast_ss(&y[c][b].d)), _mm256_cvtepi32_ps(si), acc[c]);
    }
  }
  for (int c = 0; c < NC; ++c) out[c] = hsum8(acc[c]);
}

#if TW_VNNI
// ---- k-quants, 512-bit (AVX-512 level) ---------------------------------------------------------
// One zmm holds 64 consecutive elements: for Q4_K/Q5_K the low and high nibbles of 32 qs bytes
// (sub-blocks 2j and 2j+1), for Q6_K the low or high nibbles of 64 ql bytes. So each activation
// row needs one 64-byte load per maddubs and the multiply instruction count halves, which is what
// bounds these kernels (Zen 4 runs a zmm op as two ymm halves, so no extra throughput is assumed).

// i16 lane i of the result = v[idx(i)]; used to spread per-sub-block scales over their elements.
inline __m512i spread16(__m512i v, const int16_t (&idx)[32]) {
  return _mm512_permutexvar_epi16(_mm512_loadu_si512(idx), v);
}

// Scale index tables: Q4_K pair j -> lanes 0..15 scale 2j, 16..31 scale 2j+1.
alignas(64) const int16_t kK4Spread[4][32] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
    {2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5},
    {6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7},
};
// Q6_K group g (64 elements, 16 per scale) -> scales 4g..4g+3, 8 lanes each.
alignas(64) const int16_t kK6Spread[4][32] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9, 10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13, 14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};

// With vpdpbusd + vpackssdw (see dot_pair_i16), i16 lane 8k+m holds a sum of 4 products from
// sub-block 2j + (k >= 2) + (m >= 4 ? 2 : 0) (Q4_K, pair j = 0 or 2) or, for Q6_K half h, from
// 16-element sub-block 8h + k + (m >= 4 ? 4 : 0).
alignas(64) const int16_t kK4Packed[2][32] = {
    {0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 1, 1, 1, 1, 3, 3, 3, 3, 1, 1, 1, 1, 3, 3, 3, 3},
    {4, 4, 4, 4, 6, 6, 6, 6, 4, 4, 4, 4, 6, 6, 6, 6, 5, 5, 5, 5, 7, 7, 7, 7, 5, 5, 5, 5, 7, 7, 7, 7},
};
alignas(64) const int16_t kK6Packed[2][32] = {
    {0, 0, 0, 0, 4, 4, 4, 4, 1, 1, 1, 1, 5, 5, 5, 5, 2, 2, 2, 2, 6, 6, 6, 6, 3, 3, 3, 3, 7, 7, 7, 7},
    {8, 8, 8, 8, 12, 12, 12, 12, 9, 9, 9, 9, 13, 13, 13, 13, 10, 10, 10, 10, 14, 14, 14, 14, 11, 11, 11, 11, 15, 15, 15, 15},
};

// Sums of 4 u8*s8 products of two 64-element groups, narrowed to i16 and interleaved per 128-bit
// lane (vpackssdw), so one vpdpwssd applies the per-sub-block scales to both groups: 3 multiply
// instructions per 128 elements instead of 4 with vpmaddubsw + vpdpwssd. Exact: each sum is at
// most 4 * 63 * 127 = 32004 < 2^15 (q <= 63, |q8| <= 127).
inline __m512i dot_pair_i16(__m512i qa, const int8_t* ya, __m512i qb, const int8_t* yb) {
  const __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qa, _mm512_loadu_si512(ya));
  const __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qb, _mm512_loadu_si512(yb));
  return _mm512_packs_epi32(a, b);
}

inline __m256i fold512(__m512i v) {
  return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

template <bool Q5, int NC>
void kern_q45K_512(const uint8_t* w, const uint8_t* const* acts, int64_t cols, float* out) {
  using Block = std::conditional_t<Q5, block_q5_K, block_q4_K>;
  constexpr int kChains = NC <= 2 ? 2 : 1;  // see kern_q45K
  const ActQ8K* y[NC];
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) {
    y[c] = reinterpret_cast<const ActQ8K*>(acts[c]);
    acc[c] = _mm256_setzero_ps();
  }
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const int64_t nb = cols / QK_K;
  for (int64_t b = 0; b < nb; ++b) {
    const Block& x = reinterpret_cast<const Block*>(w)[b];
    const float d = h2f(&x.d), dmin = h2f(&x.dmin);
    const __m256i sm = k4_scales_mins(x.scales);
    const __m512i sm512 = _mm512_zextsi256_si512(sm);
    const __m256 mins = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(sm, 1))));
    __m512i sumi[NC][kChains];
    for (int c = 0; c < NC; ++c) {
      acc[c] = _mm256_fnmadd_ps(mins, _mm256_loadu_ps(y[c][b].sum32), acc[c]);
      for (int k = 0; k < kChains; ++k) sumi[c][k] = _mm512_setzero_si512();
    }
    __m256i hbits;
    if constexpr (Q5) hbits = loadu256(x.qh);
    // Elements 64j..64j+63: low nibbles of qs[32j..] (sub-block 2j) then high nibbles (2j+1).
    auto group = [&](int j) {
      const __m256i qb = loadu256(x.qs + 32 * j);
      __m256i ql = _mm256_and_si256(qb, m4);
      __m256i qh = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
      if constexpr (Q5) {
        const __m256i one = _mm256_set1_epi8(1);
        ql = _mm256_or_si256(ql, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j), one), 4));
        qh = _mm256_or_si256(qh, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j + 1), one), 4));
      }
      return _mm512_inserti64x4(_mm512_zextsi256_si512(ql), qh, 1);
    };
#pragma GCC unroll 2
    for (int jp = 0; jp < 2; ++jp) {
      const __m512i qa = group(2 * jp), qb = group(2 * jp + 1);
      const __m512i sc = spread16(sm512, kK4Packed[jp]);
      for (int c = 0; c < NC; ++c) {
        const int8_t* q8 = y[c][b].qs + 128 * jp;
        sumi[c][jp % kChains] = _mm512_dpwssd_epi32(sumi[c][jp % kChains], dot_pair_i16(qa, q8, qb, q8 + 64), sc);
      }
    }
    const __m256 vd = _mm256_set1_ps(d);
    for (int c = 0; c < NC; ++c) {
      __m512i si = sumi[c][0];
      if constexpr (kChains == 2) si = _mm512_add_epi32(si, sumi[c][1]);
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(vd, _mm256_broadcast_ss(&y[c][b].d)), _mm256_cvtepi32_ps(fold512(si)), acc[c]);
    }
  }
  for (int c = 0; c < NC; ++c) out[c] = hsum8(acc[c]);
}

template <int NC>
void kern_q6K_512(const uint8_t* w, const uint8_t* const* acts, int64_t cols, float* out) {
  constexpr int kChains = NC <= 2 ? 2 : 1;
  const ActQ8K* y[NC];
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) {
    y[c] = reinterpret_cast<const ActQ8K*>(acts[c]);
    acc[c] = _mm256_setzero_ps();
  }
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i m2 = _mm512_set1_epi8(0x03);
  const int64_t nb = cols / QK_K;
  for (int64_t b = 0; b < nb; ++b) {
    const block_q6_K& x = reinterpret_cast<const block_q6_K*>(w)[b];
    const float d = h2f(&x.d);
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x.scales)));
    const __m512i sc512 = _mm512_zextsi256_si512(sc16);
    __m512i sumi[NC][kChains];
    for (int c = 0; c < NC; ++c) {
      // q6 - 32 with q6 unsigned: subtract 32 * sum sc*bsum (integer, as in kern_q6K).
      const __m256i corr = _mm256_slli_epi32(_mm256_madd_epi16(loadu256(y[c][b].bsums), sc16), 5);
      sumi[c][0] = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), corr));
      if constexpr (kChains == 2) sumi[c][1] = _mm512_setzero_si512();
    }
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      const __m512i ql = _mm512_loadu_si512(x.ql + 64 * half);
      const __m256i qh = loadu256(x.qh + 32 * half);
      // High bits of elements 0..31 are qh bits 0-1, of 32..63 bits 2-3 (and +4 for 64..127).
      const __m512i qh2 = _mm512_inserti64x4(_mm512_zextsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
      const __m512i qa = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_slli_epi16(_mm512_and_si512(qh2, m2), 4));
      const __m512i qb = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                         _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qh2, 4), m2), 4));
      const __m512i sc = spread16(sc512, kK6Packed[half]);
      for (int c = 0; c < NC; ++c) {
        const int8_t* q8 = y[c][b].qs + 128 * half;
        sumi[c][half % kChains] = _mm512_dpwssd_epi32(sumi[c][half % kChains], dot_pair_i16(qa, q8, qb, q8 + 64), sc);
      }
    }
    const __m256 vd = _mm256_set1_ps(d);
    for (int c = 0; c < NC; ++c) {
      __m512i si = sumi[c][0];
      if constexpr (kChains == 2) si = _mm512_add_epi32(si, sumi[c][1]);
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(vd, _mm256_broadcast_ss(&y[c][b].d)), _mm256_cvtepi32_ps(fold512(si)), acc[c]);
    }
  }
  for (int c = 0; c < NC; ++c) out[c] = hsum8(acc[c]);
}

// ---- Q4_K, 8 rows interleaved (see Interleaved8) ------------------------------------------------

// Repacked super-block of 8 rows: d[8] (fp32), mins[8][8] (fp32, dmin_r * m_rj, [j][r]),
// scales[8][8] (i32, [j][r]), qs[4][8][32]: chunk j (64 elements), group k of 4 bytes, 8 rows x 4.
struct Q4KPacked8 {
  float d[8];
  float mins[8][8];
  int32_t scales[8][8];
  uint8_t qs[4][8][32];
};
static_assert(sizeof(Q4KPacked8) == 32 + 256 + 256 + 1024);

size_t q4k8_bytes(int64_t cols) { return static_cast<size_t>(cols / QK_K) * sizeof(Q4KPacked8); }

void q4k8_repack(const uint8_t* w, size_t row_bytes, int64_t cols, uint8_t* dst) {
  Q4KPacked8* out = reinterpret_cast<Q4KPacked8*>(dst);
  const int64_t nb = cols / QK_K;
  for (int r = 0; r < 8; ++r) {
    const block_q4_K* x = reinterpret_cast<const block_q4_K*>(w + r * row_bytes);
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t sc[16];
      tw::ops::detail::unpack_k4_scales(x[b].scales, sc);
      const float dmin = h2f(&x[b].dmin);
      out[b].d[r] = h2f(&x[b].d);
      for (int j = 0; j < 8; ++j) {
        out[b].scales[j][r] = sc[j];
        out[b].mins[j][r] = dmin * sc[8 + j];
      }
      for (int j = 0; j < 4; ++j)
        for (int k = 0; k < 8; ++k) std::memcpy(&out[b].qs[j][k][4 * r], x[b].qs + 32 * j + 4 * k, 4);
    }
  }
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

template <int NC>
void q4k8_kernel_nc(const uint8_t* packed, const uint8_t* const* acts, int64_t cols, float* const* out) {
  const Q4KPacked8* x = reinterpret_cast<const Q4KPacked8*>(packed);
  const ActQ8K* y[NC];
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) {
    y[c] = reinterpret_cast<const ActQ8K*>(acts[c]);
    acc[c] = _mm256_setzero_ps();
  }
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const int64_t nb = cols / QK_K;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i isum[NC];
    for (int c = 0; c < NC; ++c) isum[c] = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      // Lanes = rows. lo nibbles: sub-block 2j (elements 64j + 4k..), hi: sub-block 2j+1 (+32).
      __m256i slo[NC], shi[NC];
      for (int c = 0; c < NC; ++c) slo[c] = shi[c] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].qs[j][k]));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int c = 0; c < NC; ++c) {
          const int8_t* q8 = y[c][b].qs + 64 * j + 4 * k;
          slo[c] = _mm256_dpbusd_epi32(slo[c], lo, bcast4(q8));
          shi[c] = _mm256_dpbusd_epi32(shi[c], hi, bcast4(q8 + 32));
        }
      }
      // Sub-block sums are at most 32 * 15 * 127 = 60960, times a 6-bit scale: exact in i32.
      const __m256i sl = _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].scales[2 * j]));
      const __m256i sh = _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].scales[2 * j + 1]));
      for (int c = 0; c < NC; ++c)
        isum[c] = _mm256_add_epi32(isum[c], _mm256_add_epi32(_mm256_mullo_epi32(slo[c], sl), _mm256_mullo_epi32(shi[c], sh)));
    }
    const __m256 vd = _mm256_load_ps(x[b].d);
    for (int c = 0; c < NC; ++c) {
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(vd, _mm256_broadcast_ss(&y[c][b].d)), _mm256_cvtepi32_ps(isum[c]), acc[c]);
      // Min term: sum_j (dmin m_j) * (d_y * sum of q8 in sub-block j), 8 rows per FMA.
      for (int j = 0; j < 8; ++j)
        acc[c] = _mm256_fnmadd_ps(_mm256_load_ps(x[b].mins[j]), _mm256_broadcast_ss(&y[c][b].sum32[j]), acc[c]);
    }
  }
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(out[c], acc[c]);
}

void q4k8_kernel(const uint8_t* packed, const uint8_t* const* acts, int nc, int64_t cols, float* const* out) {
  switch (nc) {
    case 1: q4k8_kernel_nc<1>(packed, acts, cols, out); return;
    case 2: q4k8_kernel_nc<2>(packed, acts, cols, out); return;
    case 3: q4k8_kernel_nc<3>(packed, acts, cols, out); return;
    default: q4k8_kernel_nc<4>(packed, acts, cols, out); return;
  }
}

// ---- 32-element types, 8 rows interleaved ---------------------------------------------------------

// Repacked block of 8 rows: d[8], m[8] (Q4_1/Q5_1 min, else 0), q[k][4r + i] = unsigned quant of
// element 4k + i of row r. The symmetric types store q + offset (Q4_0 q+8 = nibble, Q5_0 q+16,
// Q8_0 q+128) and the kernel subtracts offset * sum(q8) (ActQ8::sum): exact integers, as llama.cpp.
struct Packed32x8 {
  float d[8];
  float m[8];
  uint8_t q[8][32];
};
static_assert(sizeof(Packed32x8) == 320);

template <W32 T> constexpr int kOffset32 = T == W32::Q4_0 ? 8 : T == W32::Q5_0 ? 16 : T == W32::Q8_0 ? 128 : 0;

template <W32 T>
size_t p32_bytes(int64_t cols) { return static_cast<size_t>(cols / QK) * sizeof(Packed32x8); }

template <W32 T>
void p32_repack(const uint8_t* w, size_t row_bytes, int64_t cols, uint8_t* dst) {
  Packed32x8* out = reinterpret_cast<Packed32x8*>(dst);
  const int64_t nb = cols / QK;
  for (int r = 0; r < 8; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = w + r * row_bytes + b * kBlockBytes<T>;
      // unpack32 gives q - offset for the symmetric types: add the offset back (Q8_0: +128 = xor 0x80).
      __m256i v = unpack32<T>(p);
      if constexpr (T == W32::Q8_0) v = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
      else if constexpr (kOffset32<T> != 0) v = _mm256_add_epi8(v, _mm256_set1_epi8(kOffset32<T>));
      alignas(32) uint8_t q[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(q), v);
      out[b].d[r] = h2f(p);
      out[b].m[r] = kHasMin<T> ? h2f(p + 2) : 0.0f;
      for (int k = 0; k < 8; ++k) std::memcpy(&out[b].q[k][4 * r], q + 4 * k, 4);
    }
  }
}

template <W32 T, int NC>
void p32_kernel_nc(const uint8_t* packed, const uint8_t* const* acts, int64_t cols, float* const* out) {
  const Packed32x8* x = reinterpret_cast<const Packed32x8*>(packed);
  const ActQ8* y[NC];
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) {
    y[c] = reinterpret_cast<const ActQ8*>(acts[c]);
    acc[c] = _mm256_setzero_ps();
  }
  const int64_t nb = cols / QK;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i s0[NC], s1[NC];  // two vpdpbusd chains per activation row (latency)
    for (int c = 0; c < NC; ++c) s0[c] = s1[c] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].q[k]));  // q <= 255
      for (int c = 0; c < NC; ++c) {
        if (k & 1) s1[c] = _mm256_dpbusd_epi32(s1[c], v, bcast4(y[c][b].qs + 4 * k));
        else s0[c] = _mm256_dpbusd_epi32(s0[c], v, bcast4(y[c][b].qs + 4 * k));
      }
    }
    const __m256 vd = _mm256_load_ps(x[b].d);
    for (int c = 0; c < NC; ++c) {
      __m256i dot = _mm256_add_epi32(s0[c], s1[c]);
      if constexpr (kOffset32<T> != 0) dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(kOffset32<T> * y[c][b].sum));
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(vd, _mm256_broadcast_ss(&y[c][b].d)), _mm256_cvtepi32_ps(dot), acc[c]);
      if constexpr (kHasMin<T>) acc[c] = _mm256_fmadd_ps(_mm256_load_ps(x[b].m), _mm256_broadcast_ss(&y[c][b].s), acc[c]);
    }
  }
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(out[c], acc[c]);
}

template <W32 T>
void p32_kernel(const uint8_t* packed, const uint8_t* const* acts, int nc, int64_t cols, float* const* out) {
  switch (nc) {
    case 1: p32_kernel_nc<T, 1>(packed, acts, cols, out); return;
    case 2: p32_kernel_nc<T, 2>(packed, acts, cols, out); return;
    case 3: p32_kernel_nc<T, 3>(packed, acts, cols, out); return;
    default: p32_kernel_nc<T, 4>(packed, acts, cols, out); return;
  }
}

// ---- Q6_K, 8 rows interleaved ---------------------------------------------------------------------

// Repacked super-block of 8 rows: d[8]; scpair[p][r] = scales 2p, 2p+1 of row r as two i16 in an
// i32 (for the -32 correction with vpdpwssd against bsums pairs); sc[s][r] (i32); q[k][4r + i] =
// the unsigned 6-bit quant (0..63) of element 4k + i of row r.
struct Q6KPacked8 {
  float d[8];
  int32_t scpair[8][8];
  int32_t sc[16][8];
  uint8_t q[64][32];
};
static_assert(sizeof(Q6KPacked8) == 32 + 256 + 512 + 2048);

size_t q6k8_bytes(int64_t cols) { return static_cast<size_t>(cols / QK_K) * sizeof(Q6KPacked8); }

void q6k8_repack(const uint8_t* w, size_t row_bytes, int64_t cols, uint8_t* dst) {
  Q6KPacked8* out = reinterpret_cast<Q6KPacked8*>(dst);
  const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
  const int64_t nb = cols / QK_K;
  for (int r = 0; r < 8; ++r) {
    const block_q6_K* x = reinterpret_cast<const block_q6_K*>(w + r * row_bytes);
    for (int64_t b = 0; b < nb; ++b) {
      out[b].d[r] = h2f(&x[b].d);
      for (int sb = 0; sb < 16; ++sb) out[b].sc[sb][r] = x[b].scales[sb];
      for (int pr = 0; pr < 8; ++pr) {
        const uint16_t lo = static_cast<uint16_t>(static_cast<int16_t>(x[b].scales[2 * pr]));
        const uint16_t hi = static_cast<uint16_t>(static_cast<int16_t>(x[b].scales[2 * pr + 1]));
        out[b].scpair[pr][r] = static_cast<int32_t>(static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16));
      }
      alignas(32) uint8_t q[256];  // element order, as in kern_q6K
      for (int half = 0; half < 2; ++half) {
        const __m256i b1 = loadu256(x[b].ql + 64 * half), b2 = loadu256(x[b].ql + 64 * half + 32);
        const __m256i bh = loadu256(x[b].qh + 32 * half);
        __m256i* o = reinterpret_cast<__m256i*>(q + 128 * half);
        _mm256_store_si256(o + 0, _mm256_or_si256(_mm256_and_si256(b1, m4), _mm256_slli_epi16(_mm256_and_si256(bh, m2), 4)));
        _mm256_store_si256(o + 1, _mm256_or_si256(_mm256_and_si256(b2, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 2), m2), 4)));
        _mm256_store_si256(o + 2, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 4), m2), 4)));
        _mm256_store_si256(o + 3, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 6), m2), 4)));
      }
      for (int k = 0; k < 64; ++k) std::memcpy(&out[b].q[k][4 * r], q + 4 * k, 4);
    }
  }
}

template <int NC>
void q6k8_kernel_nc(const uint8_t* packed, const uint8_t* const* acts, int64_t cols, float* const* out) {
  const Q6KPacked8* x = reinterpret_cast<const Q6KPacked8*>(packed);
  const ActQ8K* y[NC];
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) {
    y[c] = reinterpret_cast<const ActQ8K*>(acts[c]);
    acc[c] = _mm256_setzero_ps();
  }
  const int64_t nb = cols / QK_K;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i isum[NC], corr[NC];
    for (int c = 0; c < NC; ++c) {
      // sum_s sc_s * bsum_s, two sub-blocks per vpdpwssd (|.| <= 16 * 128 * 2032: exact).
      corr[c] = _mm256_setzero_si256();
      for (int pr = 0; pr < 8; ++pr) {
        int32_t bs;
        std::memcpy(&bs, &y[c][b].bsums[2 * pr], 4);
        corr[c] = _mm256_dpwssd_epi32(corr[c], _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].scpair[pr])), _mm256_set1_epi32(bs));
      }
      isum[c] = _mm256_setzero_si256();
    }
#pragma GCC unroll 2
    for (int sb = 0; sb < 16; ++sb) {
      const __m256i* q = reinterpret_cast<const __m256i*>(x[b].q[4 * sb]);
      const __m256i q0 = _mm256_load_si256(q), q1 = _mm256_load_si256(q + 1);
      const __m256i q2 = _mm256_load_si256(q + 2), q3 = _mm256_load_si256(q + 3);
      const __m256i sc = _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].sc[sb]));
      for (int c = 0; c < NC; ++c) {
        const int8_t* q8 = y[c][b].qs + 16 * sb;
        // 16 elements of sub-block sb; q6 <= 63 so each lane's sum is at most 16 * 63 * 127.
        __m256i t0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q0, bcast4(q8));
        __m256i t1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q1, bcast4(q8 + 4));
        t0 = _mm256_dpbusd_epi32(t0, q2, bcast4(q8 + 8));
        t1 = _mm256_dpbusd_epi32(t1, q3, bcast4(q8 + 12));
        isum[c] = _mm256_add_epi32(isum[c], _mm256_mullo_epi32(_mm256_add_epi32(t0, t1), sc));
      }
    }
    const __m256 vd = _mm256_load_ps(x[b].d);
    for (int c = 0; c < NC; ++c) {
      const __m256i tot = _mm256_sub_epi32(isum[c], _mm256_slli_epi32(corr[c], 5));  // q6 - 32
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(vd, _mm256_broadcast_ss(&y[c][b].d)), _mm256_cvtepi32_ps(tot), acc[c]);
    }
  }
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(out[c], acc[c]);
}

void q6k8_kernel(const uint8_t* packed, const uint8_t* const* acts, int nc, int64_t cols, float* const* out) {
  switch (nc) {
    case 1: q6k8_kernel_nc<1>(packed, acts, cols, out); return;
    case 2: q6k8_kernel_nc<2>(packed, acts, cols, out); return;
    case 3: q6k8_kernel_nc<3>(packed, acts, cols, out); return;
    default: q6k8_kernel_nc<4>(packed, acts, cols, out); return;
  }
}
#endif  // TW_VNNI

// ---- float weights (activations: fp32, already rounded to the weight's precision) ---------------

enum class WF { F32, F16, BF16 };

template <WF T>
inline __m256 loadw8(const uint8_t* w, int64_t i) {
  if constexpr (T == WF::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(w) + i);
  } else if constexpr (T == WF::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i)));
  } else {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
}

template <WF T>
inline float loadw1(const uint8_t* w, int64_t i) {
  if constexpr (T == WF::F32) {
    float v;
    std::memcpy(&v, w + 4 * i, 4);
    return v;
  } else {
    uint16_t h;
    std::memcpy(&h, w + 2 * i, 2);
    if constexpr (T == WF::F16) return _cvtsh_ss(h);
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  }
}

template <WF T, int NC>
void kern_float(const uint8_t* w, const uint8_t* const* acts, int64_t cols, float* out) {
  const float* a[NC];
  __m256 acc[NC][2];
  for (int c = 0; c < NC; ++c) {
    a[c] = reinterpret_cast<const float*>(acts[c]);
    acc[c][0] = acc[c][1] = _mm256_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 16 <= cols; i += 16) {
    const __m256 w0 = loadw8<T>(w, i), w1 = loadw8<T>(w, i + 8);
    for (int c = 0; c < NC; ++c) {
      acc[c][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(a[c] + i), acc[c][0]);
      acc[c][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(a[c] + i + 8), acc[c][1]);
    }
  }
  for (; i + 8 <= cols; i += 8) {
    const __m256 w0 = loadw8<T>(w, i);
    for (int c = 0; c < NC; ++c) acc[c][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(a[c] + i), acc[c][0]);
  }
  for (int c = 0; c < NC; ++c) {
    float s = hsum8(_mm256_add_ps(acc[c][0], acc[c][1]));
    for (int64_t t = i; t < cols; ++t) s += loadw1<T>(w, t) * a[c][t];
    out[c] = s;
  }
}

// ---- nc dispatch ----------------------------------------------------------------------------

// nc activation rows per call: templates for 1..4 (and 8 with 32 vector registers); other counts
// are split.
template <template <int> class K>
void dispatch_nc(const uint8_t* w, const uint8_t* const* acts, int nc, int64_t cols, float* out) {
  while (nc > 0) {
#if TW_VNNI
    if (nc >= 8) { K<8>::run(w, acts, cols, out); acts += 8; out += 8; nc -= 8; continue; }
#endif
    switch (nc) {
      case 1: K<1>::run(w, acts, cols, out); return;
      case 2: K<2>::run(w, acts, cols, out); return;
      case 3: K<3>::run(w, acts, cols, out); return;
      default: K<4>::run(w, acts, cols, out); acts += 4; out += 4; nc -= 4; break;
    }
  }
}

template <W32 T> struct K32 { template <int NC> struct R { static void run(const uint8_t* w, const uint8_t* const* a, int64_t n, float* o) { kern32<T, NC>(w, a, n, o); } }; };
#if TW_VNNI
template <bool Q5> struct K45 { template <int NC> struct R { static void run(const uint8_t* w, const uint8_t* const* a, int64_t n, float* o) { kern_q45K_512<Q5, NC>(w, a, n, o); } }; };
template <int NC> struct K6 { static void run(const uint8_t* w, const uint8_t* const* a, int64_t n, float* o) { kern_q6K_512<NC>(w, a, n, o); } };
#else
template <bool Q5> struct K45 { template <int NC> struct R { static void run(const uint8_t* w, const uint8_t* const* a, int64_t n, float* o) { kern_q45K<Q5, NC>(w, a, n, o); } }; };
template <int NC> struct K6 { static void run(const uint8_t* w, const uint8_t* const* a, int64_t n, float* o) { kern_q6K<NC>(w, a, n, o); } };
#endif
template <WF T> struct KF { template <int NC> struct R { static void run(const uint8_t* w, const uint8_t* const* a, int64_t n, float* o) { kern_float<T, NC>(w, a, n, o); } }; };

// The table (generic code, see the .cpp) takes the addresses of these.
void row_q4_0(const uint8_t* w, const uint8_t* const* a, int nc, int64_t n, float* o) { dispatch_nc<K32<W32::Q4_0>::R>(w, a, nc, n, o); }
void row_q4_1(const uint8_t* w, const uint8_t* const* a, int nc, int64_t n, float* o) { dispatch_nc<K32<W32::Q4_1>::R>(w, a, nc, n, o); }
void row_q5_0(const uint8_t* w, const uint8_t* const* a, int nc, int64_t n, float* o) { dispatch_nc<K32<W32::Q5_0>::R>(w, a, nc, n, o); }
void row_q5_1(const uint8_t* w, const uint8_t* const* a, int nc, int64_t n, float* o) { dispatch_nc<K32<W32::Q5_1>::R>(w, a, nc, n, o); }
void row_q8_0(const uint8_t* w, const uint8_t* const* a, int nc, int64_t n, float* o) { dispatch_nc<K32<W32::Q8_0>::R>(w, a, nc, n, o); }
void row_q4_K(const uint8_t* w, const uint8_t* const* a, int nc, int64_t n, float* o) { dispatch_nc<K45<false>::R>(w, a, nc, n, o); }
void row_q5_K(const uint8_t* w, const uint8_t* const* a, int nc, int64_t n, float* o) { dispatch_nc<K45<true>::R>(w, a, nc, n, o); }
void row_q6_K(const uint8_t* w, const uint8_t* const* a, int nc, int64_t n, float* o) { dispatch_nc<K6>(w, a, nc, n, o); }
void row_f32(const uint8_t* w, const uint8_t* const* a, int nc, int64_t n, float* o) { dispatch_nc<KF<WF::F32>::R>(w, a, nc, n, o); }
void row_f16(const uint8_t* w, const uint8_t* const* a, int nc, int64_t n, float* o) { dispatch_nc<KF<WF::F16>::R>(w, a, nc, n, o); }
void row_bf16(const uint8_t* w, const uint8_t* const* a, int nc, int64_t n, float* o) { dispatch_nc<KF<WF::BF16>::R>(w, a, nc, n, o); }

}  // namespace
