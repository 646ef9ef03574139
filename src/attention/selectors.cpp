#include "attention/selectors.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

// GCC 12 flags the intrinsics' _mm512_undefined_* placeholders inside reduce16 (a known false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "attention/attend_block_avx512.h"  // reduce16, AlignedAlloc, TW_AVX512
#pragma GCC diagnostic pop
#include "attention/select_util.h"
#include "common/error.h"
#include "common/fp16.h"
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

// Quest scores of the G query heads of kv head h over logical pages [lp0, lp1). qpn: [G][2][d], each
// head's q+ = max(q, 0) then q- = min(q, 0): max(q*kmax, q*kmin) = q+*kmax + q-*kmin term by term
// (kmax >= kmin), which turns the bound into two dot products. Heads go four at a time so the four
// reductions are independent chains (one chain per head was latency-bound). zeros: [2][d] of 0 to pad a
// block. Group: max over the heads into out[lp]; Head: out[g * stride + lp]. The fp16 bounds are
// converted to fp32 per page (bit-exact scalar conversion: this is the portable path).
TW_CLONES void score_pages(const KeySide& ks, const int32_t* pages, int layer, int h, int64_t lp0, int64_t lp1,
                           const float* qpn, const float* zeros, int G, int d, bool group, float* out,
                           int64_t stride) {
  float mn[256], mx[256];  // d <= 256 (KeySide's limit)
  for (int64_t lp = lp0; lp < lp1; ++lp) {
    const uint16_t* mn16 = ks.kmin(layer, pages[lp], h);
    const uint16_t* mx16 = ks.kmax(layer, pages[lp], h);
    for (int i = 0; i < d; ++i) mn[i] = fp16_to_fp32(mn16[i]), mx[i] = fp16_to_fp32(mx16[i]);
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

// score_pages at the AVX-512 level for d % 16 == 0, over logical pages [lp0, lp1) and EVERY kv head,
// in blocks of 16 pages. Per (kv head, pair of pages), each 16-wide slice of the fp16 bounds is
// converted once (vcvtph2ps) and FMA'd against the G heads' q+ / q- (up to 8 heads at a time, each
// q slice loaded once for the two pages: 2 FMAs per channel per head, one load per 2 FMAs); the
// per-(head, page) accumulators go to scratch and one transpose-and-add tree (reduce16) per head turns
// 16 pages' accumulators into 16 scores (a full horizontal reduction per (head, page) cost half as
// much as the FMAs). Bounds are prefetched PFD pages ahead. Output as score_pages: Group:
// out[h * n_pages + lp] = max over the group (NaN ranks as +inf); Head: out[(h * G + g) * n_pages + lp].
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on the intrinsics' _mm512_undefined_*
// Heads g0 .. g0+NG-1 against NP pages (bounds mn[p], mx[p]): acc[(g0 + g) * 16 + jp[p]] (16 floats each).
// qk: the kv head's packed query [d/16][G][q+, q-][16] (one base pointer, constant offsets: with a
// pointer per head the compiler ran out of general registers).
template <int NG, int NP>
TW_AVX512 inline void bound_dots(const uint16_t* const* mn, const uint16_t* const* mx, const float* qk, int G,
                                 int g0, int d, const int* jp, float* acc) {
  __m512 a[NP][NG];
#pragma GCC unroll 8
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) a[p][g] = _mm512_setzero_ps();
  const float* qv = qk + (size_t)g0 * 32;
  for (int v = 0; v < d / 16; ++v, qv += (size_t)G * 32) {
    __m512 hi[NP], lo[NP];
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) {
      hi[p] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mx[p] + 16 * v)));
      lo[p] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn[p] + 16 * v)));
    }
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g) {
      const __m512 qp = _mm512_load_ps(qv + 32 * g), qn = _mm512_load_ps(qv + 32 * g + 16);
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) {
        a[p][g] = _mm512_fmadd_ps(qp, hi[p], a[p][g]);
        a[p][g] = _mm512_fmadd_ps(qn, lo[p], a[p][g]);
      }
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) _mm512_store_ps(acc + ((size_t)(g0 + g) * 16 + jp[p]) * 16, a[p][g]);
}

template <int NP>
TW_AVX512 inline void bound_dots_heads(const uint16_t* const* mn, const uint16_t* const* mx, const float* qk, int G,
                                       int d, const int* jp, float* acc) {
  for (int g0 = 0; g0 < G; g0 += 8) {
    switch (G - g0 < 8 ? G - g0 : 8) {  // the head count as a template argument keeps the accumulators in registers
      case 1: bound_dots<1, NP>(mn, mx, qk, G, g0, d, jp, acc); break;
      case 2: bound_dots<2, NP>(mn, mx, qk, G, g0, d, jp, acc); break;
      case 3: bound_dots<3, NP>(mn, mx, qk, G, g0, d, jp, acc); break;
      case 4: bound_dots<4, NP>(mn, mx, qk, G, g0, d, jp, acc); break;
      case 5: bound_dots<5, NP>(mn, mx, qk, G, g0, d, jp, acc); break;
      case 6: bound_dots<6, NP>(mn, mx, qk, G, g0, d, jp, acc); break;
      case 7: bound_dots<7, NP>(mn, mx, qk, G, g0, d, jp, acc); break;
      default: bound_dots<8, NP>(mn, mx, qk, G, g0, d, jp, acc); break;
    }
  }
}

// qpk: [hkv][d/16][G][q+, q-][16], 64-byte aligned.
TW_AVX512 void score_pages_avx512(const KeySide& ks, const int32_t* pages, int layer, int hkv, int64_t lp0, int64_t lp1,
                                  const float* qpk, int G, int d, bool group, float* out, int64_t n_pages) {
  static thread_local std::vector<float, avx512::AlignedAlloc<float>> accbuf;
  if (accbuf.size() < (size_t)G * 256) accbuf.resize((size_t)G * 256);
  float* acc = accbuf.data();  // [G][16 pages][16 lanes]
  constexpr int PFD = 4;       // pages ahead
  const int lines = d * 2 / 64 > 0 ? d * 2 / 64 : 1;  // cache lines per fp16 bound row
  const __m512 inf = _mm512_set1_ps(INFINITY);
  for (int64_t b0 = lp0; b0 < lp1; b0 += 16) {
    const int np = (int)std::min<int64_t>(16, lp1 - b0);
    const __mmask16 valid = (__mmask16)((1u << np) - 1u);
    for (int h = 0; h < hkv; ++h) {
      const float* qh = qpk + (size_t)h * G * 2 * d;
      int j = 0;
      for (; j < np; j += 2) {
        for (int p = j; p < j + 2 && p < np; ++p)
          if (h == 0 && b0 + p + PFD < lp1)  // all heads of a page ahead (contiguous [page][head][d])
            for (int hh = 0; hh < hkv; ++hh) {
              const char* a = reinterpret_cast<const char*>(ks.kmin(layer, pages[b0 + p + PFD], hh));
              const char* b = reinterpret_cast<const char*>(ks.kmax(layer, pages[b0 + p + PFD], hh));
              for (int l = 0; l < lines; ++l) {
                _mm_prefetch(a + 64 * l, _MM_HINT_T0);
                _mm_prefetch(b + 64 * l, _MM_HINT_T0);
              }
            }
        const uint16_t* mn[2] = {ks.kmin(layer, pages[b0 + j], h), nullptr};
        const uint16_t* mx[2] = {ks.kmax(layer, pages[b0 + j], h), nullptr};
        const int jp[2] = {j, j + 1};
        if (j + 1 < np) {
          mn[1] = ks.kmin(layer, pages[b0 + j + 1], h);
          mx[1] = ks.kmax(layer, pages[b0 + j + 1], h);
          bound_dots_heads<2>(mn, mx, qh, G, d, jp, acc);
        } else {
          bound_dots_heads<1>(mn, mx, qh, G, d, jp, acc);
        }
      }
      for (; j < 16; ++j)  // unused lanes of a partial block: finite, masked out below
        for (int g = 0; g < G; ++g) _mm512_store_ps(acc + ((size_t)g * 16 + j) * 16, _mm512_setzero_ps());
      __m512 best = _mm512_set1_ps(-INFINITY);
      for (int g = 0; g < G; ++g) {
        const __m512 u = avx512::reduce16(reinterpret_cast<const __m512*>(acc + (size_t)g * 256));
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
    // q+ / q- repacked per kv head as [d/16][G][2][16].
    std::vector<float, avx512::AlignedAlloc<float>> qpk(qpn.size());
    for (int h = 0; h < hkv; ++h)
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < d; ++i)
          for (int sgn = 0; sgn < 2; ++sgn)
            qpk[(size_t)h * G * 2 * d + (((size_t)(i / 16) * G + g) * 2 + sgn) * 16 + i % 16] =
                qpn[((size_t)h * G + g) * 2 * d + (size_t)sgn * d + i];
    // Work item: one page, all kv heads.
    auto run = [&](int64_t b, int64_t e, int) {
      score_pages_avx512(ks, seq.pages.data(), layer, hkv, b, e, qpk.data(), G, d, group, scores, n_pages);
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
