// Double Sparsity: the channel file (round trip, malformed files, model mismatch), the label cache
// against a from-scratch copy of the pool's fp16 K after random appends / truncations / page reuse,
// and select_ds against a brute-force reference that scores with the channels straight from the
// fp16 cache in double and sorts (random shapes and both GQA modes, exact ties, NaN scores,
// budget >= context, threads, bad input); the calibration statistic against a double reference;
// the policy's ds and Twilight-over-ds paths (file required, model checks, outputs).
#include "attention/select_ds.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention/policy.h"
#include "attention/select_util.h"
#include "attention/sparse_cpu.h"
#include "attention/test_util.h"
#include "common/error.h"
#include "common/fp16.h"

namespace tw::attn {
namespace {

using kv::kPageSize;

// Random channel lists: r distinct channels of [0, d) per (layer, kv head), in random order.
DsChannels random_channels(int n_layers, int hkv, int d, int r, std::mt19937& rng) {
  DsChannels c;
  c.arch = "llama";
  c.name = "test model";
  c.fingerprint = "0123456789abcdef";
  c.n_layers = n_layers;
  c.n_kv_heads = hkv;
  c.head_dim = d;
  c.r = r;
  c.calib_tokens = 100;
  std::vector<int32_t> all(d);
  for (int i = 0; i < n_layers * hkv; ++i) {
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    c.ch.insert(c.ch.end(), all.begin(), all.begin() + r);
  }
  return c;
}

std::string tmp_path(const std::string& name) { return ::testing::TempDir() + "ds_" + name; }

void write_text(const std::string& path, const std::string& text) {
  std::ofstream o(path);
  o << text;
}

// ---- the channel file

TEST(DsChannels, RoundTrip) {
  std::mt19937 rng(1);
  DsChannels c = random_channels(3, 2, 64, 16, rng);
  c.name = "SmolLM2 135M Instruct";  // names may contain spaces
  const std::string p = tmp_path("rt.txt");
  write_ds_channels(p, c);
  const DsChannels b = read_ds_channels(p);
  EXPECT_EQ(b.arch, c.arch);
  EXPECT_EQ(b.name, c.name);
  EXPECT_EQ(b.fingerprint, c.fingerprint);
  EXPECT_EQ(b.n_layers, 3);
  EXPECT_EQ(b.n_kv_heads, 2);
  EXPECT_EQ(b.head_dim, 64);
  EXPECT_EQ(b.r, 16);
  EXPECT_EQ(b.calib_tokens, 100);
  EXPECT_EQ(b.ch, c.ch);
  std::remove(p.c_str());
}

TEST(DsChannels, MalformedFilesAreErrors) {
  const std::string hdr =
      "twilight-ds-channels 1\narch llama\nname m\nfingerprint ab\nn_layers 1\nn_kv_heads 2\nhead_dim 8\nr 2\n"
      "calib_tokens 5\n";
  const std::string p = tmp_path("bad.txt");
  auto expect_error = [&](const std::string& text, const std::string& needle) {
    write_text(p, text);
    try {
      read_ds_channels(p);
      ADD_FAILURE() << "no error for: " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  write_text(p, hdr + "0 0 3 1\n0 1 0 7\n");
  EXPECT_EQ(read_ds_channels(p).ch, (std::vector<int32_t>{3, 1, 0, 7}));
  expect_error("hello\n", "not a Double Sparsity channel file");
  expect_error("twilight-ds-channels 2\n", "not a Double Sparsity channel file");
  expect_error(hdr + "0 0 3 1\n", "truncated");
  expect_error(hdr + "0 0 3 1\n0 1 0 8\n", "channel 8 outside [0, 8)");
  expect_error(hdr + "0 0 3 3\n0 1 0 7\n", "listed twice");
  expect_error(hdr + "0 0 3 1\n0 2 0 7\n", "expected the row of layer 0 head 1");
  expect_error(hdr + "0 0 3\n0 1 0 7\n", "expected 2 channels");
  expect_error(hdr + "0 0 3 1 2\n0 1 0 7\n", "more than 2 channels");
  expect_error(hdr + "0 0 3 1\n0 1 0 7\nextra\n", "trailing");
  std::string bad_r = hdr;
  bad_r.replace(bad_r.find("r 2"), 3, "r 9");
  expect_error(bad_r, "r must be an integer in [1, 8]");
  std::string no_name = hdr;
  no_name.replace(no_name.find("name m"), 6, "nome m");
  expect_error(no_name, "expected 'name ...'");
  EXPECT_THROW(read_ds_channels("/nonexistent/ds.txt"), Error);
  std::remove(p.c_str());
}

TEST(DsChannels, ModelMismatchIsAnError) {
  std::mt19937 rng(2);
  const DsChannels c = random_channels(30, 3, 64, 16, rng);
  EXPECT_NO_THROW(check_ds_model(c, "f", 30, 3, 64, c.fingerprint));
  EXPECT_NO_THROW(check_ds_model(c, "f", 30, 3, 64, ""));  // shape-only check
  EXPECT_THROW(check_ds_model(c, "f", 28, 3, 64, ""), Error);
  EXPECT_THROW(check_ds_model(c, "f", 30, 2, 64, ""), Error);
  EXPECT_THROW(check_ds_model(c, "f", 30, 3, 128, ""), Error);
  try {
    check_ds_model(c, "f", 30, 3, 64, "fedcba9876543210");
    ADD_FAILURE() << "fingerprint mismatch accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("calibrated for another model"), std::string::npos) << e.what();
  }
  // DsSide checks the pool shape against the channels.
  EXPECT_THROW((DsSide{kv::KVShape{30, 3, 128, 4}, c}), Error);
  EXPECT_THROW((DsSide{kv::KVShape{29, 3, 64, 4}, c}), Error);
}

// ---- the label cache

// Every valid slot of every page of seq: labels == the pool's fp16 K at the channels, bit for bit.
void check_labels(const kv::KVPool& pool, const DsSide& ds, int layer, const kv::SeqPages& seq) {
  const kv::KVShape& s = pool.shape();
  const int d = s.head_dim, r = ds.r();
  for (int64_t t = 0; t < seq.n_tokens; ++t) {
    const int32_t phys = seq.pages[t / kPageSize];
    const int slot = (int)(t % kPageSize);
    for (int h = 0; h < s.n_kv_heads; ++h) {
      const uint16_t* k = pool.k_page(layer, phys, h) + (size_t)slot * d;
      const int32_t* c = ds.channels().at(layer, h);
      for (int i = 0; i < r; ++i)
        ASSERT_EQ(ds.labels(layer, phys, h)[(size_t)i * kPageSize + slot], k[c[i]])
            << "layer " << layer << " token " << t << " head " << h << " channel " << c[i];
    }
  }
}

TEST(DsSide, MatchesFromScratchAfterRandomHistory) {
  for (const auto& [hkv, d, r] : {std::tuple{3, 64, 16}, std::tuple{2, 128, 32}, std::tuple{1, 8, 3}}) {
    std::mt19937 rng(11 + hkv * 7 + d);
    const kv::KVShape shape{2, hkv, d, 14};
    kv::KVPool pool(shape);
    DsSide ds(shape, random_channels(2, hkv, d, r, rng));
    EXPECT_EQ(ds.bytes(), (size_t)2 * 14 * hkv * kPageSize * r * 2);
    kv::SeqPages seqs[2];
    std::normal_distribution<float> N(0.f, 2.f);
    std::vector<float> k((size_t)hkv * d), v(k.size());
    int truncations = 0, releases = 0;
    auto append = [&](int si) {
      kv::SeqPages& seq = seqs[si];
      const int64_t pos = seq.n_tokens;
      if ((pos + kPageSize) / kPageSize > (int64_t)seq.pages.size() && pool.free_pages() == 0) return;
      pool.reserve(seq, pos + 1);
      for (int layer = 0; layer < 2; ++layer) {
        for (auto& x : k) x = N(rng);
        pool.write(layer, seq, pos, k.data(), v.data());
        ds.append(pool, layer, seq, pos);
      }
      seq.n_tokens = pos + 1;
    };
    for (int step = 0; step < 700; ++step) {
      const int si = (int)(rng() % 2);
      const int op = (int)(rng() % 100);
      if (op < 90) {
        append(si);
      } else if (op < 97) {
        seqs[si].n_tokens = seqs[si].n_tokens > 0 ? (int64_t)(rng() % seqs[si].n_tokens) : 0;
        append(si);
        ++truncations;
      } else {
        pool.release(seqs[si]);
        ++releases;
      }
      if (step % 5 == 0 || op >= 90)
        for (int layer = 0; layer < 2; ++layer)
          for (const auto& s : seqs) {
            check_labels(pool, ds, layer, s);
            if (::testing::Test::HasFatalFailure()) return;
          }
    }
    EXPECT_GT(truncations, 10);
    EXPECT_GT(releases, 2);
  }
}

TEST(DsSide, RejectsBadInput) {
  std::mt19937 rng(3);
  const kv::KVShape shape{1, 2, 16, 2};
  kv::KVPool pool(shape);
  DsSide ds(shape, random_channels(1, 2, 16, 4, rng));
  kv::SeqPages seq;
  pool.reserve(seq, 16);
  EXPECT_THROW(ds.append(pool, 0, seq, 16), Error);  // not reserved
  EXPECT_THROW(ds.append(pool, 0, seq, -1), Error);
  EXPECT_THROW(ds.append(pool, 1, seq, 0), Error);  // layer
  kv::KVPool other(kv::KVShape{1, 2, 16, 3});
  EXPECT_THROW(ds.append(other, 0, seq, 0), Error);  // pool shape
  DsChannels c = random_channels(1, 2, 16, 4, rng);
  c.ch[1] = c.ch[0];
  EXPECT_THROW((DsSide{shape, c}), Error);  // duplicate channel
  c = random_channels(1, 2, 16, 4, rng);
  c.ch.pop_back();
  EXPECT_THROW((DsSide{shape, c}), Error);  // wrong size
}

// ---- the selector

// Reference partial scores in double from the pool's fp16 K: ref [n_lists][n_ctx].
std::vector<double> ref_scores(const kv::KVPool& pool, const kv::SeqPages& seq, const DsChannels& ch, int layer,
                               const HeadShape& hs, const float* q, int64_t n_ctx, GqaMode mode) {
  const int d = hs.head_dim, G = hs.n_heads / hs.n_kv_heads;
  const int n_lists = mode == GqaMode::Group ? hs.n_kv_heads : hs.n_heads;
  std::vector<double> out((size_t)n_lists * n_ctx, -INFINITY);
  for (int hq = 0; hq < hs.n_heads; ++hq) {
    const int h = hq / G, li = mode == GqaMode::Group ? h : hq;
    const int32_t* c = ch.at(layer, h);
    for (int64_t t = 0; t < n_ctx; ++t) {
      const uint16_t* k = pool.k_page(layer, seq.pages[t / kPageSize], h) + (t % kPageSize) * d;
      double s = 0;
      for (int i = 0; i < ch.r; ++i) s += (double)q[(size_t)hq * d + c[i]] * fp16_to_fp32(k[c[i]]);
      double& o = out[(size_t)li * n_ctx + t];
      o = std::max(o, s);
    }
  }
  return out;
}

// Checks one list against the reference scores: ascending, unique, holds the current token, size
// budget or budget + 1 (the extra one is the current token), and every kept token scores at least
// every dropped one (within float rounding: tol).
void check_list(const Selection& sel, int li, const double* ref, int64_t n_ctx, int64_t budget, double tol) {
  const int32_t* l = sel.list(li);
  const int64_t n = sel.size(li);
  ASSERT_TRUE(std::is_sorted(l, l + n) && std::adjacent_find(l, l + n) == l + n) << "list " << li;
  ASSERT_TRUE(n > 0 && l[n - 1] == n_ctx - 1) << "current token missing from list " << li;
  std::vector<char> kept(n_ctx, 0);
  for (int64_t j = 0; j < n; ++j) kept[l[j]] = 1;
  // Without the current token, the kept set must be the top `budget` (or budget - 1 when the current
  // token is one of the best).
  double min_kept = INFINITY, max_dropped = -INFINITY;
  int64_t n_kept_wo_last = 0;
  for (int64_t t = 0; t < n_ctx - 1; ++t) {
    if (kept[t]) {
      min_kept = std::min(min_kept, ref[t]);
      ++n_kept_wo_last;
    } else {
      max_dropped = std::max(max_dropped, ref[t]);
    }
  }
  if (n == budget + 1) {
    ASSERT_EQ(n_kept_wo_last, budget);
    ASSERT_LE(ref[n_ctx - 1], min_kept + tol) << "current token added though it was among the best";
  } else {
    ASSERT_EQ(n, budget) << "list " << li;
    ASSERT_GE(ref[n_ctx - 1], max_dropped - tol) << "current token counted among the best but is not";
  }
  ASSERT_GE(min_kept, max_dropped - tol) << "list " << li << ": a dropped token outscores a kept one";
}

struct Case {
  int H, Hkv, d, r;
  int64_t n_ctx, budget;
};

class DsSelect : public ::testing::TestWithParam<Case> {};

TEST_P(DsSelect, RandomMatchesBruteForce) {
  const Case c = GetParam();
  std::mt19937 rng(5 + c.H * 3 + c.d + (int)c.n_ctx);
  const int layers = 2;
  const kv::KVShape shape{layers, c.Hkv, c.d, (c.n_ctx + kPageSize - 1) / kPageSize + 1};
  kv::KVPool pool(shape);
  const DsChannels ch = random_channels(layers, c.Hkv, c.d, c.r, rng);
  DsSide ds(shape, ch);
  kv::SeqPages seq;
  const int layer = 1;
  test_util::fill_random(pool, seq, layer, c.n_ctx, rng, 1.5f);
  for (int64_t t = 0; t < c.n_ctx; ++t) ds.append(pool, layer, seq, t);
  const HeadShape hs{c.H, c.Hkv, c.d};
  std::normal_distribution<float> N(0.f, 1.f);
  std::vector<float> q((size_t)c.H * c.d);
  ThreadPool tp(2);
  for (int trial = 0; trial < 3; ++trial) {
    for (auto& x : q) x = N(rng);
    for (GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
      const std::vector<double> ref = ref_scores(pool, seq, ch, layer, hs, q.data(), c.n_ctx, mode);
      const int n_lists = mode == GqaMode::Group ? c.Hkv : c.H;
      // The scores themselves.
      std::vector<float> s((size_t)n_lists * c.n_ctx);
      ds_token_scores(ds, seq, layer, hs, q.data(), c.n_ctx, mode, s.data());
      for (size_t i = 0; i < s.size(); ++i) ASSERT_NEAR(s[i], ref[i], 1e-4 * (1 + std::fabs(ref[i]))) << i;
      Selection a, b;
      select_ds(ds, seq, layer, hs, q.data(), c.n_ctx, c.budget, mode, a);
      select_ds(ds, seq, layer, hs, q.data(), c.n_ctx, c.budget, mode, b, &tp);
      EXPECT_EQ(a.tokens, b.tokens);  // threads do not change the result
      EXPECT_EQ(a.offsets, b.offsets);
      ASSERT_EQ(a.n_lists, n_lists);
      ASSERT_EQ(a.mode, mode);
      for (int li = 0; li < n_lists; ++li) {
        if (c.budget >= c.n_ctx) {
          ASSERT_EQ(a.size(li), c.n_ctx);
          for (int64_t t = 0; t < c.n_ctx; ++t) ASSERT_EQ(a.list(li)[t], t);
          continue;
        }
        check_list(a, li, ref.data() + (size_t)li * c.n_ctx, c.n_ctx, c.budget, 1e-3);
        if (HasFatalFailure()) return;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, DsSelect,
                         ::testing::Values(Case{9, 3, 64, 16, 1000, 125},     // SmolLM2, partial last page
                                           Case{12, 2, 128, 32, 4133, 1033},  // Qwen 1.5B, threaded path
                                           Case{14, 2, 64, 16, 777, 1},       // budget 1
                                           Case{4, 4, 32, 8, 300, 299},       // MHA, budget n - 1
                                           Case{8, 2, 64, 64, 64, 10},        // r = d: DS = exact top-k
                                           Case{3, 1, 16, 5, 17, 17},         // budget == n_ctx
                                           Case{6, 3, 64, 16, 40, 1000},      // budget > n_ctx
                                           Case{2, 1, 8, 2, 1, 1}));          // one token

// Exact ties: integer keys and queries make every score exact in float, so the result must equal a
// stable sort of the reference (descending score, then ascending position).
TEST(DsSelectTies, TieToLowerPositions) {
  std::mt19937 rng(9);
  const int H = 6, Hkv = 2, d = 32, r = 4;
  const int64_t n = 200, budget = 37;
  const kv::KVShape shape{1, Hkv, d, 13};
  kv::KVPool pool(shape);
  const DsChannels ch = random_channels(1, Hkv, d, r, rng);
  DsSide ds(shape, ch);
  kv::SeqPages seq;
  pool.reserve(seq, n);
  std::vector<float> k((size_t)Hkv * d), v(k.size(), 0.f);
  for (int64_t t = 0; t < n; ++t) {
    for (auto& x : k) x = (float)((int)(rng() % 3) - 1);  // {-1, 0, 1}: few distinct scores, many ties
    pool.write(0, seq, t, k.data(), v.data());
    ds.append(pool, 0, seq, t);
  }
  seq.n_tokens = n;
  const HeadShape hs{H, Hkv, d};
  std::vector<float> q((size_t)H * d);
  for (auto& x : q) x = (float)((int)(rng() % 5) - 2);
  for (GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
    const std::vector<double> ref = ref_scores(pool, seq, ch, 0, hs, q.data(), n, mode);
    Selection sel;
    select_ds(ds, seq, 0, hs, q.data(), n, budget, mode, sel);
    for (int li = 0; li < sel.n_lists; ++li) {
      const double* s = ref.data() + (size_t)li * n;
      std::vector<int32_t> order(n);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return s[a] > s[b]; });
      std::vector<int32_t> want(order.begin(), order.begin() + budget);
      if (std::find(want.begin(), want.end(), (int32_t)(n - 1)) == want.end()) want.push_back((int32_t)(n - 1));
      std::sort(want.begin(), want.end());
      ASSERT_EQ(std::vector<int32_t>(sel.list(li), sel.list(li) + sel.size(li)), want) << "list " << li;
    }
  }
  // All keys equal: every score ties, the first `budget` tokens win (plus the current one).
  for (int64_t t = 0; t < n; ++t) {
    std::fill(k.begin(), k.end(), 0.5f);
    pool.write(0, seq, t, k.data(), v.data());
    ds.append(pool, 0, seq, t);
  }
  Selection sel;
  select_ds(ds, seq, 0, hs, q.data(), n, budget, GqaMode::Group, sel);
  for (int li = 0; li < sel.n_lists; ++li) {
    ASSERT_EQ(sel.size(li), budget + 1);
    for (int64_t j = 0; j < budget; ++j) ASSERT_EQ(sel.list(li)[j], j);
    ASSERT_EQ(sel.list(li)[budget], n - 1);
  }
}

// A NaN score (0 * inf from an inf key) cannot rule a token out: it ranks as +inf.
TEST(DsSelectTies, NaNScoreRanksFirst) {
  const int H = 2, Hkv = 1, d = 8;
  const kv::KVShape shape{1, Hkv, d, 4};
  kv::KVPool pool(shape);
  DsChannels ch;
  ch.arch = "llama";
  ch.fingerprint = "x";
  ch.n_layers = 1;
  ch.n_kv_heads = 1;
  ch.head_dim = d;
  ch.r = 2;
  ch.ch = {1, 4};
  DsSide ds(shape, ch);
  kv::SeqPages seq;
  const int64_t n = 40;
  pool.reserve(seq, n);
  std::vector<float> k(d), v(d, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    std::fill(k.begin(), k.end(), 0.f);
    k[1] = (float)t * 0.01f;                // increasing score with q[1] > 0
    if (t == 7) k[4] = INFINITY;            // q[4] = 0 -> 0 * inf = NaN
    pool.write(0, seq, t, k.data(), v.data());
    ds.append(pool, 0, seq, t);
  }
  seq.n_tokens = n;
  std::vector<float> q((size_t)H * d, 0.f);
  q[1] = 1.f;
  q[d + 1] = 0.5f;
  Selection sel;
  select_ds(ds, seq, 0, HeadShape{H, Hkv, d}, q.data(), n, 3, GqaMode::Group, sel);
  EXPECT_EQ(std::vector<int32_t>(sel.list(0), sel.list(0) + sel.size(0)), (std::vector<int32_t>{7, 38, 39}));
}

TEST(DsSelectTies, RejectsBadInput) {
  std::mt19937 rng(4);
  const kv::KVShape shape{2, 2, 16, 4};
  kv::KVPool pool(shape);
  DsSide ds(shape, random_channels(2, 2, 16, 4, rng));
  kv::SeqPages seq;
  test_util::fill_random(pool, seq, 0, 40, rng, 1.f);
  std::vector<float> q(4 * 16, 1.f);
  Selection sel;
  const HeadShape hs{4, 2, 16};
  EXPECT_THROW(select_ds(ds, seq, 0, hs, q.data(), 40, 0, GqaMode::Group, sel), Error);    // budget
  EXPECT_THROW(select_ds(ds, seq, 0, hs, q.data(), 0, 8, GqaMode::Group, sel), Error);     // n_ctx
  EXPECT_THROW(select_ds(ds, seq, 0, hs, q.data(), 49, 8, GqaMode::Group, sel), Error);    // beyond pages
  EXPECT_THROW(select_ds(ds, seq, 2, hs, q.data(), 40, 8, GqaMode::Group, sel), Error);    // layer
  EXPECT_THROW(select_ds(ds, seq, 0, hs, nullptr, 40, 8, GqaMode::Group, sel), Error);     // q
  EXPECT_THROW(select_ds(ds, seq, 0, HeadShape{4, 2, 32}, q.data(), 40, 8, GqaMode::Group, sel), Error);  // d
  EXPECT_THROW(select_ds(ds, seq, 0, HeadShape{5, 2, 16}, q.data(), 40, 8, GqaMode::Group, sel), Error);  // H % Hkv
}


// ---- the shared top-k helper (radix select) against nth_element + sort on adversarial keys

TEST(SelectUtil, TopKAndLastMatchesSortReference) {
  std::mt19937 rng(17);
  std::normal_distribution<float> N(0.f, 1.f);
  const float specials[] = {0.f, -0.f, NAN, INFINITY, -INFINITY, 1e-40f, -1e-40f, 3.4e38f, -3.4e38f, 1.f, -1.f};
  std::vector<int32_t> tmp;
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t n = trial < 50 ? 1 + trial : 1 + (int64_t)(rng() % 3000);
    std::vector<float> key(n);
    const int kind = trial % 5;
    for (auto& x : key) {
      if (kind == 0) x = N(rng);
      else if (kind == 1) x = (float)(int)(rng() % 4);                 // heavy ties
      else if (kind == 2) x = specials[rng() % std::size(specials)];   // NaN, +-inf, +-0, denormals
      else if (kind == 3) x = 0.5f;                                    // all equal
      else x = N(rng) * 1e-3f + (float)(rng() % 2);                    // two clusters
    }
    const int64_t k = 1 + (int64_t)(rng() % (n + 2));  // also k >= n
    Selection got;
    got.clear(GqaMode::Group, 1);
    detail::push_top_k_and_last(got, key.data(), n, k, tmp);
    // Reference: stable sort by the ranking key (NaN as +inf; -0 == +0), take k, add the last, sort.
    std::vector<int32_t> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(),
                     [&](int32_t a, int32_t b) { return detail::rank_key(key[a]) > detail::rank_key(key[b]); });
    idx.resize(std::min(k, n));
    if (std::find(idx.begin(), idx.end(), (int32_t)(n - 1)) == idx.end()) idx.push_back((int32_t)(n - 1));
    std::sort(idx.begin(), idx.end());
    ASSERT_EQ(std::vector<int32_t>(got.list(0), got.list(0) + got.size(0)), idx) << "trial " << trial << " n " << n << " k " << k;
  }
}

// ---- calibration statistic

TEST(DsCalibration, MatchesReferenceAndFindsPlantedChannels) {
  const int L = 2, H = 6, Hkv = 2, d = 16, G = H / Hkv;
  std::mt19937 rng(21);
  std::normal_distribution<float> N(0.f, 1.f);
  DsCalibration cal(L, H, Hkv, d);
  std::vector<double> ref((size_t)L * Hkv * d, 0.0);
  for (int chunk = 0; chunk < 3; ++chunk) {
    const int64_t n = 5 + chunk;
    for (int l = 0; l < L; ++l) {
      std::vector<float> q((size_t)n * H * d), k((size_t)n * Hkv * d);
      for (auto& x : q) x = N(rng);
      for (auto& x : k) x = N(rng);
      // Layer 1, kv head 1: channels 11 and 3 are heavy in q and k (channel 11 more).
      for (int64_t t = 0; t < n; ++t) {
        k[(t * Hkv + 1) * d + 11] *= 8.f;
        k[(t * Hkv + 1) * d + 3] *= 5.f;
      }
      if (l == 0) std::fill(k.begin(), k.end(), 0.f);  // layer 0: all statistics 0 (ties)
      for (int64_t t = 0; t < n; ++t)
        for (int hq = 0; hq < H; ++hq)
          for (int c = 0; c < d; ++c)
            ref[((size_t)l * Hkv + hq / G) * d + c] +=
                std::fabs((double)q[(t * H + hq) * d + c] * k[(t * Hkv + hq / G) * d + c]);
      cal.add(l, n, q.data(), k.data());
    }
  }
  EXPECT_EQ(cal.tokens(0), 5 + 6 + 7);
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < Hkv; ++h)
      for (int c = 0; c < d; ++c)
        ASSERT_NEAR(cal.sum(l, h)[c], ref[((size_t)l * Hkv + h) * d + c], 1e-9 * (1 + ref[((size_t)l * Hkv + h) * d + c]));
  const DsChannels ch = cal.channels(4);
  EXPECT_EQ(ch.calib_tokens, 18);
  EXPECT_NO_THROW(ch.validate("calibrated"));
  EXPECT_EQ((std::vector<int32_t>(ch.at(0, 0), ch.at(0, 0) + 4)), (std::vector<int32_t>{0, 1, 2, 3}));  // ties: lower first
  EXPECT_EQ(ch.at(1, 1)[0], 11);
  EXPECT_EQ(ch.at(1, 1)[1], 3);
  // Ranked by the reference statistic.
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < Hkv; ++h) {
      std::vector<int32_t> idx(d);
      std::iota(idx.begin(), idx.end(), 0);
      const double* s = ref.data() + ((size_t)l * Hkv + h) * d;
      std::stable_sort(idx.begin(), idx.end(), [s](int a, int b) { return s[a] > s[b]; });
      if (l == 1) {
        EXPECT_EQ((std::vector<int32_t>(ch.at(l, h), ch.at(l, h) + 4)), (std::vector<int32_t>(idx.begin(), idx.begin() + 4)));
      }
    }
  EXPECT_THROW(cal.channels(0), Error);
  EXPECT_THROW(cal.channels(17), Error);
  EXPECT_THROW(cal.add(2, 1, nullptr, nullptr), Error);
}

// ---- the policy: --attn ds and --attn-base ds

TEST(DsPolicy, NeedsAFileForThisModel) {
  AttnConfig c;
  set_attn_option(c, "attn", "ds");
  EXPECT_EQ(c.method, Method::DS);
  EXPECT_THROW(c.validate(), Error);  // no file
  c.method = Method::Twilight;
  set_attn_option(c, "attn-base", "ds");
  EXPECT_EQ(c.base, Base::DS);
  EXPECT_THROW(c.validate(), Error);
  std::mt19937 rng(8);
  DsChannels ch = random_channels(3, 3, 64, 16, rng);
  const std::string p = tmp_path("policy.txt");
  write_ds_channels(p, ch);
  set_attn_option(c, "attn-ds-file", p);
  EXPECT_NO_THROW(c.validate());
  const HeadShape hs{9, 3, 64};
  EXPECT_NO_THROW(AttentionPolicy(c, kv::KVShape{3, 3, 64, 8}, hs, ch.fingerprint));
  EXPECT_NO_THROW(AttentionPolicy(c, kv::KVShape{3, 3, 64, 8}, hs));
  EXPECT_THROW(AttentionPolicy(c, kv::KVShape{3, 3, 64, 8}, hs, "ffffffffffffffff"), Error);   // another model
  EXPECT_THROW(AttentionPolicy(c, kv::KVShape{4, 3, 64, 8}, hs, ch.fingerprint), Error);       // layers
  EXPECT_THROW(AttentionPolicy(c, kv::KVShape{3, 3, 128, 8}, HeadShape{9, 3, 128}), Error);    // head dim
  c.ds_file = "/nonexistent/ds.txt";
  EXPECT_THROW(AttentionPolicy(c, kv::KVShape{3, 3, 64, 8}, hs), Error);
  // Methods that do not use ds ignore the file.
  c.method = Method::Quest;
  EXPECT_NO_THROW(AttentionPolicy(c, kv::KVShape{3, 3, 64, 8}, hs));
  // reconfigure (evaluation harnesses: one policy, several configurations) keeps the label cache only
  // for the channel file it was built from.
  c.method = Method::Twilight;
  c.base = Base::DS;
  c.ds_file = p;
  AttentionPolicy both(c, kv::KVShape{3, 3, 64, 8}, hs);
  AttnConfig to = c;
  to.method = Method::DS;
  EXPECT_NO_THROW(both.reconfigure(to));
  to.method = Method::Quest;
  EXPECT_NO_THROW(both.reconfigure(to));
  to.method = Method::DS;
  to.ds_file = p + ".other";
  EXPECT_THROW(both.reconfigure(to), Error);
  AttnConfig quest_only = c;
  quest_only.method = Method::Quest;
  AttentionPolicy qp(quest_only, kv::KVShape{3, 3, 64, 8}, hs);
  to.ds_file = p;
  EXPECT_THROW(qp.reconfigure(to), Error);  // no label cache
  std::remove(p.c_str());
}

TEST(DsPolicy, DecodeAttendsTheDsSelection) {
  const int L = 3, H = 9, Hkv = 3, d = 64;
  const int64_t n = 1500, b0 = 200;
  std::mt19937 rng(31);
  const DsChannels ch = random_channels(L, Hkv, d, 16, rng);
  const std::string p = tmp_path("decode.txt");
  write_ds_channels(p, ch);
  const kv::KVShape ks{L, Hkv, d, n / kPageSize + 2};
  const HeadShape hs{H, Hkv, d};
  for (Method m : {Method::DS, Method::Twilight}) {
    AttnConfig c;
    c.method = m;
    c.base = Base::DS;
    c.p = 1.f;  // Twilight keeps all of I0: same output as ds alone
    c.b0 = b0;
    c.skip_layers = 1;
    c.dense_below = 16;
    c.ds_file = p;
    c.true_mass = true;
    AttentionPolicy pol(c, ks, hs);
    kv::KVPool pool(ks);
    kv::SeqPages seq;
    pool.reserve(seq, n);
    std::normal_distribution<float> N(0.f, 1.f);
    std::vector<float> k((size_t)Hkv * d), v(k.size());
    for (int64_t t = 0; t < n; ++t)
      for (int l = 0; l < L; ++l) {
        for (auto& x : k) x = N(rng) * (t % 50 == 3 ? 3.f : 1.f);
        for (auto& x : v) x = N(rng);
        pool.write(l, seq, t, k.data(), v.data());
        pol.on_append(pool, l, seq, t);
      }
    seq.n_tokens = n;
    std::vector<float> q((size_t)H * d), out(q.size()), want(q.size());
    for (auto& x : q) x = N(rng);
    ThreadPool tp(2);
    ASSERT_TRUE(pol.sparse_at(2, n));
    pol.decode(pool, seq, 2, q.data(), n, out.data(), tp);
    // The reference: a DsSide built from scratch from the pool, select_ds, sparse attention.
    DsSide ds(ks, ch);
    for (int64_t t = 0; t < n; ++t) ds.append(pool, 2, seq, t);
    Selection sel;
    select_ds(ds, seq, 2, hs, q.data(), n, b0, GqaMode::Group, sel);
    sparse_reference(pool, seq, 2, hs, q.data(), sel, n, want.data());
    for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], want[i], 1e-4f + 1e-4f * std::fabs(want[i])) << method_name(m);
    const BudgetStats& st = pol.stats();
    for (int li = 0; li < Hkv; ++li) {
      EXPECT_EQ(st.steps[st.at(2, li)], 1);
      EXPECT_EQ(st.i0[st.at(2, li)], (double)sel.size(li));
      EXPECT_GT(st.true_mass[st.at(2, li)], 0.0);
      EXPECT_LE(st.true_mass[st.at(2, li)], 1.0 + 1e-9);
    }
  }
  std::remove(p.c_str());
}

// Speed of the ds selector for the Qwen2.5 1.5B attention shape (H 12, Hkv 2, d 128, r 32), split
// into scoring and top-k. Not part of the suite; run with
// --gtest_also_run_disabled_tests --gtest_filter='*Bench*'.
TEST(DsSelectBench, DISABLED_Select) {
  using clk = std::chrono::steady_clock;
  auto us = [](clk::duration d) { return std::chrono::duration<double, std::micro>(d).count(); };
  const HeadShape hs{12, 2, 128};
  std::mt19937 rng(9);
  std::normal_distribution<float> N(0.f, 1.f);
  for (int64_t n : {4096, 32768}) {
    const kv::KVShape shape{1, 2, 128, n / kPageSize};
    kv::KVPool pool(shape);
    DsSide ds(shape, random_channels(1, 2, 128, 32, rng));
    kv::SeqPages seq;
    test_util::fill_random(pool, seq, 0, n, rng, 1.f);
    const auto a0 = clk::now();
    for (int64_t t = 0; t < n; ++t) ds.append(pool, 0, seq, t);
    const double t_append = us(clk::now() - a0) / n;
    std::vector<float> q((size_t)12 * 128), sc((size_t)2 * n);
    for (auto& x : q) x = N(rng);
    ThreadPool tp2(2);
    Selection s;
    auto best = [&](const std::function<void()>& f) {
      double b = 1e30;
      for (int r = 0; r < 20; ++r) {
        auto t0 = clk::now();
        f();
        b = std::min(b, us(clk::now() - t0));
      }
      return b;
    };
    const double s1 = best([&] { ds_token_scores(ds, seq, 0, hs, q.data(), n, GqaMode::Group, sc.data()); });
    const double s2 = best([&] { ds_token_scores(ds, seq, 0, hs, q.data(), n, GqaMode::Group, sc.data(), &tp2); });
    const double g1 = best([&] { select_ds(ds, seq, 0, hs, q.data(), n, n / 4, GqaMode::Group, s); });
    const double g2 = best([&] { select_ds(ds, seq, 0, hs, q.data(), n, n / 4, GqaMode::Group, s, &tp2); });
    const double bytes = 2.0 * n * 32 * 2;  // labels read, fp16
    std::printf("n_ctx %6lld  append %.3f us/token; ds scores (group): %.1f us 1 thread (%.1f GB/s of labels), %.1f us 2 threads; "
                "select_ds B0 n/4: %.1f us (1 thr) / %.1f us (2 thr)\n",
                (long long)n, t_append, s1, bytes / s1 / 1e3, s2, g1, g2);
  }
}

}  // namespace
}  // namespace tw::attn
