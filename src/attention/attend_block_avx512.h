// The inner step shared by the dense and sparse decode kernels at the AVX-512 level (internal header,
// included by dense_cpu.cpp and sparse_cpu.cpp only): one block of up to 16 fp16 K/V rows against nq
// queries of the same kv head (the GQA group; in prefill also several query tokens), with the online
// softmax of online_softmax.h. See attend_rows for the data flow.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <new>

#include "attention/fast_exp.h"
#include "attention/online_softmax.h"

namespace tw::attn::avx512 {

// 64-byte aligned allocation for scratch the kernels load with aligned loads.
template <class T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <class U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const AlignedAlloc<U>&) const { return true; }
};

#define TW_AVX512 __attribute__((target("avx512f,avx512dq,fma,f16c")))
// The VNNI level (vpdpbusd: u8 x s8 -> int32), for the integer INT4 estimate and Quest page scores.
#define TW_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")))

// GCC 12 warns about the intrinsics' own _mm512_undefined_* placeholders (a known false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// fp16 -> fp32, n a multiple of 16.
TW_AVX512 inline void cvt16(const uint16_t* src, float* dst, int n) {
  for (int i = 0; i < n; i += 16)
    _mm512_store_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
}

// exp of 16 lanes, the fast_exp.h polynomial (x < -87 and -inf give 0).
TW_AVX512 inline __m512 exp16(__m512 x) {
  const __m512 kf = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i k = _mm512_cvtps_epi32(_mm512_max_ps(kf, _mm512_set1_ps(-126.f)));
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(127)), 23));
  const __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  return _mm512_maskz_mul_ps(ok, p, scale);
}

// out lane j = sum of the 16 lanes of a[j], for j < 16: a transpose-and-add tree.
TW_AVX512 inline __m512 reduce16(const __m512* a) {
  // 16 -> 8: pair (2i, 2i+1), add 256-bit halves: [a lo128 x2 partial | b lo128 x2 partial].
  __m512 b[8];
  for (int i = 0; i < 8; ++i) {
    const __m512 x = _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44);  // a0 a1 b0 b1 (128-bit lanes)
    const __m512 y = _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE);  // a2 a3 b2 b3
    b[i] = _mm512_add_ps(x, y);                                            // [a(0+2) a(1+3) b(0+2) b(1+3)]
  }
  // 8 -> 4: each 128-bit lane holds 4 partial sums of one source: c[i] lanes = sources 4i .. 4i+3.
  __m512 c[4];
  for (int i = 0; i < 4; ++i) {
    const __m512 x = _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88);  // a(0+2) b(0+2) c(0+2) d(0+2)
    const __m512 y = _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD);  // a(1+3) b(1+3) c(1+3) d(1+3)
    c[i] = _mm512_add_ps(x, y);
  }
  // Within 128-bit lanes: r[4L + k] = sum of c[k] lane L = source 4k + L.
  const __m512 p01 = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
  const __m512 p23 = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(p01, p23, 0x44), _mm512_shuffle_ps(p01, p23, 0xEE));
  // Source j sits at 4 (j % 4) + j / 4.
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(idx, r);
}

// Rows of the block after this one, to prefetch while this one is computed (n = 0: none).
struct Prefetch {
  const uint16_t* const* k = nullptr;
  const uint16_t* const* v = nullptr;
  int n = 0;
};

// o_r = o_r * scale_r + sum_{j < n} p_rj v_j for NR queries, one 16-wide slice of d at a time (the NR
// output slices in registers). p: [NR][16] weights (0 past a query's own limit; rows j < n are real
// data), v_j converted from fp16 as it is used.
template <int NV, int NR>
TW_AVX512 inline void pv(const uint16_t* const* vrow, int n, const float* p, const float* scale, SoftmaxState* st) {
  for (int v = 0; v < NV; ++v) {
    __m512 ov[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) ov[r] = _mm512_mul_ps(_mm512_loadu_ps(st[r].o + 16 * v), _mm512_set1_ps(scale[r]));
    for (int j = 0; j < n; ++j) {
      const __m512 vj = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow[j] + 16 * v)));
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) ov[r] = _mm512_fmadd_ps(vj, _mm512_set1_ps(p[r * 16 + j]), ov[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(st[r].o + 16 * v, ov[r]);
  }
}

// Attend nq queries (q: [nq][16*NV], pre-scaled by 1/sqrt(d)) of one kv head to nt <= 16 K/V rows given
// as fp16 row pointers (krow[j], vrow[j]: [16*NV] each; rows >= nt are never read). Query r sees rows
// [0, ntr[r]) (ntr == nullptr: all nt rows); a query with no visible row is left unchanged.
// Scratch: kbuf [16][16*NV] and pbuf [nq][16] floats, 64-byte aligned.
//  - K rows are converted to fp32 once (kbuf) and scored by every query: 16 FMA chains in registers,
//    one reduce16 tree, the softmax update on a 16-lane vector.
//  - V is converted straight from fp16 inside the accumulation, one 16-wide slice of d at a time for
//    up to 8 queries together (their output slices in registers, weights broadcast from pbuf): each
//    V element is converted once per 8 queries and nothing is staged.
template <int NV>
TW_AVX512 inline void attend_rows(const uint16_t* const* krow, const uint16_t* const* vrow, int nt, const float* q,
                                  int nq, const int* ntr, SoftmaxState* st, float* kbuf, float* pbuf,
                                  const Prefetch& next = Prefetch{}) {
  constexpr int d = 16 * NV;
  if (nt <= 0) return;
  // The next block's lines, spread over the query loop: a burst of 100+ prefetches stalls on the
  // miss buffers, a few per query overlap with the arithmetic. Into L2 (T1), not L1: T0 prefetches
  // hold L1 miss buffers the loads of this block need (2-core EPYC, Qwen2.5 1.5B at 32k: dense
  // -5%, Twilight's sparse attend with one block ahead 199-203 -> 144-147 us).
  constexpr int LPR = d * 2 / 64;  // cache lines per fp16 row
  const int pf_total = next.n * 2 * LPR, pf_step = nq > 0 ? (pf_total + nq - 1) / nq : pf_total;
  int pf_done = 0;
  for (int j = 0; j < nt; ++j) cvt16(krow[j], kbuf + (size_t)j * d, d);
  // Rows nt..15 are scored too (branch-free, masked out below): give them finite values.
  for (int j = nt; j < 16; ++j)
    for (int v = 0; v < NV; ++v) _mm512_store_ps(kbuf + (size_t)j * d + 16 * v, _mm512_setzero_ps());
  alignas(64) float scale[8];
  for (int r0 = 0; r0 < nq; r0 += 8) {
    const int nr = nq - r0 < 8 ? nq - r0 : 8;
    int nmax = 0;  // rows any query of this group sees
    for (int r = r0; r < r0 + nr; ++r) {
      for (const int pf_end = pf_done + pf_step < pf_total ? pf_done + pf_step : pf_total; pf_done < pf_end; ++pf_done) {
        const int row = pf_done / (2 * LPR), kv = (pf_done / LPR) & 1, line = pf_done % LPR;
        _mm_prefetch(reinterpret_cast<const char*>(kv ? next.v[row] : next.k[row]) + 64 * line, _MM_HINT_T1);
      }
      const int n = ntr ? (ntr[r] < nt ? ntr[r] : nt) : nt;
      float* pr = pbuf + (size_t)r * 16;
      if (n <= 0) {  // nothing visible: weights 0, state unchanged (scale 1)
        _mm512_store_ps(pr, _mm512_setzero_ps());
        scale[r - r0] = 1.f;
        continue;
      }
      nmax = n > nmax ? n : nmax;
      const float* qr = q + (size_t)r * d;
      __m512 qv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(qr + 16 * v);
      __m512 acc[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        const float* kj = kbuf + (size_t)j * d;
        __m512 a = _mm512_mul_ps(qv[0], _mm512_load_ps(kj));
#pragma GCC unroll 8
        for (int v = 1; v < NV; ++v) a = _mm512_fmadd_ps(qv[v], _mm512_load_ps(kj + 16 * v), a);
        acc[j] = a;
      }
      const __m512 s = reduce16(acc);
      const __mmask16 valid = (__mmask16)((1u << n) - 1u);
      const float mx = _mm512_mask_reduce_max_ps(valid, s);
      SoftmaxState& S = st[r];
      const float m_new = S.m > mx ? S.m : mx;
      const float sc = S.m == -INFINITY ? 0.f : fast_exp(S.m - m_new);  // 0 on the first block
      const __m512 e = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(s, _mm512_set1_ps(m_new))));
      _mm512_store_ps(pr, e);
      S.l = S.l * sc + _mm512_reduce_add_ps(e);
      S.m = m_new;
      scale[r - r0] = sc;
    }
    if (nmax == 0) continue;
    switch (nr) {  // the group size as a template argument keeps the output slices in registers
      case 1: pv<NV, 1>(vrow, nmax, pbuf + (size_t)r0 * 16, scale, st + r0); break;
      case 2: pv<NV, 2>(vrow, nmax, pbuf + (size_t)r0 * 16, scale, st + r0); break;
      case 3: pv<NV, 3>(vrow, nmax, pbuf + (size_t)r0 * 16, scale, st + r0); break;
      case 4: pv<NV, 4>(vrow, nmax, pbuf + (size_t)r0 * 16, scale, st + r0); break;
      case 5: pv<NV, 5>(vrow, nmax, pbuf + (size_t)r0 * 16, scale, st + r0); break;
      case 6: pv<NV, 6>(vrow, nmax, pbuf + (size_t)r0 * 16, scale, st + r0); break;
      case 7: pv<NV, 7>(vrow, nmax, pbuf + (size_t)r0 * 16, scale, st + r0); break;
      default: pv<NV, 8>(vrow, nmax, pbuf + (size_t)r0 * 16, scale, st + r0); break;
    }
  }
}

#pragma GCC diagnostic pop

}  // namespace tw::attn::avx512
