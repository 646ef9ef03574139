#include "kv/kv_dump.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <random>

#include "common/error.h"
#include "common/fp16.h"

namespace tw::kv {
namespace {

std::string tmp_path(const std::string& name) {
  return ::testing::TempDir() + "/tw_kvdump_" + std::to_string(getpid()) + "_" + name;
}

KVDump random_dump(std::mt19937& rng, int64_t n_tokens, int n_steps, std::vector<int> layers) {
  KVDump d;
  d.info.arch = "qwen2";
  d.info.model_name = "Test Model";
  d.info.desc = "random test data";
  d.info.n_layers = 6;
  d.info.n_heads = 4;
  d.info.n_kv_heads = 2;
  d.info.head_dim = 8;
  d.info.n_tokens = n_tokens;
  d.info.n_steps = n_steps;
  d.info.q_pos0 = n_tokens - n_steps;
  d.info.layers = std::move(layers);
  std::normal_distribution<float> N(0.f, 1.f);
  const size_t row = (size_t)n_tokens * 2 * 8;
  for (size_t i = 0; i < d.info.layers.size(); ++i) {
    d.k.emplace_back(row);
    d.v.emplace_back(row);
    for (auto& x : d.k.back()) x = fp32_to_fp16(N(rng));
    for (auto& x : d.v.back()) x = fp32_to_fp16(N(rng));
  }
  d.q.resize((size_t)n_steps * d.info.layers.size() * 4 * 8);
  for (auto& x : d.q) x = N(rng);
  return d;
}

std::vector<char> slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}
void spit(const std::string& p, const std::vector<char>& b) {
  std::ofstream out(p, std::ios::binary);
  out.write(b.data(), (std::streamsize)b.size());
}

TEST(KVDump, RoundTripIsExact) {
  std::mt19937 rng(1);
  const KVDump d = random_dump(rng, 37, 3, {1, 3, 4});
  const std::string p = tmp_path("rt.kv");
  write_kv_dump(p, d);
  const KVDump r = read_kv_dump(p);
  EXPECT_EQ(r.info.arch, "qwen2");
  EXPECT_EQ(r.info.model_name, "Test Model");
  EXPECT_EQ(r.info.desc, "random test data");
  EXPECT_EQ(r.info.n_tokens, 37);
  EXPECT_EQ(r.info.q_pos0, 34);
  EXPECT_EQ(r.info.n_steps, 3);
  EXPECT_EQ(r.info.layers, (std::vector<int>{1, 3, 4}));
  EXPECT_EQ(r.k, d.k);
  EXPECT_EQ(r.v, d.v);
  EXPECT_EQ(r.q, d.q);
  const KVDumpInfo hi = read_kv_dump_info(p);
  EXPECT_EQ(hi.n_tokens, 37);
  EXPECT_EQ(hi.layers.size(), 3u);
  // Row accessors index [t][h][d].
  EXPECT_EQ(r.k_row(2, 5, 1), r.k[2].data() + (5 * 2 + 1) * 8);
  EXPECT_EQ(r.query(2, 1), r.q.data() + (2 * 3 + 1) * 4 * 8);
  std::remove(p.c_str());
}

TEST(KVDump, TruncatedOrPaddedOrCorruptFilesAreErrors) {
  std::mt19937 rng(2);
  const std::string p = tmp_path("bad.kv");
  write_kv_dump(p, random_dump(rng, 20, 2, {0, 5}));
  const std::vector<char> good = slurp(p);
  for (size_t cut : {good.size() - 1, good.size() - 9, good.size() / 2, (size_t)60, (size_t)4, (size_t)0}) {
    spit(p, std::vector<char>(good.begin(), good.begin() + cut));
    EXPECT_THROW(read_kv_dump(p), Error) << "cut at " << cut;
    EXPECT_THROW(read_kv_dump_info(p), Error) << "cut at " << cut;
  }
  std::vector<char> longer = good;
  longer.push_back('x');
  spit(p, longer);
  EXPECT_THROW(read_kv_dump(p), Error);
  std::vector<char> bad = good;
  bad[0] = 'X';  // magic
  spit(p, bad);
  EXPECT_THROW(read_kv_dump(p), Error);
  bad = good;
  bad[8] = 7;  // version
  spit(p, bad);
  EXPECT_THROW(read_kv_dump(p), Error);
  bad = good;
  bad[bad.size() - 3] ^= 1;  // end marker
  spit(p, bad);
  EXPECT_THROW(read_kv_dump(p), Error);
  EXPECT_THROW(read_kv_dump(tmp_path("missing.kv")), Error);
  std::remove(p.c_str());
}

TEST(KVDump, InconsistentHeadersAreRejectedBeforeWriting) {
  std::mt19937 rng(3);
  const std::string p = tmp_path("inc.kv");
  KVDump d = random_dump(rng, 10, 2, {2, 4});
  d.info.layers = {4, 2};  // not ascending
  EXPECT_THROW(write_kv_dump(p, d), Error);
  d.info.layers = {2, 6};  // beyond the model
  EXPECT_THROW(write_kv_dump(p, d), Error);
  d = random_dump(rng, 10, 2, {2, 4});
  d.info.q_pos0 = 9;  // queries past the stored tokens
  EXPECT_THROW(write_kv_dump(p, d), Error);
  d = random_dump(rng, 10, 2, {2, 4});
  d.q.pop_back();
  EXPECT_THROW(write_kv_dump(p, d), Error);
  d = random_dump(rng, 10, 2, {2, 4});
  d.info.n_heads = 3;  // not a multiple of the kv heads
  EXPECT_THROW(write_kv_dump(p, d), Error);
  EXPECT_FALSE(std::ifstream(p).good());
  EXPECT_FALSE(std::ifstream(p + ".tmp").good());
}

TEST(KVDump, WrongModelIsAnError) {
  std::mt19937 rng(4);
  const KVDump d = random_dump(rng, 10, 1, {0});
  EXPECT_NO_THROW(d.info.check_model("qwen2", "Test Model", 6, 4, 2, 8));
  EXPECT_THROW(d.info.check_model("llama", "Test Model", 6, 4, 2, 8), Error);
  EXPECT_THROW(d.info.check_model("qwen2", "Other Model", 6, 4, 2, 8), Error);
  EXPECT_THROW(d.info.check_model("qwen2", "Test Model", 7, 4, 2, 8), Error);
  EXPECT_THROW(d.info.check_model("qwen2", "Test Model", 6, 8, 2, 8), Error);
  EXPECT_THROW(d.info.check_model("qwen2", "Test Model", 6, 4, 1, 8), Error);
  EXPECT_THROW(d.info.check_model("qwen2", "Test Model", 6, 4, 2, 16), Error);
}

TEST(KVDump, TiledSourceSkipsTheSinks) {
  EXPECT_EQ(tiled_source(0, 10, 4), 0);
  EXPECT_EQ(tiled_source(9, 10, 4), 9);
  EXPECT_EQ(tiled_source(10, 10, 4), 4);
  EXPECT_EQ(tiled_source(15, 10, 4), 9);
  EXPECT_EQ(tiled_source(16, 10, 4), 4);
  EXPECT_EQ(tiled_source(10, 10, 0), 0);
  EXPECT_THROW(tiled_source(3, 10, 10), Error);
}

TEST(KVDump, FillPoolCopiesRowsAndTiles) {
  std::mt19937 rng(5);
  const KVDump d = random_dump(rng, 21, 1, {1, 2});
  KVPool pool({2, 2, 8, 4});
  SeqPages seq;
  fill_pool_from_dump(d, pool, seq, 50, 3);
  EXPECT_EQ(seq.n_tokens, 50);
  for (int i = 0; i < 2; ++i)
    for (int64_t t = 0; t < 50; ++t)
      for (int h = 0; h < 2; ++h) {
        const int64_t src = tiled_source(t, 21, 3);
        const uint16_t* kp = pool.k_page(i, seq.pages[t / kPageSize], h) + (t % kPageSize) * 8;
        const uint16_t* vp = pool.v_page(i, seq.pages[t / kPageSize], h) + (t % kPageSize) * 8;
        for (int x = 0; x < 8; ++x) {
          ASSERT_EQ(kp[x], d.k_row(i, src, h)[x]) << i << " " << t << " " << h;
          ASSERT_EQ(vp[x], d.v_row(i, src, h)[x]);
        }
      }
  KVPool small({1, 2, 8, 4});  // fewer layers than dumped
  SeqPages s2;
  EXPECT_THROW(fill_pool_from_dump(d, small, s2, 10, 0), Error);
  KVPool wrong({2, 1, 8, 4});  // kv heads differ
  EXPECT_THROW(fill_pool_from_dump(d, wrong, s2, 10, 0), Error);
}

}  // namespace
}  // namespace tw::kv
