#include "attention/sparse_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/online_softmax.h"
#include "common/error.h"
#include "common/fp16.h"

namespace tw::attn {

namespace {

using kv::kPageSize;

#define TW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

constexpr int64_t kChunkTokens = 128;  // split-KV granularity (fixed: results independent of threads)
constexpr int kBlock = 16;             // tokens gathered per K/V block

// Attend nq queries (q: [nq][d], scaled by 1/sqrt(d)) of kv head kvh to tokens tok(j), j in [j0, j1),
// where tok(j) = t[j] for j < m and `cur` for j == m (the appended current token).
TW_CLONES void attend_list(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, int kvh, const int32_t* t,
                           int64_t m, int32_t cur, int64_t j0, int64_t j1, const float* q, int nq, SoftmaxState* st,
                           int d, float* kbuf, float* vbuf) {
  float s[kBlock];
  for (int64_t b0 = j0; b0 < j1; b0 += kBlock) {
    const int nt = (int)std::min<int64_t>(kBlock, j1 - b0);
    for (int j = 0; j < nt; ++j) {
      const int64_t jj = b0 + j;
      const int32_t pos = jj < m ? t[jj] : cur;
      const int32_t phys = seq.pages[pos / kPageSize];
      const size_t off = (size_t)(pos % kPageSize) * d;
      const _Float16* kh = reinterpret_cast<const _Float16*>(pool.k_page(layer, phys, kvh) + off);
      const _Float16* vh = reinterpret_cast<const _Float16*>(pool.v_page(layer, phys, kvh) + off);
      float* kd = kbuf + (size_t)j * d;
      float* vd = vbuf + (size_t)j * d;
#pragma omp simd
      for (int i = 0; i < d; ++i) {
        kd[i] = (float)kh[i];
        vd[i] = (float)vh[i];
      }
    }
    for (int r = 0; r < nq; ++r) {
      const float* qr = q + (size_t)r * d;
      float mx = -INFINITY;
      for (int j = 0; j < nt; ++j) {
        const float* kj = kbuf + (size_t)j * d;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < d; ++i) acc += qr[i] * kj[i];
        s[j] = acc;
        mx = std::fmax(mx, acc);
      }
      SoftmaxState& S = st[r];
      const float m_new = std::fmax(S.m, mx);
      const float scale = std::exp(S.m - m_new);  // 0 on the first block (S.m = -inf)
      float sum = 0.f;
      for (int j = 0; j < nt; ++j) sum += (s[j] = std::exp(s[j] - m_new));
      float* o = S.o;
#pragma omp simd
      for (int i = 0; i < d; ++i) o[i] *= scale;
      for (int j = 0; j < nt; ++j) {
        const float p = s[j];
        const float* vj = vbuf + (size_t)j * d;
#pragma omp simd
        for (int i = 0; i < d; ++i) o[i] += p * vj[i];
      }
      S.l = S.l * scale + sum;
      S.m = m_new;
    }
  }
}

void check_args(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs, const Selection& sel,
                int64_t n_ctx) {
  const kv::KVShape& ks = pool.shape();
  TW_CHECK(hs.n_kv_heads == ks.n_kv_heads && hs.head_dim == ks.head_dim,
           "sparse attention: head shape does not match the kv cache");
  TW_CHECK(hs.n_heads > 0 && hs.n_kv_heads > 0 && hs.n_heads % hs.n_kv_heads == 0, "sparse attention: ", hs.n_heads,
           " query heads not a multiple of ", hs.n_kv_heads, " kv heads");
  TW_CHECK(layer >= 0 && layer < ks.n_layers, "sparse attention: layer out of range");
  TW_CHECK(n_ctx > 0 && (n_ctx + kPageSize - 1) / kPageSize <= (int64_t)seq.pages.size(), "sparse attention: n_ctx ",
           n_ctx, " exceeds the sequence's pages");
  const int want = sel.mode == GqaMode::Group ? hs.n_kv_heads : hs.n_heads;
  TW_CHECK(sel.n_lists == want, "sparse attention: selection has ", sel.n_lists, " lists, expected ", want);
  TW_CHECK((int)sel.offsets.size() == sel.n_lists + 1 && sel.offsets[0] == 0 &&
               sel.offsets.back() == (int32_t)sel.tokens.size(),
           "sparse attention: selection offsets are inconsistent");
  for (int i = 0; i < sel.n_lists; ++i) {
    TW_CHECK(sel.offsets[i + 1] >= sel.offsets[i], "sparse attention: negative list size");
    const int32_t* t = sel.list(i);
    const int64_t m = sel.size(i);
    for (int64_t j = 0; j < m; ++j) {
      TW_CHECK(t[j] >= 0 && t[j] < n_ctx, "sparse attention: list ", i, " has position ", t[j], " outside [0, ",
               n_ctx, ")");
      TW_CHECK(j == 0 || t[j] > t[j - 1], "sparse attention: list ", i, " is not ascending and unique at entry ", j);
    }
  }
}

}  // namespace

void sparse_decode(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                   const Selection& sel, int64_t n_ctx, float* out, ThreadPool& tp) {
  check_args(pool, seq, layer, hs, sel, n_ctx);
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads;
  const bool group = sel.mode == GqaMode::Group;
  const int nq = group ? G : 1;
  const int n_lists = sel.n_lists;
  const int32_t cur = (int32_t)(n_ctx - 1);

  // Work items: (list, chunk). len[i] counts the appended current token when the list lacks it.
  std::vector<int64_t> len(n_lists), first_item(n_lists + 1, 0);
  for (int i = 0; i < n_lists; ++i) {
    const int64_t m = sel.size(i);
    len[i] = m + ((m > 0 && sel.list(i)[m - 1] == cur) ? 0 : 1);
    first_item[i + 1] = first_item[i] + (len[i] + kChunkTokens - 1) / kChunkTokens;
  }
  const int64_t items = first_item[n_lists];
  const float qscale = 1.f / std::sqrt((float)d);
  std::vector<float> qs((size_t)hs.n_heads * d);
  for (size_t i = 0; i < qs.size(); ++i) qs[i] = q[i] * qscale;

  std::vector<float> part_o((size_t)items * nq * d, 0.f);
  std::vector<SoftmaxState> part((size_t)items * nq);
  for (size_t i = 0; i < part.size(); ++i) part[i].o = part_o.data() + i * d;

  tp.parallel_for(items, [&](int64_t b, int64_t e, int) {
    std::vector<float> kbuf((size_t)kBlock * d), vbuf((size_t)kBlock * d);
    int i = (int)(std::upper_bound(first_item.begin(), first_item.end(), b) - first_item.begin()) - 1;
    for (int64_t it = b; it < e; ++it) {
      while (it >= first_item[i + 1]) ++i;
      const int64_t c = it - first_item[i];
      const int64_t j0 = c * kChunkTokens, j1 = std::min(len[i], j0 + kChunkTokens);
      const int kvh = group ? i : i / G;
      const float* qi = qs.data() + (size_t)(group ? i * G : i) * d;
      attend_list(pool, seq, layer, kvh, sel.list(i), sel.size(i), cur, j0, j1, qi, nq, &part[(size_t)it * nq], d,
                  kbuf.data(), vbuf.data());
    }
  });
  for (int i = 0; i < n_lists; ++i)
    for (int r = 0; r < nq; ++r) {
      SoftmaxState& acc = part[(size_t)first_item[i] * nq + r];
      for (int64_t it = first_item[i] + 1; it < first_item[i + 1]; ++it) merge(acc, part[(size_t)it * nq + r], d);
      finish(acc, out + (size_t)((group ? i * G : i) + r) * d, d);
    }
}

void sparse_reference(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                      const float* q, const Selection& sel, int64_t n_ctx, float* out) {
  check_args(pool, seq, layer, hs, sel, n_ctx);
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads;
  for (int hq = 0; hq < hs.n_heads; ++hq) {
    const int h = hq / G;
    const int li = sel.mode == GqaMode::Group ? h : hq;
    std::vector<int32_t> toks(sel.list(li), sel.list(li) + sel.size(li));
    if (toks.empty() || toks.back() != n_ctx - 1) toks.push_back((int32_t)(n_ctx - 1));
    std::vector<double> w(toks.size());
    double mx = -INFINITY;
    for (size_t j = 0; j < toks.size(); ++j) {
      const uint16_t* k = pool.k_page(layer, seq.pages[toks[j] / kPageSize], h) + (toks[j] % kPageSize) * d;
      double s = 0;
      for (int i = 0; i < d; ++i) s += (double)q[hq * d + i] * fp16_to_fp32(k[i]);
      w[j] = s / std::sqrt((double)d);
      mx = std::max(mx, w[j]);
    }
    double sum = 0;
    for (double& x : w) sum += (x = std::exp(x - mx));
    for (int i = 0; i < d; ++i) {
      double o = 0;
      for (size_t j = 0; j < toks.size(); ++j)
        o += w[j] * fp16_to_fp32(pool.v_page(layer, seq.pages[toks[j] / kPageSize], h)[(toks[j] % kPageSize) * d + i]);
      out[hq * d + i] = (float)(o / sum);
    }
  }
}

}  // namespace tw::attn
