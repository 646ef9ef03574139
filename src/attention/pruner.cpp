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

// Estimate-error margin: the INT4 rounding moves each element of K~ by at most scale_t / 2, so
// |z_true - z_est| <= e_rt = scale_t / 2 * sum_d |q_rd| / sqrt(d). Adds the candidates whose weight could
// reach the top-p threshold tau if their score were margin * e_rt higher: w_rt * exp(margin * e_rt) >= tau
// (Mean / Head: the group-averaged such weight against the one threshold; Union: per head against
// that head's own threshold). sc.z holds the per-head weights, sc.w the average, sc.idx the kept
// indices (ascending); sc.idx stays ascending.
void add_margin(const Int4Keys& keys, const kv::SeqPages& seq, int layer, int kvh, int d, const float* qi, int nq,
                const int32_t* t, int64_t m, float margin, bool union_heads, ListScratch& sc) {
  std::vector<float> qa(nq);
  for (int r = 0; r < nq; ++r) {
    double a = 0;
    for (int i = 0; i < d; ++i) a += std::fabs(qi[(size_t)r * d + i]);
    qa[r] = (float)(0.5 * margin * a / std::sqrt((double)d));
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
    ListScratch sc;
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
        if (m > 0) max_sumexp(sc.z.data() + (size_t)r * m, m, mx[r], sum[r]);
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
        const float inv = 1.f / s, inv_g = 1.f / (s * (float)nq);
        float* wp = sc.w.data();
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) {
          wp[j] += zr[j] * inv_g;
          zr[j] *= inv;
        }
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
      for (int r = 0; r < nq && nq > 1; ++r) {
        const float* wr = sc.z.data() + (size_t)r * m;
        double mr = 0.0;
        for (int32_t j : idx) mr += wr[j];
        mass_min = std::min(mass_min, mr);
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
