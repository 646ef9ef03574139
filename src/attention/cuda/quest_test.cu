// quest_select (GPU) against the CPU select_quest (Group mode) on the same pages: identical group
// scores and token lists, bit for bit (page_bounds.h: an exact integer dot, then the same float
// operations), on dyadic inputs (K multiples of 1/8, q multiples of 1/4: many exact page ties), on
// Gaussian inputs, with inf keys (NaN scores rank as +inf), tiny contexts, budgets at and past the
// context; d 64 / 128, G 1..8. Both read the same 8-bit bounds, built by the CPU key side.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "attention/cuda/attn_test_util.h"
#include "attention/cuda/quest.h"
#include "attention/cuda/real_kv_test_util.h"
#include "attention/key_side.h"
#include "attention/selectors.h"
#include "common/fp16.h"
#include "kv/kv_cache.h"

namespace tw::attn::cuda {
namespace {

using namespace test;

enum class Values { Dyadic, Gaussian, DyadicWithInf };

struct QuestCase {
  KvDtype dt;
  int d, G, hkv;
  std::vector<int> lens;
  Values values;
};

// Builds the CPU cache and key side, mirrors the bounds to the device, runs both selectors for each
// budget and compares. Adds the number of lists compared exactly to `exact` (ASSERTs need void).
void run_case(std::mt19937_64& rng, const QuestCase& c, const std::vector<int64_t>& budgets, int& exact) {
  SCOPED_TRACE(cat(dtype_name(c.dt), " d ", c.d, " G ", c.G, " Hkv ", c.hkv, " values ", (int)c.values));
  const int batch = (int)c.lens.size(), d = c.d, hkv = c.hkv, H = c.G * hkv;
  PagedBatch pb = make_batch(rng, c.dt, H, hkv, d, c.lens, 1.f);  // random pages; K/V unused here
  pb.upload();
  kv::KVPool pool({1, hkv, d, pb.n_pages});
  KeySide ks({1, hkv, d, pb.n_pages});
  std::vector<kv::SeqPages> seqs(batch);
  std::normal_distribution<float> N(0.f, 1.f);
  std::uniform_int_distribution<int> k8(-24, 24), q4(-8, 8);
  std::vector<float> kk(hkv * d), vv(hkv * d, 0.f);
  for (int b = 0; b < batch; ++b) {
    const int np = (c.lens[b] + kPageSize - 1) / kPageSize;
    seqs[b].pages.assign(pb.page_table.begin() + (size_t)b * pb.max_pages,
                         pb.page_table.begin() + (size_t)b * pb.max_pages + np);
    for (int t = 0; t < c.lens[b]; ++t) {
      // Dyadic rows repeat often across pages (few distinct values), so whole pages tie.
      for (auto& x : kk) x = c.values == Values::Gaussian ? 1.5f * N(rng) : k8(rng) / 8.f;
      if (c.values == Values::DyadicWithInf && rng() % 97 == 0) kk[rng() % kk.size()] = (rng() & 1) ? INFINITY : -INFINITY;
      pool.write(0, seqs[b], t, kk.data(), vv.data());
      ks.append(pool, 0, seqs[b], t);
    }
    seqs[b].n_tokens = c.lens[b];
  }
  if (c.values != Values::Gaussian) {  // copy some pages' bounds over others: exact page ties
    for (int b = 0; b < batch; ++b)
      for (size_t lp = 1; lp + 1 < seqs[b].pages.size(); ++lp)
        if (rng() % 4 == 0) {
          const int32_t from = seqs[b].pages[rng() % seqs[b].pages.size()], to = seqs[b].pages[lp];
          for (int h = 0; h < hkv; ++h) {
            std::copy_n(ks.bound_codes(0, from, h), 2 * d, const_cast<uint8_t*>(ks.bound_codes(0, to, h)));
            std::copy_n(ks.bound_param(0, from, h), 2, const_cast<float*>(ks.bound_param(0, to, h)));
          }
        }
  }
  // Device bounds: the CPU key side's 8-bit codes and params as they are (dtype-independent); unused
  // pages hold NaN params.
  const size_t n_ph = (size_t)pb.n_pages * hkv;
  std::vector<uint8_t> bcode(n_ph * 2 * d, 0);
  std::vector<float> bparam(n_ph * 2, NAN);
  for (int b = 0; b < batch; ++b)
    for (int32_t phys : seqs[b].pages)
      for (int h = 0; h < hkv; ++h) {
        const size_t ph = (size_t)phys * hkv + h;
        std::copy_n(ks.bound_codes(0, phys, h), 2 * d, &bcode[ph * 2 * d]);
        std::copy_n(ks.bound_param(0, phys, h), 2, &bparam[ph * 2]);
      }
  DeviceBuffer dcode = to_device(bcode), dparam = to_device(bparam);
  KeySideDev side;
  side.bcode = dcode.as<uint8_t>();
  side.bparam = dparam.as<float>();

  std::vector<float> q((size_t)batch * H * d);
  for (auto& x : q) x = c.values == Values::Gaussian ? N(rng) : q4(rng) / 4.f;
  DeviceBuffer dq = to_device(q);
  const PagedKV kv = pb.view();
  const int64_t max_len = *std::max_element(c.lens.begin(), c.lens.end());
  DeviceBuffer ws(quest_scores_bytes(kv));
  for (int64_t budget : budgets) {
    SCOPED_TRACE(cat("budget ", budget));
    const int cap = (int)quest_list_capacity(kv, budget) + 5;
    const size_t n_lists = (size_t)batch * hkv;
    DeviceBuffer dcount(n_lists * 4), dtok(n_lists * cap * 4);
    TW_CUDA_CHECK(cudaMemset(dcount.get(), 0xFF, dcount.size()));
    TW_CUDA_CHECK(cudaMemset(dtok.get(), 0xFF, dtok.size()));  // -1: untouched entries show
    TokenLists tl{dcount.as<int32_t>(), dtok.as<int32_t>(), cap};
    quest_select(kv, side, dq.as<float>(), budget, max_len, tl, nullptr, ws.as<float>(), ws.size());
    TW_CUDA_CHECK(cudaDeviceSynchronize());
    const auto count = to_host<int32_t>(dcount, n_lists), tok = to_host<int32_t>(dtok, n_lists * cap);
    const auto gscores = to_host<float>(ws, (size_t)batch * hkv * pb.max_pages);
    {  // the decode step's form, without the score output: the same lists
      TW_CUDA_CHECK(cudaMemset(dcount.get(), 0xFF, dcount.size()));
      TW_CUDA_CHECK(cudaMemset(dtok.get(), 0xFF, dtok.size()));
      quest_select(kv, side, dq.as<float>(), budget, max_len, tl);
      TW_CUDA_CHECK(cudaDeviceSynchronize());
      ASSERT_EQ(to_host<int32_t>(dcount, n_lists), count) << "counts without the score output";
      ASSERT_EQ(to_host<int32_t>(dtok, n_lists * cap), tok) << "lists without the score output";
    }
    {  // the pruner's input form (PageLists): the same counts, and pages whose tokens are the lists
      const int pcap = cap / kPageSize + 1;
      DeviceBuffer dpc(n_lists * 4), dpg(n_lists * pcap * 4);
      TW_CUDA_CHECK(cudaMemset(dpc.get(), 0xFF, dpc.size()));
      TW_CUDA_CHECK(cudaMemset(dpg.get(), 0xFF, dpg.size()));
      quest_select_pages(kv, side, dq.as<float>(), budget, max_len, PageLists{dpc.as<int32_t>(), dpg.as<int32_t>(), pcap});
      TW_CUDA_CHECK(cudaDeviceSynchronize());
      ASSERT_EQ(to_host<int32_t>(dpc, n_lists), count) << "page lists' token counts";
      const auto pg = to_host<int32_t>(dpg, n_lists * pcap);
      for (size_t li = 0; li < n_lists; ++li) {
        const int np_l = (count[li] + kPageSize - 1) / kPageSize;
        for (int i = 0; i < count[li]; ++i)
          ASSERT_EQ(pg[li * pcap + i / kPageSize] * kPageSize + i % kPageSize, tok[li * cap + i])
              << "list " << li << ", token " << i << " from the page output";
        for (int k = np_l; k < pcap; ++k) ASSERT_EQ(pg[li * pcap + k], -1) << "page written past the count, list " << li;
      }
    }
    for (int b = 0; b < batch; ++b) {
      Selection sel;
      select_quest(ks, seqs[b], 0, {H, hkv, d}, q.data() + (size_t)b * H * d, c.lens[b], budget, GqaMode::Group, sel);
      const int np = (c.lens[b] + kPageSize - 1) / kPageSize;
      std::vector<float> cpu_scores((size_t)hkv * np);
      quest_page_scores(ks, seqs[b], 0, {H, hkv, d}, q.data() + (size_t)b * H * d, c.lens[b], GqaMode::Group,
                        cpu_scores.data());
      for (int h = 0; h < hkv; ++h) {
        SCOPED_TRACE(cat("seq ", b, " (len ", c.lens[b], ") kv head ", h));
        const size_t li = (size_t)b * hkv + h;
        const float* gs = &gscores[li * pb.max_pages];
        const float* cs = &cpu_scores[(size_t)h * np];
        const bool all = budget >= c.lens[b] || (budget + kPageSize - 1) / kPageSize >= np;
        if (!all) {  // scores are computed only when pages are chosen
          for (int p = 0; p < np; ++p)
            ASSERT_EQ(gs[p], cs[p]) << "page " << p << " (the integer score: identical on both sides)";
        }
        ASSERT_EQ(count[li], sel.size(h)) << "list length";
        for (int i = 0; i < count[li]; ++i)
          ASSERT_EQ(tok[li * cap + i], sel.list(h)[i]) << "entry " << i << " of " << count[li];
        for (int i = count[li]; i < cap; ++i) ASSERT_EQ(tok[li * cap + i], -1) << "written past the count, entry " << i;
        ++exact;
      }
    }
  }
}

TEST(QuestCuda, MatchesCpuSelectQuest) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> len(40, 3000), long_len(3000, 40000);
  const std::vector<int64_t> budgets = {1, 16, 17, 40, 100, 256, 1000, 2999, 20000, 1 << 20};
  int exact = 0, total = 0, config = -1, run = 0;
  for (KvDtype dt : {KvDtype::F16, KvDtype::BF16})
    for (int d : {64, 128})
      for (int G : {1, 3, 4, 6, 7, 8})
        for (Values v : {Values::Dyadic, Values::Gaussian, Values::DyadicWithInf}) {
          if (!in_test_shard(++config)) continue;
          ++run;
          const int hkv = 1 + (int)(rng() % 2);
          // Tiny contexts (one page, one token, two pages, 33 tokens) next to long ones. With dyadic
          // values the longest (up to 2500 pages) spreads its pages over a cluster of several blocks,
          // exact ties across blocks included; Gaussian rows stay short: one block per list.
          const int last = v == Values::Gaussian ? len(rng) : long_len(rng);
          const std::vector<int> lens = {1, 16, 17, 33, len(rng), last};
          run_case(rng, {dt, d, G, hkv, lens, v}, budgets, exact);
          if (HasFatalFailure()) return;
          total += (int)(lens.size() * hkv * budgets.size());
        }
  EXPECT_GT(run, 0) << "no config in this TW_TEST_SHARD";
  if (run <= config) std::printf("TW_TEST_SHARD: %d of %d configs\n", run, config + 1);
  EXPECT_EQ(exact, total) << exact << " of " << total << " lists compared exactly";
}

// More lists than the device holds clusters of two blocks (H200: one block per list then), one of them
// past 8192 middle pages: its block's threads take runs of 36 pages (several 8-key rounds each, the
// last one partial) in the radix passes and the emit; the short lists' blocks, one page per thread.
TEST(QuestCuda, ManyListsOneLongRun) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> len(16, 2000);
  const int batch = sm_count() + 1, hkv = 2;
  std::vector<int> lens;
  for (int b = 0; b + 1 < batch; ++b) lens.push_back(len(rng));
  lens.push_back(140001);  // 8751 pages
  const std::vector<int64_t> budgets = {100, 1000, 8192, 20000};
  int exact = 0;
  run_case(rng, {KvDtype::F16, 64, 4, hkv, lens, Values::Dyadic}, budgets, exact);
  EXPECT_EQ(exact, batch * hkv * (int)budgets.size());
}

// Lists for clusters of two 256-thread blocks that would share SMs (100 lists x 2 blocks on 132 SMs):
// one 512-thread block per list instead, its radix bins owned by the first 256 threads. Tiny lists
// (every token) in the same launch.
TEST(QuestCuda, WholeListsInWideBlocks) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> len(4200, 12000);
  const int hkv = 2, batch = 50;
  std::vector<int> lens = {1, 16, 17};
  while ((int)lens.size() < batch) lens.push_back(len(rng));
  const std::vector<int64_t> budgets = {100, 1000, 8192};
  int exact = 0;
  for (Values v : {Values::Dyadic, Values::Gaussian}) {
    run_case(rng, {KvDtype::F16, 128, 4, hkv, lens, v}, budgets, exact);
    if (HasFatalFailure()) return;
  }
  EXPECT_EQ(exact, 2 * batch * hkv * (int)budgets.size());
}

// Long rows: enough page rows (batch x Hkv x pages) that the scoring warps take several 32-page rounds
// each (pages per warp from ~200k rows up on 132 SMs; the other tests stay at one round), and one
// sequence past 8192 middle pages. No K / V: random bound codes and params written into the CPU key
// side, mirrored as they are.
TEST(QuestCuda, LongRowsMatchCpuSelectQuest) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  const int d = 64, G = 4, hkv = 2, H = G * hkv;
  std::vector<int> lens(31);
  std::uniform_int_distribution<int> len(95000, 102400);
  for (int& l : lens) l = len(rng);
  lens.push_back(140001);  // 8751 pages: 8749 middle pages
  const int batch = (int)lens.size();
  std::vector<int> np(batch);
  int max_pages = 0;
  int64_t n_pages = 0;
  for (int b = 0; b < batch; ++b) {
    np[b] = (lens[b] + kPageSize - 1) / kPageSize;
    max_pages = std::max(max_pages, np[b]);
    n_pages += np[b];
  }
  ASSERT_GE(n_pages * hkv, (int64_t)sm_count() * 48 * 33) << "too few rows for several rounds per warp";
  std::vector<int32_t> perm(n_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> pt((size_t)batch * max_pages, -1);
  std::vector<kv::SeqPages> seqs(batch);
  for (int b = 0, next = 0; b < batch; ++b) {
    seqs[b].pages.assign(perm.begin() + next, perm.begin() + next + np[b]);
    seqs[b].n_tokens = lens[b];
    std::copy(seqs[b].pages.begin(), seqs[b].pages.end(), pt.begin() + (size_t)b * max_pages);
    next += np[b];
  }
  KeySide ks({1, hkv, d, n_pages});
  std::uniform_int_distribution<int> code(0, 255);
  std::normal_distribution<float> N(0.f, 1.f);
  std::uniform_real_distribution<float> step(1e-3f, 5e-2f);
  for (int64_t p = 0; p < n_pages; ++p)
    for (int h = 0; h < hkv; ++h) {
      uint8_t* c = const_cast<uint8_t*>(ks.bound_codes(0, (int32_t)p, h));
      for (int i = 0; i < 2 * d; ++i) c[i] = (uint8_t)code(rng);
      float* par = const_cast<float*>(ks.bound_param(0, (int32_t)p, h));
      par[0] = N(rng), par[1] = step(rng);
    }
  const size_t n_ph = (size_t)n_pages * hkv;
  DeviceBuffer dcode(n_ph * 2 * d), dparam(n_ph * 2 * 4);
  dcode.upload(ks.bound_codes(0, 0, 0), n_ph * 2 * d);
  dparam.upload(ks.bound_param(0, 0, 0), n_ph * 2 * 4);
  KeySideDev side;
  side.bcode = dcode.as<uint8_t>();
  side.bparam = dparam.as<float>();
  std::vector<float> q((size_t)batch * H * d);
  for (auto& x : q) x = N(rng);
  DeviceBuffer dq = to_device(q), dpt = to_device(pt), dlen = to_device(lens), kdummy(256), vdummy(256);
  PagedKV kv;
  kv.k = kdummy.get(), kv.v = vdummy.get();  // Quest reads the bounds only
  kv.page_table = dpt.as<int32_t>(), kv.seq_len = dlen.as<int32_t>();
  kv.batch = batch, kv.n_heads = H, kv.n_kv_heads = hkv, kv.head_dim = d, kv.max_pages = max_pages;
  kv.n_pages = n_pages;
  DeviceBuffer ws(quest_scores_bytes(kv));
  for (int64_t budget : {8192, 40000}) {
    SCOPED_TRACE(cat("budget ", budget));
    const int cap = (int)quest_list_capacity(kv, budget);
    const size_t n_lists = (size_t)batch * hkv;
    DeviceBuffer dcount(n_lists * 4), dtok(n_lists * cap * 4);
    TokenLists tl{dcount.as<int32_t>(), dtok.as<int32_t>(), cap};
    quest_select(kv, side, dq.as<float>(), budget, 140001, tl, nullptr, ws.as<float>(), ws.size());
    TW_CUDA_CHECK(cudaDeviceSynchronize());
    const auto count = to_host<int32_t>(dcount, n_lists), tok = to_host<int32_t>(dtok, n_lists * cap);
    for (int b = 0; b < batch; ++b) {
      Selection sel;
      select_quest(ks, seqs[b], 0, {H, hkv, d}, q.data() + (size_t)b * H * d, lens[b], budget, GqaMode::Group, sel);
      for (int h = 0; h < hkv; ++h) {
        SCOPED_TRACE(cat("seq ", b, " (len ", lens[b], ") kv head ", h));
        const size_t li = (size_t)b * hkv + h;
        ASSERT_EQ(count[li], sel.size(h)) << "list length";
        for (int i = 0; i < count[li]; ++i) ASSERT_EQ(tok[li * cap + i], sel.list(h)[i]) << "entry " << i;
      }
    }
  }
}

TEST(QuestCuda, BadInputIsAnError) {
  TW_REQUIRE_CUDA_DEVICE();
  std::mt19937_64 rng(fresh_seed());
  PagedBatch pb = make_batch(rng, KvDtype::F16, 8, 2, 64, {100}, 1.f);
  pb.upload();
  DeviceBuffer bcode((size_t)pb.n_pages * 2 * 2 * 64), bparam((size_t)pb.n_pages * 2 * 2 * 4), q(8 * 64 * 4), cnt(64),
      tok(1 << 16), ws(1 << 16);
  KeySideDev side;
  side.bcode = bcode.as<uint8_t>();
  side.bparam = bparam.as<float>();
  const PagedKV kv = pb.view();
  using ::tw::cuda::test::expect_error;
  TokenLists tl{cnt.as<int32_t>(), tok.as<int32_t>(), 64};
  expect_error([&] { quest_select(kv, side, q.as<float>(), 0, 100, tl); }, "budget");
  expect_error([&] { quest_select(kv, side, q.as<float>(), 100, 100, tl); }, "capacity 64 < 112");
  expect_error([&] { quest_select_pages(kv, side, q.as<float>(), 100, 100, PageLists{tl.count, tl.tokens, 6}); },
               "page list capacity 6 < 7");
  tl.capacity = 128;
  expect_error([&] { quest_select(kv, side, q.as<float>(), 100, 100, tl, nullptr, ws.as<float>(), 4); }, "score buffer");
  expect_error([&] { quest_select(kv, KeySideDev{}, q.as<float>(), 100, 100, tl); }, "null page bounds");
  PagedKV bad = kv;
  bad.n_heads = 18;
  expect_error([&] { quest_select(bad, side, q.as<float>(), 100, 100, tl); }, "GQA group 9");
}

// The real model's attention (TW_REAL_KV, real_kv_test_util.h): the GPU's page scores and lists equal the
// CPU select_quest's bit for bit, for budgets from a page to the whole context, the long tiled sequence
// spreading its pages over a cluster.
TEST(QuestCuda, RealModelDump) {
  TW_REQUIRE_CUDA_DEVICE();
  TW_REQUIRE_REAL_KV();
  const kv::KVDump& d = *real::dump();
  SCOPED_TRACE(cat("real KV: ", d.info.model_name, ", ", d.info.n_tokens, " tokens"));
  int exact = 0, total = 0;
  for (KvDtype dt : {KvDtype::F16, KvDtype::BF16}) {
    auto B = real::standard_batch(d, dt);
    const ptest::Batch& b = *B;
    const int Hkv = b.spec.n_kv_heads, H = b.spec.n_heads, D = b.spec.head_dim;
    const int64_t max_len = *std::max_element(b.spec.seq_len.begin(), b.spec.seq_len.end());
    DeviceBuffer ws(quest_scores_bytes(b.kv));
    for (int64_t budget : {int64_t(16), int64_t(1000), int64_t(2048), int64_t(8192), max_len / 4, max_len}) {
      SCOPED_TRACE(cat(dtype_name(dt), " budget ", budget));
      const int cap = (int)quest_list_capacity(b.kv, budget);
      const size_t n_lists = (size_t)b.batch * Hkv;
      DeviceBuffer dcount(n_lists * 4), dtok(n_lists * cap * 4);
      TW_CUDA_CHECK(cudaMemset(dcount.get(), 0xFF, dcount.size()));
      TW_CUDA_CHECK(cudaMemset(dtok.get(), 0xFF, dtok.size()));
      quest_select(b.kv, b.ks, b.d_q.as<float>(), budget, max_len, TokenLists{dcount.as<int32_t>(), dtok.as<int32_t>(), cap},
                   nullptr, ws.as<float>(), ws.size());
      TW_CUDA_CHECK(cudaDeviceSynchronize());
      const auto count = to_host<int32_t>(dcount, n_lists), tok = to_host<int32_t>(dtok, n_lists * cap);
      const auto gscores = to_host<float>(ws, n_lists * b.max_pages);
      for (int s = 0; s < b.batch; ++s) {
        const int L = b.spec.seq_len[s], np = (L + kPageSize - 1) / kPageSize;
        const float* q = b.q.data() + (size_t)s * H * D;
        Selection sel;
        select_quest(*b.side, b.seqs[s], 0, b.hs(), q, L, budget, GqaMode::Group, sel);
        std::vector<float> cpu_scores((size_t)Hkv * np);
        quest_page_scores(*b.side, b.seqs[s], 0, b.hs(), q, L, GqaMode::Group, cpu_scores.data());
        const bool all = budget >= L || (budget + kPageSize - 1) / kPageSize >= np;
        for (int h = 0; h < Hkv; ++h) {
          SCOPED_TRACE(cat("seq ", s, " (len ", L, ") kv head ", h));
          const size_t li = (size_t)s * Hkv + h;
          ++total;
          if (!all)  // scores are computed only when pages are chosen
            for (int p = 0; p < np; ++p)
              ASSERT_EQ(gscores[li * b.max_pages + p], cpu_scores[(size_t)h * np + p]) << "page " << p;
          ASSERT_EQ(count[li], sel.size(h)) << "list length";
          for (int i = 0; i < count[li]; ++i) ASSERT_EQ(tok[li * cap + i], sel.list(h)[i]) << "entry " << i;
          ++exact;
        }
      }
    }
  }
  EXPECT_EQ(exact, total);
}

}  // namespace
}  // namespace tw::attn::cuda
