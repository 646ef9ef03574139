#include "attention/pruner.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <immintrin.h>

#include "attention/topp.h"
#include "attention/fast_exp.h"
#include "common/error.h"
#include "ops/cpu/matmul.h"

namespace tw::attn {

namespace {

using kv::kPageSize;

#define TW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

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

// acc[u] = q_u . codes for 4 (2) query heads at once; q_u = (qe + u*dh, qo + u*dh).
__attribute__((always_inline)) inline void dot4(const float* qe, const float* qo, int dh, const float* lo,
                                                const float* hi, float* acc) {
  const float *e0 = qe, *e1 = qe + dh, *e2 = qe + 2 * dh, *e3 = qe + 3 * dh;
  const float *o0 = qo, *o1 = qo + dh, *o2 = qo + 2 * dh, *o3 = qo + 3 * dh;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int i = 0; i < dh; ++i) {
    a0 += e0[i] * lo[i] + o0[i] * hi[i];
    a1 += e1[i] * lo[i] + o1[i] * hi[i];
    a2 += e2[i] * lo[i] + o2[i] * hi[i];
    a3 += e3[i] * lo[i] + o3[i] * hi[i];
  }
  acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}
__attribute__((always_inline)) inline void dot2(const float* qe, const float* qo, int dh, const float* lo,
                                                const float* hi, float* acc) {
  const float *e0 = qe, *e1 = qe + dh, *o0 = qo, *o1 = qo + dh;
  float a0 = 0.f, a1 = 0.f;
#pragma omp simd reduction(+ : a0, a1)
  for (int i = 0; i < dh; ++i) {
    a0 += e0[i] * lo[i] + o0[i] * hi[i];
    a1 += e1[i] * lo[i] + o1[i] * hi[i];
  }
  acc[0] = a0, acc[1] = a1;
}

// Scores of a run of tokens against nq queries. qe/qo: [nq][d/2], the even / odd elements of the
// scaled queries (so that the low / high nibbles pair with them without an interleaving shuffle);
// qsum: [nq], the sums of the scaled queries (the zero-point term: q . (zero + c * s) =
// zero * sum(q) + s * (q . c)). lo/hi: scratch [d/2].
TW_CLONES void score_tokens(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d,
                            const float* qe, const float* qo, const float* qsum, int nq, const int32_t* tokens,
                            int64_t m, float* z, float* lo, float* hi) {
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
#pragma omp simd
    for (int i = 0; i < dh; ++i) {
      lo[i] = (float)(c[i] & 15);
      hi[i] = (float)(c[i] >> 4);
    }
    const float s = scale[row], zp = zero[row];
    // Heads in blocks of 4 / 2 / 1: independent accumulator chains share each unpacked row (one
    // chain per token was latency-bound on the FMA chain).
    int r = 0;
    for (; r + 4 <= nq; r += 4) {
      float a[4];
      dot4(qe + (size_t)r * dh, qo + (size_t)r * dh, dh, lo, hi, a);
      for (int u = 0; u < 4; ++u) z[(size_t)(r + u) * m + j] = zp * qsum[r + u] + s * a[u];
    }
    for (; r + 2 <= nq; r += 2) {
      float a[2];
      dot2(qe + (size_t)r * dh, qo + (size_t)r * dh, dh, lo, hi, a);
      for (int u = 0; u < 2; ++u) z[(size_t)(r + u) * m + j] = zp * qsum[r + u] + s * a[u];
    }
    for (; r < nq; ++r) {
      const float* e = qe + (size_t)r * dh;
      const float* o = qo + (size_t)r * dh;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int i = 0; i < dh; ++i) acc += e[i] * lo[i] + o[i] * hi[i];
      z[(size_t)r * m + j] = zp * qsum[r] + s * acc;
    }
  }
}

// The same with AVX-512 intrinsics for d = 32 * C (C = 2: d = 64, C = 4: d = 128): the unpacked row
// stays in 2C registers, every head accumulates lo and hi chains separately and ends with one
// shuffle-tree reduction (the portable loop above ends each dot product in 16 dependent scalar adds).
// GCC 12 warns about the intrinsics' own _mm512_undefined_* placeholders (a known false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int C>
__attribute__((target("avx512f"))) void score_tokens_avx512(const Int4Keys& keys, const kv::SeqPages& seq, int layer,
                                                            int kvh, const float* qe, const float* qo,
                                                            const float* qsum, int nq, const int32_t* tokens,
                                                            int64_t m, float* z) {
  constexpr int dh = 16 * C;
  const __m512i mask = _mm512_set1_epi32(15);
  int64_t cur_lp = -1;
  const uint8_t* codes = nullptr;
  const float *scale = nullptr, *zero = nullptr;
  for (int64_t j = 0; j < m; ++j) {
    const int32_t t = tokens[j];
    const int64_t lp = t / kPageSize;
    if (lp != cur_lp) {
      const int32_t phys = seq.pages[lp];
      codes = keys.codes(keys.ctx, layer, phys, kvh);
      scale = keys.scale(keys.ctx, layer, phys, kvh);
      zero = keys.zero(keys.ctx, layer, phys, kvh);
      cur_lp = lp;
      // Prefetch the mirror of the page ~2 pages of candidates ahead: candidate pages are scattered,
      // and without it every page starts with a cache miss on its codes and scale (bench --attention).
      const int64_t ja = j + 2 * kPageSize;
      if (ja < m && tokens[ja] / kPageSize > lp) {
        const int32_t pa = seq.pages[tokens[ja] / kPageSize];
        const char* ca = reinterpret_cast<const char*>(keys.codes(keys.ctx, layer, pa, kvh));
        for (int off = 0; off < kPageSize * dh; off += 64) _mm_prefetch(ca + off, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(keys.scale(keys.ctx, layer, pa, kvh)), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(keys.zero(keys.ctx, layer, pa, kvh)), _MM_HINT_T0);
      }
    }
    const int row = t % kPageSize;
    const uint8_t* c = codes + (size_t)row * dh;
    __m512 lo[C], hi[C];
    for (int k = 0; k < C; ++k) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16 * k)));
      lo[k] = _mm512_cvtepi32_ps(_mm512_and_si512(b, mask));
      hi[k] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
    }
    const float s = scale[row], zp = zero[row];
    for (int r = 0; r < nq; ++r) {
      const float* e = qe + (size_t)r * dh;
      const float* o = qo + (size_t)r * dh;
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(e), lo[0]);
      __m512 b = _mm512_mul_ps(_mm512_loadu_ps(o), hi[0]);
      for (int k = 1; k < C; ++k) {
        a = _mm512_fmadd_ps(_mm512_loadu_ps(e + 16 * k), lo[k], a);
        b = _mm512_fmadd_ps(_mm512_loadu_ps(o + 16 * k), hi[k], b);
      }
      z[(size_t)r * m + j] = zp * qsum[r] + s * _mm512_reduce_add_ps(_mm512_add_ps(a, b));
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

void estimate_scores(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d, const float* q, int nq,
                     const int32_t* tokens, int64_t m, float* z) {
  check_keys(keys);
  TW_CHECK(d > 0 && d % 2 == 0, "pruner: head dim ", d, " must be even");
  const int dh = d / 2;
  const float qscale = 1.f / std::sqrt((float)d);
  std::vector<float> qe((size_t)nq * dh), qo((size_t)nq * dh), qsum(nq), lo(dh), hi(dh);
  for (int r = 0; r < nq; ++r) {
    float s = 0.f;
    for (int i = 0; i < dh; ++i) {
      qe[(size_t)r * dh + i] = q[(size_t)r * d + 2 * i] * qscale;
      qo[(size_t)r * dh + i] = q[(size_t)r * d + 2 * i + 1] * qscale;
      s += qe[(size_t)r * dh + i] + qo[(size_t)r * dh + i];
    }
    qsum[r] = s;
  }
  static const bool avx512 = ops::active_simd() == ops::Simd::AVX512;  // implies AVX-512F
  if (avx512 && d == 64)
    score_tokens_avx512<2>(keys, seq, layer, kvh, qe.data(), qo.data(), qsum.data(), nq, tokens, m, z);
  else if (avx512 && d == 128)
    score_tokens_avx512<4>(keys, seq, layer, kvh, qe.data(), qo.data(), qsum.data(), nq, tokens, m, z);
  else
    score_tokens(keys, seq, layer, kvh, d, qe.data(), qo.data(), qsum.data(), nq, tokens, m, z, lo.data(), hi.data());
}

void estimate_scores_reference(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d,
                               const float* q, int nq, const int32_t* tokens, int64_t m, float* z) {
  check_keys(keys);
  for (int64_t j = 0; j < m; ++j) {
    const int32_t t = tokens[j], phys = seq.pages[t / kPageSize];
    const int row = t % kPageSize;
    const uint8_t* c = keys.codes(keys.ctx, layer, phys, kvh) + (size_t)row * (d / 2);
    const double s = keys.scale(keys.ctx, layer, phys, kvh)[row], zp = keys.zero(keys.ctx, layer, phys, kvh)[row];
    for (int r = 0; r < nq; ++r) {
      double acc = 0.0;
      for (int i = 0; i < d; ++i) {
        const int code = (i % 2 == 0) ? (c[i / 2] & 15) : (c[i / 2] >> 4);
        acc += (double)q[(size_t)r * d + i] * (zp + code * s);
      }
      z[(size_t)r * m + j] = (float)(acc / std::sqrt((double)d));
    }
  }
}

void prune_topp(const Int4Keys& keys, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, Selection& out,
                std::vector<PruneStats>& stats, ThreadPool& tp) {
  check_keys(keys);
  TW_CHECK(&in != &out, "pruner: input and output selections must differ");
  TW_CHECK(hs.n_kv_heads > 0 && hs.n_heads > 0 && hs.n_heads % hs.n_kv_heads == 0, "pruner: ", hs.n_heads,
           " query heads not a multiple of ", hs.n_kv_heads, " kv heads");
  TW_CHECK(hs.head_dim > 0 && hs.head_dim % 2 == 0, "pruner: head dim ", hs.head_dim, " must be even");
  TW_CHECK(opt.p > 0.f && opt.p <= 1.f, "pruner: p = ", opt.p, " is not in (0, 1]");
  TW_CHECK(opt.min_tokens >= 0 && opt.max_tokens >= 0, "pruner: negative floor or cap");
  TW_CHECK(opt.max_tokens == 0 || opt.max_tokens >= opt.min_tokens, "pruner: cap ", opt.max_tokens, " below floor ",
           opt.min_tokens);
  TW_CHECK(n_ctx > 0 && (n_ctx + kPageSize - 1) / kPageSize <= (int64_t)seq.pages.size(), "pruner: n_ctx ", n_ctx,
           " exceeds the sequence's pages");
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
  const int32_t cur = (int32_t)(n_ctx - 1);
  std::vector<std::vector<int32_t>> kept(n_lists);
  stats.assign(n_lists, PruneStats{});

  tp.parallel_for(n_lists, [&](int64_t b, int64_t e, int) {
    std::vector<float> z, w, wprio;
    std::vector<int32_t> idx;
    for (int64_t li = b; li < e; ++li) {
      const int i = (int)li;
      const int64_t m = in.size(i);
      const int32_t* t = in.list(i);
      check_list(t, m, n_ctx, i);
      const int kvh = in.mode == GqaMode::Group ? i : i / G;
      const float* qi = q + (size_t)(in.mode == GqaMode::Group ? i * G : i) * d;
      z.resize((size_t)nq * m);
      w.assign(m, 0.f);
      estimate_scores(keys, seq, layer, kvh, d, qi, nq, t, m, z.data());
      // Softmax per query head, then the group average (sum of distributions / nq).
      for (int r = 0; r < nq && m > 0; ++r) {
        float* zr = z.data() + (size_t)r * m;
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < m; ++j) mx = zr[j] > mx ? zr[j] : mx;
        const float sum = exp_shift_sum(zr, m, mx);
        const float inv = 1.f / (sum * (float)nq);
        float* wp = w.data();
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) wp[j] += zr[j] * inv;
      }
      topp_select(w.data(), m, opt.p, idx);

      // Current token: forced in, ranked above every candidate for the floor and the cap.
      const bool cur_is_cand = m > 0 && t[m - 1] == cur;
      const int64_t extra = cur_is_cand ? 0 : 1;
      if (cur_is_cand && (idx.empty() || idx.back() != m - 1)) idx.push_back((int32_t)(m - 1));
      const int64_t size = (int64_t)idx.size() + extra;
      const bool need_floor = opt.min_tokens > size && (int64_t)idx.size() < m;
      const bool need_cap = opt.max_tokens > 0 && size > opt.max_tokens;
      if (need_floor || need_cap) {
        wprio = w;
        if (cur_is_cand) wprio[m - 1] = INFINITY;
        const int64_t k = need_cap ? opt.max_tokens - extra : opt.min_tokens - extra;
        top_k_indices(wprio.data(), m, k, idx);
      }

      std::vector<int32_t>& out_i = kept[i];
      out_i.clear();
      double mass = 0.0;
      for (int32_t j : idx) {
        out_i.push_back(t[j]);
        mass += w[j];
      }
      if (!cur_is_cand) out_i.push_back(cur);  // every candidate is < cur: order stays ascending
      stats[i] = PruneStats{m, (int64_t)out_i.size(), (float)mass};
    }
  });

  out.clear(in.mode, n_lists);
  for (int i = 0; i < n_lists; ++i) out.push_list(kept[i].data(), (int64_t)kept[i].size());
}

void prune_topp(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                const Selection& in, int64_t n_ctx, const PruneOptions& opt, Selection& out,
                std::vector<PruneStats>& stats, ThreadPool& tp) {
  TW_CHECK(ks.shape().n_kv_heads == hs.n_kv_heads && ks.shape().head_dim == hs.head_dim,
           "pruner: head shape does not match the key side structures");
  TW_CHECK(layer >= 0 && layer < ks.shape().n_layers, "pruner: layer out of range");
  prune_topp(int4_keys(ks), seq, layer, hs, q, in, n_ctx, opt, out, stats, tp);
}

}  // namespace tw::attn
