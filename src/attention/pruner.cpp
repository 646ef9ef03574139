#include "attention/pruner.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <immintrin.h>

#include "attention/attend_block_avx512.h"  // AlignedAlloc, TW_VNNI
#include "attention/topp.h"
#include "attention/fast_exp.h"
#include "common/error.h"
#include "ops/cpu/matmul.h"

namespace tw::attn {

namespace {

using kv::kPageSize;

#define TW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

constexpr int kMaxGroup = 16;  // heads summed together in the kept-mass pass

// w[j] += z[j] * inv_g and z[j] *= inv (the group average and the head's normalised weights).
TW_CLONES void add_scaled(float* w, float* z, int64_t m, float inv, float inv_g) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    w[j] += z[j] * inv_g;
    z[j] *= inv;
  }
}

// In place: z[j] = exp(z[j] - mx), returns the sum.
TW_CLONES float exp_shift_sum(float* z, int64_t m, float mx) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < m; ++j) {
    const float e = fast_exp(z[j] - mx);
    z[j] = e;
    sum += e;
  }
  return sum;
}

// The max of z[0..m).
TW_CLONES float max_of(const float* z, int64_t m) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < m; ++j) mx = z[j] > mx ? z[j] : mx;
  return mx;
}

// The max of z[0..m) and sum_j exp(z[j] - max), z untouched.
TW_CLONES void max_sumexp(const float* z, int64_t m, float& mx_out, float& sum_out) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < m; ++j) mx = z[j] > mx ? z[j] : mx;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < m; ++j) sum += fast_exp(z[j] - mx);
  mx_out = mx;
  sum_out = sum;
}

// Integer dot products of the INT4 codes of a run of tokens with nq int8 queries (the estimate of
// pruner.h, "INT4 estimate"): dot = sum_i code_i * q8_i, exact in int32; then
// z = fma(scale_t, fma(sq, dot, cq), zero_t * qsum) per (head, token), the same operations as the
// reference. q8: [nq][d] in element order. Portable (vectorised by the compiler per clone).
TW_CLONES void score_tokens(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d, const int8_t* q8,
                            const float* sq, const float* cq, const float* qsum, int nq, const int32_t* tokens,
                            int64_t m, float* z) {
  const int dh = d / 2;
  int64_t cur_lp = -1;
  const uint8_t* codes = nullptr;
  const float *scale = nullptr, *zero = nullptr;
  for (int64_t j = 0; j < m; ++j) {
    const int32_t t = tokens[j];
    const int64_t lp = t / kPageSize;
    if (lp != cur_lp) {  // candidates are ascending: one lookup per page, not per token
      const int32_t phys = seq.pages[lp];
      codes = keys.codes(keys.ctx, layer, phys, kvh);
      scale = keys.scale(keys.ctx, layer, phys, kvh);
      zero = keys.zero(keys.ctx, layer, phys, kvh);
      cur_lp = lp;
    }
    const int row = t % kPageSize;
    const uint8_t* c = codes + (size_t)row * dh;
    for (int r = 0; r < nq; ++r) {
      const int8_t* qr = q8 + (size_t)r * d;
      int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int i = 0; i < dh; ++i) acc += (int32_t)(c[i] & 15) * qr[2 * i] + (int32_t)(c[i] >> 4) * qr[2 * i + 1];
      z[(size_t)r * m + j] = std::fma(scale[row], std::fma(sq[r], (float)acc, cq[r]), zero[row] * qsum[r]);
    }
  }
}

// The same at the AVX-512 VNNI level for d = 64 / 128 (KD = d / 8 packed dwords per token), 16 tokens
// at a time, with no horizontal reduction:
//  - the 16 tokens' packed code rows (KD dwords each: dword k = code bytes 4k..4k+3 = dims 8k..8k+7)
//    are transposed (16 x 16 dwords, 64 shuffles) so that register w[k] holds dword k of every token,
//    one token per lane;
//  - per head, vpdpbusd of w[k]'s low nibbles (dims 8k, 8k+2, 8k+4, 8k+6) and high nibbles (the odd
//    dims) with the head's int8 query bytes of those dims broadcast to every lane: the 16 lanes
//    accumulate the 16 tokens' dots directly (exact int32), up to 8 heads at a time sharing each
//    unpacked w[k]; then the affine map to the score, vectorised over the tokens.
// Bit-identical to score_tokens. The mirror of the page ~2 pages of candidates ahead is prefetched.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on the intrinsics' _mm512_undefined_*
// 16 x 16 transpose of dwords: r[j] lane k -> r[k] lane j.
TW_VNNI inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // u[4k + c], 128-bit block L: column 4L + c of rows 4k .. 4k+3
    u[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // v[c] = columns c, 8+c of rows 0-7 ...; blocks regrouped
    t[c] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
    r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd);
  }
}

// NH heads (qd: [NH][KD][lo, hi][16], each query dword broadcast to a full vector: loaded as the
// vpdpbusd memory operand) against the transposed block w: z rows of the heads.
template <int KD, int NH>
TW_VNNI inline void heads_vnni(const __m512i* w, const uint32_t* qd, const float* sq, const float* cq,
                               const float* qsum, __m512 vs, __m512 vz, __mmask16 valid, float* z, int64_t m) {
  const __m512i m15 = _mm512_set1_epi8(15);
  __m512i acc[NH];
#pragma GCC unroll 8
  for (int h = 0; h < NH; ++h) acc[h] = _mm512_setzero_si512();
#pragma GCC unroll 16
  for (int k = 0; k < KD; ++k) {
    const __m512i lo = _mm512_and_si512(w[k], m15), hi = _mm512_and_si512(_mm512_srli_epi16(w[k], 4), m15);
#pragma GCC unroll 8
    for (int h = 0; h < NH; ++h) {
      acc[h] = _mm512_dpbusd_epi32(acc[h], lo, _mm512_load_si512(qd + ((size_t)h * KD + k) * 32));
      acc[h] = _mm512_dpbusd_epi32(acc[h], hi, _mm512_load_si512(qd + ((size_t)h * KD + k) * 32 + 16));
    }
  }
#pragma GCC unroll 8
  for (int h = 0; h < NH; ++h) {
    const __m512 t = _mm512_fmadd_ps(_mm512_set1_ps(sq[h]), _mm512_cvtepi32_ps(acc[h]), _mm512_set1_ps(cq[h]));
    const __m512 zz = _mm512_fmadd_ps(vs, t, _mm512_mul_ps(vz, _mm512_set1_ps(qsum[h])));
    _mm512_mask_storeu_ps(z + (size_t)h * m, valid, zz);
  }
}

template <int KD>
TW_VNNI void score_tokens_vnni(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, const uint32_t* qd,
                               const float* sq, const float* cq, const float* qsum, int nq, const int32_t* tokens,
                               int64_t m, float* z) {
  constexpr int dh = KD * 4;  // code bytes per row
  alignas(64) float sbuf[16], zbuf[16];
  int64_t cur_lp = -1;
  const uint8_t* codes = nullptr;
  const float *scale = nullptr, *zero = nullptr;
  for (int64_t b0 = 0; b0 < m; b0 += 16) {
    const int nt = (int)std::min<int64_t>(16, m - b0);
    __m512i w[16];
    for (int j = 0; j < nt; ++j) {
      const int32_t t = tokens[b0 + j];
      const int64_t lp = t / kPageSize;
      if (lp != cur_lp) {
        const int32_t phys = seq.pages[lp];
        codes = keys.codes(keys.ctx, layer, phys, kvh);
        scale = keys.scale(keys.ctx, layer, phys, kvh);
        zero = keys.zero(keys.ctx, layer, phys, kvh);
        cur_lp = lp;
        // The page of the token kPagesAhead pages on: its code lines into L2 (into L1 two pages ahead
        // they held the L1 miss buffers the current loads need: 2-core EPYC, Qwen2.5 1.5B at 32k,
        // B0 n/4: this estimate 107-123 -> 85 us), its scale / zero lines into L1.
        constexpr int kPagesAhead = 4;
        const int64_t ja = b0 + j + kPagesAhead * kPageSize;
        if (ja < m && tokens[ja] / kPageSize > lp) {
          const int32_t pa = seq.pages[tokens[ja] / kPageSize];
          const char* ca = reinterpret_cast<const char*>(keys.codes(keys.ctx, layer, pa, kvh));
          for (int off = 0; off < kPageSize * dh; off += 64) _mm_prefetch(ca + off, _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(keys.scale(keys.ctx, layer, pa, kvh)), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(keys.zero(keys.ctx, layer, pa, kvh)), _MM_HINT_T0);
        }
      }
      const int row = t % kPageSize;
      const uint8_t* c = codes + (size_t)row * dh;
      if constexpr (KD == 16)
        w[j] = _mm512_loadu_si512(c);
      else
        w[j] = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)));
      sbuf[j] = scale[row];
      zbuf[j] = zero[row];
    }
    for (int j = nt; j < 16; ++j) {  // padding lanes: finite, masked out below
      w[j] = _mm512_setzero_si512();
      sbuf[j] = 0.f, zbuf[j] = 0.f;
    }
    transpose16(w);
    const __m512 vs = _mm512_load_ps(sbuf), vz = _mm512_load_ps(zbuf);
    const __mmask16 valid = (__mmask16)((1u << nt) - 1u);
    for (int g0 = 0; g0 < nq; g0 += 8) {
      const uint32_t* q = qd + (size_t)g0 * KD * 32;
      float* zg = z + (size_t)g0 * m + b0;
      switch (nq - g0 < 8 ? nq - g0 : 8) {  // the head count as a template argument: accumulators in registers
        case 1: heads_vnni<KD, 1>(w, q, sq + g0, cq + g0, qsum + g0, vs, vz, valid, zg, m); break;
        case 2: heads_vnni<KD, 2>(w, q, sq + g0, cq + g0, qsum + g0, vs, vz, valid, zg, m); break;
        case 3: heads_vnni<KD, 3>(w, q, sq + g0, cq + g0, qsum + g0, vs, vz, valid, zg, m); break;
        case 4: heads_vnni<KD, 4>(w, q, sq + g0, cq + g0, qsum + g0, vs, vz, valid, zg, m); break;
        case 5: heads_vnni<KD, 5>(w, q, sq + g0, cq + g0, qsum + g0, vs, vz, valid, zg, m); break;
        case 6: heads_vnni<KD, 6>(w, q, sq + g0, cq + g0, qsum + g0, vs, vz, valid, zg, m); break;
        case 7: heads_vnni<KD, 7>(w, q, sq + g0, cq + g0, qsum + g0, vs, vz, valid, zg, m); break;
        default: heads_vnni<KD, 8>(w, q, sq + g0, cq + g0, qsum + g0, vs, vz, valid, zg, m); break;
      }
    }
  }
}
#pragma GCC diagnostic pop

void check_keys(const Int4Keys& keys) {
  TW_CHECK(keys.codes && keys.scale && keys.zero, "pruner: INT4 key view has null accessors");
}

void check_list(const int32_t* t, int64_t m, int64_t n_ctx, int list) {
  for (int64_t j = 0; j < m; ++j) {
    TW_CHECK(t[j] >= 0 && t[j] < n_ctx, "pruner: list ", list, " has position ", t[j], " outside [0, ", n_ctx, ")");
    TW_CHECK(j == 0 || t[j] > t[j - 1], "pruner: list ", list, " is not ascending and unique at entry ", j);
  }
}

}  // namespace

void quantize_query_int8(const float* q, int d, int8_t* q8, float& sq, float& cq, float& qsum) {
  const float qscale = 1.f / std::sqrt((float)d);
  float amax = 0.f, s = 0.f;
  for (int i = 0; i < d; ++i) {
    const float x = q[i] * qscale;
    amax = std::max(amax, std::fabs(x));
    s += x;
  }
  sq = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  double res = 0.0;  // sum of the rounding residuals qs_i - sq * q8_i
  for (int i = 0; i < d; ++i) {
    const float x = q[i] * qscale;
    const float r = std::nearbyint(x * inv);  // |x * inv| <= 127 (up to rounding of inv): clamp below
    q8[i] = (int8_t)std::clamp(r, -127.f, 127.f);
    res += (double)x - (double)sq * q8[i];
  }
  cq = (float)(7.5 * res);
  qsum = s;
}

// The estimate's last step (pruner.h): every score rounded to fp16, nearest even, at most 65504 (the
// clamp first). F16C's vcvtps2ph in the x86-64-v3 / v4 clones, libgcc's exact conversion otherwise.
TW_CLONES void round_scores_to_half(float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = (float)(_Float16)std::min(z[i], 65504.f);
}

void estimate_scores(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d, const float* q, int nq,
                     const int32_t* tokens, int64_t m, float* z) {
  check_keys(keys);
  TW_CHECK(d > 0 && d % 2 == 0, "pruner: head dim ", d, " must be even");
  std::vector<int8_t> q8((size_t)nq * d);
  std::vector<float> sq(nq), cq(nq), qsum(nq);
  for (int r = 0; r < nq; ++r) quantize_query_int8(q + (size_t)r * d, d, q8.data() + (size_t)r * d, sq[r], cq[r], qsum[r]);
  static const bool vnni = ops::active_simd() == ops::Simd::AVX512;  // the AVX512 level includes VNNI, BW, VL
  if (vnni && (d == 64 || d == 128)) {
    // Per head and packed dword k (dims 8k .. 8k+7): the query bytes of the low-nibble dims (8k, 8k+2,
    // 8k+4, 8k+6) and of the high-nibble dims (the odd ones), each as one dword: qd [nq][d/8][2].
    const int kd = d / 8;
    // Each dword is replicated to 16 lanes (the kernel's vpdpbusd memory operand): [nq][d/8][2][16].
    static thread_local std::vector<uint32_t, avx512::AlignedAlloc<uint32_t>> qd;
    qd.resize((size_t)nq * kd * 32);
    for (int r = 0; r < nq; ++r)
      for (int k = 0; k < kd; ++k)
        for (int hi = 0; hi < 2; ++hi) {
          uint32_t v = 0;
          for (int b = 0; b < 4; ++b) v |= (uint32_t)(uint8_t)q8[(size_t)r * d + 8 * k + 2 * b + hi] << (8 * b);
          std::fill_n(qd.data() + ((size_t)r * kd + k) * 32 + hi * 16, 16, v);
        }
    if (d == 64)
      score_tokens_vnni<8>(keys, seq, layer, kvh, qd.data(), sq.data(), cq.data(), qsum.data(), nq, tokens, m, z);
    else
      score_tokens_vnni<16>(keys, seq, layer, kvh, qd.data(), sq.data(), cq.data(), qsum.data(), nq, tokens, m, z);
  } else {
    score_tokens(keys, seq, layer, kvh, d, q8.data(), sq.data(), cq.data(), qsum.data(), nq, tokens, m, z);
  }
  round_scores_to_half(z, (int64_t)nq * m);
}

void estimate_scores_reference(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d,
                               const float* q, int nq, const int32_t* tokens, int64_t m, float* z) {
  check_keys(keys);
  std::vector<int8_t> q8(d);
  for (int r = 0; r < nq; ++r) {
    float sq, cq, qsum;
    quantize_query_int8(q + (size_t)r * d, d, q8.data(), sq, cq, qsum);
    for (int64_t j = 0; j < m; ++j) {
      const int32_t t = tokens[j], phys = seq.pages[t / kPageSize];
      const int row = t % kPageSize;
      const uint8_t* c = keys.codes(keys.ctx, layer, phys, kvh) + (size_t)row * (d / 2);
      const float s = keys.scale(keys.ctx, layer, phys, kvh)[row], zp = keys.zero(keys.ctx, layer, phys, kvh)[row];
      int64_t dot = 0;
      for (int i = 0; i < d; ++i) dot += (int64_t)((i % 2 == 0) ? (c[i / 2] & 15) : (c[i / 2] >> 4)) * q8[i];
      z[(size_t)r * m + j] = estimate_score(dot, s, zp, sq, cq, qsum);
    }
  }
}

float estimate_score(int64_t dot, float scale, float zero, float sq, float cq, float qsum) {
  float z = std::fma(scale, std::fma(sq, (float)dot, cq), zero * qsum);
  round_scores_to_half(&z, 1);
  return z;
}

const char* guard_name(Guard g) {
  switch (g) {
    case Guard::Off: return "off";
    case Guard::Report: return "report";
    case Guard::Widen: return "widen";
    case Guard::All: return "all";
    case Guard::Dense: return "dense";
  }
  return "?";
}
const char* combine_name(GroupCombine c) { return c == GroupCombine::Mean ? "mean" : "union"; }

namespace {

// Per logical page, how many of its tokens < n_ctx are NOT candidates. cnt: [n_pages].
void outside_counts(const int32_t* t, int64_t m, int64_t n_ctx, std::vector<int32_t>& cnt) {
  const int64_t n_pages = (n_ctx + kPageSize - 1) / kPageSize;
  cnt.resize(n_pages);
  for (int64_t lp = 0; lp < n_pages; ++lp) cnt[lp] = (int32_t)std::min<int64_t>(kPageSize, n_ctx - lp * kPageSize);
  for (int64_t j = 0; j < m; ++j) --cnt[t[j] / kPageSize];
}

// One head's guard terms, shifted by M = max(max z, max of the outside pages' scaled bounds): S from
// the candidates' (max, sum exp) = (mx, sum), U from the outside pages. Returns U / (S + U).
// A NaN or +inf page bound (possible only with inf keys) cannot rule its page out: bound 1, and a
// widening guard takes the whole context.
struct BoundTerms {
  double M = -INFINITY, S = 0, U = 0;
  bool unbounded = false;
  double bound() const { return unbounded ? 1.0 : U > 0 ? U / (S + U) : 0.0; }
};
BoundTerms bound_terms(float mx, float sum, const float* u, const std::vector<int32_t>& cnt, float scale) {
  BoundTerms b;
  double umax = -INFINITY;
  for (size_t lp = 0; lp < cnt.size(); ++lp)
    if (cnt[lp] > 0) umax = std::isnan(u[lp]) ? INFINITY : std::max(umax, (double)u[lp] * scale);
  if (umax == INFINITY) {
    b.unbounded = true;
    return b;
  }
  b.M = std::max((double)mx, umax);
  if (b.M == -INFINITY) return b;  // no candidates and no outside tokens
  b.S = sum > 0 ? (double)sum * std::exp((double)mx - b.M) : 0.0;
  for (size_t lp = 0; lp < cnt.size(); ++lp)
    if (cnt[lp] > 0) b.U += cnt[lp] * std::exp((double)u[lp] * scale - b.M);
  return b;
}

struct ListScratch {
  std::vector<float> z, za, w, wprio, tau, kscale;
  std::vector<int32_t> idx, idx_r, cnt, t2, added;
  std::vector<char> mark;
  std::vector<std::pair<double, int32_t>> order;
};

// Estimate-error margin: the INT4 rounding moves each element of K~ by at most scale_t / 2 and the
// int8 query adds at most 7.5 * scale_t * sum_d |qs_d - sq * q8_d| (pruner.h), so
// |z_true - z_est| <= e_rt = scale_t * (sum_d |qs_rd| / 2 + 7.5 * sum_d |qs_rd - sq_r * q8_rd|). Adds the candidates whose weight could
// reach the top-p threshold tau if their score were margin * e_rt higher: w_rt * exp(margin * e_rt) >= tau
// (Mean / Head: the group-averaged such weight against the one threshold; Union: per head against
// that head's own threshold). sc.z holds the per-head weights, sc.w the average, sc.idx the kept
// indices (ascending); sc.idx stays ascending.
void add_margin(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d, const float* qi, int nq,
                const int32_t* t, int64_t m, float margin, bool union_heads, ListScratch& sc) {
  // qa[r] * scale_t = margin * e_rt (pruner.h: INT4 rounding of the keys + int8 rounding of the query).
  std::vector<float> qa(nq);
  std::vector<int8_t> q8(d);
  const float qscale = 1.f / std::sqrt((float)d);
  for (int r = 0; r < nq; ++r) {
    float sq, cq, qsum;
    quantize_query_int8(qi + (size_t)r * d, d, q8.data(), sq, cq, qsum);
    double a = 0, res = 0;
    for (int i = 0; i < d; ++i) {
      const double x = (double)(qi[(size_t)r * d + i] * qscale);
      a += std::fabs(x);
      res += std::fabs(x - (double)sq * q8[i]);
    }
    qa[r] = (float)(margin * (0.5 * a + 7.5 * res));
  }
  sc.kscale.resize(m);
  int64_t cur_lp = -1;
  const float* scale = nullptr;
  for (int64_t j = 0; j < m; ++j) {
    const int64_t lp = t[j] / kPageSize;
    if (lp != cur_lp) scale = keys.scale(keys.ctx, layer, seq.pages[lp], kvh), cur_lp = lp;
    sc.kscale[j] = scale[t[j] % kPageSize];
  }
  sc.mark.assign(m, 0);
  for (int32_t j : sc.idx) sc.mark[j] = 1;
  bool added = false;
  for (int64_t j = 0; j < m; ++j) {
    if (sc.mark[j]) continue;
    bool keep = false;
    if (union_heads) {
      for (int r = 0; r < nq && !keep; ++r)
        keep = sc.tau[r] > 0.f && sc.z[(size_t)r * m + j] * std::exp(qa[r] * sc.kscale[j]) >= sc.tau[r];
    } else if (sc.tau[0] > 0.f) {
      float up = 0.f;
      for (int r = 0; r < nq; ++r) up += sc.z[(size_t)r * m + j] * std::exp(qa[r] * sc.kscale[j]);
      keep = up / (float)nq >= sc.tau[0];
    }
    if (keep) sc.mark[j] = 1, added = true;
  }
  if (!added) return;
  sc.idx.clear();
  for (int64_t j = 0; j < m; ++j)
    if (sc.mark[j]) sc.idx.push_back((int32_t)j);
}

}  // namespace

double outside_bound(const float* z, const int32_t* tokens, int64_t m, const float* u, int64_t n_ctx, float scale) {
  std::vector<int32_t> cnt;
  outside_counts(tokens, m, n_ctx, cnt);
  float mx = -INFINITY, sum = 0.f;
  if (m > 0) max_sumexp(z, m, mx, sum);
  return bound_terms(mx, sum, u, cnt, scale).bound();
}

void prune_topp(const Int4Keys& keys, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, const PageBounds& bounds,
                Selection& out, std::vector<PruneStats>& stats, ThreadPool& tp) {
  check_keys(keys);
  TW_CHECK(&in != &out, "pruner: input and output selections must differ");
  TW_CHECK(hs.n_kv_heads > 0 && hs.n_heads > 0 && hs.n_heads % hs.n_kv_heads == 0, "pruner: ", hs.n_heads,
           " query heads not a multiple of ", hs.n_kv_heads, " kv heads");
  TW_CHECK(hs.head_dim > 0 && hs.head_dim % 2 == 0, "pruner: head dim ", hs.head_dim, " must be even");
  TW_CHECK(opt.p > 0.f && opt.p <= 1.f, "pruner: p = ", opt.p, " is not in (0, 1]");
  TW_CHECK(opt.min_tokens >= 0 && opt.max_tokens >= 0, "pruner: negative floor or cap");
  TW_CHECK(opt.max_tokens == 0 || opt.max_tokens >= opt.min_tokens, "pruner: cap ", opt.max_tokens, " below floor ",
           opt.min_tokens);
  TW_CHECK(opt.guard_frac >= 0.f && opt.guard_frac <= 1.f, "pruner: guard fraction ", opt.guard_frac,
           " is not in [0, 1]");
  TW_CHECK(opt.widen_max > 0.f && opt.widen_max <= 1.f, "pruner: widen_max ", opt.widen_max, " is not in (0, 1]");
  TW_CHECK(opt.margin >= 0.f && std::isfinite(opt.margin), "pruner: margin ", opt.margin, " must be finite and >= 0");
  TW_CHECK(n_ctx > 0 && (n_ctx + kPageSize - 1) / kPageSize <= (int64_t)seq.pages.size(), "pruner: n_ctx ", n_ctx,
           " exceeds the sequence's pages");
  const int64_t n_pages = (n_ctx + kPageSize - 1) / kPageSize;
  const bool guard = opt.guard != Guard::Off;
  TW_CHECK(!guard || (bounds.u && bounds.n_pages == n_pages), "pruner: the guard needs page bounds for ", n_pages,
           " pages, got ", bounds.u ? bounds.n_pages : 0);
  const int G = hs.n_heads / hs.n_kv_heads, d = hs.head_dim;
  const int want_lists = in.mode == GqaMode::Group ? hs.n_kv_heads : hs.n_heads;
  TW_CHECK(in.n_lists == want_lists, "pruner: selection has ", in.n_lists, " lists, expected ", want_lists);
  TW_CHECK((int)in.offsets.size() == in.n_lists + 1 && in.offsets[0] == 0 &&
               in.offsets.back() == (int32_t)in.tokens.size(),
           "pruner: selection offsets are inconsistent");
  for (int i = 0; i < in.n_lists; ++i) TW_CHECK(in.offsets[i + 1] >= in.offsets[i], "pruner: negative list size");

  for (int64_t i = 0; i < (int64_t)hs.n_heads * d; ++i)
    TW_CHECK(std::isfinite(q[i]), "pruner: query element ", i, " is not finite");

  const int n_lists = in.n_lists;
  const int nq = in.mode == GqaMode::Group ? G : 1;
  const bool union_heads = in.mode == GqaMode::Group && opt.combine == GroupCombine::Union && nq > 1;
  const int32_t cur = (int32_t)(n_ctx - 1);
  const float scale = 1.f / std::sqrt((float)d);
  // The guard acts when a head's bound exceeds this (p = 1 tolerates no outside mass).
  const double target = (double)opt.guard_frac * (1.0 - (double)opt.p);
  std::vector<std::vector<int32_t>> kept(n_lists);
  stats.assign(n_lists, PruneStats{});

  tp.parallel_for(n_lists, [&](int64_t b, int64_t e, int) {
    static thread_local ListScratch sc;  // per worker, reused across calls: no allocation per decode step
    std::vector<float> mx(nq), sum(nq);
    for (int64_t li = b; li < e; ++li) {
      const int i = (int)li;
      PruneStats st;
      const int64_t m0 = in.size(i);
      int64_t m = m0;
      const int32_t* t = in.list(i);
      check_list(t, m, n_ctx, i);
      st.n_in = m0;
      const int kvh = in.mode == GqaMode::Group ? i : i / G;
      const int h0 = in.mode == GqaMode::Group ? i * G : i;  // first query head of the list
      const float* qi = q + (size_t)h0 * d;
      sc.z.resize((size_t)nq * m);
      estimate_scores(keys, seq, layer, kvh, d, qi, nq, t, m, sc.z.data());
      for (int r = 0; r < nq; ++r) {
        mx[r] = -INFINITY, sum[r] = 0.f;
        if (m == 0) continue;
        if (guard)  // the guard's bound needs the sum too
          max_sumexp(sc.z.data() + (size_t)r * m, m, mx[r], sum[r]);
        else  // the softmax below sums the exps itself: one exp pass, not two
          mx[r] = max_of(sc.z.data() + (size_t)r * m, m);
      }

      // Guard: bound of the mass outside I0 per head, and the action when it is too large.
      if (guard) {
        outside_counts(t, m, n_ctx, sc.cnt);
        double worst = 0;
        std::vector<BoundTerms> bt(nq);
        for (int r = 0; r < nq; ++r) {
          bt[r] = bound_terms(mx[r], sum[r], bounds.u + (size_t)(h0 + r) * n_pages, sc.cnt, scale);
          worst = std::max(worst, bt[r].bound());
        }
        st.outside_bound0 = st.outside_bound = (float)worst;
        const bool act = opt.guard != Guard::Report && worst > target;
        if (act && opt.guard == Guard::Dense) {
          std::vector<int32_t>& o = kept[i];
          o.resize(n_ctx);
          for (int64_t x = 0; x < n_ctx; ++x) o[x] = (int32_t)x;
          st.n_out = n_ctx;
          st.est_mass_kept = st.est_mass_min = 1.f;
          st.outside_bound = 0.f;
          st.n_added = n_ctx - m0;
          st.action = 3;
          stats[i] = st;
          continue;
        }
        if (act) {
          // Pages to add: per head, the largest contributions to U until U_rest <= S * t / (1 - t).
          sc.mark.assign(n_pages, 0);
          bool all = opt.guard == Guard::All;
          for (int r = 0; r < nq; ++r) all = all || bt[r].unbounded;
          if (!all) {
            int64_t n_add = 0;
            for (int r = 0; r < nq; ++r) {
              if (bt[r].bound() <= target) continue;
              const float* ur = bounds.u + (size_t)(h0 + r) * n_pages;
              sc.order.clear();
              for (int64_t lp = 0; lp < n_pages; ++lp)
                if (sc.cnt[lp] > 0) sc.order.emplace_back(sc.cnt[lp] * std::exp((double)ur[lp] * scale - bt[r].M), (int32_t)lp);
              std::sort(sc.order.begin(), sc.order.end(), [](auto& a, auto& c) { return a.first > c.first || (a.first == c.first && a.second < c.second); });
              const double allow = target < 1.0 ? bt[r].S * target / (1.0 - target) : INFINITY;
              double rest = bt[r].U;
              for (const auto& [c, lp] : sc.order) {
                if (rest <= allow) break;
                rest -= c;
                if (!sc.mark[lp]) sc.mark[lp] = 1, n_add += sc.cnt[lp];
              }
            }
            all = (double)(m0 + n_add) > (double)opt.widen_max * (double)n_ctx;
          }
          if (all) std::fill(sc.mark.begin(), sc.mark.end(), 1);
          // The new candidates: I0 plus every non-candidate token of the marked pages.
          sc.added.clear();
          {
            int64_t j = 0;
            for (int64_t lp = 0; lp < n_pages; ++lp) {
              if (!sc.mark[lp] || sc.cnt[lp] == 0) continue;
              const int64_t t0 = lp * kPageSize, t1 = std::min<int64_t>(n_ctx, t0 + kPageSize);
              for (int64_t x = t0; x < t1; ++x) {
                while (j < m && t[j] < x) ++j;
                const bool is_cand = j < m && t[j] == x;
                if (!is_cand) sc.added.push_back((int32_t)x);
              }
            }
          }
          const int64_t ma = (int64_t)sc.added.size(), m2 = m + ma;
          sc.za.resize((size_t)nq * ma);
          estimate_scores(keys, seq, layer, kvh, d, qi, nq, sc.added.data(), ma, sc.za.data());
          // Merge (both ascending) into t2 / z.
          sc.t2.resize(m2);
          std::vector<float> z2((size_t)nq * m2);
          int64_t a = 0, c = 0;
          for (int64_t k = 0; k < m2; ++k) {
            const bool from_in = c >= ma || (a < m && t[a] < sc.added[c]);
            sc.t2[k] = from_in ? t[a] : sc.added[c];
            for (int r = 0; r < nq; ++r)
              z2[(size_t)r * m2 + k] = from_in ? sc.z[(size_t)r * m + a] : sc.za[(size_t)r * ma + c];
            from_in ? ++a : ++c;
          }
          sc.z.swap(z2);
          t = sc.t2.data();
          m = m2;
          st.n_added = ma;
          st.action = all ? 2 : 1;
          outside_counts(t, m, n_ctx, sc.cnt);
          worst = 0;
          for (int r = 0; r < nq; ++r) {
            max_sumexp(sc.z.data() + (size_t)r * m, m, mx[r], sum[r]);
            worst = std::max(worst, bound_terms(mx[r], sum[r], bounds.u + (size_t)(h0 + r) * n_pages, sc.cnt, scale).bound());
          }
          st.outside_bound = (float)worst;
        }
      }

      // Softmax per query head (in place: z row r becomes head r's weights), and the group average.
      sc.w.assign(m, 0.f);
      for (int r = 0; r < nq && m > 0; ++r) {
        float* zr = sc.z.data() + (size_t)r * m;
        const float s = exp_shift_sum(zr, m, mx[r]);
        add_scaled(sc.w.data(), zr, m, 1.f / s, 1.f / (s * (float)nq));
      }
      std::vector<int32_t>& idx = sc.idx;
      sc.tau.assign(nq, 0.f);
      if (!union_heads) {
        sc.tau[0] = topp_select(sc.w.data(), m, opt.p, idx).tau;
      } else {
        // Each head's own top-p set, united.
        sc.mark.assign(m, 0);
        for (int r = 0; r < nq; ++r) {
          sc.tau[r] = topp_select(sc.z.data() + (size_t)r * m, m, opt.p, sc.idx_r).tau;
          for (int32_t j : sc.idx_r) sc.mark[j] = 1;
        }
        idx.clear();
        for (int64_t j = 0; j < m; ++j)
          if (sc.mark[j]) idx.push_back((int32_t)j);
      }
      if (opt.margin > 0.f && m > 0) add_margin(keys, seq, layer, kvh, d, qi, nq, t, m, opt.margin, union_heads, sc);

      // Current token: forced in, ranked above every candidate for the floor and the cap.
      const bool cur_is_cand = m > 0 && t[m - 1] == cur;
      const int64_t extra = cur_is_cand ? 0 : 1;
      if (cur_is_cand && (idx.empty() || idx.back() != m - 1)) idx.push_back((int32_t)(m - 1));
      const int64_t size = (int64_t)idx.size() + extra;
      const bool need_floor = opt.min_tokens > size && (int64_t)idx.size() < m;
      const bool need_cap = opt.max_tokens > 0 && size > opt.max_tokens;
      if (need_floor || need_cap) {
        sc.wprio = sc.w;
        if (cur_is_cand) sc.wprio[m - 1] = INFINITY;
        const int64_t k = need_cap ? opt.max_tokens - extra : opt.min_tokens - extra;
        top_k_indices(sc.wprio.data(), m, k, idx);
      }

      std::vector<int32_t>& out_i = kept[i];
      out_i.clear();
      double mass = 0.0;
      for (int32_t j : idx) {
        out_i.push_back(t[j]);
        mass += sc.w[j];
      }
      double mass_min = nq > 1 ? INFINITY : mass;
      if (nq > 1) {  // every head's kept mass in one pass (nq independent sums, each in index order)
        double mr[kMaxGroup] = {};
        for (int r0 = 0; r0 < nq; r0 += kMaxGroup) {
          const int nr = std::min(kMaxGroup, nq - r0);
          std::fill(mr, mr + nr, 0.0);
          for (int32_t j : idx)
            for (int r = 0; r < nr; ++r) mr[r] += sc.z[(size_t)(r0 + r) * m + j];
          for (int r = 0; r < nr; ++r) mass_min = std::min(mass_min, mr[r]);
        }
      }
      if (!cur_is_cand) out_i.push_back(cur);  // every candidate is < cur: order stays ascending
      st.n_out = (int64_t)out_i.size();
      st.est_mass_kept = (float)mass;
      st.est_mass_min = m > 0 ? (float)mass_min : 0.f;
      stats[i] = st;
    }
  });

  out.clear(in.mode, n_lists);
  for (int i = 0; i < n_lists; ++i) out.push_list(kept[i].data(), (int64_t)kept[i].size());
}

void prune_topp(const Int4Keys& keys, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, Selection& out,
                std::vector<PruneStats>& stats, ThreadPool& tp) {
  prune_topp(keys, seq, layer, hs, q, in, n_ctx, opt, PageBounds{}, out, stats, tp);
}

void prune_topp(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, const PageBounds& bounds,
                Selection& out, std::vector<PruneStats>& stats, ThreadPool& tp) {
  TW_CHECK(ks.shape().n_kv_heads == hs.n_kv_heads && ks.shape().head_dim == hs.head_dim,
           "pruner: head shape does not match the key side structures");
  TW_CHECK(layer >= 0 && layer < ks.shape().n_layers, "pruner: layer out of range");
  prune_topp(int4_keys(ks), seq, layer, hs, q, in, n_ctx, opt, bounds, out, stats, tp);
}

void prune_topp(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, Selection& out,
                std::vector<PruneStats>& stats, ThreadPool& tp) {
  prune_topp(ks, seq, layer, hs, q, in, n_ctx, opt, PageBounds{}, out, stats, tp);
}

}  // namespace tw::attn
