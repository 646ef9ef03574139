#include "attention/policy.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

#include "common/error.h"

namespace tw::attn {
namespace {

struct Fixture {
  kv::KVShape ks;
  HeadShape hs;
  kv::KVPool pool;
  kv::SeqPages seq;
  Fixture(int layers, int H, int Hkv, int d, int64_t n) : ks{layers, Hkv, d, n / 16 + 2}, hs{H, Hkv, d}, pool(ks) {}
  // Random keys with a few "important" tokens so attention is concentrated, as in real models.
  void fill(AttentionPolicy& pol, int64_t n, std::mt19937& rng) {
    std::normal_distribution<float> N(0.f, 1.f);
    pool.reserve(seq, n);
    std::vector<float> k(ks.n_kv_heads * ks.head_dim), v(k.size());
    for (int64_t t = 0; t < n; ++t) {
      const float boost = (t % 97 == 5) ? 3.f : 1.f;
      for (auto& x : k) x = N(rng) * boost;
      for (auto& x : v) x = N(rng);
      for (int l = 0; l < ks.n_layers; ++l) {
        pool.write(l, seq, t, k.data(), v.data());
        pol.on_append(pool, l, seq, t);
      }
    }
    seq.n_tokens = n;
  }
};

TEST(AttentionPolicy, TwilightWithoutSelectorAtPOneEqualsDense) {
  for (auto [H, Hkv, d] : {std::tuple{9, 3, 64}, std::tuple{12, 2, 128}}) {
    Fixture f(3, H, Hkv, d, 2000);
    AttnConfig c;
    c.method = Method::Twilight;
    c.base = Base::None;
    c.p = 1.f;
    c.skip_layers = 1;
    c.dense_below = 16;
    AttentionPolicy pol(c, f.ks, f.hs);
    std::mt19937 rng(11);
    f.fill(pol, 2000, rng);
    std::normal_distribution<float> N(0.f, 1.f);
    std::vector<float> q((size_t)H * d), out(q.size()), ref(q.size());
    for (auto& x : q) x = N(rng);
    ThreadPool tp(2);
    ASSERT_TRUE(pol.sparse_at(2, 2000));
    pol.decode(f.pool, f.seq, 2, q.data(), 2000, out.data(), tp);
    dense_decode(f.pool, f.seq, 2, f.hs, q.data(), 2000, ref.data(), tp);
    for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], ref[i], 1e-5f + 1e-5f * std::fabs(ref[i]));
    EXPECT_EQ(pol.stats().steps[pol.stats().at(2, 0)], 1);
    EXPECT_DOUBLE_EQ(pol.stats().i1[pol.stats().at(2, 0)], 2000);
  }
}

TEST(AttentionPolicy, DenseFallbacks) {
  Fixture f(3, 9, 3, 64, 600);
  AttnConfig c;
  c.method = Method::Quest;
  c.b0 = 512;
  c.skip_layers = 2;
  c.dense_below = 100;
  AttentionPolicy pol(c, f.ks, f.hs);
  EXPECT_FALSE(pol.sparse_at(1, 600));   // skip layer
  EXPECT_TRUE(pol.sparse_at(2, 600));
  EXPECT_FALSE(pol.sparse_at(2, 90));    // short context
  EXPECT_FALSE(pol.sparse_at(2, 500));   // budget covers the context
}

TEST(AttentionPolicy, TwilightPrunesAndTracksMass) {
  const int H = 12, Hkv = 2, d = 128;
  const int64_t n = 3000;
  Fixture f(1, H, Hkv, d, n);
  AttnConfig c;
  c.method = Method::Twilight;
  c.base = Base::Quest;
  c.b0 = 1024;
  c.p = 0.9f;
  c.skip_layers = 0;
  c.true_mass = true;
  AttentionPolicy pol(c, f.ks, f.hs);
  std::mt19937 rng(5);
  f.fill(pol, n, rng);
  std::normal_distribution<float> N(0.f, 1.f);
  std::vector<float> q((size_t)H * d), out(q.size());
  for (auto& x : q) x = N(rng) * 1.5f;
  ThreadPool tp(2);
  pol.decode(f.pool, f.seq, 0, q.data(), n, out.data(), tp);
  const BudgetStats& s = pol.stats();
  for (int i = 0; i < Hkv; ++i) {
    const size_t k = s.at(0, i);
    EXPECT_GE(s.i0[k], 1024 - 16);  // ceil(B0 / 16) pages, the last one partial
    EXPECT_LE(s.i0[k], 1024 + 32);  // whole pages, sink and last page
    EXPECT_LT(s.i1[k], s.i0[k]);    // top-p pruned something
    EXPECT_GE(s.est_mass[k], 0.9 - 1e-4);
    EXPECT_GT(s.true_mass[k], 0.0);
    EXPECT_LE(s.true_mass[k], 1.0 + 1e-9);
  }
  const std::string js = s.json(c);
  EXPECT_NE(js.find("\"avg_i1\""), std::string::npos);
  EXPECT_NE(js.find("\"avg_true_mass\""), std::string::npos);
}

// One policy, prefilled while dense (side data still maintained), switched to Quest and Twilight
// (group -> head mode): each decode equals a fresh policy of that configuration over the same cache.
TEST(AttentionPolicy, ReconfigureKeepsSideStructures) {
  const int H = 9, Hkv = 3, d = 64;
  const int64_t n = 2100;
  Fixture f(2, H, Hkv, d, n);
  AttnConfig tw;
  tw.method = Method::Twilight;
  tw.b0 = 512;
  tw.p = 0.9f;
  tw.skip_layers = 0;
  AttentionPolicy pol(tw, f.ks, f.hs);
  AttnConfig dense;
  pol.reconfigure(dense);
  EXPECT_TRUE(pol.needs_side());
  std::mt19937 rng(21);
  f.fill(pol, n, rng);

  AttnConfig quest = tw;
  quest.method = Method::Quest;
  AttnConfig tw_head = tw;
  tw_head.gqa = GqaMode::Head;
  std::normal_distribution<float> N(0.f, 1.f);
  std::vector<float> q((size_t)H * d), out(q.size()), ref(q.size());
  for (auto& x : q) x = N(rng) * 1.5f;
  ThreadPool tp(2);
  for (const AttnConfig& c : {quest, tw_head, tw}) {
    pol.reconfigure(c);
    EXPECT_EQ(pol.stats().n_lists, c.gqa == GqaMode::Group ? Hkv : H);
    AttentionPolicy fresh(c, f.ks, f.hs);
    for (int64_t t = 0; t < n; ++t)
      for (int l = 0; l < 2; ++l) fresh.on_append(f.pool, l, f.seq, t);
    pol.decode(f.pool, f.seq, 1, q.data(), n, out.data(), tp);
    fresh.decode(f.pool, f.seq, 1, q.data(), n, ref.data(), tp);
    for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], ref[i]) << c.describe() << " at " << i;
    EXPECT_EQ(pol.stats().i1, fresh.stats().i1) << c.describe();
    EXPECT_EQ(pol.stats().steps[pol.stats().at(1, 0)], 1);  // stats restarted at the switch
  }
  // A policy built without side structures cannot switch to a method that needs them.
  AttentionPolicy plain(dense, f.ks, f.hs);
  EXPECT_FALSE(plain.needs_side());
  EXPECT_THROW(plain.reconfigure(quest), Error);
  AttnConfig bad = tw;
  bad.p = 1.5f;
  EXPECT_THROW(pol.reconfigure(bad), Error);
  EXPECT_EQ(pol.config().method, Method::Twilight);  // unchanged after a refused switch
}

TEST(AttnConfig, BadValuesAreErrors) {
  AttnConfig c;
  EXPECT_THROW(set_attn_option(c, "attn", "sparse"), Error);
  EXPECT_THROW((set_attn_option(c, "attn", "ds"), c.validate()), Error);  // ds needs --attn-ds-file
  EXPECT_THROW(set_attn_option(c, "attn-base", "magic"), Error);
  EXPECT_THROW(set_attn_option(c, "attn-p", "x"), Error);
  EXPECT_THROW(set_attn_option(c, "attn-b0", "1.5"), Error);
  EXPECT_THROW(set_attn_option(c, "attn-gqa", "both"), Error);
  EXPECT_THROW(set_attn_option(c, "colour", "blue"), Error);
  for (float p : {0.f, -0.1f, 1.01f}) {
    c = {};
    c.p = p;
    EXPECT_THROW(c.validate(), Error) << p;
  }
  c = {};
  c.b0 = -1;
  EXPECT_THROW(c.validate(), Error);
  c = {};
  c.min_tokens = 10;
  c.max_tokens = 5;
  EXPECT_THROW(c.validate(), Error);
}

TEST(AttnConfig, ConfigFileWithLineNumbersInErrors) {
  const std::string path = ::testing::TempDir() + "/attn.conf";
  {
    std::ofstream o(path);
    o << "# twilight over quest\nattn = twilight\nattn-p = 0.85  # LongChat default\nattn-b0=4096\nattn-gqa = head\n";
  }
  AttnConfig c;
  load_attn_config(path, c);
  EXPECT_EQ(c.method, Method::Twilight);
  EXPECT_FLOAT_EQ(c.p, 0.85f);
  EXPECT_EQ(c.b0, 4096);
  EXPECT_EQ(c.gqa, GqaMode::Head);
  {
    std::ofstream o(path);
    o << "attn = twilight\n\nattn-p 0.9\n";
  }
  try {
    load_attn_config(path, c);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("attn.conf:3"), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_attn_config("/nonexistent/attn.conf", c), Error);
}

TEST(AttentionPolicy, TrueMassSplitAddsUpAndTheBoundHolds) {
  // Debug mode: outside + allowed + group + estimate = 1 - true mass (I1 inside I0'), per list and step;
  // the exact-z bound never falls below the true outside mass.
  for (const GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
    const int H = 9, Hkv = 3, d = 64;
    const int64_t n = 2500;
    Fixture f(1, H, Hkv, d, n);
    AttnConfig c;
    c.method = Method::Twilight;
    c.b0 = 600;
    c.p = 0.9f;
    c.skip_layers = 0;
    c.gqa = mode;
    c.true_mass = true;
    AttentionPolicy pol(c, f.ks, f.hs);
    std::mt19937 rng(15);
    f.fill(pol, n, rng);
    std::normal_distribution<float> N(0.f, 1.f);
    std::vector<float> q((size_t)H * d), out(q.size());
    ThreadPool tp(2);
    for (int step = 0; step < 2; ++step) {
      for (auto& x : q) x = N(rng) * 1.5f;
      pol.decode(f.pool, f.seq, 0, q.data(), n, out.data(), tp);
    }
    const BudgetStats& s = pol.stats();
    for (int i = 0; i < s.n_lists; ++i) {
      const size_t k = s.at(0, i);
      ASSERT_EQ(s.steps[k], 2);
      const double parts = s.loss_outside[k] + s.loss_allowed[k] + s.loss_group[k] + s.loss_estimate[k];
      EXPECT_NEAR(parts, 2 - s.true_mass[k], 1e-6) << i;
      EXPECT_GT(s.loss_outside[k], 0.0);  // B0 = 600 of 2500 misses some mass
      EXPECT_NEAR(s.loss_outside[k], 2 - s.true_i0[k], 1e-9);
      EXPECT_LE(s.true_min[k], s.true_mass[k] + 1e-12);
      EXPECT_EQ(s.bound_violations[k], 0);
      EXPECT_GE(s.bound_exact[k], s.loss_outside[k] - 1e-9);  // max over heads >= their mean
      EXPECT_GT(s.bound_slack[k], 0.0);
    }
    const std::string js = s.json(c);
    for (const char* key : {"avg_true_min", "avg_loss_outside", "avg_loss_estimate", "bound_violations"})
      EXPECT_NE(js.find(key), std::string::npos) << key;
  }
}

TEST(AttentionPolicy, GuardAtPOneOverQuestEqualsDense) {
  // p = 1 tolerates no mass outside I0: the guard (widen / all) brings the whole context in and
  // p = 1 keeps it, so Twilight over Quest equals dense attention.
  for (const char* g : {"widen", "all", "dense"}) {
    const int H = 12, Hkv = 2, d = 128;
    const int64_t n = 1800;
    Fixture f(1, H, Hkv, d, n);
    AttnConfig c;
    c.method = Method::Twilight;
    c.b0 = 300;
    c.p = 1.f;
    c.skip_layers = 0;
    set_attn_option(c, "attn-guard", g);
    AttentionPolicy pol(c, f.ks, f.hs);
    std::mt19937 rng(8);
    f.fill(pol, n, rng);
    std::normal_distribution<float> N(0.f, 1.f);
    std::vector<float> q((size_t)H * d), out(q.size()), ref(q.size());
    for (auto& x : q) x = N(rng);
    ThreadPool tp(2);
    pol.decode(f.pool, f.seq, 0, q.data(), n, out.data(), tp);
    dense_decode(f.pool, f.seq, 0, f.hs, q.data(), n, ref.data(), tp);
    for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], ref[i], 1e-5f + 1e-5f * std::fabs(ref[i])) << g;
    const BudgetStats& s = pol.stats();
    for (int i = 0; i < Hkv; ++i) {
      EXPECT_EQ(s.guard_acts[s.at(0, i)], 1) << g;
      EXPECT_GT(s.bound0[s.at(0, i)], 0.0);
      EXPECT_EQ(s.bound[s.at(0, i)], 0.0);
    }
    EXPECT_NE(s.json(c).find("\"avg_bound0\""), std::string::npos);
  }
}

TEST(AttnConfig, GuardAndCombineOptions) {
  AttnConfig c;
  set_attn_option(c, "attn-combine", "union");
  set_attn_option(c, "attn-guard", "widen");
  set_attn_option(c, "attn-guard-frac", "0.5");
  set_attn_option(c, "attn-widen-max", "0.25");
  EXPECT_EQ(c.combine, GroupCombine::Union);
  EXPECT_EQ(c.guard, Guard::Widen);
  EXPECT_FLOAT_EQ(c.guard_frac, 0.5f);
  EXPECT_FLOAT_EQ(c.widen_max, 0.25f);
  c.method = Method::Twilight;
  EXPECT_NE(c.describe().find("guard widen"), std::string::npos);
  EXPECT_NE(c.describe().find("combine union"), std::string::npos);
  EXPECT_NO_THROW(c.validate());
  EXPECT_THROW(set_attn_option(c, "attn-combine", "max"), Error);
  EXPECT_THROW(set_attn_option(c, "attn-guard", "on"), Error);
  EXPECT_THROW(set_attn_option(c, "attn-guard-frac", "half"), Error);
  c.guard_frac = 1.5f;
  EXPECT_THROW(c.validate(), Error);
  c.guard_frac = 1.f;
  c.widen_max = 0.f;
  EXPECT_THROW(c.validate(), Error);
}

}  // namespace
}  // namespace tw::attn
