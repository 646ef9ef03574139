#include "attention/dense_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention/online_softmax.h"
#include "common/error.h"
#include "common/fp16.h"

namespace tw::attn {

namespace {

using kv::kPageSize;

#define TW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

TW_CLONES void page_to_f32(const uint16_t* src, float* dst, int n) {
  // _Float16 -> float compiles to vcvtph2ps on F16C targets, a library call on the baseline.
  const _Float16* h = reinterpret_cast<const _Float16*>(src);
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = (float)h[i];
}

// Attend nq queries sharing kv head `kvh` over logical pages [p0, p1) of seq. q: [nq][d], already
// scaled by 1/sqrt(d). Query r sees tokens with position <= limit[r]. States st[r] are updated.
// kbuf/vbuf: scratch [kPageSize][d].
TW_CLONES void attend_pages(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, int kvh, int64_t p0,
                            int64_t p1, const float* q, int nq, const int64_t* limit, SoftmaxState* st, int d,
                            float* kbuf, float* vbuf) {
  float s[kPageSize];
  for (int64_t lp = p0; lp < p1; ++lp) {
    const int32_t phys = seq.pages[lp];
    const int64_t t0 = lp * kPageSize;
    int64_t max_limit = -1;
    for (int r = 0; r < nq; ++r) max_limit = std::max(max_limit, limit[r]);
    const int nt = (int)std::min<int64_t>(kPageSize, max_limit - t0 + 1);
    if (nt <= 0) break;
    page_to_f32(pool.k_page(layer, phys, kvh), kbuf, nt * d);
    page_to_f32(pool.v_page(layer, phys, kvh), vbuf, nt * d);
    for (int r = 0; r < nq; ++r) {
      const float* qr = q + (size_t)r * d;
      const int ntr = (int)std::min<int64_t>(nt, limit[r] - t0 + 1);
      if (ntr <= 0) continue;
      float mx = -INFINITY;
      for (int j = 0; j < ntr; ++j) {
        const float* kj = kbuf + (size_t)j * d;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < d; ++i) acc += qr[i] * kj[i];
        s[j] = acc;
        mx = std::fmax(mx, acc);
      }
      SoftmaxState& S = st[r];
      const float m_new = std::fmax(S.m, mx);
      const float scale = std::exp(S.m - m_new);  // exp(-inf) = 0 on the first page
      float sum = 0.f;
      for (int j = 0; j < ntr; ++j) {
        s[j] = std::exp(s[j] - m_new);
        sum += s[j];
      }
      float* o = S.o;
#pragma omp simd
      for (int i = 0; i < d; ++i) o[i] *= scale;
      for (int j = 0; j < ntr; ++j) {
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

void check_shape(const kv::KVPool& pool, const HeadShape& hs, int layer) {
  const kv::KVShape& ks = pool.shape();
  TW_CHECK(hs.n_kv_heads == ks.n_kv_heads && hs.head_dim == ks.head_dim, "attention: head shape does not match the kv cache");
  TW_CHECK(hs.n_heads > 0 && hs.n_heads % hs.n_kv_heads == 0, "attention: ", hs.n_heads, " query heads not a multiple of ",
           hs.n_kv_heads, " kv heads");
  TW_CHECK(layer >= 0 && layer < ks.n_layers, "attention: layer out of range");
}

}  // namespace

void dense_decode(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                  int64_t n_ctx, float* out, ThreadPool& tp) {
  check_shape(pool, hs, layer);
  TW_CHECK(n_ctx > 0 && (n_ctx + kPageSize - 1) / kPageSize <= (int64_t)seq.pages.size(), "attention: n_ctx ", n_ctx,
           " exceeds the sequence's pages");
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads, hkv = hs.n_kv_heads;
  const int64_t n_pages = (n_ctx + kPageSize - 1) / kPageSize;
  // Split-KV: enough chunks per kv head to keep every thread busy, at least 8 pages each.
  const int64_t want = std::max<int64_t>(1, (int64_t)tp.size() * 2 / hkv + ((tp.size() * 2) % hkv != 0));
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(want, n_pages / 8));
  const float qscale = 1.f / std::sqrt((float)d);
  std::vector<float> qs((size_t)hs.n_heads * d);
  for (size_t i = 0; i < qs.size(); ++i) qs[i] = q[i] * qscale;

  const int64_t items = hkv * n_chunks;
  std::vector<float> part_o((size_t)items * G * d, 0.f);
  std::vector<SoftmaxState> part((size_t)items * G);
  for (size_t i = 0; i < part.size(); ++i) part[i].o = part_o.data() + i * d;
  const std::vector<int64_t> limit(G, n_ctx - 1);

  tp.parallel_for(items, [&](int64_t b, int64_t e, int) {
    std::vector<float> kbuf((size_t)kPageSize * d), vbuf((size_t)kPageSize * d);
    for (int64_t it = b; it < e; ++it) {
      const int h = (int)(it / n_chunks);
      const int64_t c = it % n_chunks;
      const int64_t p0 = n_pages * c / n_chunks, p1 = n_pages * (c + 1) / n_chunks;
      attend_pages(pool, seq, layer, h, p0, p1, qs.data() + (size_t)h * G * d, G, limit.data(), &part[it * G], d,
                   kbuf.data(), vbuf.data());
    }
  });
  for (int h = 0; h < hkv; ++h)
    for (int g = 0; g < G; ++g) {
      SoftmaxState& acc = part[((size_t)h * n_chunks) * G + g];
      for (int64_t c = 1; c < n_chunks; ++c) merge(acc, part[((size_t)h * n_chunks + c) * G + g], d);
      finish(acc, out + ((size_t)h * G + g) * d, d);
    }
}

void dense_prefill(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                   int64_t n, int64_t pos0, float* out, ThreadPool& tp) {
  check_shape(pool, hs, layer);
  TW_CHECK(n > 0 && pos0 >= 0 && (pos0 + n + kPageSize - 1) / kPageSize <= (int64_t)seq.pages.size(),
           "attention: prefill range exceeds the sequence's pages");
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads, hkv = hs.n_kv_heads, H = hs.n_heads;
  const float qscale = 1.f / std::sqrt((float)d);
  // Work item: (kv head, block of T query tokens); the block's G*T queries share every K/V page read.
  constexpr int64_t T = 16;
  const int64_t n_blocks = (n + T - 1) / T;
  tp.parallel_for(hkv * n_blocks, [&](int64_t b, int64_t e, int) {
    std::vector<float> kbuf((size_t)kPageSize * d), vbuf((size_t)kPageSize * d);
    std::vector<float> qb((size_t)T * G * d), ob((size_t)T * G * d);
    std::vector<SoftmaxState> st((size_t)T * G);
    std::vector<int64_t> limit((size_t)T * G);
    for (int64_t it = b; it < e; ++it) {
      const int h = (int)(it % hkv);
      const int64_t blk = it / hkv;
      const int64_t i0 = blk * T, i1 = std::min(n, i0 + T);
      const int nq = (int)((i1 - i0) * G);
      for (int64_t i = i0; i < i1; ++i)
        for (int g = 0; g < G; ++g) {
          const size_t r = (size_t)(i - i0) * G + g;
          const float* src = q + ((size_t)i * H + (size_t)h * G + g) * d;
          for (int x = 0; x < d; ++x) qb[r * d + x] = src[x] * qscale;
          limit[r] = pos0 + i;
          st[r] = SoftmaxState{-INFINITY, 0.f, ob.data() + r * d};
          std::fill(st[r].o, st[r].o + d, 0.f);
        }
      const int64_t last_page = (pos0 + i1 - 1) / kPageSize;
      attend_pages(pool, seq, layer, h, 0, last_page + 1, qb.data(), nq, limit.data(), st.data(), d, kbuf.data(),
                   vbuf.data());
      for (int64_t i = i0; i < i1; ++i)
        for (int g = 0; g < G; ++g)
          finish(st[(size_t)(i - i0) * G + g], out + ((size_t)i * H + (size_t)h * G + g) * d, d);
    }
  });
}

void dense_reference(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                     int64_t n_ctx, float* out) {
  check_shape(pool, hs, layer);
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads;
  std::vector<double> w(n_ctx);
  for (int hq = 0; hq < hs.n_heads; ++hq) {
    const int h = hq / G;
    double mx = -INFINITY;
    for (int64_t t = 0; t < n_ctx; ++t) {
      const uint16_t* k = pool.k_page(layer, seq.pages[t / kPageSize], h) + (t % kPageSize) * d;
      double s = 0;
      for (int i = 0; i < d; ++i) s += (double)q[hq * d + i] * fp16_to_fp32(k[i]);
      w[t] = s / std::sqrt((double)d);
      mx = std::max(mx, w[t]);
    }
    double sum = 0;
    for (int64_t t = 0; t < n_ctx; ++t) sum += (w[t] = std::exp(w[t] - mx));
    for (int i = 0; i < d; ++i) {
      double o = 0;
      for (int64_t t = 0; t < n_ctx; ++t) {
        const uint16_t* v = pool.v_page(layer, seq.pages[t / kPageSize], h) + (t % kPageSize) * d;
        o += w[t] * fp16_to_fp32(v[i]);
      }
      out[hq * d + i] = (float)(o / sum);
    }
  }
}

}  // namespace tw::attn
