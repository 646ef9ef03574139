// KeySide (Quest page bounds + INT4 key mirror) against from-scratch recomputations from the pool's
// fp16 K, after random appends with page boundaries, partial pages, truncate-and-rewrite and pages
// released and reused by another sequence; the fast append against the scalar reference; INT4
// dequantisation error; the Quest upper-bound property; input validation.
#include "attention/key_side.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "common/error.h"
#include "common/fp16.h"
#include "attention/page_bounds.h"

namespace tw::attn {
namespace {

using kv::kPageSize;

// Random key row with a varied character: ordinary, constant (scale clamp), huge, tiny.
void random_key(std::vector<float>& k, std::mt19937& rng) {
  std::normal_distribution<float> N(0.f, 1.f);
  const int kind = (int)(rng() % 8);
  const float sc = kind == 0 ? 3e4f : kind == 1 ? 1e-3f : 1.f + (float)(rng() % 4);
  if (kind == 2) {
    const float c = N(rng);
    std::fill(k.begin(), k.end(), c);
    return;
  }
  for (auto& x : k) x = std::clamp(N(rng) * sc, -65000.f, 65000.f);
}

// From-scratch check of every valid slot of every page of seq, in both KeySides.
void check_seq(const kv::KVPool& pool, const KeySide& a, const KeySide& b, int layer, const kv::SeqPages& seq) {
  const kv::KVShape& s = pool.shape();
  const int d = s.head_dim;
  std::vector<float> k(d);
  std::vector<uint8_t> codes(d / 2);
  for (int64_t lp = 0; lp * kPageSize < seq.n_tokens; ++lp) {
    const int valid = (int)std::min<int64_t>(kPageSize, seq.n_tokens - lp * kPageSize);
    const int32_t phys = seq.pages[lp];
    for (int h = 0; h < s.n_kv_heads; ++h) {
      const uint16_t* page = pool.k_page(layer, phys, h);
      std::vector<float> mn(d, INFINITY), mx(d, -INFINITY), par(2);
      std::vector<uint8_t> bc(2 * d);
      for (int i = 0; i < d; ++i)
        for (int j = 0; j < valid; ++j) {
          mn[i] = std::min(mn[i], fp16_to_fp32(page[j * d + i]));
          mx[i] = std::max(mx[i], fp16_to_fp32(page[j * d + i]));
        }
      quantize_page_bounds(mn.data(), mx.data(), d, bc.data(), par.data());
      for (const KeySide* ks : {&a, &b}) {
        const uint8_t* got = ks->bound_codes(layer, phys, h);
        const float* gp = ks->bound_param(layer, phys, h);
        ASSERT_EQ(gp[0], par[0]) << "page " << lp << " head " << h << ": lo";
        ASSERT_EQ(gp[1], par[1]) << "page " << lp << " head " << h << ": step";
        for (int i = 0; i < d; ++i) {
          ASSERT_EQ(got[i], bc[i]) << "page " << lp << " head " << h << " dim " << i << ": min code";
          ASSERT_EQ(got[d + i], bc[d + i]) << "page " << lp << " head " << h << " dim " << i << ": max code";
          // Conservative: the decoded bounds bracket the exact ones.
          ASSERT_LE(std::fma(gp[1], (float)got[i], gp[0]), mn[i]) << "page " << lp << " head " << h << " dim " << i;
          ASSERT_GE(std::fma(gp[1], (float)got[d + i], gp[0]), mx[i]) << "page " << lp << " head " << h << " dim " << i;
        }
        for (int j = 0; j < valid; ++j) {
          for (int i = 0; i < d; ++i) k[i] = fp16_to_fp32(page[j * d + i]);
          float scale, zero;
          int4_quantize_ref(k.data(), d, codes.data(), &scale, &zero);
          ASSERT_EQ(ks->k4_scale(layer, phys, h)[j], scale) << "page " << lp << " slot " << j;
          ASSERT_EQ(ks->k4_zero(layer, phys, h)[j], zero) << "page " << lp << " slot " << j;
          const uint8_t* got = ks->k4(layer, phys, h) + (size_t)j * (d / 2);
          for (int i = 0; i < d / 2; ++i) ASSERT_EQ(got[i], codes[i]) << "page " << lp << " slot " << j << " byte " << i;
        }
      }
    }
  }
}

struct Shape {
  int Hkv, d;
};

class KeySideRandom : public ::testing::TestWithParam<Shape> {};

TEST_P(KeySideRandom, MatchesFromScratchAfterRandomHistory) {
  const Shape c = GetParam();
  std::mt19937 rng(77 + c.Hkv * 131 + c.d);
  const kv::KVShape shape{2, c.Hkv, c.d, 14};
  kv::KVPool pool(shape);
  KeySide fast(shape), ref(shape);
  kv::SeqPages seqs[2];
  std::vector<float> k((size_t)c.Hkv * c.d), v(k.size()), row(c.d);
  std::vector<int> owner(shape.n_pages, -1);  // last sequence that held each physical page
  int truncations = 0, releases = 0, reused = 0, page_starts = 0;
  auto append = [&](int si) {
    kv::SeqPages& seq = seqs[si];
    const int64_t pos = seq.n_tokens;
    if ((pos + 1 + kPageSize - 1) / kPageSize > (int64_t)seq.pages.size() && pool.free_pages() == 0) return;
    pool.reserve(seq, pos + 1);
    const int32_t phys = seq.pages[pos / kPageSize];
    reused += owner[phys] != -1 && owner[phys] != si;
    owner[phys] = si;
    page_starts += pos % kPageSize == 0;
    for (int layer = 0; layer < 2; ++layer) {
      for (int h = 0; h < c.Hkv; ++h) {
        random_key(row, rng);
        std::copy(row.begin(), row.end(), k.begin() + (size_t)h * c.d);
      }
      pool.write(layer, seq, pos, k.data(), v.data());
      fast.append(pool, layer, seq, pos);
      ref.append_reference(pool, layer, seq, pos);
    }
    seq.n_tokens = pos + 1;
  };
  for (int step = 0; step < 900; ++step) {
    const int si = (int)(rng() % 2);
    kv::SeqPages& seq = seqs[si];
    const int op = (int)(rng() % 100);
    if (op < 90) {
      append(si);
    } else if (op < 97) {
      // Truncate and rewrite: the side data is stale until the first rewritten position is appended.
      seq.n_tokens = seq.n_tokens > 0 ? (int64_t)(rng() % seq.n_tokens) : 0;
      append(si);
      ++truncations;
    } else {
      pool.release(seq);  // its pages go to the other sequence next
      ++releases;
    }
    if (step % 7 == 0 || op >= 90)
      for (int layer = 0; layer < 2; ++layer)
        for (const auto& s : seqs) {
          check_seq(pool, fast, ref, layer, s);
          if (::testing::Test::HasFatalFailure()) return;
        }
  }
  for (int layer = 0; layer < 2; ++layer)
    for (const auto& s : seqs) check_seq(pool, fast, ref, layer, s);
  // The history really exercised what it is meant to.
  EXPECT_GT(truncations, 10);
  EXPECT_GT(releases, 3);
  EXPECT_GT(reused, 3);
  EXPECT_GT(page_starts, 20);
}

TEST_P(KeySideRandom, DequantisedWithinHalfScale) {
  const Shape c = GetParam();
  std::mt19937 rng(5 + c.d);
  const kv::KVShape shape{1, c.Hkv, c.d, 5};
  kv::KVPool pool(shape);
  KeySide ks(shape);
  kv::SeqPages seq;
  const int64_t n = 70;  // 4 full pages + a partial one
  pool.reserve(seq, n);
  std::vector<float> k((size_t)c.Hkv * c.d), v(k.size()), row(c.d), deq(c.d);
  for (int64_t t = 0; t < n; ++t) {
    for (int h = 0; h < c.Hkv; ++h) {
      random_key(row, rng);
      std::copy(row.begin(), row.end(), k.begin() + (size_t)h * c.d);
    }
    pool.write(0, seq, t, k.data(), v.data());
    ks.append(pool, 0, seq, t);
  }
  for (int64_t t = 0; t < n; ++t)
    for (int h = 0; h < c.Hkv; ++h) {
      const int32_t phys = seq.pages[t / kPageSize];
      const int j = (int)(t % kPageSize);
      const float scale = ks.k4_scale(0, phys, h)[j], zero = ks.k4_zero(0, phys, h)[j];
      int4_dequantize(ks.k4(0, phys, h) + (size_t)j * (c.d / 2), scale, zero, c.d, deq.data());
      const uint16_t* kr = pool.k_page(0, phys, h) + (size_t)j * c.d;
      for (int i = 0; i < c.d; ++i) {
        const float x = fp16_to_fp32(kr[i]);
        // scale/2 from rounding, plus float rounding of zero + code * scale.
        const float tol = 0.5f * scale * (1 + 1e-5f) + 2e-7f * (std::fabs(zero) + 15 * scale);
        ASSERT_LE(std::fabs(deq[i] - x), tol) << "token " << t << " head " << h << " dim " << i;
      }
    }
}

TEST_P(KeySideRandom, QuestBoundIsUpperBound) {
  const Shape c = GetParam();
  std::mt19937 rng(11 + c.d * 3 + c.Hkv);
  const kv::KVShape shape{1, c.Hkv, c.d, 6};
  kv::KVPool pool(shape);
  KeySide ks(shape);
  kv::SeqPages seq;
  const int64_t n = 83;
  pool.reserve(seq, n);
  std::normal_distribution<float> N(0.f, 1.f);
  std::vector<float> k((size_t)c.Hkv * c.d), v(k.size()), row(c.d), q(c.d);
  for (int64_t t = 0; t < n; ++t) {
    for (int h = 0; h < c.Hkv; ++h) {
      random_key(row, rng);
      std::copy(row.begin(), row.end(), k.begin() + (size_t)h * c.d);
    }
    pool.write(0, seq, t, k.data(), v.data());
    ks.append(pool, 0, seq, t);
  }
  for (int trial = 0; trial < 20; ++trial) {
    for (auto& x : q) x = N(rng) * (trial % 3 == 0 ? 100.f : 1.f);
    for (int64_t t = 0; t < n; ++t)
      for (int h = 0; h < c.Hkv; ++h) {
        const int32_t phys = seq.pages[t / kPageSize];
        const uint8_t* bc = ks.bound_codes(0, phys, h);
        const float* par = ks.bound_param(0, phys, h);
        const uint16_t* kr = pool.k_page(0, phys, h) + (t % kPageSize) * c.d;
        double u = 0, dot = 0, mag = 0;  // float * float is exact in double
        for (int i = 0; i < c.d; ++i) {
          const float lo = std::fma(par[1], (float)bc[i], par[0]), hi = std::fma(par[1], (float)bc[c.d + i], par[0]);
          u += std::max((double)q[i] * hi, (double)q[i] * lo);
          dot += (double)q[i] * fp16_to_fp32(kr[i]);
          mag += std::fabs((double)q[i] * fp16_to_fp32(kr[i]));
        }
        ASSERT_LE(dot, u + 1e-12 * mag) << "token " << t << " head " << h;
      }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, KeySideRandom,
                         ::testing::Values(Shape{3, 64}, Shape{2, 128}, Shape{1, 2}, Shape{8, 128}, Shape{2, 80}));

TEST(KeySide, ConstantKeyUsesClampedScale) {
  const kv::KVShape shape{1, 1, 8, 1};
  kv::KVPool pool(shape);
  KeySide ks(shape);
  kv::SeqPages seq;
  pool.reserve(seq, 1);
  std::vector<float> k(8, -2.5f), v(8, 0.f);
  pool.write(0, seq, 0, k.data(), v.data());
  ks.append(pool, 0, seq, 0);
  EXPECT_EQ(ks.k4_scale(0, seq.pages[0], 0)[0], kInt4MinScale);
  EXPECT_EQ(ks.k4_zero(0, seq.pages[0], 0)[0], -2.5f);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(ks.k4(0, seq.pages[0], 0)[i], 0);
  // A constant page: step 0, every bound code 0, lo the value.
  EXPECT_EQ(ks.bound_param(0, seq.pages[0], 0)[0], -2.5f);
  EXPECT_EQ(ks.bound_param(0, seq.pages[0], 0)[1], 0.f);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(ks.bound_codes(0, seq.pages[0], 0)[i], 0);
}

TEST(KeySide, NibbleOrderAndRounding) {
  // K = 0, 1, ..., 15 (and then 15 - i): scale 1, zero 0, codes equal the values; element 2i low nibble.
  const kv::KVShape shape{1, 1, 32, 1};
  kv::KVPool pool(shape);
  KeySide ks(shape);
  kv::SeqPages seq;
  pool.reserve(seq, 1);
  std::vector<float> k(32), v(32, 0.f);
  for (int i = 0; i < 16; ++i) k[i] = (float)i, k[16 + i] = (float)(15 - i);
  pool.write(0, seq, 0, k.data(), v.data());
  ks.append(pool, 0, seq, 0);
  const uint8_t* c = ks.k4(0, seq.pages[0], 0);
  EXPECT_EQ(ks.k4_scale(0, seq.pages[0], 0)[0], 1.f);
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(c[i] & 15, (int)k[2 * i]) << i;
    EXPECT_EQ(c[i] >> 4, (int)k[2 * i + 1]) << i;
  }
  // Half-way values round up: K = {0, 15, 1.5, 7.5}: scale 1, zero 0 -> codes 0, 15, 2, 8.
  float s, z;
  uint8_t codes[2];
  const float four[4] = {0.f, 15.f, 1.5f, 7.5f};
  int4_quantize_ref(four, 4, codes, &s, &z);
  EXPECT_EQ(s, 1.f);
  EXPECT_EQ(z, 0.f);
  EXPECT_EQ(codes[0], 0 | (15 << 4));
  EXPECT_EQ(codes[1], 2 | (8 << 4));
}

TEST(KeySide, BytesCountsEverything) {
  const kv::KVShape shape{3, 2, 128, 10};
  KeySide ks(shape);
  // Per (layer, page, head): 2 * 128 bound codes + {lo, s} + 16 * 64 code bytes + 2 * 16 floats scale/zero.
  EXPECT_EQ(ks.bytes(), (size_t)3 * 10 * 2 * (2 * 128 + 2 * 4 + 16 * 64 + 2 * 16 * 4));
}

// The 8-bit bound definition on its own: conservative and tight (each code the best one that is still
// conservative), on ranges from 1e-3 to 6e4, with outlier channels, constant pages and non-finite input.
TEST(PageBounds, ConservativeAndTight) {
  std::mt19937 rng(77);
  std::normal_distribution<float> N(0.f, 1.f);
  for (int trial = 0; trial < 2000; ++trial) {
    const int d = trial % 3 == 0 ? 64 : 128;
    const float sc = trial % 5 == 0 ? 1e-3f : trial % 7 == 0 ? 3e4f : 1.f + (float)(trial % 4);
    std::vector<float> mn(d), mx(d), par(2);
    std::vector<uint8_t> c(2 * d);
    for (int i = 0; i < d; ++i) {
      const float a = fp16_to_fp32(fp32_to_fp16(std::clamp(N(rng) * sc, -65000.f, 65000.f)));
      const float w = trial % 11 == 0 ? 0.f : std::fabs(N(rng)) * sc * (i % 17 == 0 ? 20.f : 1.f);
      mn[i] = a;
      mx[i] = fp16_to_fp32(fp32_to_fp16(std::min(a + w, 65000.f)));
    }
    quantize_page_bounds(mn.data(), mx.data(), d, c.data(), par.data());
    const float lo = par[0], s = par[1];
    ASSERT_EQ(lo, *std::min_element(mn.begin(), mn.end()));
    ASSERT_GE(std::fma(s, 255.f, lo), *std::max_element(mx.begin(), mx.end()));
    for (int i = 0; i < d; ++i) {
      const int a = c[i], b = c[d + i];
      ASSERT_LE(std::fma(s, (float)a, lo), mn[i]) << "trial " << trial << " dim " << i;
      ASSERT_GE(std::fma(s, (float)b, lo), mx[i]) << "trial " << trial << " dim " << i;
      if (s > 0.f) {
        if (a < 255) {
          ASSERT_GT(std::fma(s, (float)(a + 1), lo), mn[i]) << "trial " << trial << " dim " << i;
        }
        if (b > 0) {
          ASSERT_LT(std::fma(s, (float)(b - 1), lo), mx[i]) << "trial " << trial << " dim " << i;
        }
      }
    }
  }
  std::vector<float> mn(8, 1.f), mx(8, 2.f), par(2);
  std::vector<uint8_t> c(16, 9);
  mx[5] = INFINITY;
  quantize_page_bounds(mn.data(), mx.data(), 8, c.data(), par.data());
  EXPECT_TRUE(std::isnan(par[0]) && std::isnan(par[1]));
  for (uint8_t x : c) EXPECT_EQ(x, 0);
  mx[5] = 2.f;
  mn[2] = NAN;  // a NaN channel: never mistaken for a finite page
  quantize_page_bounds(mn.data(), mx.data(), 8, c.data(), par.data());
  EXPECT_TRUE(std::isnan(par[0]) || std::isnan(par[1])) << par[0] << " " << par[1];
}

TEST(KeySide, RejectsBadInput) {
  EXPECT_THROW(KeySide({1, 1, 7, 4}), tw::Error);    // odd head dim
  EXPECT_THROW(KeySide({1, 1, 512, 4}), tw::Error);  // head dim too large
  EXPECT_THROW(KeySide({0, 1, 64, 4}), tw::Error);
  const kv::KVShape shape{2, 2, 64, 4};
  kv::KVPool pool(shape);
  KeySide ks(shape);
  KeySide other({2, 2, 128, 4});
  kv::SeqPages seq;
  pool.reserve(seq, 20);
  EXPECT_THROW(ks.append(pool, 0, seq, 32), tw::Error);   // not reserved
  EXPECT_THROW(ks.append(pool, 0, seq, -1), tw::Error);
  EXPECT_THROW(ks.append(pool, 2, seq, 0), tw::Error);    // layer
  EXPECT_THROW(other.append(pool, 0, seq, 0), tw::Error); // shape mismatch
  try {
    ks.append(pool, 0, seq, 40);
    FAIL() << "no error";
  } catch (const tw::Error& e) {
    EXPECT_NE(std::string(e.what()).find("not reserved"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace tw::attn
