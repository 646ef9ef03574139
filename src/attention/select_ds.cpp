#include "attention/select_ds.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "attention/fp16_rows.h"
#include "attention/select_util.h"
#include "common/error.h"

namespace tw::attn {

namespace {

using kv::kPageSize;

#define TW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// Partial scores of the G query heads of kv head h over logical pages [lp0, lp1). qs: [G][r], each
// head's query restricted to the channels. Labels are channel-major [r][16], so a page is r
// multiply-adds of 16-wide rows per head. Group: max over the heads into out[t]; Head: out[g * stride + t].
// Only tokens < n_ctx are written (the tail of the last page holds stale or unwritten slots).
TW_CLONES void score_pages(const DsSide& ds, const int32_t* pages, int layer, int h, int64_t lp0, int64_t lp1,
                           const float* qs, int G, int r, int64_t n_ctx, bool group, float* out, int64_t stride,
                           Fp16CvtFn cvt) {
  float lab[kDsMaxR * kPageSize];  // r <= kDsMaxR (DsSide checks)
  for (int64_t lp = lp0; lp < lp1; ++lp) {
    const int nt = (int)std::min<int64_t>(kPageSize, n_ctx - lp * kPageSize);
    cvt(ds.labels(layer, pages[lp], h), lab, r * kPageSize);
    float best[kPageSize];
    for (int j = 0; j < kPageSize; ++j) best[j] = -INFINITY;
    for (int g = 0; g < G; ++g) {
      const float* qg = qs + (size_t)g * r;
      float s[kPageSize] = {};
      for (int i = 0; i < r; ++i) {
        const float qi = qg[i];
        const float* row = lab + (size_t)i * kPageSize;
#pragma omp simd
        for (int j = 0; j < kPageSize; ++j) s[j] += qi * row[j];
      }
      if (group) {
        for (int j = 0; j < kPageSize; ++j) best[j] = (std::isnan(s[j]) || s[j] > best[j]) ? detail::rank_key(s[j]) : best[j];
      } else {
        float* o = out + (size_t)g * stride + lp * kPageSize;
        for (int j = 0; j < nt; ++j) o[j] = s[j];
      }
    }
    if (group)
      for (int j = 0; j < nt; ++j) out[lp * kPageSize + j] = best[j];
  }
}

}  // namespace

void ds_token_scores(const DsSide& ds, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                     int64_t n_ctx, GqaMode mode, float* scores, ThreadPool* tp) {
  detail::check_common("ds selector", ds.shape(), seq, layer, hs, q, n_ctx);
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads, hkv = hs.n_kv_heads, r = ds.r();
  const int64_t n_pages = (n_ctx + kPageSize - 1) / kPageSize;
  const bool group = mode == GqaMode::Group;
  // Queries restricted to their kv head's channels: qs [H][r].
  std::vector<float> qs((size_t)hs.n_heads * r);
  for (int hq = 0; hq < hs.n_heads; ++hq) {
    const int32_t* c = ds.channels().at(layer, hq / G);
    for (int i = 0; i < r; ++i) qs[(size_t)hq * r + i] = q[(size_t)hq * d + c[i]];
  }
  static const Fp16CvtFn cvt = pick_fp16_cvt();
  // Work item: (kv head, page), as quest_page_scores.
  auto run = [&](int64_t b, int64_t e, int) {
    while (b < e) {
      const int h = (int)(b / n_pages);
      const int64_t lp0 = b % n_pages, lp1 = std::min<int64_t>(n_pages, lp0 + (e - b));
      float* o = group ? scores + (size_t)h * n_ctx : scores + (size_t)h * G * n_ctx;
      score_pages(ds, seq.pages.data(), layer, h, lp0, lp1, qs.data() + (size_t)h * G * r, G, r, n_ctx, group, o, n_ctx,
                  cvt);
      b += lp1 - lp0;
    }
  };
  const int64_t items = (int64_t)hkv * n_pages;
  if (tp && tp->size() > 1 && items >= 256)  // below ~256 pages the fork-join costs more than the scoring
    tp->parallel_for(items, run);
  else
    run(0, items, 0);
}

void select_ds(const DsSide& ds, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
               int64_t n_ctx, int64_t budget, GqaMode mode, Selection& out, ThreadPool* tp) {
  detail::check_common("ds selector", ds.shape(), seq, layer, hs, q, n_ctx);
  TW_CHECK(budget > 0, "ds selector: budget must be positive, got ", budget);
  const int n_lists = detail::n_lists_of(hs, mode);
  out.clear(mode, n_lists);
  std::vector<int32_t> tmp;
  if (budget >= n_ctx) {
    tmp.resize(n_ctx);
    std::iota(tmp.begin(), tmp.end(), 0);
    for (int i = 0; i < n_lists; ++i) out.push_list(tmp.data(), n_ctx);
    return;
  }
  std::vector<float> scores((size_t)n_lists * n_ctx);
  ds_token_scores(ds, seq, layer, hs, q, n_ctx, mode, scores.data(), tp);
  for (int i = 0; i < n_lists; ++i) detail::push_top_k_and_last(out, scores.data() + (size_t)i * n_ctx, n_ctx, budget, tmp);
}

}  // namespace tw::attn
