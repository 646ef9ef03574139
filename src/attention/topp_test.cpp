// Exact top-p selection (radix select) against the sort reference, plus the defining properties
// checked directly: mass >= p * total, and minimality (dropping the lightest kept value together
// with its ties falls below the target).
#include "attention/topp.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/error.h"

namespace tw::attn {
namespace {

// Checks the definition on its own terms (double sums, independent of either implementation).
void check_properties(const std::vector<float>& w, float p, const std::vector<int32_t>& kept, const ToppResult& r) {
  double total = 0.0;
  for (float x : w) total += x;
  if (total == 0.0) {
    EXPECT_TRUE(kept.empty());
    return;
  }
  ASSERT_FALSE(kept.empty());
  ASSERT_TRUE(std::is_sorted(kept.begin(), kept.end()));
  float tau = INFINITY;
  double mass = 0.0;
  for (int32_t i : kept) {
    ASSERT_GT(w[i], 0.f) << "zero weight kept at " << i;
    tau = std::min(tau, w[i]);
    mass += w[i];
  }
  EXPECT_EQ(tau, r.tau);
  EXPECT_EQ((int64_t)kept.size(), r.n_kept);
  // The kept set is exactly {w >= tau}.
  int64_t n_ge = 0;
  for (float x : w) n_ge += (x >= tau && x > 0.f);
  EXPECT_EQ(n_ge, (int64_t)kept.size());
  const double target = (double)p * total;
  const double rel = 1e-12 * total;  // summation-order slack between this check and the implementation
  EXPECT_GE(mass, target - rel) << "kept mass below p";
  if (p < 1.f) {
    double without = 0.0;  // mass of {w > tau}: dropping tau and all its ties must fall short
    for (float x : w)
      if (x > tau) without += x;
    EXPECT_LT(without, target + rel) << "not minimal: the set without tau's ties already reaches p";
  }
}

void check_case(const std::vector<float>& w, float p, const char* what) {
  SCOPED_TRACE(::testing::Message() << what << " n=" << w.size() << " p=" << p);
  std::vector<int32_t> fast, ref;
  const ToppResult rf = topp_select(w.data(), (int64_t)w.size(), p, fast);
  const ToppResult rr = topp_select_reference(w.data(), (int64_t)w.size(), p, ref);
  EXPECT_EQ(rf.tau, rr.tau);
  ASSERT_EQ(fast, ref);
  check_properties(w, p, fast, rf);
}

std::vector<float> softmax_of(const std::vector<float>& z) {
  float mx = -INFINITY;
  for (float x : z) mx = std::max(mx, x);
  std::vector<float> w(z.size());
  double s = 0;
  for (size_t i = 0; i < z.size(); ++i) s += (w[i] = std::exp(z[i] - mx));
  for (float& x : w) x = (float)(x / s);
  return w;
}

const float kPs[] = {1e-6f, 0.1f, 0.5f, 0.85f, 0.9f, 0.95f, 0.99f, 0.999f, 1.f};

TEST(Topp, RandomSoftmaxesMatchSortReference) {
  std::mt19937 rng(42);
  for (int64_t n : {2, 3, 17, 100, 255, 256, 257, 1000, 4096, 8192, 20000}) {
    for (float temp : {0.1f, 1.f, 3.f, 10.f}) {
      std::normal_distribution<float> N(0.f, temp);
      std::vector<float> z(n);
      for (auto& x : z) x = N(rng);
      const std::vector<float> w = softmax_of(z);
      for (float p : kPs) check_case(w, p, "softmax");
    }
  }
}

TEST(Topp, Adversarial) {
  std::mt19937 rng(7);
  // Uniform: every weight ties; whatever p, all are kept (no subset of ties is allowed).
  for (int64_t n : {1, 5, 300, 5000}) {
    std::vector<float> w(n, 1.f / n);
    for (float p : kPs) {
      check_case(w, p, "uniform");
      std::vector<int32_t> k;
      topp_select(w.data(), n, p, k);
      EXPECT_EQ((int64_t)k.size(), n);
    }
  }
  // One-hot (the rest exactly 0): always exactly the one index.
  for (int64_t n : {1, 2, 1000}) {
    std::vector<float> w(n, 0.f);
    w[n / 2] = 1.f;
    for (float p : kPs) {
      check_case(w, p, "one-hot");
      std::vector<int32_t> k;
      topp_select(w.data(), n, p, k);
      ASSERT_EQ(k, std::vector<int32_t>{(int32_t)(n / 2)});
    }
  }
  // Heavy ties: few distinct values, many copies (large boundary buckets hit levels 2 and 3).
  for (int distinct : {2, 3, 10}) {
    std::vector<float> w(6000);
    for (auto& x : w) x = (float)(1 + rng() % distinct);
    double s = 0;
    for (float x : w) s += x;
    for (auto& x : w) x = (float)(x / s);
    for (float p : kPs) check_case(w, p, "ties");
  }
  // Values that differ only in the low mantissa bits (same level-1 and level-2 bucket).
  {
    std::vector<float> w(3000);
    for (size_t i = 0; i < w.size(); ++i) {
      uint32_t u = 0x3a000000u | (uint32_t)(rng() % 200);
      std::memcpy(&w[i], &u, 4);
    }
    for (float p : kPs) check_case(w, p, "low bits");
  }
  // Many zeros (softmax of -inf scores) mixed with a few positives, and subnormals.
  {
    std::vector<float> z(10000, -INFINITY);
    for (int i = 0; i < 37; ++i) z[rng() % z.size()] = (float)(rng() % 5);
    std::vector<float> w(z.size(), 0.f);
    float mx = -INFINITY;
    for (float x : z) mx = std::max(mx, x);
    double s = 0;
    for (size_t i = 0; i < z.size(); ++i) s += (w[i] = std::exp(z[i] - mx));
    for (auto& x : w) x = (float)(x / s);
    for (float p : kPs) check_case(w, p, "zeros");
    w[3] = 1e-40f;  // subnormal: bucket 0 of level 1
    w[4] = 3e-41f;
    for (float p : kPs) check_case(w, p, "subnormals");
    std::vector<int32_t> k;
    topp_select(w.data(), (int64_t)w.size(), 1.f, k);
    EXPECT_TRUE(std::find(k.begin(), k.end(), 4) != k.end()) << "p = 1 keeps every positive weight";
  }
  // Sums off by 1e-6 either way: the target scales with the true sum.
  for (float f : {1.f - 1e-6f, 1.f + 1e-6f, 0.5f, 3.f}) {
    std::normal_distribution<float> N(0.f, 2.f);
    std::vector<float> z(5000);
    for (auto& x : z) x = N(rng);
    std::vector<float> w = softmax_of(z);
    for (auto& x : w) x *= f;
    for (float p : kPs) check_case(w, p, "scaled sum");
  }
}

TEST(Topp, TinyPKeepsTheMaxAndItsTies) {
  std::vector<float> w = {0.1f, 0.3f, 0.2f, 0.3f, 0.1f};
  std::vector<int32_t> k;
  const ToppResult r = topp_select(w.data(), 5, 1e-7f, k);
  EXPECT_EQ(k, (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(r.tau, 0.3f);
  topp_select(w.data(), 5, 0.6f, k);  // 0.3 + 0.3 = 0.6 reaches p exactly? rounding decides: check both sides
  std::vector<int32_t> ref;
  topp_select_reference(w.data(), 5, 0.6f, ref);
  EXPECT_EQ(k, ref);
  topp_select(w.data(), 5, 0.7f, k);
  EXPECT_EQ(k, (std::vector<int32_t>{1, 2, 3}));
  topp_select(w.data(), 5, 0.85f, k);  // 0.8 < 0.85: the two 0.1 ties come in together
  EXPECT_EQ(k, (std::vector<int32_t>{0, 1, 2, 3, 4}));
}

TEST(Topp, EdgeSizesAndErrors) {
  std::vector<int32_t> k = {5};
  ToppResult r = topp_select(nullptr, 0, 0.9f, k);
  EXPECT_TRUE(k.empty());
  EXPECT_EQ(r.n_kept, 0);
  const float one = 0.7f;
  r = topp_select(&one, 1, 0.3f, k);
  EXPECT_EQ(k, std::vector<int32_t>{0});
  const std::vector<float> zeros(10, 0.f);
  r = topp_select(zeros.data(), 10, 1.f, k);
  EXPECT_TRUE(k.empty()) << "all-zero weights carry no mass";
  const std::vector<float> negz = {-0.f, 0.5f};
  topp_select(negz.data(), 2, 1.f, k);
  EXPECT_EQ(k, std::vector<int32_t>{1});

  const std::vector<float> w = {0.2f, 0.8f};
  EXPECT_THROW(topp_select(w.data(), 2, 0.f, k), Error);
  EXPECT_THROW(topp_select(w.data(), 2, -0.5f, k), Error);
  EXPECT_THROW(topp_select(w.data(), 2, 1.0001f, k), Error);
  EXPECT_THROW(topp_select(w.data(), 2, NAN, k), Error);
  for (float bad : {-0.1f, NAN, INFINITY}) {
    const std::vector<float> b = {0.2f, bad, 0.3f};
    EXPECT_THROW(topp_select(b.data(), 3, 0.5f, k), Error) << bad;
    EXPECT_THROW(topp_select_reference(b.data(), 3, 0.5f, k), Error) << bad;
  }
  EXPECT_THROW(topp_select(w.data(), -1, 0.5f, k), Error);
}

TEST(Topp, HugeN) {
  std::mt19937 rng(3);
  const int64_t n = 1 << 20;
  std::exponential_distribution<float> E(1.f);
  std::vector<float> z(n);
  for (auto& x : z) x = E(rng) * 4.f;
  const std::vector<float> w = softmax_of(z);
  std::vector<int32_t> k;
  const auto t0 = std::chrono::steady_clock::now();
  const ToppResult r = topp_select(w.data(), n, 0.9f, k);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  RecordProperty("ms", std::to_string(ms));
  check_properties(w, 0.9f, k, r);  // the definition checked directly (no 1M-element reference sort)
  std::vector<float> flat(n, 1.f / n);  // 1M ties: the boundary bucket is the whole array
  check_case(flat, 0.5f, "1M uniform");
}

TEST(TopK, HeaviestWithIndexTieBreak) {
  const std::vector<float> w = {0.1f, 0.4f, 0.1f, 0.3f, 0.1f};
  std::vector<int32_t> idx;
  top_k_indices(w.data(), 5, 3, idx);
  EXPECT_EQ(idx, (std::vector<int32_t>{0, 1, 3}));
  top_k_indices(w.data(), 5, 0, idx);
  EXPECT_TRUE(idx.empty());
  top_k_indices(w.data(), 5, 9, idx);
  EXPECT_EQ(idx.size(), 5u);
}

}  // namespace
}  // namespace tw::attn
