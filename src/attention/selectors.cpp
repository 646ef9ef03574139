#include "attention/selectors.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "attention/select_util.h"
#include "common/error.h"
#include "ops/cpu/matmul.h"

#include <immintrin.h>

namespace tw::attn {

namespace {

using kv::kPageSize;

#define TW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

using detail::check_common;
using detail::n_lists_of;
using detail::rank_key;
using detail::top_r;

void push_all(Selection& out, int64_t n_ctx, int n_lists, std::vector<int32_t>& tmp) {
  tmp.resize(n_ctx);
  std::iota(tmp.begin(), tmp.end(), 0);
  for (int i = 0; i < n_lists; ++i) out.push_list(tmp.data(), n_ctx);
}

// Quest scores of the G query heads of kv head h over logical pages [lp0, lp1). qpn: [G][2][d], each
// head's q+ = max(q, 0) then q- = min(q, 0): max(q*kmax, q*kmin) = q+*kmax + q-*kmin term by term
// (kmax >= kmin), which turns the bound into two dot products. Heads go four at a time so the four
// reductions are independent chains (one chain per head was latency-bound). zeros: [2][d] of 0 to pad a
// block. Group: max over the heads into out[lp]; Head: out[g * stride + lp].
TW_CLONES void score_pages(const KeySide& ks, const int32_t* pages, int layer, int h, int64_t lp0, int64_t lp1,
                           const float* qpn, const float* zeros, int G, int d, bool group, float* out,
                           int64_t stride) {
  for (int64_t lp = lp0; lp < lp1; ++lp) {
    const float* mn = ks.kmin(layer, pages[lp], h);
    const float* mx = ks.kmax(layer, pages[lp], h);
    float best = -INFINITY;
    for (int g0 = 0; g0 < G; g0 += 4) {
      const float* qb[4];
      for (int j = 0; j < 4; ++j) qb[j] = g0 + j < G ? qpn + (size_t)(g0 + j) * 2 * d : zeros;
      const float *p0 = qb[0], *p1 = qb[1], *p2 = qb[2], *p3 = qb[3];
      float u0 = 0.f, u1 = 0.f, u2 = 0.f, u3 = 0.f;
#pragma omp simd reduction(+ : u0, u1, u2, u3)
      for (int i = 0; i < d; ++i) {
        const float a = mx[i], b = mn[i];
        u0 += p0[i] * a + p0[d + i] * b;
        u1 += p1[i] * a + p1[d + i] * b;
        u2 += p2[i] * a + p2[d + i] * b;
        u3 += p3[i] * a + p3[d + i] * b;
      }
      const float u[4] = {u0, u1, u2, u3};
      for (int j = 0; j < 4 && g0 + j < G; ++j) {
        if (group)
          best = (std::isnan(u[j]) || u[j] > best) ? rank_key(u[j]) : best;
        else
          out[(g0 + j) * stride + lp] = u[j];
      }
    }
    if (group) out[lp] = best;
  }
}

// score_pages at the AVX-512 level for d % 16 == 0, over logical pages [lp0, lp1) and EVERY kv head
// (page-major: a thread reads the bounds of its pages as one contiguous stream, [page][head][d]):
// per (page, kv head), the bound slices are loaded once and FMA'd against the G heads' q+ / q-
// (8 heads at a time, each its own accumulator), the next page's bounds are prefetched. Output as
// score_pages: Group: out[h * n_pages + lp] = max over the group (NaN ranks as +inf); Head:
// out[(h * G + g) * n_pages + lp].
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on the intrinsics' _mm512_undefined_*
// NG heads g0 .. g0+NG-1 of one (page, kv head): u[g] = sum over d of q+ * kmax + q- * kmin.
template <int NG>
__attribute__((target("avx512f,fma"))) inline void bound_dots(const float* mn, const float* mx, const float* qh, int g0,
                                                              int d, float* u) {
  __m512 acc[NG];
#pragma GCC unroll 8
  for (int g = 0; g < NG; ++g) acc[g] = _mm512_setzero_ps();
  for (int v = 0; v < d / 16; ++v) {
    const __m512 a = _mm512_loadu_ps(mx + 16 * v), b = _mm512_loadu_ps(mn + 16 * v);
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g) {
      const float* qg = qh + (size_t)(g0 + g) * 2 * d + 16 * v;
      acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qg), a, acc[g]);
      acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qg + d), b, acc[g]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < NG; ++g) u[g] = _mm512_reduce_add_ps(acc[g]);
}

__attribute__((target("avx512f,fma"))) void score_pages_avx512(const KeySide& ks, const int32_t* pages, int layer,
                                                              int hkv, int64_t lp0, int64_t lp1, const float* qpn,
                                                              int G, int d, bool group, float* out, int64_t n_pages) {
  float u[8];
  for (int64_t lp = lp0; lp < lp1; ++lp) {
    constexpr int PFD = 2;  // pages ahead (1-16 measured within noise; 2 kept)
    if (lp + PFD < lp1)  // two pages ahead: the bounds of all heads of a page are contiguous
      for (int h = 0; h < hkv; ++h) {
        const char* a = reinterpret_cast<const char*>(ks.kmin(layer, pages[lp + PFD], h));
        const char* b = reinterpret_cast<const char*>(ks.kmax(layer, pages[lp + PFD], h));
        for (int off = 0; off < d * 4; off += 64) {
          _mm_prefetch(a + off, _MM_HINT_T0);
          _mm_prefetch(b + off, _MM_HINT_T0);
        }
      }
    for (int h = 0; h < hkv; ++h) {
      const float* mn = ks.kmin(layer, pages[lp], h);
      const float* mx = ks.kmax(layer, pages[lp], h);
      const float* qh = qpn + (size_t)h * G * 2 * d;
      float best = -INFINITY;
      for (int g0 = 0; g0 < G; g0 += 8) {
        const int ng = G - g0 < 8 ? G - g0 : 8;
        switch (ng) {  // the head count as a template argument keeps the accumulators in registers
          case 1: bound_dots<1>(mn, mx, qh, g0, d, u); break;
          case 2: bound_dots<2>(mn, mx, qh, g0, d, u); break;
          case 3: bound_dots<3>(mn, mx, qh, g0, d, u); break;
          case 4: bound_dots<4>(mn, mx, qh, g0, d, u); break;
          case 5: bound_dots<5>(mn, mx, qh, g0, d, u); break;
          case 6: bound_dots<6>(mn, mx, qh, g0, d, u); break;
          case 7: bound_dots<7>(mn, mx, qh, g0, d, u); break;
          default: bound_dots<8>(mn, mx, qh, g0, d, u); break;
        }
        for (int g = 0; g < ng; ++g) {
          if (group)
            best = (std::isnan(u[g]) || u[g] > best) ? rank_key(u[g]) : best;
          else
            out[((size_t)h * G + g0 + g) * n_pages + lp] = u[g];
        }
      }
      if (group) out[(size_t)h * n_pages + lp] = best;
    }
  }
}
#pragma GCC diagnostic pop

// Exact scores q.k/sqrt(d) of the G query heads of kv head h for tokens [0, n_ctx): s [G][n_ctx].
TW_CLONES void exact_scores(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, int h, const float* qg, int G,
                            int d, int64_t n_ctx, float* s) {
  std::vector<float> kf((size_t)kPageSize * d);
  const float sc = 1.f / std::sqrt((float)d);
  const int64_t n_pages = (n_ctx + kPageSize - 1) / kPageSize;
  for (int64_t lp = 0; lp < n_pages; ++lp) {
    const int nt = (int)std::min<int64_t>(kPageSize, n_ctx - lp * kPageSize);
    const _Float16* k16 = reinterpret_cast<const _Float16*>(pool.k_page(layer, seq.pages[lp], h));
#pragma omp simd
    for (int i = 0; i < nt * d; ++i) kf[i] = (float)k16[i];
    for (int g = 0; g < G; ++g) {
      const float* qq = qg + (size_t)g * d;
      for (int j = 0; j < nt; ++j) {
        const float* kj = kf.data() + (size_t)j * d;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < d; ++i) acc += qq[i] * kj[i];
        s[(size_t)g * n_ctx + lp * kPageSize + j] = acc * sc;
      }
    }
  }
}

void quest_impl(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                int64_t n_ctx, int64_t budget, GqaMode mode, Selection& out, ThreadPool* tp) {
  check_common("quest selector", ks.shape(), seq, layer, hs, q, n_ctx);
  TW_CHECK(budget > 0, "quest selector: budget must be positive, got ", budget);
  const int n_lists = n_lists_of(hs, mode);
  out.clear(mode, n_lists);
  std::vector<int32_t> tmp;
  const int64_t n_pages = (n_ctx + kPageSize - 1) / kPageSize;
  const int64_t n_sel = (budget + kPageSize - 1) / kPageSize;
  if (budget >= n_ctx || n_sel >= n_pages) {
    push_all(out, n_ctx, n_lists, tmp);
    return;
  }
  // Here n_pages >= 2: the sink page and the last page are distinct and always kept.
  std::vector<float> scores((size_t)n_lists * n_pages);
  quest_page_scores(ks, seq, layer, hs, q, n_ctx, mode, scores.data(), tp);
  const int64_t r = std::max<int64_t>(0, n_sel - 2);
  std::vector<int32_t> idx;
  for (int li = 0; li < n_lists; ++li) {
    idx.resize(n_pages - 2);
    std::iota(idx.begin(), idx.end(), 1);
    top_r(idx, scores.data() + (size_t)li * n_pages, r);
    idx.resize(std::min<int64_t>(r, (int64_t)idx.size()));
    idx.push_back(0);
    idx.push_back((int32_t)(n_pages - 1));
    std::sort(idx.begin(), idx.end());
    tmp.clear();
    for (int32_t lp : idx) {
      const int64_t t1 = std::min<int64_t>(n_ctx, (int64_t)(lp + 1) * kPageSize);
      for (int64_t t = (int64_t)lp * kPageSize; t < t1; ++t) tmp.push_back((int32_t)t);
    }
    out.push_list(tmp.data(), (int64_t)tmp.size());
  }
}

}  // namespace

void quest_page_scores(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                       int64_t n_ctx, GqaMode mode, float* scores, ThreadPool* tp) {
  check_common("quest scores", ks.shape(), seq, layer, hs, q, n_ctx);
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads, hkv = hs.n_kv_heads;
  const int64_t n_pages = (n_ctx + kPageSize - 1) / kPageSize;
  const bool group = mode == GqaMode::Group;
  std::vector<float> qpn((size_t)hs.n_heads * 2 * d), zeros((size_t)2 * d, 0.f);
  for (int hq = 0; hq < hs.n_heads; ++hq)
    for (int i = 0; i < d; ++i) {
      const float x = q[(size_t)hq * d + i];
      qpn[(size_t)hq * 2 * d + i] = x > 0.f ? x : 0.f;
      qpn[(size_t)hq * 2 * d + d + i] = x < 0.f ? x : 0.f;
    }
  if (ops::active_simd() == ops::Simd::AVX512 && d % 16 == 0) {
    // Work item: one page, all kv heads.
    auto run = [&](int64_t b, int64_t e, int) {
      score_pages_avx512(ks, seq.pages.data(), layer, hkv, b, e, qpn.data(), G, d, group, scores, n_pages);
    };
    if (tp && tp->size() > 1 && n_pages * hkv >= 256)
      tp->parallel_for(n_pages, run);
    else
      run(0, n_pages, 0);
    return;
  }
  // Work item: (kv head, page); a chunk covers consecutive pages of one or two heads.
  auto run = [&](int64_t b, int64_t e, int) {
    while (b < e) {
      const int h = (int)(b / n_pages);
      const int64_t lp0 = b % n_pages, lp1 = std::min<int64_t>(n_pages, lp0 + (e - b));
      float* o = group ? scores + (size_t)h * n_pages : scores + (size_t)h * G * n_pages;
      score_pages(ks, seq.pages.data(), layer, h, lp0, lp1, qpn.data() + (size_t)h * G * 2 * d, zeros.data(), G, d,
                  group, o, n_pages);
      b += lp1 - lp0;
    }
  };
  const int64_t items = (int64_t)hkv * n_pages;
  // Below ~256 pages the fork-join costs more than the scoring.
  if (tp && tp->size() > 1 && items >= 256)
    tp->parallel_for(items, run);
  else
    run(0, items, 0);
}

void select_quest(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                  int64_t n_ctx, int64_t budget, GqaMode mode, Selection& out) {
  quest_impl(ks, seq, layer, hs, q, n_ctx, budget, mode, out, nullptr);
}

void select_quest(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                  int64_t n_ctx, int64_t budget, GqaMode mode, Selection& out, ThreadPool& tp) {
  quest_impl(ks, seq, layer, hs, q, n_ctx, budget, mode, out, &tp);
}

void select_streaming(int64_t n_ctx, int64_t sinks, int64_t window, int n_lists, GqaMode mode, Selection& out) {
  TW_CHECK(n_ctx > 0 && n_ctx <= std::numeric_limits<int32_t>::max(), "streaming selector: n_ctx ", n_ctx,
           " out of range");
  TW_CHECK(n_lists > 0, "streaming selector: n_lists must be positive, got ", n_lists);
  TW_CHECK(sinks >= 0, "streaming selector: sinks must be >= 0, got ", sinks);
  TW_CHECK(window >= 1, "streaming selector: window must be >= 1 (the current token is always kept), got ", window);
  out.clear(mode, n_lists);
  std::vector<int32_t> tmp;
  if (sinks >= n_ctx || window >= n_ctx || sinks + window >= n_ctx) {
    push_all(out, n_ctx, n_lists, tmp);
    return;
  }
  for (int64_t t = 0; t < sinks; ++t) tmp.push_back((int32_t)t);
  for (int64_t t = n_ctx - window; t < n_ctx; ++t) tmp.push_back((int32_t)t);
  for (int i = 0; i < n_lists; ++i) out.push_list(tmp.data(), (int64_t)tmp.size());
}

void select_all(int64_t n_ctx, int n_lists, GqaMode mode, Selection& out) {
  TW_CHECK(n_ctx > 0 && n_ctx <= std::numeric_limits<int32_t>::max(), "select_all: n_ctx ", n_ctx, " out of range");
  TW_CHECK(n_lists > 0, "select_all: n_lists must be positive, got ", n_lists);
  out.clear(mode, n_lists);
  std::vector<int32_t> tmp;
  push_all(out, n_ctx, n_lists, tmp);
}

void select_topk_oracle(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                        const float* q, int64_t n_ctx, int64_t k, GqaMode mode, Selection& out) {
  check_common("oracle selector", pool.shape(), seq, layer, hs, q, n_ctx);
  TW_CHECK(k > 0, "oracle selector: k must be positive, got ", k);
  const int n_lists = n_lists_of(hs, mode);
  out.clear(mode, n_lists);
  std::vector<int32_t> tmp;
  if (k >= n_ctx) {
    push_all(out, n_ctx, n_lists, tmp);
    return;
  }
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads;
  std::vector<float> s((size_t)G * n_ctx), w(n_ctx);
  auto emit = [&](const float* key) { detail::push_top_k_and_last(out, key, n_ctx, k, tmp); };
  for (int h = 0; h < hs.n_kv_heads; ++h) {
    exact_scores(pool, seq, layer, h, q + (size_t)h * G * d, G, d, n_ctx, s.data());
    if (mode == GqaMode::Head) {
      for (int g = 0; g < G; ++g) emit(s.data() + (size_t)g * n_ctx);
      continue;
    }
    std::fill(w.begin(), w.end(), 0.f);
    for (int g = 0; g < G; ++g) {
      const float* sg = s.data() + (size_t)g * n_ctx;
      float m = -INFINITY;
      for (int64_t t = 0; t < n_ctx; ++t) m = std::max(m, sg[t]);
      double l = 0;
      for (int64_t t = 0; t < n_ctx; ++t) l += std::exp((double)sg[t] - m);
      const float inv = (float)(1.0 / l);
      for (int64_t t = 0; t < n_ctx; ++t) w[t] = std::max(w[t], std::exp(sg[t] - m) * inv);
    }
    emit(w.data());
  }
}

}  // namespace tw::attn
