#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <set>

#include "common/error.h"

namespace tw {
namespace {

std::vector<float> logits_of(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(p > 0 ? (float)std::log(p) : -std::numeric_limits<float>::infinity());
  return l;
}

TEST(Sampler, GreedyIsArgmaxLowestIdOnTies) {
  SamplerParams p;
  p.temp = 0;
  Sampler s(p, 5);
  const std::vector<float> l = {0.f, 3.f, -1.f, 3.f, 2.f};
  EXPECT_EQ(s.sample(l.data()), 1);
}

TEST(Sampler, TopKOneIsGreedyAtAnyTemperature) {
  SamplerParams p;
  p.temp = 5.f;
  p.top_k = 1;
  p.top_p = 1.f;
  p.min_p = 0.f;
  Sampler s(p, 4);
  const std::vector<float> l = {0.1f, 0.2f, 0.3f, 0.25f};
  for (int i = 0; i < 100; ++i) EXPECT_EQ(s.sample(l.data()), 2);
}

TEST(Sampler, PlainSamplingFollowsTheSoftmax) {
  const std::vector<double> probs = {0.5, 0.25, 0.15, 0.1};
  SamplerParams p;
  p.temp = 1.f;
  p.top_k = 0;
  p.top_p = 1.f;
  p.min_p = 0.f;
  p.seed = 42;
  Sampler s(p, 4);
  const std::vector<float> l = logits_of(probs);
  const int N = 40000;
  std::vector<int> count(4);
  for (int i = 0; i < N; ++i) ++count[s.sample(l.data())];
  for (int k = 0; k < 4; ++k) {
    const double sd = std::sqrt(N * probs[k] * (1 - probs[k]));
    EXPECT_NEAR(count[k], N * probs[k], 5 * sd) << "token " << k;
  }
}

TEST(Sampler, TemperatureSharpens) {
  // At T = 0.5 probabilities become p^2 / sum p^2.
  const std::vector<double> probs = {0.6, 0.3, 0.1};
  SamplerParams p;
  p.temp = 0.5f;
  p.top_k = 0;
  p.top_p = 1.f;
  p.min_p = 0.f;
  Sampler s(p, 3);
  const std::vector<float> l = logits_of(probs);
  const int N = 40000;
  std::vector<int> count(3);
  for (int i = 0; i < N; ++i) ++count[s.sample(l.data())];
  const double z = 0.36 + 0.09 + 0.01;
  const double want[3] = {0.36 / z, 0.09 / z, 0.01 / z};
  for (int k = 0; k < 3; ++k) EXPECT_NEAR(count[k], N * want[k], 5 * std::sqrt(N * want[k] * (1 - want[k])));
}

TEST(Sampler, TopPKeepsTheSmallestPrefixReachingP) {
  // Sorted mass: 0.4, 0.3, 0.2, 0.1. p = 0.7 -> {0, 1} exactly (0.4 + 0.3 reaches 0.7).
  // p = 0.71 -> {0, 1, 2}.
  const std::vector<float> l = logits_of({0.4, 0.3, 0.2, 0.1});
  for (auto [top_p, allowed] : std::vector<std::pair<float, std::set<int>>>{{0.69f, {0, 1}}, {0.71f, {0, 1, 2}}, {0.3f, {0}}}) {
    SamplerParams p;
    p.temp = 1.f;
    p.top_k = 0;
    p.min_p = 0.f;
    p.top_p = top_p;
    Sampler s(p, 4);
    std::set<int> seen;
    for (int i = 0; i < 5000; ++i) seen.insert(s.sample(l.data()));
    EXPECT_EQ(seen, allowed) << "top_p " << top_p;
  }
}

TEST(Sampler, MinPDropsTokensBelowFractionOfTheMax) {
  const std::vector<float> l = logits_of({0.5, 0.3, 0.12, 0.08});  // min_p 0.2 -> threshold 0.1: drops 0.08
  SamplerParams p;
  p.temp = 1.f;
  p.top_k = 0;
  p.top_p = 1.f;
  p.min_p = 0.2f;
  Sampler s(p, 4);
  std::set<int> seen;
  for (int i = 0; i < 5000; ++i) seen.insert(s.sample(l.data()));
  EXPECT_EQ(seen, (std::set<int>{0, 1, 2}));
}

TEST(Sampler, NegativeInfinityIsNeverSampled) {
  const std::vector<float> l = {-INFINITY, 0.f, -INFINITY, 0.f};
  SamplerParams p;
  p.temp = 1.f;
  p.top_k = 0;
  p.top_p = 1.f;
  p.min_p = 0.f;
  Sampler s(p, 4);
  for (int i = 0; i < 2000; ++i) {
    const int t = s.sample(l.data());
    EXPECT_TRUE(t == 1 || t == 3);
  }
}

TEST(Sampler, SeedMakesRunsReproducible) {
  std::vector<float> l(100);
  for (int i = 0; i < 100; ++i) l[i] = std::sin(i * 0.7f);
  SamplerParams p;
  p.top_k = 0;
  p.top_p = 1.f;
  p.min_p = 0.f;
  p.seed = 7;
  Sampler a(p, 100), b(p, 100);
  p.seed = 8;
  Sampler c(p, 100);
  std::vector<int> ra, rb, rc;
  for (int i = 0; i < 50; ++i) {
    ra.push_back(a.sample(l.data()));
    rb.push_back(b.sample(l.data()));
    rc.push_back(c.sample(l.data()));
  }
  EXPECT_EQ(ra, rb);
  EXPECT_NE(ra, rc);
}

TEST(Sampler, InvalidParametersAreErrors) {
  SamplerParams p;
  p.top_p = 0.f;
  EXPECT_THROW(p.validate(), Error);
  p.top_p = 1.5f;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.min_p = -0.1f;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.temp = NAN;
  EXPECT_THROW(p.validate(), Error);
  EXPECT_THROW(Sampler(SamplerParams{}, 0), Error);
}

}  // namespace
}  // namespace tw
