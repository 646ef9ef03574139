#include "attention/dense_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention/attend_block_avx512.h"
#include "attention/fast_exp.h"
#include "attention/online_softmax.h"
#include "common/error.h"
#include "common/fp16.h"
#include "ops/cpu/matmul.h"

namespace tw::attn {

namespace {

using kv::kPageSize;

#define TW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// fp16 -> fp32 for a page, 8 at a time with F16C where the CPU has it (checked once); the scalar
// bit conversion otherwise. Conversion per element is the largest cost of a page when done scalar.
__attribute__((target("avx2,f16c"))) void cvt_f16c(const uint16_t* src, float* dst, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = fp16_to_fp32(src[i]);
}
void page_to_f32(const uint16_t* src, float* dst, int n) {
  static const bool f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
  if (f16c) return cvt_f16c(src, dst, n);
  for (int i = 0; i < n; ++i) dst[i] = fp16_to_fp32(src[i]);
}

// Attend nq queries sharing kv head `kvh` over logical pages [p0, p1) of seq. q: [nq][d], already
// scaled by 1/sqrt(d). Query r sees tokens with position <= limit[r]. States st[r] are updated.
// Per page: K and V are converted to fp32 once for all nq queries; per query, 16 dot products,
// 16 exps as one vector, 16 axpys of V rows into the running output.
TW_CLONES void attend_pages(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, int kvh, int64_t p0,
                            int64_t p1, const float* q, int nq, const int64_t* limit, SoftmaxState* st, int d,
                            float* kbuf, float* vbuf) {
  constexpr int P = kPageSize;
  alignas(64) float s[P];
  int64_t max_limit = -1;
  for (int r = 0; r < nq; ++r) max_limit = std::max(max_limit, limit[r]);
  for (int64_t lp = p0; lp < p1; ++lp) {
    const int32_t phys = seq.pages[lp];
    const int64_t t0 = lp * P;
    const int nt = (int)std::min<int64_t>(P, max_limit - t0 + 1);
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
        mx = mx > acc ? mx : acc;
      }
      for (int j = ntr; j < P; ++j) s[j] = -INFINITY;
      SoftmaxState& S = st[r];
      const float m_new = S.m > mx ? S.m : mx;
      const float scale = S.m == -INFINITY ? 0.f : fast_exp(S.m - m_new);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < P; ++j) {
        const float e = fast_exp(s[j] - m_new);
        s[j] = e;
        sum += e;
      }
      float* o = S.o;
#pragma omp simd
      for (int i = 0; i < d; ++i) o[i] *= scale;
      for (int j = 0; j < ntr; ++j) {
        const float pj = s[j];
        const float* vj = vbuf + (size_t)j * d;
#pragma omp simd
        for (int i = 0; i < d; ++i) o[i] += pj * vj[i];
      }
      S.l = S.l * scale + sum;
      S.m = m_new;
    }
  }
}

// The same page step with explicit AVX2/FMA intrinsics (8 lanes): 8 dot products finish together
// with one hadd tree instead of 8 horizontal reductions, exps are vectorised, V rows are FMA'd into
// the output. K/V pages are converted from fp16 once per page for all nq queries.
__attribute__((target("avx2,fma,f16c"))) inline __m256 exp8(__m256 x) {
  const __m256 kf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i k = _mm256_cvtps_epi32(_mm256_max_ps(kf, _mm256_set1_ps(-127.f)));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
  const __m256 res = _mm256_mul_ps(p, scale);
  return _mm256_and_ps(res, _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ));  // x < -87 (and -inf) -> 0
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 hsum8x8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

__attribute__((target("avx2,fma,f16c"))) void attend_pages_avx2(const kv::KVPool& pool, const kv::SeqPages& seq,
                                                                int layer, int kvh, int64_t p0, int64_t p1,
                                                                const float* q, int nq, const int64_t* limit,
                                                                SoftmaxState* st, int d, float* kbuf, float* vbuf) {
  constexpr int P = kPageSize;
  alignas(32) float s[P];
  int64_t max_limit = -1;
  for (int r = 0; r < nq; ++r) max_limit = std::max(max_limit, limit[r]);
  const int dv = d / 8;  // d is a multiple of 8 (checked by the caller)
  for (int64_t lp = p0; lp < p1; ++lp) {
    const int32_t phys = seq.pages[lp];
    const int64_t t0 = lp * P;
    const int nt = (int)std::min<int64_t>(P, max_limit - t0 + 1);
    if (nt <= 0) break;
    cvt_f16c(pool.k_page(layer, phys, kvh), kbuf, nt * d);
    cvt_f16c(pool.v_page(layer, phys, kvh), vbuf, nt * d);
    for (int r = 0; r < nq; ++r) {
      const float* qr = q + (size_t)r * d;
      const int ntr = (int)std::min<int64_t>(nt, limit[r] - t0 + 1);
      if (ntr <= 0) continue;
      for (int j0 = 0; j0 < P; j0 += 8) {
        __m256 acc[8];
        for (int jj = 0; jj < 8; ++jj) {
          const int j = j0 + jj;
          __m256 a = _mm256_setzero_ps();
          if (j < ntr) {
            const float* kj = kbuf + (size_t)j * d;
            for (int i = 0; i < dv; ++i) a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + 8 * i), _mm256_loadu_ps(kj + 8 * i), a);
          }
          acc[jj] = a;
        }
        _mm256_store_ps(s + j0, hsum8x8(acc));
      }
      float mx = -INFINITY;
      for (int j = 0; j < ntr; ++j) mx = s[j] > mx ? s[j] : mx;
      SoftmaxState& S = st[r];
      const float m_new = S.m > mx ? S.m : mx;
      const float scale = S.m == -INFINITY ? 0.f : fast_exp(S.m - m_new);
      __m256 vsum = _mm256_setzero_ps();
      const __m256 vm = _mm256_set1_ps(m_new);
      for (int j0 = 0; j0 < P; j0 += 8) {
        const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(j0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(ntr), idx));
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_load_ps(s + j0), vm)), valid);
        _mm256_store_ps(s + j0, e);
        vsum = _mm256_add_ps(vsum, e);
      }
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, vsum);
      const float sum = ((tmp[0] + tmp[1]) + (tmp[2] + tmp[3])) + ((tmp[4] + tmp[5]) + (tmp[6] + tmp[7]));
      float* o = S.o;
      const __m256 vs = _mm256_set1_ps(scale);
      for (int i = 0; i < dv; ++i) {
        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(o + 8 * i), vs);
        for (int j = 0; j < ntr; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), _mm256_loadu_ps(vbuf + (size_t)j * d + 8 * i), acc);
        _mm256_storeu_ps(o + 8 * i, acc);
      }
      S.l = S.l * scale + sum;
      S.m = m_new;
    }
  }
}

// Row pointers of logical page lp of kv head kvh: rows[0][j] = K row j, rows[1][j] = V row j.
void page_rows(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, int kvh, int64_t lp, int d,
               const uint16_t* (*rows)[kPageSize]) {
  const int32_t phys = seq.pages[lp];
  const uint16_t* kp = pool.k_page(layer, phys, kvh);
  const uint16_t* vp = pool.v_page(layer, phys, kvh);
  for (int j = 0; j < kPageSize; ++j) {
    rows[0][j] = kp + (size_t)j * d;
    rows[1][j] = vp + (size_t)j * d;
  }
}

// The page step at the AVX-512 level (d = 64 or 128): the K and V pages converted to fp32 once for
// all nq queries (attend_block_avx512.h), the next page prefetched while this one is computed (a
// kv head's pages are 4 KiB blocks at a stride, which the hardware prefetcher does not run ahead on).
template <int NV>
TW_AVX512 void attend_pages_avx512(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, int kvh, int64_t p0,
                                   int64_t p1, const float* q, int nq, const int64_t* limit, SoftmaxState* st,
                                   int* ntr, float* pw) {
  constexpr int P = kPageSize, d = 16 * NV;
  alignas(64) float kbuf[P * d];
  float* pbuf = pw;
  const uint16_t* rows[2][2][P];  // [buffer][k, v][row]: this page's rows and the next page's
  int64_t max_limit = -1;
  for (int r = 0; r < nq; ++r) max_limit = std::max(max_limit, limit[r]);
  for (int64_t lp = p0; lp < p1; ++lp) {
    const int64_t t0 = lp * P;
    const int nt = (int)std::min<int64_t>(P, max_limit - t0 + 1);
    if (nt <= 0) break;
    const uint16_t* const* krow = rows[lp & 1][0];
    const uint16_t* const* vrow = rows[lp & 1][1];
    if (lp == p0) page_rows(pool, seq, layer, kvh, lp, d, rows[lp & 1]);
    avx512::Prefetch next;
    if (lp + 1 < p1 && (lp + 1) * P <= max_limit) {  // the next page is read too: prefetch it
      page_rows(pool, seq, layer, kvh, lp + 1, d, rows[(lp + 1) & 1]);
      next = {rows[(lp + 1) & 1][0], rows[(lp + 1) & 1][1], (int)std::min<int64_t>(P, max_limit - (lp + 1) * P + 1)};
    }
    for (int r = 0; r < nq; ++r) ntr[r] = (int)std::clamp<int64_t>(limit[r] - t0 + 1, 0, P);
    avx512::attend_rows<NV>(krow, vrow, nt, q, nq, ntr, st, kbuf, pbuf, next);
  }
}

enum class Kernel { Portable, AVX2, AVX512 };


// One place picks the page step for a SIMD level: AVX-512 for d = 64 / 128, AVX2/FMA/F16C for d % 8 == 0,
// the portable loop otherwise (and at the scalar level: TWILIGHT_SIMD=scalar).
Kernel pick_kernel(ops::Simd level, int d) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (level == ops::Simd::AVX512 && ops::simd_supported(ops::Simd::AVX512) && avx2 && (d == 64 || d == 128))
    return Kernel::AVX512;
  if (level != ops::Simd::Scalar && avx2 && d % 8 == 0) return Kernel::AVX2;
  return Kernel::Portable;
}

// Per-thread scratch of the page step: reused across calls (no allocation per decode step).
struct PageScratch {
  std::vector<float> kbuf, vbuf;
  std::vector<int> ntr;
  std::vector<float, avx512::AlignedAlloc<float>> pw;  // [nq][16] softmax weights of a page (AVX-512 step)
};
PageScratch& page_scratch(int d, int nq) {
  static thread_local PageScratch s;
  if (s.kbuf.size() < (size_t)kPageSize * d) {
    s.kbuf.resize((size_t)kPageSize * d);
    s.vbuf.resize((size_t)kPageSize * d);
  }
  if (s.ntr.size() < (size_t)nq) s.ntr.resize(nq);
  if (s.pw.size() < (size_t)nq * 16) s.pw.resize((size_t)nq * 16);
  return s;
}

void attend(Kernel kern, const kv::KVPool& pool, const kv::SeqPages& seq, int layer, int kvh, int64_t p0, int64_t p1,
            const float* q, int nq, const int64_t* limit, SoftmaxState* st, int d) {
  PageScratch& sc = page_scratch(d, nq);
  switch (kern) {
    case Kernel::AVX512:
      if (d == 64)
        attend_pages_avx512<4>(pool, seq, layer, kvh, p0, p1, q, nq, limit, st, sc.ntr.data(), sc.pw.data());
      else
        attend_pages_avx512<8>(pool, seq, layer, kvh, p0, p1, q, nq, limit, st, sc.ntr.data(), sc.pw.data());
      break;
    case Kernel::AVX2:
      attend_pages_avx2(pool, seq, layer, kvh, p0, p1, q, nq, limit, st, d, sc.kbuf.data(), sc.vbuf.data());
      break;
    case Kernel::Portable:
      attend_pages(pool, seq, layer, kvh, p0, p1, q, nq, limit, st, d, sc.kbuf.data(), sc.vbuf.data());
      break;
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
  dense_decode(pool, seq, layer, hs, q, n_ctx, out, tp, ops::active_simd());
}

void dense_decode(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                  int64_t n_ctx, float* out, ThreadPool& tp, ops::Simd level) {
  check_shape(pool, hs, layer);
  TW_CHECK(n_ctx > 0 && (n_ctx + kPageSize - 1) / kPageSize <= (int64_t)seq.pages.size(), "attention: n_ctx ", n_ctx,
           " exceeds the sequence's pages");
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads, hkv = hs.n_kv_heads;
  const int64_t n_pages = (n_ctx + kPageSize - 1) / kPageSize;
  const Kernel kern = pick_kernel(level, d);
  // Split-KV: enough chunks per kv head to keep every thread busy, at least 8 pages each.
  const int64_t want = std::max<int64_t>(1, (int64_t)tp.size() * 2 / hkv + ((tp.size() * 2) % hkv != 0));
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(want, n_pages / 8));
  const int64_t items = hkv * n_chunks;
  // The caller's scratch, reused across decode steps (a step runs this once per layer).
  struct Scratch {
    std::vector<float> qs, part_o;
    std::vector<SoftmaxState> part;
    std::vector<int64_t> limit;
  };
  static thread_local Scratch tls;
  Scratch& sc = tls;  // a local reference: the workers must see the caller's buffers, not their own thread_local
  const float qscale = 1.f / std::sqrt((float)d);
  sc.qs.resize((size_t)hs.n_heads * d);
  for (size_t i = 0; i < sc.qs.size(); ++i) sc.qs[i] = q[i] * qscale;
  sc.part_o.assign((size_t)items * G * d, 0.f);
  sc.part.assign((size_t)items * G, SoftmaxState{});
  for (size_t i = 0; i < sc.part.size(); ++i) sc.part[i].o = sc.part_o.data() + i * d;
  sc.limit.assign(G, n_ctx - 1);

  tp.parallel_for(items, [&](int64_t b, int64_t e, int) {
    for (int64_t it = b; it < e; ++it) {
      const int h = (int)(it / n_chunks);
      const int64_t c = it % n_chunks;
      const int64_t p0 = n_pages * c / n_chunks, p1 = n_pages * (c + 1) / n_chunks;
      attend(kern, pool, seq, layer, h, p0, p1, sc.qs.data() + (size_t)h * G * d, G, sc.limit.data(), &sc.part[it * G], d);
    }
  });
  for (int h = 0; h < hkv; ++h)
    for (int g = 0; g < G; ++g) {
      SoftmaxState& acc = sc.part[((size_t)h * n_chunks) * G + g];
      for (int64_t c = 1; c < n_chunks; ++c) merge(acc, sc.part[((size_t)h * n_chunks + c) * G + g], d);
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
  const Kernel kern = pick_kernel(ops::active_simd(), d);
  tp.parallel_for(hkv * n_blocks, [&](int64_t b, int64_t e, int) {
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
      attend(kern, pool, seq, layer, h, 0, last_page + 1, qb.data(), nq, limit.data(), st.data(), d);
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
