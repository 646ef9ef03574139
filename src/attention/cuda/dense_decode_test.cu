// dense_decode (GPU) against a double-precision reference over the same paged bytes, and against the
// CPU reference attention::dense_reference on a kv::KVPool: fp16 / bf16, d 64 / 128, GQA groups
// 1..8, ragged lengths 1..~5000 with partial last pages, random page tables, NaN in unused slots,
// forced split plans (one split, many, past one combine chunk, an undersized plan), a CUDA-graph
// replay, bad configurations.
// DenseDecodeCudaBench (disabled by default) times it at the Llama-3.1-8B shape, and at the real model's
// at batch 1, with other split counts beside the planned one.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "attention/cuda/attn_test_util.h"
#include "attention/cuda/real_kv_test_util.h"
#include "attention/cuda/dense_decode.h"
#include "attention/dense_cpu.h"
#include "kv/kv_cache.h"

namespace tw::attn::cuda {
namespace {

using namespace test;

// out [batch][H][d] in double: scores, two-pass softmax, weighted V.
std::vector<double> reference(const PagedBatch& pb, const std::vector<float>& q) {
  const int d = pb.head_dim, H = pb.n_heads, G = pb.group();
  std::vector<double> out((size_t)pb.batch() * H * d, 0.0);
  std::vector<double> s, kf, vf;
  for (int b = 0; b < pb.batch(); ++b) {
    const int n = pb.seq_len[b];
    for (int h = 0; h < pb.n_kv_heads; ++h) {
      kf.assign((size_t)n * d, 0.0);
      vf.assign((size_t)n * d, 0.0);
      for (int t = 0; t < n; ++t) {
        const size_t r = pb.row(b, t, h);
        for (int i = 0; i < d; ++i) {
          kf[(size_t)t * d + i] = from_bits(pb.dtype, pb.k[r + i]);
          vf[(size_t)t * d + i] = from_bits(pb.dtype, pb.v[r + i]);
        }
      }
      for (int g = 0; g < G; ++g) {
        const float* qq = q.data() + ((size_t)b * H + h * G + g) * d;
        s.assign(n, 0.0);
        double mx = -INFINITY;
        for (int t = 0; t < n; ++t) {
          double a = 0;
          for (int i = 0; i < d; ++i) a += double(qq[i]) * kf[(size_t)t * d + i];
          s[t] = a / std::sqrt(double(d));
          mx = std::max(mx, s[t]);
        }
        double sum = 0;
        for (int t = 0; t < n; ++t) sum += (s[t] = std::exp(s[t] - mx));
        double* o = out.data() + ((size_t)b * H + h * G + g) * d;
        for (int t = 0; t < n; ++t)
          for (int i = 0; i < d; ++i) o[i] += s[t] / sum * vf[(size_t)t * d + i];
      }
    }
  }
  return out;
}

// Runs dense_decode with `plan` on a poisoned output and compares each (sequence, head) row:
// ||out - ref|| / ||ref|| under tol_row, and over the whole batch under tol_all. Rounding the
// softmax weights to the KV dtype is the only error beyond fp32: ~u/sqrt(3) relative with
// u = 2^-11 (fp16) or 2^-8 (bf16), so tol 2e-3 / 1.5e-2 per row leaves room for unlucky rows while
// any indexing, masking or merge mistake is O(1).
void check(const PagedBatch& pb, const DenseDecodePlan& plan, const std::vector<float>& q,
           const std::vector<double>& ref) {
  SCOPED_TRACE(cat(dtype_name(pb.dtype), " d ", pb.head_dim, " H ", pb.n_heads, " Hkv ", pb.n_kv_heads, " batch ",
                   pb.batch(), " plan ", plan.n_splits, " x ", plan.pages_per_split, " pages"));
  const PagedKV kv = pb.view();
  const size_t n_out = (size_t)pb.batch() * pb.n_heads * pb.head_dim;
  DeviceBuffer dq = to_device(q), dout((n_out + 4) * 4);
  const size_t ws_bytes = dense_decode_workspace_bytes(kv, plan);
  DeviceBuffer ws(std::max<size_t>(ws_bytes, 16));
  TW_CUDA_CHECK(cudaMemset(dout.get(), 0xFF, dout.size()));  // NaN: unwritten rows show
  TW_CUDA_CHECK(cudaMemset(ws.get(), 0xFF, ws.size()));
  dense_decode(kv, plan, dq.as<float>(), dout.as<float>(), ws.get(), ws_bytes);
  TW_CUDA_CHECK(cudaDeviceSynchronize());
  const auto out = to_host<float>(dout, n_out + 4);
  const double tol_row = pb.dtype == KvDtype::F16 ? 2e-3 : 1.5e-2;
  const double tol_all = pb.dtype == KvDtype::F16 ? 5e-4 : 5e-3;
  const int d = pb.head_dim;
  double e2_all = 0, r2_all = 0;
  int bad = 0;
  for (size_t row = 0; row < (size_t)pb.batch() * pb.n_heads; ++row) {
    double e2 = 0, r2 = 0;
    for (int i = 0; i < d; ++i) {
      const double o = out[row * d + i], r = ref[row * d + i];
      ASSERT_TRUE(std::isfinite(o)) << "row " << row << " dim " << i << " not written or not finite: " << o;
      e2 += (o - r) * (o - r);
      r2 += r * r;
    }
    e2_all += e2;
    r2_all += r2;
    if (std::sqrt(e2 / r2) > tol_row && ++bad <= 5)
      ADD_FAILURE() << "row " << row << " (seq " << row / pb.n_heads << ", len " << pb.seq_len[row / pb.n_heads]
                    << ", head " << row % pb.n_heads << "): relative error " << std::sqrt(e2 / r2);
  }
  EXPECT_EQ(bad, 0);
  EXPECT_LT(std::sqrt(e2_all / r2_all), tol_all);
  for (int gk = 0; gk < 4; ++gk) {
    uint32_t bits;
    std::memcpy(&bits, &out[n_out + gk], 4);
    EXPECT_EQ(bits, 0xFFFFFFFFu) << "wrote past the output";
  }
}

std::vector<float> random_q(std::mt19937_64& rng, const PagedBatch& pb) {
  std::normal_distribution<float> N(0.f, 1.f);
  std::vector<float> q((size_t)pb.batch() * pb.n_heads * pb.head_dim);
  for (auto& x : q) x = N(rng);
  return q;
}

TEST(DenseDecodeCuda, RandomRaggedBatches) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  const int sms = ::tw::cuda::device_info(0).sm_count;
  std::uniform_int_distribution<int> len_small(1, 40), len_big(41, 5000), hkv_d(1, 3);
  std::uniform_real_distribution<float> ks(0.5f, 2.5f);
  for (KvDtype dt : {KvDtype::F16, KvDtype::BF16})
    for (int d : {64, 128})
      for (int G : {1, 3, 4, 6, 7, 8}) {
        const int hkv = hkv_d(rng);
        // A tiny sequence, one ending exactly on a page, and random long ones.
        std::vector<int> lens = {len_small(rng), 16 * len_small(rng), len_big(rng), len_big(rng)};
        std::shuffle(lens.begin(), lens.end(), rng);
        PagedBatch pb = make_batch(rng, dt, G * hkv, hkv, d, lens, ks(rng));
        pb.upload();
        const auto q = random_q(rng, pb);
        const auto ref = reference(pb, q);
        const int64_t max_len = *std::max_element(lens.begin(), lens.end());
        check(pb, plan_dense_decode(pb.view(), max_len, sms), q, ref);
        check(pb, DenseDecodePlan{1, pb.max_pages}, q, ref);  // one split: no combine
        check(pb, DenseDecodePlan{7, 3}, q, ref);             // undersized plan: the last split takes the rest
        // Up to 48 splits: sequences past 16 pages take the combine's shared-weights path, shorter ones
        // its loop, in one launch.
        check(pb, DenseDecodePlan{48, std::max(1, (pb.max_pages + 47) / 48)}, q, ref);
      }
}

// The real model's attention (TW_REAL_KV, real_kv_test_util.h): its K / V (fp16 and rounded to bf16) on
// random pages, its queries; the planned split and a single split against the double reference.
TEST(DenseDecodeCuda, RealModelDump) {
  TW_REQUIRE_CUDA_DEVICE();
  TW_REQUIRE_REAL_KV();
  const kv::KVDump& dump = *real::dump();
  const int n = (int)dump.info.n_tokens, H = dump.info.n_heads, hkv = dump.info.n_kv_heads, d = dump.info.head_dim;
  SCOPED_TRACE(cat("real KV: ", dump.info.model_name, ", ", n, " tokens"));
  const uint64_t seed = fresh_seed();  // the pages' placement only
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  const int sms = ::tw::cuda::device_info(0).sm_count;
  const std::vector<int> lens = real::standard_lens(dump);
  const int max_len = *std::max_element(lens.begin(), lens.end());
  for (KvDtype dt : {KvDtype::F16, KvDtype::BF16}) {
    PagedBatch pb = make_batch(rng, dt, H, hkv, d, lens, 1.f);
    std::vector<float> k(d), v(d), q;
    for (int b = 0; b < pb.batch(); ++b) {
      const int layer = real::standard_layer(dump, b);
      for (int t = 0; t < lens[b]; ++t)
        for (int h = 0; h < hkv; ++h) {
          real::row(dump, layer, t, h, k.data(), v.data());
          const size_t r = pb.row(b, t, h);
          for (int i = 0; i < d; ++i) pb.k[r + i] = to_bits(dt, k[i]), pb.v[r + i] = to_bits(dt, v[i]);
        }
      const float* qb = dump.query(0, layer);
      q.insert(q.end(), qb, qb + (size_t)H * d);
    }
    pb.upload();
    const auto ref = reference(pb, q);
    check(pb, plan_dense_decode(pb.view(), max_len, sms), q, ref);
    check(pb, DenseDecodePlan{1, pb.max_pages}, q, ref);
  }
}

// More splits than the many-split combine holds weights for at once (1024): its chunk loop, with a
// shorter sequence beside the long one (fewer splits ran for it), one page per split and two.
TEST(DenseDecodeCuda, SplitsPastOneCombineChunk) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  for (int d : {64, 128}) {
    const std::vector<int> lens = {16 * 1500 - 5, 16 * 300 + 7};
    PagedBatch pb = make_batch(rng, KvDtype::F16, 4, 1, d, lens, 1.5f);
    pb.upload();
    const auto q = random_q(rng, pb);
    const auto ref = reference(pb, q);
    check(pb, DenseDecodePlan{pb.max_pages, 1}, q, ref);
    check(pb, DenseDecodePlan{(pb.max_pages + 1) / 2, 2}, q, ref);
  }
}

// The same pages through the CPU cache and attention::dense_reference (fp16, the CPU's dtype).
TEST(DenseDecodeCuda, MatchesCpuDenseReference) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  std::mt19937 rng32((uint32_t)seed);
  const int hkv = 2, G = 7, d = 128;
  const std::vector<int> lens = {1, 333, 2049};
  kv::KVPool pool({1, hkv, d, 400});
  std::vector<kv::SeqPages> seqs(lens.size());
  std::normal_distribution<float> N(0.f, 1.f);
  std::vector<float> kk(hkv * d), vv(hkv * d);
  for (size_t b = 0; b < lens.size(); ++b) {
    pool.reserve(seqs[b], lens[b]);
    for (int t = 0; t < lens[b]; ++t) {
      for (auto& x : kk) x = 1.5f * N(rng);
      for (auto& x : vv) x = N(rng);
      pool.write(0, seqs[b], t, kk.data(), vv.data());
    }
  }
  PagedBatch pb;
  pb.dtype = KvDtype::F16;
  pb.n_heads = G * hkv;
  pb.n_kv_heads = hkv;
  pb.head_dim = d;
  pb.n_pages = 400;
  pb.seq_len.assign(lens.begin(), lens.end());
  pb.max_pages = 0;
  for (auto& s : seqs) pb.max_pages = std::max(pb.max_pages, (int)s.pages.size());
  pb.page_table.assign(lens.size() * pb.max_pages, -1);
  for (size_t b = 0; b < lens.size(); ++b)
    std::copy(seqs[b].pages.begin(), seqs[b].pages.end(), pb.page_table.begin() + b * pb.max_pages);
  const size_t page_elems = (size_t)kPageSize * d;
  pb.k.assign((size_t)pb.n_pages * hkv * page_elems, 0);
  pb.v = pb.k;
  for (auto& s : seqs)
    for (int32_t phys : s.pages)
      for (int h = 0; h < hkv; ++h) {
        std::copy_n(pool.k_page(0, phys, h), page_elems, pb.k.begin() + ((size_t)phys * hkv + h) * page_elems);
        std::copy_n(pool.v_page(0, phys, h), page_elems, pb.v.begin() + ((size_t)phys * hkv + h) * page_elems);
      }
  pb.upload();
  const auto q = random_q(rng, pb);
  std::vector<double> ref(q.size());
  std::vector<float> o((size_t)pb.n_heads * d);
  for (size_t b = 0; b < lens.size(); ++b) {
    seqs[b].n_tokens = lens[b];
    dense_reference(pool, seqs[b], 0, {pb.n_heads, hkv, d}, q.data() + b * pb.n_heads * d, lens[b], o.data());
    std::copy(o.begin(), o.end(), ref.begin() + b * pb.n_heads * d);
  }
  check(pb, plan_dense_decode(pb.view(), 2049, ::tw::cuda::device_info(0).sm_count), q, ref);
}

// Empty sequences give zero rows; lengths past the page table are clamped to it.
TEST(DenseDecodeCuda, EmptySequenceGivesZeros) {
  TW_REQUIRE_CUDA_DEVICE();
  std::mt19937_64 rng(fresh_seed());
  PagedBatch pb = make_batch(rng, KvDtype::BF16, 8, 2, 64, {0, 50}, 1.f);
  pb.upload();
  const auto q = random_q(rng, pb);
  auto ref = reference(pb, q);
  for (size_t i = 0; i < (size_t)8 * 64; ++i) ref[i] = 0.0;
  const size_t n_out = q.size();
  for (const DenseDecodePlan plan : {DenseDecodePlan{1, 4}, DenseDecodePlan{3, 1}}) {
    DeviceBuffer dq = to_device(q), dout(n_out * 4), ws(std::max<size_t>(16, dense_decode_workspace_bytes(pb.view(), plan)));
    TW_CUDA_CHECK(cudaMemset(dout.get(), 0xFF, dout.size()));
    dense_decode(pb.view(), plan, dq.as<float>(), dout.as<float>(), ws.get(), ws.size());
    const auto out = to_host<float>(dout, n_out);
    for (size_t i = 0; i < (size_t)8 * 64; ++i) ASSERT_EQ(out[i], 0.f) << "empty sequence, element " << i;
    double e2 = 0, r2 = 0;
    for (size_t i = 8 * 64; i < n_out; ++i) {
      e2 += (out[i] - ref[i]) * (out[i] - ref[i]);
      r2 += ref[i] * ref[i];
    }
    EXPECT_LT(std::sqrt(e2 / r2), 5e-3);
  }
}

// The step is captured once in a CUDA graph and replayed with new q and lengths written on the device.
TEST(DenseDecodeCuda, ReplaysInCudaGraph) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  PagedBatch pb = make_batch(rng, KvDtype::F16, 24, 4, 128, {3000, 1200}, 1.5f);
  pb.upload();
  const PagedKV kv = pb.view();
  const DenseDecodePlan plan = plan_dense_decode(kv, 3000, ::tw::cuda::device_info(0).sm_count);
  ASSERT_GT(plan.n_splits, 1);
  const size_t n_out = (size_t)2 * 24 * 128;
  DeviceBuffer dq(n_out * 4), dout(n_out * 4), ws(dense_decode_workspace_bytes(kv, plan));
  cudaStream_t s;
  TW_CUDA_CHECK(cudaStreamCreate(&s));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  TW_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  dense_decode(kv, plan, dq.as<float>(), dout.as<float>(), ws.get(), ws.size(), s);
  TW_CUDA_CHECK(cudaStreamEndCapture(s, &g));
  TW_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
  for (const std::vector<int>& lens : {std::vector<int>{3000, 1200}, std::vector<int>{17, 1190}}) {
    pb.seq_len = lens;
    pb.dlen.upload(lens.data(), lens.size() * 4);
    const auto q = random_q(rng, pb);
    dq.upload(q.data(), q.size() * 4);
    TW_CUDA_CHECK(cudaGraphLaunch(ge, s));
    TW_CUDA_CHECK(cudaStreamSynchronize(s));
    const auto out = to_host<float>(dout, n_out);
    const auto ref = reference(pb, q);
    double e2 = 0, r2 = 0;
    for (size_t i = 0; i < n_out; ++i) {
      e2 += (out[i] - ref[i]) * (out[i] - ref[i]);
      r2 += ref[i] * ref[i];
    }
    EXPECT_LT(std::sqrt(e2 / r2), 5e-4) << "lengths " << lens[0] << ", " << lens[1];
  }
  TW_CUDA_CHECK(cudaGraphExecDestroy(ge));
  TW_CUDA_CHECK(cudaGraphDestroy(g));
  TW_CUDA_CHECK(cudaStreamDestroy(s));
}

TEST(DenseDecodeCuda, BadConfigurationIsAnError) {
  TW_REQUIRE_CUDA_DEVICE();
  std::mt19937_64 rng(fresh_seed());
  PagedBatch pb = make_batch(rng, KvDtype::F16, 8, 2, 64, {40}, 1.f);
  pb.upload();
  DeviceBuffer dq(8 * 64 * 4), dout(8 * 64 * 4);
  auto run = [&](PagedKV kv, DenseDecodePlan plan, size_t ws_bytes) {
    DeviceBuffer ws(std::max<size_t>(16, ws_bytes));
    dense_decode(kv, plan, dq.as<float>(), dout.as<float>(), ws.get(), ws_bytes);
  };
  const DenseDecodePlan one{1, 8};
  PagedKV kv = pb.view();
  kv.head_dim = 96;
  ::tw::cuda::test::expect_error([&] { run(kv, one, 0); }, "head_dim 96");
  kv = pb.view();
  kv.n_heads = 18, kv.n_kv_heads = 2;
  ::tw::cuda::test::expect_error([&] { run(kv, one, 0); }, "GQA group 9");
  kv = pb.view();
  kv.n_heads = 7;
  ::tw::cuda::test::expect_error([&] { run(kv, one, 0); }, "not a positive multiple");
  kv = pb.view();
  kv.dtype = static_cast<KvDtype>(5);
  ::tw::cuda::test::expect_error([&] { run(kv, one, 0); }, "dtype");
  kv = pb.view();
  kv.v = nullptr;
  ::tw::cuda::test::expect_error([&] { run(kv, one, 0); }, "null K or V");
  kv = pb.view();
  kv.page_table = nullptr;
  ::tw::cuda::test::expect_error([&] { run(kv, one, 0); }, "null page table");
  kv = pb.view();
  const DenseDecodePlan four{4, 1};
  ::tw::cuda::test::expect_error([&] { run(kv, four, dense_decode_workspace_bytes(kv, four) - 4); }, "workspace");
  ::tw::cuda::test::expect_error([&] { run(kv, DenseDecodePlan{0, 1}, 0); }, "bad plan");
  ::tw::cuda::test::expect_error([&] { plan_dense_decode(kv, 0, 132); }, "max_seq_len");
}

// ---- timing -------------------------------------------------------------------------------------

// Fills n values of T with hash-random N(0,1)-ish values (sum of uniforms), on the device.
template <typename T>
__global__ void fill_random_kernel(T* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31, x *= 0xBF58476D1CE4E5B9ull, x ^= x >> 27, x *= 0x94D049BB133111EBull, x ^= x >> 31;
    const float u = ((x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48)) / 65536.f - 2.f;
    p[i] = T(u * 1.7320508f * scale);
  }
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Llama-3.1-8B attention shape (H 32, Hkv 8, d 128), batch 1/16/64, L 8k/32k (and 128k for the smaller
// batches), fp16 and bf16. Every sequence has its own pages; several "layers" (pools) are rotated so
// the data read per launch is well past the L2. Prints BENCH lines: the median over 7 replays of a
// CUDA graph of >= 10 launches, per launch.
TEST(DenseDecodeCudaBench, DISABLED_Llama8B) {
  TW_REQUIRE_CUDA_DEVICE();
  const auto info = ::tw::cuda::device_info(0);
  std::printf("device: %s\n", ::tw::cuda::describe(info).c_str());
  cudaEvent_t e0, e1;
  TW_CUDA_CHECK(cudaEventCreate(&e0));
  TW_CUDA_CHECK(cudaEventCreate(&e1));
  // Copy bandwidth: 2 GiB device-to-device, bytes read + written.
  double copy_gbs = 0;
  {
    const size_t bytes = size_t(2) << 30;
    DeviceBuffer a(bytes), c(bytes);
    TW_CUDA_CHECK(cudaMemset(a.get(), 1, bytes));
    std::vector<float> ms;
    for (int r = 0; r < 12; ++r) {
      TW_CUDA_CHECK(cudaEventRecord(e0));
      TW_CUDA_CHECK(cudaMemcpyAsync(c.get(), a.get(), bytes, cudaMemcpyDeviceToDevice));
      TW_CUDA_CHECK(cudaEventRecord(e1));
      TW_CUDA_CHECK(cudaEventSynchronize(e1));
      float t;
      TW_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
      if (r >= 2) ms.push_back(t);
    }
    copy_gbs = 2.0 * bytes / (median(ms) * 1e-3) / 1e9;
    std::printf("BENCH copy d2d 2 GiB: %.0f GB/s (read + write)\n", copy_gbs);
  }
  const int d = 128;
  // The Llama-3.1-8B shape (32 / 8 heads), then the real model's (Qwen2.5-Coder-1.5B: 12 / 2) at batch 1.
  struct Case { int batch, L, H, Hkv; };
  const Case cases[] = {{1, 8192, 32, 8},   {16, 8192, 32, 8},  {64, 8192, 32, 8},  {1, 32768, 32, 8},
                        {16, 32768, 32, 8}, {64, 32768, 32, 8}, {1, 131072, 32, 8}, {16, 131072, 32, 8},
                        {1, 8192, 12, 2},   {1, 32768, 12, 2}};
  std::mt19937_64 rng(fresh_seed());
  for (KvDtype dt : {KvDtype::BF16, KvDtype::F16})
    for (const Case cs : cases) {
      const int H = cs.H, Hkv = cs.Hkv;
      const int pages = cs.L / kPageSize;
      const double kv_bytes = 2.0 * cs.batch * (double)cs.L * Hkv * d * 2;
      const int layers = (int)std::max<double>(1, std::ceil(3.0 * info.l2_bytes / kv_bytes));
      const int64_t n_pages = (int64_t)layers * cs.batch * pages;
      const size_t pool_elems = (size_t)n_pages * Hkv * kPageSize * d;
      DeviceBuffer k(pool_elems * 2), v(pool_elems * 2);
      if (dt == KvDtype::F16) {
        fill_random_kernel<<<1024, 256>>>(k.as<__half>(), pool_elems, rng(), 1.f);
        fill_random_kernel<<<1024, 256>>>(v.as<__half>(), pool_elems, rng(), 1.f);
      } else {
        fill_random_kernel<<<1024, 256>>>(k.as<__nv_bfloat16>(), pool_elems, rng(), 1.f);
        fill_random_kernel<<<1024, 256>>>(v.as<__nv_bfloat16>(), pool_elems, rng(), 1.f);
      }
      TW_CUDA_CHECK_LAUNCH();
      std::vector<int32_t> perm(n_pages);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);  // layer l, sequence b: pages perm[(l*batch + b)*pages ...]
      DeviceBuffer pt = to_device(perm);
      std::vector<int32_t> lens(cs.batch, cs.L);
      DeviceBuffer len = to_device(lens);
      std::vector<float> qh((size_t)cs.batch * H * d);
      std::normal_distribution<float> N(0.f, 1.f);
      for (auto& x : qh) x = N(rng);
      DeviceBuffer q = to_device(qh), out(qh.size() * 4);
      PagedKV kv;
      kv.k = k.get(), kv.v = v.get(), kv.seq_len = len.as<int32_t>(), kv.dtype = dt, kv.batch = cs.batch;
      kv.n_heads = H, kv.n_kv_heads = Hkv, kv.head_dim = d, kv.max_pages = pages, kv.n_pages = n_pages;
      kv.page_table = pt.as<int32_t>();
      // Median time per launch over 7 replays of a CUDA graph of nl launches on the rotated layers (no
      // host launch gaps in the timing).
      auto time_plan = [&](const DenseDecodePlan& plan) {
        DeviceBuffer ws(std::max<size_t>(16, dense_decode_workspace_bytes(kv, plan)));
        cudaStream_t st;
        TW_CUDA_CHECK(cudaStreamCreate(&st));
        const int nl = std::max(layers, 10);
        cudaGraph_t g;
        cudaGraphExec_t ge;
        TW_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        for (int i = 0; i < nl; ++i) {
          kv.page_table = pt.as<int32_t>() + (size_t)(i % layers) * cs.batch * pages;
          dense_decode(kv, plan, q.as<float>(), out.as<float>(), ws.get(), ws.size(), st);
        }
        TW_CUDA_CHECK(cudaStreamEndCapture(st, &g));
        TW_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
        TW_CUDA_CHECK(cudaGraphLaunch(ge, st));  // warm-up
        std::vector<float> us;
        for (int r = 0; r < 7; ++r) {
          TW_CUDA_CHECK(cudaEventRecord(e0, st));
          TW_CUDA_CHECK(cudaGraphLaunch(ge, st));
          TW_CUDA_CHECK(cudaEventRecord(e1, st));
          TW_CUDA_CHECK(cudaEventSynchronize(e1));
          float t;
          TW_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
          us.push_back(t * 1000.f / nl);
        }
        TW_CUDA_CHECK(cudaGraphExecDestroy(ge));
        TW_CUDA_CHECK(cudaGraphDestroy(g));
        TW_CUDA_CHECK(cudaStreamDestroy(st));
        return median(us);
      };
      const double bytes = kv_bytes + (double)cs.batch * pages * 4 + 2.0 * qh.size() * 4;
      const DenseDecodePlan planned = plan_dense_decode(kv, cs.L, info.sm_count);
      // The planner's choice, then (fp16) other split counts: twice the planned splits, one and four
      // waves' worth of blocks, and at batch 1 half and four times the planned splits.
      std::vector<int> forced;
      if (dt == KvDtype::F16) {
        forced.push_back(planned.n_splits * 2);
        for (const int mult : {1, 4}) forced.push_back(mult * std::max(1, info.sm_count * planned.blocks_per_sm / (cs.batch * Hkv)));
        if (cs.batch == 1)
          for (const int s : {planned.n_splits / 2, planned.n_splits * 4}) forced.push_back(s);
      }
      // The planned variant once untimed first: whichever variant ran first after the pools were filled
      // came out 5-12% slow at batch 1 (H200: 1 x 128k, 33 splits 144.9 us timed first, 129.0 third),
      // which once passed for a better plan.
      time_plan(planned);
      std::vector<DenseDecodePlan> plans = {planned};  // distinct split counts, the planned one first
      for (const int f : forced) {
        DenseDecodePlan plan = planned;
        plan.n_splits = std::min(std::max(f, 1), pages);
        plan.pages_per_split = (pages + plan.n_splits - 1) / plan.n_splits;
        plan.n_splits = (pages + plan.pages_per_split - 1) / plan.pages_per_split;
        if (std::none_of(plans.begin(), plans.end(), [&](const DenseDecodePlan& o) { return o.n_splits == plan.n_splits; }))
          plans.push_back(plan);
      }
      for (const DenseDecodePlan& plan : plans) {
        const bool is_forced = &plan != &plans[0];
        const float t = time_plan(plan);
        const double gbs = bytes / (t * 1e-6) / 1e9;
        std::printf("BENCH dense_decode %s batch %d x L %d x Hkv %d x G %d x d %d: %.1f us, %.1f MB, %.0f GB/s, "
                    "%.1f%% of copy (%s %d x %d pages, %d blocks/SM, %d layers rotated)\n",
                    dtype_name(dt), cs.batch, cs.L, Hkv, H / Hkv, d, t, bytes / 1e6, gbs, 100.0 * gbs / copy_gbs,
                    is_forced ? "forced" : "plan", plan.n_splits, plan.pages_per_split, planned.blocks_per_sm, layers);
      }
    }
  TW_CUDA_CHECK(cudaEventDestroy(e0));
  TW_CUDA_CHECK(cudaEventDestroy(e1));
}

}  // namespace
}  // namespace tw::attn::cuda
