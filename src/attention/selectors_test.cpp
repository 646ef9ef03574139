// Selectors (Quest, StreamingLLM, oracle top-k, all) against brute-force references on random and
// adversarial inputs (ties, huge negative keys, one-hot), several GQA shapes, n_ctx not a multiple of
// 16 and below 16, budgets at and above n_ctx, both GQA modes; input validation.
#include "attention/selectors.h"
#include "attention/page_bounds.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "common/error.h"
#include "common/fp16.h"

namespace tw::attn {
namespace {

using kv::kPageSize;
constexpr int kLayer = 1;  // layer 1 of 2: catches layer indexing mistakes

struct Env {
  HeadShape hs;
  kv::KVPool pool;
  KeySide ks;
  kv::SeqPages seq;
  Env(const HeadShape& h, int64_t n_pages) : hs(h), pool({2, h.n_kv_heads, h.head_dim, n_pages}), ks(pool.shape()) {}
};

// n tokens, key of (token, kv head) from gen(t, h, row[d]).
std::unique_ptr<Env> make_env(const HeadShape& hs, int64_t n,
                              const std::function<void(int64_t, int, float*)>& gen) {
  auto e = std::make_unique<Env>(hs, (n + kPageSize - 1) / kPageSize + 1);
  e->pool.reserve(e->seq, n);
  const int d = hs.head_dim;
  std::vector<float> k((size_t)hs.n_kv_heads * d), v(k.size(), 0.f);
  for (int64_t t = 0; t < n; ++t) {
    for (int h = 0; h < hs.n_kv_heads; ++h) gen(t, h, k.data() + (size_t)h * d);
    for (int layer = 0; layer < 2; ++layer) {
      e->pool.write(layer, e->seq, t, k.data(), v.data());
      e->ks.append(e->pool, layer, e->seq, t);
    }
  }
  e->seq.n_tokens = n;
  return e;
}

std::vector<float> random_q(const HeadShape& hs, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> N(0.f, 1.f);
  std::vector<float> q((size_t)hs.n_heads * hs.head_dim);
  for (auto& x : q) x = N(rng) * scale;
  return q;
}

// Lists well formed: n_lists lists, ascending, unique, in [0, n_ctx).
void check_wellformed(const Selection& s, GqaMode mode, int n_lists, int64_t n_ctx) {
  ASSERT_EQ(s.mode, mode);
  ASSERT_EQ(s.n_lists, n_lists);
  ASSERT_EQ((int)s.offsets.size(), n_lists + 1);
  ASSERT_EQ(s.offsets[0], 0);
  ASSERT_EQ((size_t)s.offsets[n_lists], s.tokens.size());
  for (int i = 0; i < n_lists; ++i) {
    ASSERT_LE(s.offsets[i], s.offsets[i + 1]);
    const int32_t* t = s.list(i);
    for (int64_t j = 0; j < s.size(i); ++j) {
      ASSERT_GE(t[j], 0);
      ASSERT_LT(t[j], n_ctx);
      if (j > 0) {
        ASSERT_LT(t[j - 1], t[j]) << "list " << i << " not ascending/unique at " << j;
      }
    }
  }
}

bool is_all(const Selection& s, int i, int64_t n_ctx) {
  if (s.size(i) != n_ctx) return false;
  for (int64_t j = 0; j < n_ctx; ++j)
    if (s.list(i)[j] != j) return false;
  return true;
}

int n_lists_of(const HeadShape& hs, GqaMode m) { return m == GqaMode::Group ? hs.n_kv_heads : hs.n_heads; }

// Brute-force Quest page scores in double (exact products), with a magnitude for tolerances.
void quest_ref(const Env& e, const float* q, int64_t n_ctx, GqaMode mode, std::vector<double>& sc,
               std::vector<double>& mag) {
  const HeadShape& hs = e.hs;
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads;
  const int64_t np = (n_ctx + kPageSize - 1) / kPageSize;
  const int nl = n_lists_of(hs, mode);
  sc.assign((size_t)nl * np, -INFINITY);
  mag.assign(sc.size(), 0.0);
  for (int hq = 0; hq < hs.n_heads; ++hq) {
    const int h = hq / G;
    const int li = mode == GqaMode::Group ? h : hq;
    for (int64_t p = 0; p < np; ++p) {
      // The definition (page_bounds.h) in double: the int8 query sq * q8 against the decoded 8-bit bounds
      // lo + s * code.
      const uint8_t* c = e.ks.bound_codes(kLayer, e.seq.pages[p], h);
      const float* par = e.ks.bound_param(kLayer, e.seq.pages[p], h);
      std::vector<int8_t> q8(d);
      float sq;
      int q8sum;
      quantize_quest_query(q + (size_t)hq * d, d, q8.data(), sq, q8sum);
      double u = 0, m = 0;
      for (int i = 0; i < d; ++i) {
        const double qi = (double)sq * q8[i];
        const double a = qi * ((double)par[0] + (double)par[1] * c[d + i]),
                     b = qi * ((double)par[0] + (double)par[1] * c[i]);
        u += std::max(a, b);
        m += std::fabs(a) + std::fabs(b);
      }
      sc[(size_t)li * np + p] = std::max(sc[(size_t)li * np + p], u);
      mag[(size_t)li * np + p] = std::max(mag[(size_t)li * np + p], m);
    }
  }
}

void check_quest(const Env& e, const float* q, int64_t n_ctx, int64_t budget, GqaMode mode, const Selection& s) {
  const int nl = n_lists_of(e.hs, mode);
  check_wellformed(s, mode, nl, n_ctx);
  if (::testing::Test::HasFatalFailure()) return;
  const int64_t np = (n_ctx + kPageSize - 1) / kPageSize, nsel = (budget + kPageSize - 1) / kPageSize;
  std::vector<double> sc, mag;
  quest_ref(e, q, n_ctx, mode, sc, mag);
  for (int li = 0; li < nl; ++li) {
    if (budget >= n_ctx || nsel >= np) {
      ASSERT_TRUE(is_all(s, li, n_ctx)) << "list " << li << " budget " << budget;
      continue;
    }
    // Whole pages (last one cut at n_ctx).
    std::set<int64_t> pages;
    for (int64_t j = 0; j < s.size(li); ++j) pages.insert(s.list(li)[j] / kPageSize);
    int64_t expect_tokens = 0;
    for (int64_t p : pages) expect_tokens += std::min<int64_t>(kPageSize, n_ctx - p * kPageSize);
    ASSERT_EQ(s.size(li), expect_tokens) << "list " << li << ": partial pages";
    ASSERT_EQ((int64_t)pages.size(), std::max<int64_t>(nsel, 2)) << "list " << li;
    ASSERT_TRUE(pages.count(0)) << "sink page missing";
    ASSERT_TRUE(pages.count(np - 1)) << "last page missing";
    // Every chosen (non-forced) page scores at least as high as every page left out.
    for (int64_t a : pages) {
      if (a == 0 || a == np - 1) continue;
      for (int64_t b = 1; b < np - 1; ++b) {
        if (pages.count(b)) continue;
        const double tol = 1e-5 * std::max(mag[li * np + a], mag[li * np + b]);
        ASSERT_GE(sc[li * np + a], sc[li * np + b] - tol) << "list " << li << " kept page " << a << " dropped " << b;
      }
    }
  }
}

// Reference ranking keys of the oracle in double: Head: scores; Group: max over the group of softmax weights.
std::vector<double> oracle_ref(const Env& e, const float* q, int64_t n_ctx, GqaMode mode) {
  const HeadShape& hs = e.hs;
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads;
  std::vector<double> s((size_t)hs.n_heads * n_ctx);
  for (int hq = 0; hq < hs.n_heads; ++hq)
    for (int64_t t = 0; t < n_ctx; ++t) {
      const uint16_t* k = e.pool.k_page(kLayer, e.seq.pages[t / kPageSize], hq / G) + (t % kPageSize) * d;
      double acc = 0;
      for (int i = 0; i < d; ++i) acc += (double)q[(size_t)hq * d + i] * fp16_to_fp32(k[i]);
      s[(size_t)hq * n_ctx + t] = acc / std::sqrt((double)d);
    }
  if (mode == GqaMode::Head) return s;
  std::vector<double> w((size_t)hs.n_kv_heads * n_ctx, 0.0);
  for (int hq = 0; hq < hs.n_heads; ++hq) {
    const double* sr = s.data() + (size_t)hq * n_ctx;
    const double m = *std::max_element(sr, sr + n_ctx);
    double l = 0;
    for (int64_t t = 0; t < n_ctx; ++t) l += std::exp(sr[t] - m);
    for (int64_t t = 0; t < n_ctx; ++t) {
      double& x = w[(size_t)(hq / G) * n_ctx + t];
      x = std::max(x, std::exp(sr[t] - m) / l);
    }
  }
  return w;
}

void check_oracle(const Env& e, const float* q, int64_t n_ctx, int64_t k, GqaMode mode, const Selection& s) {
  const int nl = n_lists_of(e.hs, mode);
  check_wellformed(s, mode, nl, n_ctx);
  if (::testing::Test::HasFatalFailure()) return;
  const std::vector<double> ref = oracle_ref(e, q, n_ctx, mode);
  for (int li = 0; li < nl; ++li) {
    if (k >= n_ctx) {
      ASSERT_TRUE(is_all(s, li, n_ctx));
      continue;
    }
    const double* r = ref.data() + (size_t)li * n_ctx;
    std::vector<int32_t> sel(s.list(li), s.list(li) + s.size(li));
    ASSERT_TRUE(sel.size() == (size_t)k || sel.size() == (size_t)k + 1) << sel.size();
    ASSERT_EQ(sel.back(), n_ctx - 1) << "current token missing";
    if (sel.size() == (size_t)k + 1) sel.pop_back();  // the forced extra
    std::vector<char> in(n_ctx, 0);
    for (int32_t t : sel) in[t] = 1;
    double worst_in = INFINITY, best_out = -INFINITY, scale = 0;
    for (int64_t t = 0; t < n_ctx; ++t) {
      scale = std::max(scale, std::fabs(r[t]));
      if (in[t]) worst_in = std::min(worst_in, r[t]);
      else best_out = std::max(best_out, r[t]);
    }
    const double tol = mode == GqaMode::Head ? 1e-5 * (1 + scale) : 1e-4 * scale;
    ASSERT_GE(worst_in, best_out - tol) << "list " << li << ": the kept set is not the top-" << k;
  }
}

struct Case {
  int H, Hkv, d;
  int64_t n_ctx;
};

class Selectors : public ::testing::TestWithParam<Case> {};

TEST_P(Selectors, RandomMatchesBruteForce) {
  const Case c = GetParam();
  const HeadShape hs{c.H, c.Hkv, c.d};
  std::mt19937 rng(31 * c.n_ctx + c.H + c.d);
  auto env = make_env(hs, c.n_ctx, [&](int64_t, int, float* k) {
    std::normal_distribution<float> N(0.f, 1.f);
    const float sc = 0.5f + (float)(rng() % 4), off = 0.5f * N(rng);
    for (int i = 0; i < c.d; ++i) k[i] = N(rng) * sc + off;
  });
  ThreadPool tp(2);
  Selection s, s2;
  for (int trial = 0; trial < 2; ++trial) {
    const std::vector<float> q = random_q(hs, rng, trial ? 3.f : 1.f);
    for (GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
      for (int64_t budget : {int64_t(1), int64_t(16), int64_t(40), int64_t(64), int64_t(300), c.n_ctx - 1, c.n_ctx,
                             c.n_ctx + 5}) {
        if (budget <= 0) continue;
        select_quest(env->ks, env->seq, kLayer, hs, q.data(), c.n_ctx, budget, mode, s);
        check_quest(*env, q.data(), c.n_ctx, budget, mode, s);
        if (HasFatalFailure()) return;
        select_quest(env->ks, env->seq, kLayer, hs, q.data(), c.n_ctx, budget, mode, s2, tp);
        ASSERT_EQ(s.offsets, s2.offsets);
        ASSERT_EQ(s.tokens, s2.tokens) << "threaded Quest differs";
        select_topk_oracle(env->pool, env->seq, kLayer, hs, q.data(), c.n_ctx, budget, mode, s);
        check_oracle(*env, q.data(), c.n_ctx, budget, mode, s);
        if (HasFatalFailure()) return;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, Selectors,
                         ::testing::Values(Case{9, 3, 64, 1}, Case{9, 3, 64, 5}, Case{9, 3, 64, 16}, Case{9, 3, 64, 1037},
                                           Case{12, 2, 128, 17}, Case{12, 2, 128, 700}, Case{14, 2, 64, 333},
                                           Case{32, 8, 128, 130}, Case{32, 8, 128, 515},
                                           Case{18, 1, 64, 300},     // G = 18: several blocks of 8 heads
                                           Case{12, 2, 128, 4100})); // >= 256 pages: lists built in parallel

TEST(Selectors, QuestScoresMatchReference) {
  const HeadShape hs{12, 2, 128};
  std::mt19937 rng(3);
  std::normal_distribution<float> N(0.f, 1.f);
  auto env = make_env(hs, 1000, [&](int64_t, int, float* k) {
    for (int i = 0; i < 128; ++i) k[i] = N(rng);
  });
  const std::vector<float> q = random_q(hs, rng);
  ThreadPool tp(2);
  for (GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
    const int nl = n_lists_of(hs, mode);
    const int64_t np = (1000 + 15) / 16;
    std::vector<float> a((size_t)nl * np), b(a.size());
    quest_page_scores(env->ks, env->seq, kLayer, hs, q.data(), 1000, mode, a.data());
    quest_page_scores(env->ks, env->seq, kLayer, hs, q.data(), 1000, mode, b.data(), &tp);
    std::vector<double> sc, mag;
    quest_ref(*env, q.data(), 1000, mode, sc, mag);
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_NEAR(a[i], sc[i], 1e-5 * mag[i]) << i;
      ASSERT_EQ(a[i], b[i]) << i;
    }
  }
}

// The scores are page_bound_score of the exact integer dot, bit for bit, at every SIMD level (ctest runs
// this binary at the machine's level and at scalar_level): d 64 and 128, G 1..8, a partial last page.
TEST(Selectors, QuestScoresAreTheIntegerDefinition) {
  std::mt19937 rng(17);
  std::normal_distribution<float> N(0.f, 1.f);
  for (const HeadShape hs : {HeadShape{12, 2, 128}, HeadShape{9, 3, 64}, HeadShape{8, 1, 128}, HeadShape{7, 7, 64}}) {
    const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads;
    const int64_t n = 777, np = (n + 15) / 16;
    auto env = make_env(hs, n, [&](int64_t t, int, float* k) {
      for (int i = 0; i < d; ++i) k[i] = N(rng) * (i % 13 == 0 ? 8.f : 1.f) + (t % 5 == 0 ? 2.f : 0.f);
    });
    const std::vector<float> q = random_q(hs, rng);
    std::vector<float> head((size_t)hs.n_heads * np), group((size_t)hs.n_kv_heads * np);
    quest_page_scores(env->ks, env->seq, kLayer, hs, q.data(), n, GqaMode::Head, head.data());
    quest_page_scores(env->ks, env->seq, kLayer, hs, q.data(), n, GqaMode::Group, group.data());
    std::vector<int8_t> q8(d);
    for (int h = 0; h < hs.n_kv_heads; ++h)
      for (int64_t p = 0; p < np; ++p) {
        const uint8_t* c = env->ks.bound_codes(kLayer, env->seq.pages[p], h);
        const float* par = env->ks.bound_param(kLayer, env->seq.pages[p], h);
        float best = -INFINITY;
        for (int g = 0; g < G; ++g) {
          const int hq = h * G + g;
          float sq;
          int q8sum;
          quantize_quest_query(q.data() + (size_t)hq * d, d, q8.data(), sq, q8sum);
          int dot = 0;
          for (int i = 0; i < d; ++i) dot += std::max<int>(q8[i], 0) * c[d + i] + std::min<int>(q8[i], 0) * c[i];
          const float want = page_bound_score(par[0], par[1], sq, q8sum, dot);
          ASSERT_EQ(head[(size_t)hq * np + p], want) << "d " << d << " G " << G << " head " << hq << " page " << p;
          best = std::max(best, want);
        }
        ASSERT_EQ(group[(size_t)h * np + p], best) << "d " << d << " G " << G << " kv head " << h << " page " << p;
      }
  }
}

TEST(Selectors, OracleContainsExactTopK) {
  // Small integer q and keys: every score is exact in float, so the exact top-k (ties: lower position)
  // is known without tolerance.
  const HeadShape hs{9, 3, 64};
  std::mt19937 rng(8);
  const int64_t n = 301;
  auto env = make_env(hs, n, [&](int64_t, int, float* k) {
    for (int i = 0; i < 64; ++i) k[i] = (float)((int)(rng() % 7) - 3);
  });
  std::vector<float> q((size_t)9 * 64);
  for (auto& x : q) x = (float)((int)(rng() % 5) - 2);
  Selection s;
  for (int64_t k : {1, 2, 10, 77, 300}) {
    select_topk_oracle(env->pool, env->seq, kLayer, hs, q.data(), n, k, GqaMode::Head, s);
    for (int hq = 0; hq < 9; ++hq) {
      std::vector<std::pair<int, int32_t>> r;  // (-integer score, position): ascending = best first
      for (int64_t t = 0; t < n; ++t) {
        const uint16_t* kr = env->pool.k_page(kLayer, env->seq.pages[t / 16], hq / 3) + (t % 16) * 64;
        int acc = 0;
        for (int i = 0; i < 64; ++i) acc += (int)q[hq * 64 + i] * (int)fp16_to_fp32(kr[i]);
        r.push_back({-acc, (int32_t)t});
      }
      std::sort(r.begin(), r.end());
      std::vector<int32_t> want;
      for (int64_t i = 0; i < k; ++i) want.push_back(r[i].second);
      if (std::find(want.begin(), want.end(), n - 1) == want.end()) want.push_back((int32_t)(n - 1));
      std::sort(want.begin(), want.end());
      ASSERT_EQ(std::vector<int32_t>(s.list(hq), s.list(hq) + s.size(hq)), want) << "head " << hq << " k " << k;
    }
  }
}

TEST(Selectors, AllEqualKeysTieToLowerPositions) {
  const HeadShape hs{12, 2, 128};
  const int64_t n = 250;  // 16 pages, last one partial (10 tokens)
  auto env = make_env(hs, n, [](int64_t, int, float* k) {
    for (int i = 0; i < 128; ++i) k[i] = 0.25f * (float)(i % 5) - 0.5f;
  });
  std::mt19937 rng(1);
  const std::vector<float> q = random_q(hs, rng);
  Selection s;
  for (GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
    const int nl = n_lists_of(hs, mode);
    select_quest(env->ks, env->seq, kLayer, hs, q.data(), n, 64, mode, s);  // 4 pages: 0, 1, 2 and the last
    for (int li = 0; li < nl; ++li) {
      std::vector<int32_t> want;
      for (int32_t t = 0; t < 48; ++t) want.push_back(t);
      for (int32_t t = 240; t < 250; ++t) want.push_back(t);
      ASSERT_EQ(std::vector<int32_t>(s.list(li), s.list(li) + s.size(li)), want) << "quest list " << li;
    }
    select_topk_oracle(env->pool, env->seq, kLayer, hs, q.data(), n, 5, mode, s);
    for (int li = 0; li < nl; ++li)
      ASSERT_EQ(std::vector<int32_t>(s.list(li), s.list(li) + s.size(li)), (std::vector<int32_t>{0, 1, 2, 3, 4, 249}))
          << "oracle list " << li;
  }
}

TEST(Selectors, HugeNegativeKeysNeverWin) {
  const HeadShape hs{14, 2, 64};
  const int64_t n = 400;
  std::mt19937 rng(2);
  std::normal_distribution<float> N(0.f, 1.f);
  // Pages 3..9 entirely, and every 5th token, hold keys near the fp16 minimum.
  auto bad = [](int64_t t) { return (t >= 48 && t < 160) || (t % 5 == 2); };
  auto env = make_env(hs, n, [&](int64_t t, int, float* k) {
    for (int i = 0; i < 64; ++i) k[i] = bad(t) ? -65000.f + (float)(rng() % 100) : N(rng);
  });
  std::vector<float> q = random_q(hs, rng);
  for (auto& x : q) x = std::fabs(x) + 0.1f;  // positive q: bad keys score about -6e6
  Selection s;
  for (GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
    const int nl = n_lists_of(hs, mode);
    select_quest(env->ks, env->seq, kLayer, hs, q.data(), n, 160, mode, s);
    check_quest(*env, q.data(), n, 160, mode, s);
    for (int li = 0; li < nl; ++li)
      for (int64_t j = 0; j < s.size(li); ++j) ASSERT_FALSE(s.list(li)[j] >= 48 && s.list(li)[j] < 160) << "bad page kept";
    select_topk_oracle(env->pool, env->seq, kLayer, hs, q.data(), n, 200, mode, s);
    check_oracle(*env, q.data(), n, 200, mode, s);
    for (int li = 0; li < nl; ++li)
      for (int64_t j = 0; j < s.size(li); ++j) ASSERT_FALSE(bad(s.list(li)[j])) << "bad token " << s.list(li)[j];
  }
}

TEST(Selectors, OneHotKeyIsFound) {
  const HeadShape hs{32, 8, 128};
  const int64_t n = 1000, hot = 517;  // page 32 of 63
  auto env = make_env(hs, n, [&](int64_t t, int, float* k) {
    for (int i = 0; i < 128; ++i) k[i] = 0.f;
    if (t == hot) k[7] = 50.f;
  });
  std::vector<float> q((size_t)32 * 128, 0.f);
  for (int hq = 0; hq < 32; ++hq) q[(size_t)hq * 128 + 7] = 10.f;
  Selection s;
  for (GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
    const int nl = n_lists_of(hs, mode);
    select_topk_oracle(env->pool, env->seq, kLayer, hs, q.data(), n, 1, mode, s);
    for (int li = 0; li < nl; ++li)
      ASSERT_EQ(std::vector<int32_t>(s.list(li), s.list(li) + s.size(li)), (std::vector<int32_t>{(int32_t)hot, 999}));
    select_quest(env->ks, env->seq, kLayer, hs, q.data(), n, 48, mode, s);
    for (int li = 0; li < nl; ++li) {
      std::vector<int32_t> want;
      for (int32_t t = 0; t < 16; ++t) want.push_back(t);
      for (int32_t t = 512; t < 528; ++t) want.push_back(t);
      for (int32_t t = 992; t < 1000; ++t) want.push_back(t);
      ASSERT_EQ(std::vector<int32_t>(s.list(li), s.list(li) + s.size(li)), want);
    }
  }
}

TEST(Selectors, StreamingAndAll) {
  Selection s;
  for (int64_t n : {1, 5, 16, 17, 100, 1000})
    for (int64_t sinks : {0, 1, 4, 64})
      for (int64_t window : {1, 3, 16, 500, 2000})
        for (GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
          select_streaming(n, sinks, window, 3, mode, s);
          check_wellformed(s, mode, 3, n);
          std::vector<int32_t> want;
          for (int64_t t = 0; t < n; ++t)
            if (t < sinks || t >= n - window) want.push_back((int32_t)t);
          for (int li = 0; li < 3; ++li)
            ASSERT_EQ(std::vector<int32_t>(s.list(li), s.list(li) + s.size(li)), want)
                << n << " " << sinks << " " << window;
        }
  for (int64_t n : {1, 15, 33}) {
    select_all(n, 4, GqaMode::Head, s);
    check_wellformed(s, GqaMode::Head, 4, n);
    for (int li = 0; li < 4; ++li) ASSERT_TRUE(is_all(s, li, n));
  }
}

TEST(Selectors, RejectBadInput) {
  const HeadShape hs{12, 2, 64};
  std::mt19937 rng(4);
  std::normal_distribution<float> N(0.f, 1.f);
  auto env = make_env(hs, 40, [&](int64_t, int, float* k) {
    for (int i = 0; i < 64; ++i) k[i] = N(rng);
  });
  const std::vector<float> q = random_q(hs, rng);
  Selection s;
  auto quest = [&](const HeadShape& h, int layer, int64_t n, int64_t b) {
    select_quest(env->ks, env->seq, layer, h, q.data(), n, b, GqaMode::Group, s);
  };
  auto oracle = [&](const HeadShape& h, int layer, int64_t n, int64_t k) {
    select_topk_oracle(env->pool, env->seq, layer, h, q.data(), n, k, GqaMode::Head, s);
  };
  EXPECT_THROW(quest(hs, kLayer, 40, 0), tw::Error);
  EXPECT_THROW(quest(hs, kLayer, 40, -3), tw::Error);
  EXPECT_THROW(quest(hs, kLayer, 0, 16), tw::Error);
  EXPECT_THROW(quest(hs, kLayer, 49, 16), tw::Error);  // beyond the 3 reserved pages
  EXPECT_THROW(quest(hs, 2, 40, 16), tw::Error);
  EXPECT_THROW(quest({11, 2, 64}, kLayer, 40, 16), tw::Error);  // G not an integer
  EXPECT_THROW(quest({12, 3, 64}, kLayer, 40, 16), tw::Error);  // Hkv mismatch
  EXPECT_THROW(quest({12, 2, 128}, kLayer, 40, 16), tw::Error);  // d mismatch
  EXPECT_THROW(oracle(hs, kLayer, 40, 0), tw::Error);
  EXPECT_THROW(oracle(hs, kLayer, -1, 5), tw::Error);
  EXPECT_THROW(oracle({13, 2, 64}, kLayer, 40, 5), tw::Error);
  EXPECT_THROW(oracle(hs, kLayer, 64, 5), tw::Error);
  EXPECT_THROW(select_streaming(10, 2, 0, 2, GqaMode::Group, s), tw::Error);
  EXPECT_THROW(select_streaming(10, -1, 4, 2, GqaMode::Group, s), tw::Error);
  EXPECT_THROW(select_streaming(0, 2, 4, 2, GqaMode::Group, s), tw::Error);
  EXPECT_THROW(select_streaming(10, 2, 4, 0, GqaMode::Group, s), tw::Error);
  EXPECT_THROW(select_all(0, 2, GqaMode::Group, s), tw::Error);
  EXPECT_THROW(select_all(5, 0, GqaMode::Group, s), tw::Error);
  try {
    quest(hs, kLayer, 40, 0);
    FAIL() << "no error";
  } catch (const tw::Error& e) {
    EXPECT_NE(std::string(e.what()).find("budget"), std::string::npos) << e.what();
  }
  try {
    quest({11, 2, 64}, kLayer, 40, 16);
    FAIL() << "no error";
  } catch (const tw::Error& e) {
    EXPECT_NE(std::string(e.what()).find("multiple"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace tw::attn

namespace tw::attn {
namespace {

// Speed of append and Quest selection for the Qwen2.5 1.5B attention shape (H 12, Hkv 2, d 128).
// Not part of the suite; run with --gtest_also_run_disabled_tests --gtest_filter='*Bench*'.
TEST(SelectorsBench, DISABLED_AppendAndQuest) {
  using clk = std::chrono::steady_clock;
  auto us = [](clk::duration d) { return std::chrono::duration<double, std::micro>(d).count(); };
  const HeadShape hs{12, 2, 128};
  std::mt19937 rng(9);
  std::normal_distribution<float> N(0.f, 1.f);
  for (int64_t n : {4096, 32768}) {
    const kv::KVShape shape{1, 2, 128, n / kPageSize};
    kv::KVPool pool(shape);
    KeySide ks(shape);
    kv::SeqPages seq;
    pool.reserve(seq, n);
    std::vector<float> k(256), v(256);
    double t_fast = 0, t_ref = 0;
    for (int64_t t = 0; t < n; ++t) {
      for (auto& x : k) x = N(rng);
      pool.write(0, seq, t, k.data(), v.data());
      auto t0 = clk::now();
      ks.append(pool, 0, seq, t);
      auto t1 = clk::now();
      if (t % 8 == 0) ks.append_reference(pool, 0, seq, t);
      auto t2 = clk::now();
      t_fast += us(t1 - t0);
      t_ref += us(t2 - t1);
    }
    seq.n_tokens = n;
    std::printf("n_ctx %6lld  append (all kv heads of one layer): fast %.3f us/token, scalar reference %.3f us/token\n",
                (long long)n, t_fast / n, t_ref / (n / 8));
    std::vector<float> q((size_t)12 * 128);
    for (auto& x : q) x = N(rng);
    std::vector<float> sc((size_t)2 * (n / kPageSize));
    ThreadPool tp1(1), tp2(2);
    Selection s;
    const int64_t budget = n / 4;
    auto best = [&](const std::function<void()>& f) {
      double b = 1e30;
      for (int r = 0; r < 30; ++r) {
        auto t0 = clk::now();
        f();
        b = std::min(b, us(clk::now() - t0));
      }
      return b;
    };
    const double s1 = best([&] { quest_page_scores(ks, seq, 0, hs, q.data(), n, GqaMode::Group, sc.data()); });
    const double s2 = best([&] { quest_page_scores(ks, seq, 0, hs, q.data(), n, GqaMode::Group, sc.data(), &tp2); });
    const double q1 = best([&] { select_quest(ks, seq, 0, hs, q.data(), n, budget, GqaMode::Group, s); });
    const double q2 = best([&] { select_quest(ks, seq, 0, hs, q.data(), n, budget, GqaMode::Group, s, tp2); });
    const double qh = best([&] { select_quest(ks, seq, 0, hs, q.data(), n, budget, GqaMode::Head, s); });
    const double bytes = 2.0 * (n / kPageSize) * (2 * 128 + 8);  // 8-bit codes + {lo, s} per page and kv head
    std::printf("n_ctx %6lld  quest scores (group): %.1f us 1 thread (%.1f GB/s of bounds), %.1f us 2 threads\n",
                (long long)n, s1, bytes / s1 / 1e3, s2);
    std::printf("n_ctx %6lld  select_quest budget %lld: group %.1f us (1 thr) / %.1f us (2 thr), head %.1f us (1 thr)\n",
                (long long)n, (long long)budget, q1, q2, qh);
    const double o = best([&] { select_topk_oracle(pool, seq, 0, hs, q.data(), n, budget, GqaMode::Group, s); });
    std::printf("n_ctx %6lld  oracle top-k (group): %.1f us\n", (long long)n, o);
  }
}

}  // namespace
}  // namespace tw::attn
