#include "attention/sparse_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "attention/attend_block_avx512.h"
#include "attention/fast_exp.h"
#include "attention/fp16_rows.h"
#include "attention/online_softmax.h"
#include "common/error.h"
#include "common/fp16.h"
#include "ops/cpu/matmul.h"

namespace tw::attn {

namespace {

using kv::kPageSize;

#define TW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

constexpr int64_t kChunkTokens = 128;  // split-KV granularity (fixed: results independent of threads)
constexpr int kBlock = 16;             // tokens gathered per K/V block

// fp16 -> fp32 rows: attention/fp16_rows.h. GCC 12 warns about the intrinsics' own
// _mm512_undefined_* placeholders (a known false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// s[j] = q . k_j for nt rows of kbuf ([nt][d], d % 16 == 0), one shuffle-tree reduction per row.
__attribute__((target("avx512f"))) void scores_avx512(const float* q, const float* kbuf, int nt, int d, float* s) {
  for (int j = 0; j < nt; ++j) {
    const float* k = kbuf + (size_t)j * d;
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
    __m512 b = _mm512_setzero_ps();
    int i = 16;
    for (; i + 32 <= d; i += 32) {
      b = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + i), b);
      a = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), _mm512_loadu_ps(k + i + 16), a);
    }
    for (; i < d; i += 16) b = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + i), b);
    s[j] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  }
}
// o = o * scale + sum_j s_j v_j over nt rows of vbuf ([nt][d], d % 16 == 0): each 16-wide slice
// of o is loaded and stored once per block, not once per token.
__attribute__((target("avx512f"))) void accum_avx512(float* o, float scale, const float* s, const float* vbuf, int nt,
                                                     int d) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int i = 0; i < d; i += 16) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(o + i), sc);
    for (int j = 0; j < nt; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), _mm512_loadu_ps(vbuf + (size_t)j * d + i), acc);
    _mm512_storeu_ps(o + i, acc);
  }
}
#pragma GCC diagnostic pop
void accum_portable(float* o, float scale, const float* s, const float* vbuf, int nt, int d) {
#pragma omp simd
  for (int i = 0; i < d; ++i) o[i] *= scale;
  for (int j = 0; j < nt; ++j) {
    const float p = s[j];
    const float* vj = vbuf + (size_t)j * d;
#pragma omp simd
    for (int i = 0; i < d; ++i) o[i] += p * vj[i];
  }
}
using AccumFn = void (*)(float*, float, const float*, const float*, int, int);
void scores_portable(const float* q, const float* kbuf, int nt, int d, float* s) {
  for (int j = 0; j < nt; ++j) {
    const float* kj = kbuf + (size_t)j * d;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < d; ++i) acc += q[i] * kj[i];
    s[j] = acc;
  }
}
using ScoreFn = void (*)(const float*, const float*, int, int, float*);

using CvtFn = Fp16CvtFn;

// Attend nq queries (q: [nq][d], scaled by 1/sqrt(d)) of kv head kvh to tokens tok(j), j in [j0, j1),
// where tok(j) = t[j] for j < m and `cur` for j == m (the appended current token).
TW_CLONES void attend_list(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, int kvh, const int32_t* t,
                           int64_t m, int32_t cur, int64_t j0, int64_t j1, const float* q, int nq, SoftmaxState* st,
                           int d, float* kbuf, float* vbuf, CvtFn cvt, ScoreFn score, AccumFn accum) {
  float s[kBlock];
  for (int64_t b0 = j0; b0 < j1; b0 += kBlock) {
    const int nt = (int)std::min<int64_t>(kBlock, j1 - b0);
    for (int j = 0; j < nt; ++j) {
      const int64_t jj = b0 + j;
      const int32_t pos = jj < m ? t[jj] : cur;
      const int32_t phys = seq.pages[pos / kPageSize];
      const size_t off = (size_t)(pos % kPageSize) * d;
      cvt(pool.k_page(layer, phys, kvh) + off, kbuf + (size_t)j * d, d);
      cvt(pool.v_page(layer, phys, kvh) + off, vbuf + (size_t)j * d, d);
    }
    for (int r = 0; r < nq; ++r) {
      const float* qr = q + (size_t)r * d;
      score(qr, kbuf, nt, d, s);
      float mx = -INFINITY;
      for (int j = 0; j < nt; ++j) mx = s[j] > mx ? s[j] : mx;
      SoftmaxState& S = st[r];
      const float m_new = S.m > mx ? S.m : mx;
      const float scale = S.m == -INFINITY ? 0.f : fast_exp(S.m - m_new);  // 0 on the first block
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < nt; ++j) {
        s[j] = fast_exp(s[j] - m_new);
        sum += s[j];
      }
      accum(S.o, scale, s, vbuf, nt, d);
      S.l = S.l * scale + sum;
      S.m = m_new;
    }
  }
}

// attend_list at the AVX-512 level (d = 64 / 128): blocks of 16 listed rows through attend_rows
// (attend_block_avx512.h: K converted once for the nq queries, V converted inside the accumulation).
// Listed rows are scattered, so the rows of the block PFB blocks ahead are prefetched (into L2, by
// attend_rows) while this one is computed (one block ahead: with L1 prefetches two were needed, 7 GB/s
// at 32k with one; with L2 prefetches one is best, two or three 5-15% slower); the first blocks of a
// chunk are prefetched before it starts.
template <int NV>
TW_AVX512 void attend_list_avx512(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, int kvh, const int32_t* t,
                                  int64_t m, int32_t cur, int64_t j0, int64_t j1, const float* q, int nq,
                                  SoftmaxState* st, float* pbuf) {
  constexpr int d = 16 * NV;
  constexpr int PFB = 1;  // blocks ahead
  alignas(64) float kbuf[kBlock * d];
  const uint16_t* rows[PFB + 1][2][kBlock];  // [ring slot][k, v][row]
  int nts[PFB + 1] = {};
  auto fill = [&](int64_t b0, int slot) {
    const int nt = b0 < j1 ? (int)std::min<int64_t>(kBlock, j1 - b0) : 0;
    for (int j = 0; j < nt; ++j) {
      const int64_t jj = b0 + j;
      const int32_t pos = jj < m ? t[jj] : cur;
      const int32_t phys = seq.pages[pos / kPageSize];
      const size_t off = (size_t)(pos % kPageSize) * d;
      rows[slot][0][j] = pool.k_page(layer, phys, kvh) + off;
      rows[slot][1][j] = pool.v_page(layer, phys, kvh) + off;
    }
    nts[slot] = nt;
  };
  constexpr int LPR = d * 2 / 64;  // cache lines per fp16 row
  for (int b = 0; b < PFB; ++b) {  // the first PFB blocks: prefetched up front
    fill(j0 + (int64_t)b * kBlock, b);
    for (int j = 0; j < nts[b]; ++j)
      for (int l = 0; l < LPR; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(rows[b][0][j]) + 64 * l, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(rows[b][1][j]) + 64 * l, _MM_HINT_T0);
      }
  }
  int slot = 0;
  for (int64_t b0 = j0; b0 < j1; b0 += kBlock) {
    const int ahead = (slot + PFB) % (PFB + 1);
    fill(b0 + (int64_t)PFB * kBlock, ahead);
    const avx512::Prefetch next{rows[ahead][0], rows[ahead][1], nts[ahead]};
    avx512::attend_rows<NV>(rows[slot][0], rows[slot][1], nts[slot], q, nq, nullptr, st, kbuf, pbuf, next);
    slot = (slot + 1) % (PFB + 1);
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
  sparse_decode(pool, seq, layer, hs, q, sel, n_ctx, out, tp, ops::active_simd());
}

void sparse_decode(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                   const Selection& sel, int64_t n_ctx, float* out, ThreadPool& tp, ops::Simd level) {
  check_args(pool, seq, layer, hs, sel, n_ctx);
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads;
  const bool group = sel.mode == GqaMode::Group;
  const int nq = group ? G : 1;
  const int n_lists = sel.n_lists;
  const int32_t cur = (int32_t)(n_ctx - 1);

  // Work items: (list, chunk). len[i] counts the appended current token when the list lacks it.
  // The caller's scratch is reused across decode steps (workers reach it through the reference).
  struct Scratch {
    std::vector<int64_t> len, first_item;
    std::vector<float> qs, part_o;
    std::vector<SoftmaxState> part;
  };
  static thread_local Scratch tls;
  Scratch& sc = tls;
  sc.len.assign(n_lists, 0);
  sc.first_item.assign(n_lists + 1, 0);
  for (int i = 0; i < n_lists; ++i) {
    const int64_t m = sel.size(i);
    sc.len[i] = m + ((m > 0 && sel.list(i)[m - 1] == cur) ? 0 : 1);
    sc.first_item[i + 1] = sc.first_item[i] + (sc.len[i] + kChunkTokens - 1) / kChunkTokens;
  }
  const int64_t items = sc.first_item[n_lists];
  const float qscale = 1.f / std::sqrt((float)d);
  sc.qs.resize((size_t)hs.n_heads * d);
  for (size_t i = 0; i < sc.qs.size(); ++i) sc.qs[i] = q[i] * qscale;
  sc.part_o.assign((size_t)items * nq * d, 0.f);
  sc.part.assign((size_t)items * nq, SoftmaxState{});
  for (size_t i = 0; i < sc.part.size(); ++i) sc.part[i].o = sc.part_o.data() + i * d;

  const CvtFn cvt = fp16_cvt_for(level);
  const bool wide = cvt == fp16_cvt_for(ops::Simd::AVX512) && d % 16 == 0;
  const bool blocks512 = wide && (d == 64 || d == 128);
  const ScoreFn score = wide ? scores_avx512 : scores_portable;
  const AccumFn accum = wide ? accum_avx512 : accum_portable;
  tp.parallel_for(items, [&](int64_t b, int64_t e, int) {
    struct Local {
      std::vector<float> kbuf, vbuf;
      std::vector<float, avx512::AlignedAlloc<float>> pbuf;
    };
    static thread_local Local lc;  // per worker: no allocation per decode step
    if (lc.kbuf.size() < (size_t)kBlock * d) {
      lc.kbuf.resize((size_t)kBlock * d);
      lc.vbuf.resize((size_t)kBlock * d);
    }
    if (lc.pbuf.size() < (size_t)nq * 16) lc.pbuf.resize((size_t)nq * 16);
    int i = (int)(std::upper_bound(sc.first_item.begin(), sc.first_item.end(), b) - sc.first_item.begin()) - 1;
    for (int64_t it = b; it < e; ++it) {
      while (it >= sc.first_item[i + 1]) ++i;
      const int64_t c = it - sc.first_item[i];
      const int64_t j0 = c * kChunkTokens, j1 = std::min(sc.len[i], j0 + kChunkTokens);
      const int kvh = group ? i : i / G;
      const float* qi = sc.qs.data() + (size_t)(group ? i * G : i) * d;
      SoftmaxState* st = &sc.part[(size_t)it * nq];
      if (blocks512 && d == 128)
        attend_list_avx512<8>(pool, seq, layer, kvh, sel.list(i), sel.size(i), cur, j0, j1, qi, nq, st, lc.pbuf.data());
      else if (blocks512)
        attend_list_avx512<4>(pool, seq, layer, kvh, sel.list(i), sel.size(i), cur, j0, j1, qi, nq, st, lc.pbuf.data());
      else
        attend_list(pool, seq, layer, kvh, sel.list(i), sel.size(i), cur, j0, j1, qi, nq, st, d, lc.kbuf.data(),
                    lc.vbuf.data(), cvt, score, accum);
    }
  });
  for (int i = 0; i < n_lists; ++i)
    for (int r = 0; r < nq; ++r) {
      SoftmaxState& acc = sc.part[(size_t)sc.first_item[i] * nq + r];
      for (int64_t it = sc.first_item[i] + 1; it < sc.first_item[i + 1]; ++it) merge(acc, sc.part[(size_t)it * nq + r], d);
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
