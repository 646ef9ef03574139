// Dense attention (split-KV decode, blocked prefill) against the scalar two-pass reference, on
// fresh random inputs, several GQA shapes, partial last pages, 1 and 2 threads.
#include "attention/dense_cpu.h"
#include "attention/test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "attention/online_softmax.h"
#include "common/fp16.h"
#include "ops/cpu/matmul.h"

namespace tw::attn {
namespace {

struct Case {
  int H, Hkv, d;
  int64_t n_ctx;
  int threads;
};

using test_util::fill_random;

class DenseDecode : public ::testing::TestWithParam<Case> {};

TEST_P(DenseDecode, MatchesReference) {
  const Case c = GetParam();
  std::mt19937 rng(1000 + c.n_ctx + c.H * 7 + c.threads);
  kv::KVPool pool({2, c.Hkv, c.d, (c.n_ctx + 15) / 16 + 1});
  kv::SeqPages seq;
  fill_random(pool, seq, 1, c.n_ctx, rng, 1.5f);
  std::normal_distribution<float> N(0.f, 1.f);
  std::vector<float> q((size_t)c.H * c.d);
  for (auto& x : q) x = N(rng);
  std::vector<float> out(q.size()), ref(q.size());
  ThreadPool tp(c.threads);
  const HeadShape hs{c.H, c.Hkv, c.d};
  dense_decode(pool, seq, 1, hs, q.data(), c.n_ctx, out.data(), tp);
  dense_reference(pool, seq, 1, hs, q.data(), c.n_ctx, ref.data());
  for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], ref[i], 2e-5f + 2e-5f * std::fabs(ref[i])) << "at " << i;
}

INSTANTIATE_TEST_SUITE_P(Shapes, DenseDecode,
                         ::testing::Values(Case{9, 3, 64, 1, 1}, Case{9, 3, 64, 17, 2}, Case{9, 3, 64, 1000, 2},
                                           Case{12, 2, 128, 333, 1}, Case{12, 2, 128, 4099, 2},
                                           Case{14, 2, 64, 2048, 2}, Case{8, 8, 128, 257, 2},
                                           Case{32, 8, 128, 1500, 2}, Case{4, 1, 64, 16, 2}));

// Every SIMD level this CPU runs (the suite's default level is only the best one, plus scalar via
// TWILIGHT_SIMD): AVX-512 (d 64 / 128: attend_block_avx512.h), AVX2 and portable, with shapes that hit
// groups of more than 8 queries (G = 16), G = 1, partial last pages and 1-3 threads.
TEST(DenseDecode, EverySimdLevelMatchesReference) {
  const Case cases[] = {Case{12, 2, 128, 4099, 2}, Case{9, 3, 64, 1000, 3}, Case{32, 2, 128, 700, 2},
                        Case{8, 8, 64, 17, 1},     Case{6, 1, 128, 16, 2},   Case{4, 2, 64, 1, 1},
                        Case{10, 2, 32, 333, 2},   Case{6, 2, 24, 100, 2}};
  for (const ops::Simd level : {ops::Simd::Scalar, ops::Simd::AVX2, ops::Simd::AVX512}) {
    if (!ops::simd_supported(level)) continue;
    for (const Case c : cases) {
      std::mt19937 rng(77 + c.n_ctx + c.d + (int)level);
      kv::KVPool pool({1, c.Hkv, c.d, (c.n_ctx + 15) / 16});
      kv::SeqPages seq;
      fill_random(pool, seq, 0, c.n_ctx, rng, 2.f);
      std::normal_distribution<float> N(0.f, 1.f);
      std::vector<float> q((size_t)c.H * c.d);
      for (auto& x : q) x = N(rng);
      std::vector<float> out(q.size()), ref(q.size());
      ThreadPool tp(c.threads);
      const HeadShape hs{c.H, c.Hkv, c.d};
      dense_reference(pool, seq, 0, hs, q.data(), c.n_ctx, ref.data());
      for (int rep = 0; rep < 2; ++rep) {  // twice: the reused scratch must not leak state
        dense_decode(pool, seq, 0, hs, q.data(), c.n_ctx, out.data(), tp, level);
        for (size_t i = 0; i < out.size(); ++i)
          ASSERT_NEAR(out[i], ref[i], 2e-5f + 2e-5f * std::fabs(ref[i]))
              << ops::simd_name(level) << " H " << c.H << " d " << c.d << " n " << c.n_ctx << " at " << i;
      }
    }
  }
}

TEST(DensePrefill, CausalMatchesReferencePerToken) {
  for (const Case c : {Case{9, 3, 64, 77, 2}, Case{12, 2, 128, 150, 1}, Case{8, 4, 64, 33, 2}}) {
    std::mt19937 rng(7 + c.n_ctx);
    kv::KVPool pool({1, c.Hkv, c.d, (c.n_ctx + 15) / 16});
    kv::SeqPages seq;
    fill_random(pool, seq, 0, c.n_ctx, rng, 1.0f);
    std::normal_distribution<float> N(0.f, 1.f);
    // Prefill the last n tokens (pos0 > 0 exercises a chunk after an earlier chunk).
    const int64_t pos0 = c.n_ctx / 3, n = c.n_ctx - pos0;
    std::vector<float> q((size_t)n * c.H * c.d);
    for (auto& x : q) x = N(rng);
    std::vector<float> out(q.size()), ref((size_t)c.H * c.d);
    ThreadPool tp(c.threads);
    const HeadShape hs{c.H, c.Hkv, c.d};
    dense_prefill(pool, seq, 0, hs, q.data(), n, pos0, out.data(), tp);
    for (int64_t i = 0; i < n; ++i) {
      dense_reference(pool, seq, 0, hs, q.data() + (size_t)i * c.H * c.d, pos0 + i + 1, ref.data());
      for (int j = 0; j < c.H * c.d; ++j)
        ASSERT_NEAR(out[(size_t)i * c.H * c.d + j], ref[j], 2e-5f + 2e-5f * std::fabs(ref[j])) << "token " << i << " at " << j;
    }
  }
}

TEST(DenseDecode, OneHotAttentionPicksTheValue) {
  // A key aligned with q and much larger than the rest: output must be that token's value.
  const int d = 64;
  kv::KVPool pool({1, 1, d, 8});
  kv::SeqPages seq;
  pool.reserve(seq, 100);
  std::vector<float> k(d, 0.f), v(d);
  for (int64_t t = 0; t < 100; ++t) {
    for (int i = 0; i < d; ++i) {
      k[i] = t == 57 ? 4.f : 0.f;
      v[i] = (float)t + 0.25f * i;
    }
    pool.write(0, seq, t, k.data(), v.data());
  }
  std::vector<float> q(d, 4.f), out(d);
  ThreadPool tp(2);
  dense_decode(pool, seq, 0, {1, 1, d}, q.data(), 100, out.data(), tp);
  for (int i = 0; i < d; ++i) EXPECT_NEAR(out[i], fp16_to_fp32(fp32_to_fp16(57.f + 0.25f * i)), 1e-3f);
}

TEST(OnlineSoftmax, MergeEqualsOnePass) {
  std::mt19937 rng(3);
  std::normal_distribution<float> N(0.f, 3.f);
  const int d = 8, n = 50;
  std::vector<float> s(n), v(n * d);
  for (auto& x : s) x = N(rng);
  for (auto& x : v) x = N(rng);
  auto run = [&](int a, int b, float* o) {
    SoftmaxState st{-INFINITY, 0.f, o};
    for (int i = 0; i < d; ++i) o[i] = 0;
    for (int t = a; t < b; ++t) {
      const float m = std::fmax(st.m, s[t]), sc = std::exp(st.m - m), p = std::exp(s[t] - m);
      for (int i = 0; i < d; ++i) o[i] = o[i] * sc + p * v[t * d + i];
      st.l = st.l * sc + p;
      st.m = m;
    }
    return st;
  };
  std::vector<float> o1(d), o2(d), o3(d), r1(d), r2(d);
  SoftmaxState all = run(0, n, o1.data());
  SoftmaxState x = run(0, 20, o2.data()), y = run(20, n, o3.data());
  merge(x, y, d);
  finish(all, r1.data(), d);
  finish(x, r2.data(), d);
  for (int i = 0; i < d; ++i) EXPECT_NEAR(r1[i], r2[i], 1e-5f);
  SoftmaxState empty{-INFINITY, 0.f, o3.data()};
  merge(x, empty, d);  // merging an empty state changes nothing
  finish(x, r2.data(), d);
  for (int i = 0; i < d; ++i) EXPECT_NEAR(r1[i], r2[i], 1e-5f);
}

}  // namespace
}  // namespace tw::attn
