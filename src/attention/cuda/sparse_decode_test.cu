// Varlen sparse decode attention against the CPU references: sparse_reference (double, two-pass) on
// random token lists, and with every position listed, dense_reference (p = 1 with select-all lists
// is dense attention). bf16 runs use values that are exact in fp16, so the CPU cache holds exactly
// the device's values and the same references apply.
#include <gtest/gtest.h>

#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

#include "attention/cuda/pruner_test_util.h"
#include "attention/cuda/real_kv_test_util.h"
#include "attention/cuda/sparse_decode.h"
#include "attention/dense_cpu.h"
#include "attention/sparse_cpu.h"

namespace tw::attn::cuda {
namespace {

using namespace ptest;
using ::tw::cuda::test::expect_error;
using ::tw::cuda::test::fresh_seed;

std::vector<float> run_sparse(const Batch& B, const HostLists& lists) {
  const int n_lists = B.batch * B.spec.n_kv_heads;
  DevLists dl(n_lists, lists.capacity);
  dl.upload(lists);
  const size_t ws = sparse_decode_workspace_bytes(B.kv, lists.capacity);
  ::tw::cuda::DeviceBuffer dws(ws), dout(B.q.size() * 4);
  TW_CUDA_CHECK(cudaMemset(dws.get(), 0xFF, ws));          // the workspace needs no initialisation
  TW_CUDA_CHECK(cudaMemset(dout.get(), 0xFF, dout.size()));  // NaN: unwritten outputs show
  sparse_decode(B.kv, B.d_q.as<float>(), dl.tl, dout.as<float>(), dws.get(), ws);
  TW_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> out(B.q.size());
  dout.download(out.data(), out.size() * 4);
  return out;
}

// Per (sequence, head) row: ||gpu - ref|| / ||ref|| <= 2e-3 (fp16) / 1.5e-2 (bf16). The kernel rounds the
// softmax weights to the KV dtype for the tensor-core P.V (the dense kernel's arithmetic,
// decode_tile.cuh): ~u/sqrt(3) relative with u = 2^-11 / 2^-8; any indexing, masking or merge mistake
// is O(1).
void compare_rows(const std::vector<float>& got, const std::vector<float>& ref, int d, KvDtype dtype,
                  const char* what) {
  const double tol = dtype == KvDtype::F16 ? 2e-3 : 1.5e-2;
  int bad = 0;
  for (size_t r = 0; r < got.size() / d; ++r) {
    double e2 = 0, r2 = 0;
    for (int i = 0; i < d; ++i) {
      const size_t x = r * d + i;
      ASSERT_TRUE(std::isfinite(got[x])) << what << ": output " << r << "," << i << " not written";
      e2 += (double(got[x]) - ref[x]) * (double(got[x]) - ref[x]);
      r2 += double(ref[x]) * ref[x];
    }
    if (std::sqrt(e2) > tol * std::sqrt(r2) + 1e-6 && ++bad <= 5)
      ADD_FAILURE() << what << ": head row " << r << ": relative error " << std::sqrt(e2 / std::max(r2, 1e-30));
  }
  EXPECT_EQ(bad, 0);
}

// Dense attention of every sequence on the CPU (double, two-pass): the reference of select-all lists.
std::vector<float> dense_refs(const Batch& B, const std::vector<int>& lens) {
  const size_t per_seq = (size_t)B.spec.n_heads * B.spec.head_dim;
  std::vector<float> ref(per_seq * B.batch);
  for (int s = 0; s < B.batch; ++s)
    dense_reference(*B.pool, B.seqs[s], 0, B.hs(), B.q.data() + s * per_seq, lens[s], ref.data() + s * per_seq);
  return ref;
}

struct Cfg {
  int H, Hkv, d;
  KvDtype dtype;
  std::vector<int> lens;
};

const std::vector<Cfg> kCfgs = {
    {32, 8, 128, KvDtype::F16, {1, 17, 300, 2100, 70}},  {32, 8, 128, KvDtype::BF16, {1000, 33}},
    {9, 3, 64, KvDtype::F16, {4100, 900, 2}},             {12, 2, 128, KvDtype::BF16, {5000, 2500}},
    {14, 2, 64, KvDtype::BF16, {3500, 64, 16}},           {8, 8, 128, KvDtype::F16, {1500, 700}},
    {16, 2, 64, KvDtype::F16, {6000}},
    // A wave of lists or more (272 >= the H200's 2 x 132 resident attend blocks): items of the cap, a list
    // split only past it.
    {32, 8, 128, KvDtype::F16, {17,  300, 2100, 70,   5000, 1,   900, 2600, 150,  3100, 40,   1800,
                                640, 2049, 333, 4000, 12,   700, 2500, 90, 1300, 3000, 55,   1024,
                                260, 4500, 8,   1600, 2200, 480, 3600, 75, 950,  2300}},
};

// Random lists of every kind (Quest-like runs, random, without the current token, every position, one
// empty list) against sparse_reference.
void check_random_lists(const Cfg& c, int capacity, std::mt19937_64& rng) {
  SCOPED_TRACE(cat("H ", c.H, " Hkv ", c.Hkv, " d ", c.d, c.dtype == KvDtype::F16 ? " f16" : " bf16", " batch ",
                   c.lens.size(), " capacity ", capacity));
  BatchSpec spec;
  spec.n_heads = c.H, spec.n_kv_heads = c.Hkv, spec.head_dim = c.d, spec.dtype = c.dtype, spec.seq_len = c.lens;
  spec.kscale = 1.2f;
  auto B = make_batch(spec, rng);
  HostLists lists;
  lists.capacity = capacity;
  const ListKind kinds[] = {ListKind::QuestLike, ListKind::Random, ListKind::NoCurrent, ListKind::All};
  for (int s = 0; s < B->batch; ++s)
    for (int h = 0; h < c.Hkv; ++h)
      lists.lists.push_back(make_candidates(kinds[(s + h) % 4], c.lens[s], lists.capacity, rng));
  lists.lists[0].clear();  // an empty list: the current token alone
  const std::vector<float> got = run_sparse(*B, lists);
  std::vector<float> ref(got.size());
  for (int s = 0; s < B->batch; ++s) {
    const Selection sel = selection_of(lists, s, c.Hkv);
    const size_t off = (size_t)s * c.H * c.d;
    sparse_reference(*B->pool, B->seqs[s], 0, B->hs(), B->q.data() + off, sel, c.lens[s], ref.data() + off);
  }
  compare_rows(got, ref, c.d, c.dtype, "sparse");
}

TEST(SparseDecodeCuda, RandomListsMatchCpu) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  for (const Cfg& c : kCfgs) check_random_lists(c, 3000, rng);
}

// More lists than a wave of attend blocks (480 >= the H200's 2 x 132): the batch's tokens per item
// from total_kernel (at least 1024), so the capacity-8193 lists have up to nine items; most lists are
// short (one item each), four sequences' long (eight or nine items). kCfgs' last configuration (272
// lists) is the same regime at capacity 3000.
TEST(SparseDecodeCuda, WaveOfLongAndShortLists) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  Cfg c{8, 8, 64, KvDtype::F16, {}};
  std::uniform_int_distribution<int> short_len(20, 700);
  for (int s = 0; s < 56; ++s) c.lens.push_back(short_len(rng));
  for (int len : {8200, 9000, 5000, 2100}) c.lens.push_back(len);
  check_random_lists(c, 8193, rng);
}

TEST(SparseDecodeCuda, SelectAllEqualsDense) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  for (const Cfg& c : {kCfgs[0], kCfgs[3], kCfgs[4]}) {
    SCOPED_TRACE(cat("H ", c.H, " Hkv ", c.Hkv, " d ", c.d));
    BatchSpec spec;
    spec.n_heads = c.H, spec.n_kv_heads = c.Hkv, spec.head_dim = c.d, spec.dtype = c.dtype, spec.seq_len = c.lens;
    auto B = make_batch(spec, rng);
    HostLists lists;
    lists.capacity = *std::max_element(c.lens.begin(), c.lens.end());
    for (int s = 0; s < B->batch; ++s)
      for (int h = 0; h < c.Hkv; ++h) lists.lists.push_back(make_candidates(ListKind::All, c.lens[s], lists.capacity, rng));
    compare_rows(run_sparse(*B, lists), dense_refs(*B, c.lens), c.d, c.dtype, "select-all vs dense");
  }
}

// The real model's attention (TW_REAL_KV, real_kv_test_util.h), with the lists a decode step hands the
// kernel: Quest's candidates at B0 8192 (CPU select_quest), those pruned by the CPU prune_topp at p 0.95
// (a few hundred to a few thousand tokens per list), and every position (against dense attention).
TEST(SparseDecodeCuda, RealModelDump) {
  TW_REQUIRE_CUDA_DEVICE();
  TW_REQUIRE_REAL_KV();
  const kv::KVDump& d = *real::dump();
  SCOPED_TRACE(cat("real KV: ", d.info.model_name, ", ", d.info.n_tokens, " tokens"));
  ThreadPool tp(2);
  for (KvDtype dt : {KvDtype::F16, KvDtype::BF16}) {
    auto B = real::standard_batch(d, dt);
    const int H = B->spec.n_heads, Hkv = B->spec.n_kv_heads, D = B->spec.head_dim;
    const std::vector<int>& lens = B->spec.seq_len;
    const int max_len = *std::max_element(lens.begin(), lens.end());
    HostLists quest, pruned, all;
    quest.capacity = pruned.capacity = all.capacity = max_len;
    for (int s = 0; s < B->batch; ++s) {
      Selection sel, kept;
      real::cpu_chain(*B, s, 8192, 0.95f, tp, sel, kept);
      for (int h = 0; h < Hkv; ++h) {
        quest.lists.emplace_back(sel.list(h), sel.list(h) + sel.size(h));
        pruned.lists.emplace_back(kept.list(h), kept.list(h) + kept.size(h));
        all.lists.emplace_back(lens[s]);
        std::iota(all.lists.back().begin(), all.lists.back().end(), 0);
      }
    }
    for (const auto& [lists, what] : {std::pair{&quest, "Quest B0 8192"}, std::pair{&pruned, "pruned p 0.95"}}) {
      SCOPED_TRACE(cat(dt == KvDtype::F16 ? "f16 " : "bf16 ", what));
      const std::vector<float> got = run_sparse(*B, *lists);
      std::vector<float> ref(got.size());
      for (int s = 0; s < B->batch; ++s) {
        const size_t off = (size_t)s * H * D;
        sparse_reference(*B->pool, B->seqs[s], 0, B->hs(), B->q.data() + off, selection_of(*lists, s, Hkv), lens[s],
                         ref.data() + off);
      }
      compare_rows(got, ref, D, dt, what);
    }
    compare_rows(run_sparse(*B, all), dense_refs(*B, lens), D, dt, "select-all vs dense");
  }
}

// The item boundaries (sparse_decode.cu, split_of): for these 24 lists the tokens per item T is its
// floor of 256 on the H200 (len x 24 / want <= 189 with want = 132 SMs x 4; on a GPU of under 98 SMs
// the longest lists get larger items, still checked against the reference). Lists of T + 1 .. T + 63 entries are
// one item (the rest under T / 4 is spread), which writes the output itself; T + 64 is two; 2049 ..
// 2111 entries are eight equal items, 2112 nine (the last of 64), 4150 sixteen; the one-entry and
// T-entry lists are single items too. Every list holds every position (so the reference is dense
// attention), the current token included or, for odd sequences, appended by the kernel.
TEST(SparseDecodeCuda, ItemBoundaries) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  BatchSpec spec;
  spec.n_heads = 8, spec.n_kv_heads = 2, spec.head_dim = 128, spec.dtype = KvDtype::F16;
  spec.seq_len = {1, 256, 257, 300, 319, 320, 321, 2049, 2100, 2111, 2112, 4150};
  auto B = make_batch(spec, rng);
  HostLists lists;
  lists.capacity = 4150;
  for (int s = 0; s < B->batch; ++s)
    for (int h = 0; h < spec.n_kv_heads; ++h) {
      std::vector<int32_t> all = make_candidates(ListKind::All, spec.seq_len[s], lists.capacity, rng);
      if (s % 2 == 1) all.pop_back();  // the kernel appends the current token
      lists.lists.push_back(all);
    }
  compare_rows(run_sparse(*B, lists), dense_refs(*B, spec.seq_len), spec.head_dim, spec.dtype, "item boundaries");
}

TEST(SparseDecodeCuda, BadConfigurationsFail) {
  TW_REQUIRE_CUDA_DEVICE();
  std::mt19937_64 rng(2);
  BatchSpec spec;
  spec.n_heads = 8, spec.n_kv_heads = 2, spec.head_dim = 64, spec.seq_len = {40};
  auto B = make_batch(spec, rng);
  DevLists dl(2, 64);
  ::tw::cuda::DeviceBuffer out(B->q.size() * 4);
  const size_t ws = sparse_decode_workspace_bytes(B->kv, 64);
  ::tw::cuda::DeviceBuffer dws(ws);
  PagedKV kv = B->kv;
  kv.head_dim = 80;
  expect_error([&] { sparse_decode(kv, B->d_q.as<float>(), dl.tl, out.as<float>(), dws.get(), ws); }, "head_dim");
  kv = B->kv;
  kv.n_heads = 20;  // G = 10
  expect_error([&] { sparse_decode(kv, B->d_q.as<float>(), dl.tl, out.as<float>(), dws.get(), ws); }, "group");
  expect_error([&] { sparse_decode(B->kv, B->d_q.as<float>(), dl.tl, out.as<float>(), dws.get(), ws - 16); },
               "workspace");
}

__global__ void fill_half(__half* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t x = (uint32_t)i * 2654435761u ^ seed;
    x ^= x >> 15, x *= 2246822519u, x ^= x >> 13, x *= 3266489917u, x ^= x >> 16;
    p[i] = __float2half((x >> 8) * (2.f / 16777216.f) - 1.f);
  }
}

// Llama-3.1-8B shape, 32 sequences x 32768 tokens (distinct K/V per sequence: 4.3 GB), lists of
// `per_list` random positions per (sequence, kv head) (~2% of the context, Twilight's typical |I1|).
// TW_BENCH_BATCH picks another batch, TW_BENCH_PER_LIST one list length instead of the three.
TEST(SparseDecodeCudaBench, DISABLED_Llama8B) {
  TW_REQUIRE_CUDA_DEVICE();
  const int batch = bench_size("TW_BENCH_BATCH", 32), per = bench_knob("TW_BENCH_PER_LIST");
  const std::vector<int> per_lists =
      per > 0 ? std::vector<int>{std::min(std::max(2, per), 8192)} : std::vector<int>{160, 655, 2048};
  const int H = 32, Hkv = 8, d = 128, L = 32768;
  const int64_t n_pages = (int64_t)batch * (L / kPageSize);
  const size_t n_elem = (size_t)n_pages * Hkv * kPageSize * d;
  ::tw::cuda::DeviceBuffer k(n_elem * 2), v(n_elem * 2);
  fill_half<<<2048, 256>>>(k.as<__half>(), n_elem, 3u);
  fill_half<<<2048, 256>>>(v.as<__half>(), n_elem, 5u);
  TW_CUDA_CHECK_LAUNCH();
  std::mt19937_64 rng(99);
  std::vector<int32_t> pt(n_pages), len(batch, L);
  std::iota(pt.begin(), pt.end(), 0);
  std::shuffle(pt.begin(), pt.end(), rng);
  ::tw::cuda::DeviceBuffer dpt(pt.size() * 4), dlen(len.size() * 4), dq((size_t)batch * H * d * 4),
      dout((size_t)batch * H * d * 4);
  dpt.upload(pt.data(), pt.size() * 4);
  dlen.upload(len.data(), len.size() * 4);
  const auto q = ::tw::cuda::test::random_normal(rng, (size_t)batch * H * d);
  dq.upload(q.data(), q.size() * 4);
  PagedKV kv;
  kv.k = k.get(), kv.v = v.get(), kv.page_table = dpt.as<int32_t>(), kv.seq_len = dlen.as<int32_t>();
  kv.batch = batch, kv.n_heads = H, kv.n_kv_heads = Hkv, kv.head_dim = d, kv.max_pages = L / kPageSize;
  kv.n_pages = n_pages;
  for (int per_list : per_lists) {
    HostLists lists;
    lists.capacity = 8193;
    std::uniform_int_distribution<int> U(0, L - 2);
    for (int i = 0; i < batch * Hkv; ++i) {
      std::vector<int32_t> l;
      while ((int)l.size() < per_list - 1) {
        l.push_back(U(rng));
        if ((int)l.size() == per_list - 1) {
          std::sort(l.begin(), l.end());
          l.erase(std::unique(l.begin(), l.end()), l.end());
        }
      }
      l.push_back(L - 1);
      lists.lists.push_back(l);
    }
    DevLists dl(batch * Hkv, lists.capacity);
    dl.upload(lists);
    const size_t ws = sparse_decode_workspace_bytes(kv, lists.capacity);
    ::tw::cuda::DeviceBuffer dws(ws);
    const auto [us, us_direct] = time_us([&](cudaStream_t st) {
      sparse_decode(kv, dq.as<float>(), dl.tl, dout.as<float>(), dws.get(), ws, st);
    });
    const double bytes = (double)batch * Hkv * per_list * (2.0 * d * 2 + 4);
    std::printf("BENCH sparse_decode: batch %d H %d Hkv %d d %d |I1| %d per kv head: median %.1f us per call "
                "in a graph (%.1f us direct launch), %.1f MB read, %.0f GB/s\n",
                batch, H, Hkv, d, per_list, us, us_direct, bytes / 1e6, bytes / us / 1e3);
  }
}

}  // namespace
}  // namespace tw::attn::cuda
