// Sparse decode attention: equals dense attention when nothing is pruned, matches the scalar
// reference on random lists (both GQA modes, with and without the current token, empty lists,
// 1-3 threads), and obeys the top-p error identity/bound with exact weights.
#include "attention/sparse_cpu.h"
#include "attention/test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "attention/pruner.h"
#include "attention/topp.h"
#include "common/error.h"
#include "common/fp16.h"
#include "ops/cpu/matmul.h"

namespace tw::attn {
namespace {

using kv::kPageSize;

using test_util::fill_random;

Selection all_tokens(GqaMode mode, int n_lists, int64_t n) {
  Selection s;
  s.clear(mode, n_lists);
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = (int32_t)i;
  for (int i = 0; i < n_lists; ++i) s.push_list(t.data(), n);
  return s;
}

struct Case {
  int H, Hkv, d;
};

void expect_close(const std::vector<float>& a, const std::vector<float>& b, float tol, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], tol + tol * std::fabs(b[i])) << what << " at " << i;
}

TEST(SparseDecode, SelectAllEqualsDense) {
  ThreadPool tp(2);
  for (const Case c : {Case{9, 3, 64}, Case{12, 2, 128}, Case{14, 2, 64}, Case{32, 8, 128}}) {
    for (const int64_t n_ctx : {1, 15, 16, 17, 1000, 4099}) {
      SCOPED_TRACE(::testing::Message() << "H=" << c.H << " Hkv=" << c.Hkv << " d=" << c.d << " n_ctx=" << n_ctx);
      std::mt19937 rng(77 + n_ctx + c.H);
      kv::KVPool pool({2, c.Hkv, c.d, (n_ctx + 15) / 16 + 1});
      kv::SeqPages seq;
      fill_random(pool, seq, 1, n_ctx, rng, 1.5f);
      std::normal_distribution<float> N(0.f, 1.f);
      std::vector<float> q((size_t)c.H * c.d);
      for (auto& x : q) x = N(rng);
      const HeadShape hs{c.H, c.Hkv, c.d};
      std::vector<float> dense(q.size()), out(q.size());
      dense_decode(pool, seq, 1, hs, q.data(), n_ctx, dense.data(), tp);
      for (const GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
        const int n_lists = mode == GqaMode::Group ? c.Hkv : c.H;
        sparse_decode(pool, seq, 1, hs, q.data(), all_tokens(mode, n_lists, n_ctx), n_ctx, out.data(), tp);
        expect_close(out, dense, 2e-5f, "select-all");
        // Without the current token in the lists: it is appended, the result is the same.
        sparse_decode(pool, seq, 1, hs, q.data(), all_tokens(mode, n_lists, n_ctx - 1), n_ctx, out.data(), tp);
        expect_close(out, dense, 2e-5f, "select-all but current");
      }
    }
  }
}

// The pipeline with no pruning: select-all candidates, pruner at p = 1 (INT4 estimate), sparse decode.
TEST(SparseDecode, PrunerAtPOneThenSparseEqualsDense) {
  ThreadPool tp(2);
  for (const Case c : {Case{12, 2, 128}, Case{9, 3, 64}}) {
    const int64_t n_ctx = 1000;
    std::mt19937 rng(5 + c.H);
    kv::KVPool pool({1, c.Hkv, c.d, (n_ctx + 15) / 16});
    KeySide ks(pool.shape());
    kv::SeqPages seq;
    fill_random(pool, seq, 0, n_ctx, rng, 1.5f);
    for (int64_t t = 0; t < n_ctx; ++t) ks.append(pool, 0, seq, t);
    std::normal_distribution<float> N(0.f, 1.f);
    std::vector<float> q((size_t)c.H * c.d);
    for (auto& x : q) x = N(rng);
    const HeadShape hs{c.H, c.Hkv, c.d};
    std::vector<float> dense(q.size()), out(q.size());
    dense_decode(pool, seq, 0, hs, q.data(), n_ctx, dense.data(), tp);
    for (const GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
      const int n_lists = mode == GqaMode::Group ? c.Hkv : c.H;
      const Selection all = all_tokens(mode, n_lists, n_ctx);
      Selection kept;
      std::vector<PruneStats> st;
      prune_topp(ks, seq, 0, hs, q.data(), all, n_ctx, PruneOptions{1.f, 0, 0}, kept, st, tp);
      EXPECT_EQ(kept.tokens, all.tokens);
      for (const PruneStats& s : st) EXPECT_NEAR(s.est_mass_kept, 1.f, 1e-5f);
      sparse_decode(pool, seq, 0, hs, q.data(), kept, n_ctx, out.data(), tp);
      expect_close(out, dense, 2e-5f, "p=1 pipeline");
    }
  }
}

TEST(SparseDecode, RandomListsMatchReference) {
  for (const Case c : {Case{9, 3, 64}, Case{12, 2, 128}, Case{8, 8, 64}, Case{4, 1, 128}}) {
    for (const int64_t n_ctx : {1, 33, 1500}) {
      std::mt19937 rng(300 + n_ctx + c.d);
      kv::KVPool pool({1, c.Hkv, c.d, (n_ctx + 15) / 16});
      kv::SeqPages seq;
      fill_random(pool, seq, 0, n_ctx, rng, 2.f);
      std::normal_distribution<float> N(0.f, 1.f);
      std::vector<float> q((size_t)c.H * c.d);
      for (auto& x : q) x = N(rng);
      const HeadShape hs{c.H, c.Hkv, c.d};
      for (const GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
        const int n_lists = mode == GqaMode::Group ? c.Hkv : c.H;
        Selection sel;
        sel.clear(mode, n_lists);
        for (int i = 0; i < n_lists; ++i) {
          const double frac = i == 0 ? 0.0 : (i % 3 == 1 ? 0.05 : 0.6);  // list 0 empty
          std::bernoulli_distribution B(frac);
          std::vector<int32_t> t;
          for (int64_t x = 0; x < n_ctx; ++x)
            if (B(rng) || (x == n_ctx - 1 && i % 2 == 0 && i > 0)) t.push_back((int32_t)x);
          sel.push_list(t.data(), (int64_t)t.size());
        }
        std::vector<float> ref(q.size()), out(q.size());
        sparse_reference(pool, seq, 0, hs, q.data(), sel, n_ctx, ref.data());
        for (int threads : {1, 2, 3}) {
          ThreadPool tp(threads);
          sparse_decode(pool, seq, 0, hs, q.data(), sel, n_ctx, out.data(), tp);
          expect_close(out, ref, 2e-5f, "random lists");
        }
      }
    }
  }
}

// Every SIMD level this CPU runs against the reference (the suite's default level is only the best
// one): the AVX-512 block step (d 64 / 128), the AVX-512 loops (d 32), the AVX2 / portable ones; lists
// with scattered, contiguous and single tokens, longer than a chunk, groups of more than 8 queries.
TEST(SparseDecode, EverySimdLevelMatchesReference) {
  for (const ops::Simd level : {ops::Simd::Scalar, ops::Simd::AVX2, ops::Simd::AVX512}) {
    if (!ops::simd_supported(level)) continue;
    for (const Case c : {Case{12, 2, 128}, Case{9, 3, 64}, Case{32, 2, 128}, Case{4, 4, 64}, Case{8, 2, 32}}) {
      const int64_t n_ctx = 777;
      std::mt19937 rng(500 + c.H + c.d + (int)level);
      kv::KVPool pool({1, c.Hkv, c.d, (n_ctx + 15) / 16});
      kv::SeqPages seq;
      fill_random(pool, seq, 0, n_ctx, rng, 2.f);
      std::normal_distribution<float> N(0.f, 1.f);
      std::vector<float> q((size_t)c.H * c.d);
      for (auto& x : q) x = N(rng);
      const HeadShape hs{c.H, c.Hkv, c.d};
      for (const GqaMode mode : {GqaMode::Group, GqaMode::Head}) {
        const int n_lists = mode == GqaMode::Group ? c.Hkv : c.H;
        Selection sel;
        sel.clear(mode, n_lists);
        for (int i = 0; i < n_lists; ++i) {
          std::vector<int32_t> t;
          if (i % 3 == 0) {  // contiguous run (Quest-like pages)
            for (int64_t x = 100; x < 400; ++x) t.push_back((int32_t)x);
          } else if (i % 3 == 1) {  // one token
            t.push_back((int32_t)(i * 7));
          } else {  // scattered
            std::bernoulli_distribution B(0.3);
            for (int64_t x = 0; x < n_ctx; ++x)
              if (B(rng)) t.push_back((int32_t)x);
          }
          sel.push_list(t.data(), (int64_t)t.size());
        }
        std::vector<float> ref(q.size()), out(q.size());
        sparse_reference(pool, seq, 0, hs, q.data(), sel, n_ctx, ref.data());
        for (int threads : {1, 2}) {
          ThreadPool tp(threads);
          sparse_decode(pool, seq, 0, hs, q.data(), sel, n_ctx, out.data(), tp, level);
          expect_close(out, ref, 2e-5f, ops::simd_name(level));
        }
      }
    }
  }
}

// Error of top-p attention with exact weights. For one query head with exact weights W over all
// tokens and an attended set I (top-p set plus the current token), S = sum_I W_i and
// o^ = sum_I W_i v_i / S. Then exactly
//     o - o^ = sum_{i not in I} W_i v_i - (1 - S) o^,
// so ||o - o^|| <= (1 - S) (max_i ||v_i|| + ||o^||) <= 2 (1 - S) max_i ||v_i||, and S >= p.
// (TWILIGHT.md writes (1 - sum W_I) ||V||; with ||W - W^||_1 = 2 (1 - S) and every row of V bounded
// by max ||v_i||, the factor 2 is what the l1/max-row form gives.) We test the identity to float
// tolerance (a strong check of which tokens were attended and how they were weighted) and the bound.
TEST(SparseDecode, TopPErrorIdentityAndBound) {
  for (const Case c : {Case{12, 2, 128}, Case{9, 3, 64}}) {
    const int64_t n_ctx = 2000;
    std::mt19937 rng(31 + c.H);
    kv::KVPool pool({1, c.Hkv, c.d, (n_ctx + 15) / 16});
    kv::SeqPages seq;
    fill_random(pool, seq, 0, n_ctx, rng, 2.f);
    std::normal_distribution<float> N(0.f, 1.f);
    std::vector<float> q((size_t)c.H * c.d);
    for (auto& x : q) x = N(rng);
    const HeadShape hs{c.H, c.Hkv, c.d};
    const int d = c.d, G = c.H / c.Hkv;
    // Exact weights per query head (double), from the fp16 K the attention uses.
    std::vector<std::vector<double>> W(c.H, std::vector<double>(n_ctx));
    for (int hq = 0; hq < c.H; ++hq) {
      double mx = -INFINITY, s = 0;
      for (int64_t t = 0; t < n_ctx; ++t) {
        const uint16_t* k = pool.k_page(0, seq.pages[t / kPageSize], hq / G) + (t % kPageSize) * d;
        double acc = 0;
        for (int i = 0; i < d; ++i) acc += (double)q[hq * d + i] * fp16_to_fp32(k[i]);
        mx = std::max(mx, W[hq][t] = acc / std::sqrt((double)d));
      }
      for (double& x : W[hq]) s += (x = std::exp(x - mx));
      for (double& x : W[hq]) x /= s;
    }
    auto v_of = [&](int h, int64_t t, int i) {
      return (double)fp16_to_fp32(pool.v_page(0, seq.pages[t / kPageSize], h)[(t % kPageSize) * d + i]);
    };
    double vmax = 0;
    for (int h = 0; h < c.Hkv; ++h)
      for (int64_t t = 0; t < n_ctx; ++t) {
        double n2 = 0;
        for (int i = 0; i < d; ++i) n2 += v_of(h, t, i) * v_of(h, t, i);
        vmax = std::max(vmax, std::sqrt(n2));
      }
    std::vector<float> o(q.size());
    dense_reference(pool, seq, 0, hs, q.data(), n_ctx, o.data());
    ThreadPool tp(2);
    for (const GqaMode mode : {GqaMode::Head, GqaMode::Group}) {
      for (const float p : {0.5f, 0.8f, 0.9f, 0.95f, 0.99f}) {
        SCOPED_TRACE(::testing::Message() << "H=" << c.H << " mode=" << (int)mode << " p=" << p);
        const int n_lists = mode == GqaMode::Group ? c.Hkv : c.H;
        Selection sel;
        sel.clear(mode, n_lists);
        std::vector<int32_t> keep;
        for (int li = 0; li < n_lists; ++li) {
          std::vector<float> w(n_ctx, 0.f);  // Group: the group's average of exact weights
          const int h0 = mode == GqaMode::Group ? li * G : li, nh = mode == GqaMode::Group ? G : 1;
          for (int r = 0; r < nh; ++r)
            for (int64_t t = 0; t < n_ctx; ++t) w[t] += (float)(W[h0 + r][t] / nh);
          topp_select(w.data(), n_ctx, p, keep);
          sel.push_list(keep.data(), (int64_t)keep.size());
        }
        std::vector<float> oh(q.size());
        sparse_decode(pool, seq, 0, hs, q.data(), sel, n_ctx, oh.data(), tp);
        for (int hq = 0; hq < c.H; ++hq) {
          const int li = mode == GqaMode::Group ? hq / G : hq;
          std::vector<char> in(n_ctx, 0);
          for (int64_t j = 0; j < sel.size(li); ++j) in[sel.list(li)[j]] = 1;
          in[n_ctx - 1] = 1;
          double S = 0;
          for (int64_t t = 0; t < n_ctx; ++t) S += in[t] ? W[hq][t] : 0.0;
          if (mode == GqaMode::Head) {
            EXPECT_GE(S, p - 1e-6);
          }
          double err2 = 0, id2 = 0;
          for (int i = 0; i < d; ++i) {
            double outside = 0;
            for (int64_t t = 0; t < n_ctx; ++t)
              if (!in[t]) outside += W[hq][t] * v_of(hq / G, t, i);
            const double diff = (double)o[hq * d + i] - oh[hq * d + i];
            const double pred = outside - (1 - S) * oh[hq * d + i];
            err2 += diff * diff;
            id2 += (diff - pred) * (diff - pred);
          }
          EXPECT_LT(std::sqrt(id2), 2e-5 * std::sqrt((double)d)) << "head " << hq << ": o - o^ != identity";
          EXPECT_LE(std::sqrt(err2), 2 * (1 - S) * vmax + 1e-5) << "head " << hq;
        }
      }
    }
  }
}

TEST(SparseDecode, BadInput) {
  kv::KVPool pool({1, 2, 64, 4});
  kv::SeqPages seq;
  std::mt19937 rng(2);
  fill_random(pool, seq, 0, 50, rng, 1.f);
  std::vector<float> q(4 * 64, 0.1f), out(q.size());
  ThreadPool tp(2);
  const HeadShape hs{4, 2, 64};
  const Selection good = all_tokens(GqaMode::Group, 2, 50);
  EXPECT_NO_THROW(sparse_decode(pool, seq, 0, hs, q.data(), good, 50, out.data(), tp));
  EXPECT_THROW(sparse_decode(pool, seq, 0, hs, q.data(), good, 49, out.data(), tp), Error);  // 49 >= n_ctx
  EXPECT_THROW(sparse_decode(pool, seq, 0, hs, q.data(), good, 0, out.data(), tp), Error);
  EXPECT_THROW(sparse_decode(pool, seq, 1, hs, q.data(), good, 50, out.data(), tp), Error);
  EXPECT_THROW(sparse_decode(pool, seq, 0, HeadShape{4, 2, 128}, q.data(), good, 50, out.data(), tp), Error);
  EXPECT_THROW(sparse_decode(pool, seq, 0, HeadShape{5, 2, 64}, q.data(), good, 50, out.data(), tp), Error);
  EXPECT_THROW(sparse_decode(pool, seq, 0, hs, q.data(), all_tokens(GqaMode::Head, 2, 50), 50, out.data(), tp),
               Error);
  EXPECT_THROW(sparse_decode(pool, seq, 0, hs, q.data(), good, 80, out.data(), tp), Error);  // beyond pages
  Selection dup;
  dup.clear(GqaMode::Group, 2);
  const int32_t t[] = {4, 4, 9};
  dup.push_list(t, 3);
  dup.push_list(t + 2, 1);
  EXPECT_THROW(sparse_decode(pool, seq, 0, hs, q.data(), dup, 50, out.data(), tp), Error);
  Selection broken = good;
  broken.offsets.pop_back();
  EXPECT_THROW(sparse_decode(pool, seq, 0, hs, q.data(), broken, 50, out.data(), tp), Error);
}

}  // namespace
}  // namespace tw::attn
