#include "attention/selectors.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

// GCC 12 flags the intrinsics' _mm512_undefined_* placeholders inside reduce16 (a known false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "attention/attend_block_avx512.h"  // reduce16, AlignedAlloc, TW_VNNI
#pragma GCC diagnostic pop
#include "attention/page_bounds.h"
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

void push_all(Selection& out, int64_t n_ctx, int n_lists, std::vector<int32_t>& tmp) {
  tmp.resize(n_ctx);
  std::iota(tmp.begin(), tmp.end(), 0);
  for (int i = 0; i < n_lists; ++i) out.push_list(tmp.data(), n_ctx);
}

// The query of the 8-bit page score (page_bounds.h), per query head: q8+ = max(q8, 0) and
// q8- = min(q8, 0) as bytes, [H][d] each, sq and sum q8.
struct QuestQuery {
  std::vector<int8_t> qp, qn;
  std::vector<float> sq;
  std::vector<int> q8sum;
  QuestQuery(const float* q, int n_heads, int d) : qp((size_t)n_heads * d), qn(qp.size()), sq(n_heads), q8sum(n_heads) {
    std::vector<int8_t> q8(d);
    for (int hq = 0; hq < n_heads; ++hq) {
      quantize_quest_query(q + (size_t)hq * d, d, q8.data(), sq[hq], q8sum[hq]);
      for (int i = 0; i < d; ++i) {
        qp[(size_t)hq * d + i] = q8[i] > 0 ? q8[i] : 0;
        qn[(size_t)hq * d + i] = q8[i] < 0 ? q8[i] : 0;
      }
    }
  }
};

// Quest scores of the G query heads g0h .. g0h+G-1 (kv head h) over logical pages [lp0, lp1), the
// portable path: per (page, head) the exact integer dot over the codes, then page_bound_score. Group:
// max over the heads into out[lp] (NaN ranks as +inf); Head: out[g * stride + lp].
TW_CLONES void score_pages(const KeySide& ks, const int32_t* pages, int layer, int h, int64_t lp0, int64_t lp1,
                           const QuestQuery& qq, int g0h, int G, int d, bool group, float* out, int64_t stride) {
  for (int64_t lp = lp0; lp < lp1; ++lp) {
    const uint8_t* c = ks.bound_codes(layer, pages[lp], h);
    const float* par = ks.bound_param(layer, pages[lp], h);
    float best = -INFINITY;
    for (int g = 0; g < G; ++g) {
      const int8_t* qp = qq.qp.data() + (size_t)(g0h + g) * d;
      const int8_t* qn = qq.qn.data() + (size_t)(g0h + g) * d;
      int32_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int i = 0; i < d; ++i) dot += (int32_t)qp[i] * c[d + i] + (int32_t)qn[i] * c[i];
      const float v = page_bound_score(par[0], par[1], qq.sq[g0h + g], qq.q8sum[g0h + g], dot);
      if (group)
        best = (std::isnan(v) || v > best) ? rank_key(v) : best;
      else
        out[g * stride + lp] = v;
    }
    if (group) out[lp] = best;
  }
}

// score_pages at the AVX-512 VNNI level for d % 64 == 0, over logical pages [lp0, lp1) and EVERY kv
// head, in blocks of 16 pages. Per (kv head, pair of pages), each 64-byte slice of the codes is
// loaded once and multiplied into the G heads' int8 q+ / q- with vpdpbusd (u8 x s8 -> int32, 4 products
// per lane; up to 8 heads at a time, each q slice loaded once for the two pages); the per-(head, page)
// int32 accumulators go to scratch as floats (exact: every partial sum is an integer below 2^24) and
// one transpose-and-add tree (reduce16, exact for the same reason) per head turns 16 pages' accumulators
// into 16 dots, then page_bound_score for the 16 pages at once (the same float operations: the scores
// are bit-identical to the portable path's). Bounds are prefetched PFD pages ahead. Output as
// score_pages: Group: out[h * n_pages + lp] = max over the group (NaN ranks as +inf); Head:
// out[(h * G + g) * n_pages + lp].
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on the intrinsics' _mm512_undefined_*
// Heads g0 .. g0+NG-1 against NP pages (codes c[p]: [2][d], min row then max row):
// acc[(g0 + g) * 16 + jp[p]] (16 floats each). qk: the kv head's packed query [d/64][G][q+, q-][64] bytes.
template <int NG, int NP>
TW_VNNI inline void bound_dots(const uint8_t* const* c, const int8_t* qk, int G, int g0, int d, const int* jp,
                               float* acc) {
  __m512i a[NP][NG];
#pragma GCC unroll 8
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) a[p][g] = _mm512_setzero_si512();
  const int8_t* qv = qk + (size_t)g0 * 128;
  for (int v = 0; v < d / 64; ++v, qv += (size_t)G * 128) {
    __m512i hi[NP], lo[NP];
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) {
      hi[p] = _mm512_loadu_si512(c[p] + d + 64 * v);
      lo[p] = _mm512_loadu_si512(c[p] + 64 * v);
    }
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g) {
      const __m512i qp = _mm512_load_si512(qv + 128 * g), qn = _mm512_load_si512(qv + 128 * g + 64);
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) {
        a[p][g] = _mm512_dpbusd_epi32(a[p][g], hi[p], qp);
        a[p][g] = _mm512_dpbusd_epi32(a[p][g], lo[p], qn);
      }
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p)
      _mm512_store_ps(acc + ((size_t)(g0 + g) * 16 + jp[p]) * 16, _mm512_cvtepi32_ps(a[p][g]));
}

template <int NP>
TW_VNNI inline void bound_dots_heads(const uint8_t* const* c, const int8_t* qk, int G, int d, const int* jp,
                                     float* acc) {
  for (int g0 = 0; g0 < G; g0 += 8) {
    switch (G - g0 < 8 ? G - g0 : 8) {  // the head count as a template argument keeps the accumulators in registers
      case 1: bound_dots<1, NP>(c, qk, G, g0, d, jp, acc); break;
      case 2: bound_dots<2, NP>(c, qk, G, g0, d, jp, acc); break;
      case 3: bound_dots<3, NP>(c, qk, G, g0, d, jp, acc); break;
      case 4: bound_dots<4, NP>(c, qk, G, g0, d, jp, acc); break;
      case 5: bound_dots<5, NP>(c, qk, G, g0, d, jp, acc); break;
      case 6: bound_dots<6, NP>(c, qk, G, g0, d, jp, acc); break;
      case 7: bound_dots<7, NP>(c, qk, G, g0, d, jp, acc); break;
      default: bound_dots<8, NP>(c, qk, G, g0, d, jp, acc); break;
    }
  }
}

// qpk: [hkv][d/64][G][q+, q-][64] bytes, 64-byte aligned.
TW_VNNI void score_pages_vnni(const KeySide& ks, const int32_t* pages, int layer, int hkv, int64_t lp0, int64_t lp1,
                              const int8_t* qpk, const QuestQuery& qq, int G, int d, bool group, float* out,
                              int64_t n_pages) {
  static thread_local std::vector<float, avx512::AlignedAlloc<float>> accbuf;
  if (accbuf.size() < (size_t)G * 256) accbuf.resize((size_t)G * 256);
  float* acc = accbuf.data();  // [G][16 pages][16 lanes]
  // Pages ahead; the code lines prefetched into L2: into L1 (T0) a page's 8 code lines x 4 pages
  // stalled on the L1 miss buffers (perf: the prefetch loop and the loads after it held most samples). 2-core EPYC, Qwen2.5
  // 1.5B at 32k: select 110-133 -> 88-90 us (T1 at 8 or 16 pages alike; T0 at 8 or none: no gain).
  constexpr int PFD = 8;
  const int lines = 2 * d / 64;  // cache lines per page's codes
  const __m512 inf = _mm512_set1_ps(INFINITY);
  alignas(64) float lo16[16], s16[16];
  for (int64_t b0 = lp0; b0 < lp1; b0 += 16) {
    const int np = (int)std::min<int64_t>(16, lp1 - b0);
    const __mmask16 valid = (__mmask16)((1u << np) - 1u);
    for (int h = 0; h < hkv; ++h) {
      const int8_t* qh = qpk + (size_t)h * G * 2 * d;
      int j = 0;
      for (; j < np; j += 2) {
        for (int p = j; p < j + 2 && p < np; ++p)
          if (h == 0 && b0 + p + PFD < lp1)  // all heads of a page ahead (contiguous [page][head][2][d])
            for (int hh = 0; hh < hkv; ++hh) {
              const char* a = reinterpret_cast<const char*>(ks.bound_codes(layer, pages[b0 + p + PFD], hh));
              for (int l = 0; l < lines; ++l) _mm_prefetch(a + 64 * l, _MM_HINT_T1);
              _mm_prefetch(reinterpret_cast<const char*>(ks.bound_param(layer, pages[b0 + p + PFD], hh)),
                           _MM_HINT_T0);
            }
        const uint8_t* c[2] = {ks.bound_codes(layer, pages[b0 + j], h), nullptr};
        const int jp[2] = {j, j + 1};
        for (int p = j; p < j + 2 && p < np; ++p) {
          const float* par = ks.bound_param(layer, pages[b0 + p], h);
          lo16[p] = par[0], s16[p] = par[1];
        }
        if (j + 1 < np) {
          c[1] = ks.bound_codes(layer, pages[b0 + j + 1], h);
          bound_dots_heads<2>(c, qh, G, d, jp, acc);
        } else {
          bound_dots_heads<1>(c, qh, G, d, jp, acc);
        }
      }
      for (; j < 16; ++j) {  // unused lanes of a partial block: finite, masked out below
        lo16[j] = 0.f, s16[j] = 0.f;
        for (int g = 0; g < G; ++g) _mm512_store_ps(acc + ((size_t)g * 16 + j) * 16, _mm512_setzero_ps());
      }
      const __m512 lov = _mm512_load_ps(lo16), sv = _mm512_load_ps(s16);
      __m512 best = _mm512_set1_ps(-INFINITY);
      for (int g = 0; g < G; ++g) {
        const int hq = h * G + g;
        const __m512 dot = avx512::reduce16(reinterpret_cast<const __m512*>(acc + (size_t)g * 256));
        // page_bound_score for 16 pages: sq * fma(s, dot, lo * q8sum).
        const __m512 u = _mm512_mul_ps(_mm512_set1_ps(qq.sq[hq]),
                                       _mm512_fmadd_ps(sv, dot, _mm512_mul_ps(lov, _mm512_set1_ps((float)qq.q8sum[hq]))));
        if (group)  // NaN (inf keys only) ranks as +inf: it cannot rule the page out
          best = _mm512_max_ps(best, _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(u, u, _CMP_UNORD_Q), inf));
        else
          _mm512_mask_storeu_ps(out + ((size_t)h * G + g) * n_pages + b0, valid, u);
      }
      if (group) _mm512_mask_storeu_ps(out + (size_t)h * n_pages + b0, valid, best);
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
  // Per list: the r-th largest score T among pages 1 .. n_pages-2 by radix select (order_bits: NaN
  // ranks as +inf), then one ascending pass keeps the pages above T and the first ones equal to T
  // (ties: lower page first), so the tokens come out ascending without a sort.
  const int64_t r = std::max<int64_t>(0, n_sel - 2), mid = n_pages - 2;  // r < mid here
  const int64_t last0 = (n_pages - 1) * kPageSize;
  const int64_t n_tok = (r + 1) * kPageSize + (n_ctx - last0);  // the same for every list
  const size_t base = out.tokens.size();
  out.tokens.resize(base + (size_t)n_lists * n_tok);
  std::vector<char> miscount(n_lists, 0);  // checked after the parallel region (no throw inside it)
  auto build = [&](int64_t l0, int64_t l1, int) {
    std::vector<uint32_t> u(mid);
    for (int64_t li = l0; li < l1; ++li) {
      const float* sc = scores.data() + (size_t)li * n_pages;
      uint32_t T = 0;
      int64_t eq_left = 0;
      if (r > 0) {
        for (int64_t p = 0; p < mid; ++p) u[p] = detail::order_bits(sc[p + 1]);
        T = detail::kth_largest_bits(u.data(), mid, r, eq_left);
      }
      int32_t* o = out.tokens.data() + base + (size_t)li * n_tok;
      int32_t* const o_end = o + n_tok;
      auto emit = [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) *o++ = (int32_t)t;
      };
      emit(0, kPageSize);
      for (int64_t p = 0; p < mid && r > 0; ++p)
        if (u[p] > T || (u[p] == T && eq_left-- > 0)) emit((p + 1) * kPageSize, (p + 2) * kPageSize);
      emit(last0, n_ctx);
      miscount[li] = o != o_end;
    }
  };
  if (tp && tp->size() > 1 && n_lists > 1 && n_pages >= 256)  // lists are independent: one per thread
    tp->parallel_for(n_lists, build);
  else
    build(0, n_lists, 0);
  for (int li = 0; li < n_lists; ++li) TW_CHECK(!miscount[li], "quest selector: internal error (page count)");
  for (int li = 0; li < n_lists; ++li) out.offsets.push_back((int32_t)(base + (size_t)(li + 1) * n_tok));
}

}  // namespace

namespace {

// quest_page_scores for an already quantised query.
void page_scores(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const QuestQuery& qq,
                 int64_t n_ctx, GqaMode mode, float* scores, ThreadPool* tp) {
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads, hkv = hs.n_kv_heads;
  const int64_t n_pages = (n_ctx + kPageSize - 1) / kPageSize;
  const bool group = mode == GqaMode::Group;
  if (ops::active_simd() == ops::Simd::AVX512 && d % 64 == 0) {  // the AVX512 level includes VNNI
    // q8+ / q8- repacked per kv head as [d/64][G][2][64] bytes.
    std::vector<int8_t, avx512::AlignedAlloc<int8_t>> qpk((size_t)hs.n_heads * 2 * d);
    for (int h = 0; h < hkv; ++h)
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < d; ++i)
          for (int sgn = 0; sgn < 2; ++sgn)
            qpk[(size_t)h * G * 2 * d + (((size_t)(i / 64) * G + g) * 2 + sgn) * 64 + i % 64] =
                (sgn ? qq.qn : qq.qp)[((size_t)h * G + g) * d + i];
    // Work item: one page, all kv heads.
    auto run = [&](int64_t b, int64_t e, int) {
      score_pages_vnni(ks, seq.pages.data(), layer, hkv, b, e, qpk.data(), qq, G, d, group, scores, n_pages);
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
      score_pages(ks, seq.pages.data(), layer, h, lp0, lp1, qq, h * G, G, d, group, o, n_pages);
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

}  // namespace

void quest_page_scores(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                       int64_t n_ctx, GqaMode mode, float* scores, ThreadPool* tp) {
  check_common("quest scores", ks.shape(), seq, layer, hs, q, n_ctx);
  page_scores(ks, seq, layer, hs, QuestQuery(q, hs.n_heads, hs.head_dim), n_ctx, mode, scores, tp);
}

void quest_page_upper_bounds(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                             const float* q, int64_t n_ctx, float* bounds, ThreadPool* tp) {
  check_common("quest bounds", ks.shape(), seq, layer, hs, q, n_ctx);
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads;
  const int64_t n_pages = (n_ctx + kPageSize - 1) / kPageSize;
  const QuestQuery qq(q, hs.n_heads, d);
  page_scores(ks, seq, layer, hs, qq, n_ctx, GqaMode::Head, bounds, tp);
  std::vector<float> rmax(hs.n_heads, 0.f);  // max_i |q_i - sq q8_i| (q8 = q8+ + q8-)
  for (int hq = 0; hq < hs.n_heads; ++hq)
    for (int i = 0; i < d; ++i) {
      const size_t k = (size_t)hq * d + i;
      rmax[hq] = std::max(rmax[hq], std::fabs(q[k] - qq.sq[hq] * (qq.qp[k] + qq.qn[k])));
    }
  // q.k = q~.k + (q - q~).k <= u_p + max_i |q_i - q~_i| * sum_i max(|kmin_i|, |kmax_i|).
  for (int h = 0; h < hs.n_kv_heads; ++h)
    for (int64_t lp = 0; lp < n_pages; ++lp) {
      const uint8_t* c = ks.bound_codes(layer, seq.pages[lp], h);
      const float* par = ks.bound_param(layer, seq.pages[lp], h);
      float m = 0.f;
      for (int i = 0; i < d; ++i)
        m += std::max(std::fabs(std::fma(par[1], (float)c[i], par[0])), std::fabs(std::fma(par[1], (float)c[d + i], par[0])));
      for (int g = 0; g < G; ++g) bounds[(size_t)(h * G + g) * n_pages + lp] += rmax[h * G + g] * m;
    }
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
