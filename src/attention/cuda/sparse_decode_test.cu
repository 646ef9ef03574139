// Varlen sparse decode attention against the CPU references: sparse_reference (double, two-pass) on
// random token lists, and with every position listed, dense_reference (p = 1 with select-all lists
// is dense attention). bf16 runs use values that are exact in fp16, so the CPU cache holds exactly
// the device's values and the same references apply.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/cuda/pruner_test_util.h"
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

// |gpu - ref| <= 2e-5 * max |ref| of the head's row + 1e-6 (fp32 accumulation over <= 10^4 tokens).
void compare_rows(const std::vector<float>& got, const std::vector<float>& ref, int d, const char* what) {
  int bad = 0;
  for (size_t r = 0; r < got.size() / d; ++r) {
    double mx = 0;
    for (int i = 0; i < d; ++i) mx = std::max(mx, (double)std::fabs(ref[r * d + i]));
    for (int i = 0; i < d; ++i) {
      const size_t x = r * d + i;
      ASSERT_TRUE(std::isfinite(got[x])) << what << ": output " << r << "," << i << " not written";
      if (std::fabs(got[x] - ref[x]) > 2e-5 * mx + 1e-6 && ++bad <= 5)
        ADD_FAILURE() << what << ": head row " << r << " dim " << i << ": gpu " << got[x] << " ref " << ref[x];
    }
  }
  EXPECT_EQ(bad, 0);
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
};

TEST(SparseDecodeCuda, RandomListsMatchCpu) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  for (const Cfg& c : kCfgs) {
    SCOPED_TRACE(cat("H ", c.H, " Hkv ", c.Hkv, " d ", c.d, c.dtype == KvDtype::F16 ? " f16" : " bf16"));
    BatchSpec spec;
    spec.n_heads = c.H, spec.n_kv_heads = c.Hkv, spec.head_dim = c.d, spec.dtype = c.dtype, spec.seq_len = c.lens;
    spec.kscale = 1.2f;
    auto B = make_batch(spec, rng);
    HostLists lists;
    lists.capacity = 3000;
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
    compare_rows(got, ref, c.d, "sparse");
  }
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
    const std::vector<float> got = run_sparse(*B, lists);
    std::vector<float> ref(got.size());
    for (int s = 0; s < B->batch; ++s) {
      const size_t off = (size_t)s * c.H * c.d;
      dense_reference(*B->pool, B->seqs[s], 0, B->hs(), B->q.data() + off, c.lens[s], ref.data() + off);
    }
    compare_rows(got, ref, c.d, "select-all vs dense");
  }
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

}  // namespace
}  // namespace tw::attn::cuda
