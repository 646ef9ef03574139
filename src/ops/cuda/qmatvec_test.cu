// qmatvec_cuda against the CPU reference (gguf::dequantize_row + double dot) on random valid blocks,
// odd shapes, real rows from the models (fixture) and, where the model files are present, whole
// real tensors.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "common/paths.h"
#include "gguf/gguf.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/cuda_test_util.h"
#include "ops/cuda/qmatvec.h"

namespace tw::cuda {
namespace {

using gguf::Type;
using namespace test;

// Uploads W and x, poisons y (NaN) and a guard tail past it, runs the kernel and compares with the
// reference: each row within 1e-4 of sum|w x| (fp32 rounding over up to 8960 terms is ~1e-6 of it;
// any indexing or layout mistake is O(1)), and ||y - ref|| / ||sum|w x| || < 1e-5 overall. Not
// relative to ||ref||: a short row can cancel to ~1e-4 of sum|w x| (seen: Q4_0 1 x 32, seed
// 6773258224218222711, ref 7.5e-6 vs sum|w x| 0.099), where fp32 rounding alone is 1e-3 of ref.
void check_qmatvec(Type t, const std::vector<uint8_t>& w, int64_t rows, int64_t cols, const std::vector<float>& x) {
  SCOPED_TRACE(cat(gguf::type_traits(t).name, " ", rows, " x ", cols));
  constexpr int kGuard = 4;
  DeviceBuffer dw(w.size()), dx(x.size() * 4), dy((rows + kGuard) * 4);
  dw.upload(w.data(), w.size());
  dx.upload(x.data(), x.size() * 4);
  TW_CUDA_CHECK(cudaMemset(dy.get(), 0xFF, dy.size()));  // 0xFFFFFFFF is a NaN: unwritten rows show
  qmatvec_cuda({dw.get(), t, rows, cols}, dx.as<float>(), dy.as<float>());
  TW_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> y(rows + kGuard);
  dy.download(y.data(), dy.size());

  const QRef ref = qmatvec_reference(t, w.data(), rows, cols, x);
  double err2 = 0, abs2 = 0;
  int bad = 0;
  for (int64_t i = 0; i < rows; ++i) {
    ASSERT_TRUE(std::isfinite(y[i])) << "row " << i << " not written (or not finite): " << y[i];
    const double e = std::fabs(double(y[i]) - ref.y[i]);
    err2 += e * e;
    abs2 += ref.abs_sum[i] * ref.abs_sum[i];
    if (e > 1e-4 * ref.abs_sum[i] + 1e-30 && ++bad <= 5)
      ADD_FAILURE() << "row " << i << ": gpu " << y[i] << " ref " << ref.y[i] << " |err| " << e << " sum|wx| "
                    << ref.abs_sum[i];
  }
  EXPECT_EQ(bad, 0);
  EXPECT_LT(std::sqrt(err2 / abs2), 1e-5);
  for (int g = 0; g < kGuard; ++g) {
    uint32_t bits;
    std::memcpy(&bits, &y[rows + g], 4);
    EXPECT_EQ(bits, 0xFFFFFFFFu) << "kernel wrote past the last row (guard " << g << ")";
  }
}

const Type kAllTypes[] = {Type::Q4_0, Type::Q4_1, Type::Q5_0, Type::Q8_0, Type::Q4_K, Type::Q6_K};

TEST(QmatvecCuda, RandomBlocksOddShapes) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  // Rows not multiples of the 4 rows per block or of a warp; cols the models' widths (576 and 896 are
  // not multiples of 256, so the k-quants get 256/2304 instead) and 32 (fewer units than lanes).
  const int64_t rows_list[] = {1, 3, 33, 130, 1001};
  for (Type t : kAllTypes) {
    const bool k = gguf::type_traits(t).block_elems == gguf::QK_K;
    const std::vector<int64_t> cols_list = k ? std::vector<int64_t>{256, 1536, 2304, 8960}
                                             : std::vector<int64_t>{32, 576, 896, 1536, 8960};
    for (int64_t cols : cols_list)
      for (int64_t rows : rows_list) {
        const auto w = random_qmatrix(rng, t, rows, cols);
        const auto x = random_normal(rng, cols);
        check_qmatvec(t, w, rows, cols, x);
        if (HasFatalFailure()) return;
      }
  }
}

// Strongly non-zero-mean x: the Q4_1/Q4_K min terms (m * sum x) then dominate, so a wrong min or
// offset cannot hide behind cancellation.
TEST(QmatvecCuda, RandomBlocksPositiveInput) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed));
  std::mt19937_64 rng(seed);
  for (Type t : kAllTypes) {
    const int64_t cols = 1536, rows = 67;
    auto x = random_normal(rng, cols);
    for (auto& v : x) v = std::fabs(v) + 0.5f;
    check_qmatvec(t, random_qmatrix(rng, t, rows, cols), rows, cols, x);
  }
}

// Real rows of SmolLM2 (Q4_1, Q8_0) and Qwen2.5-1.5B (Q4_K, Q6_K), from the committed fixture.
TEST(QmatvecCuda, RealRowsFixture) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed));
  std::mt19937_64 rng(seed);
  int checked = 0;
  for (const auto& e : load_fixture()) {
    if (!qmatvec_supported(e.type)) continue;  // the F32 norm weight is for the rmsnorm test
    SCOPED_TRACE(e.source + ": " + e.name);
    check_qmatvec(e.type, e.data, e.rows, e.cols, random_normal(rng, e.cols));
    ++checked;
  }
  EXPECT_EQ(checked, 5);
}

// Whole real tensors; needs the model files (fails, with the fetch hint, when they are missing).
// scripts/gpu_check.sh leaves these out on the GPU machine, where the models cannot be carried.
void check_model_tensors(const std::string& file, const std::vector<std::string>& names) {
  const auto f = gguf::File::open(require_model(file));
  std::mt19937_64 rng(fresh_seed());
  for (const auto& n : names) {
    const auto& t = f.tensor(n);
    SCOPED_TRACE(file + ": " + n);
    ASSERT_TRUE(qmatvec_supported(t.type)) << gguf::type_traits(t.type).name;
    std::vector<uint8_t> w(t.data, t.data + t.nbytes);
    check_qmatvec(t.type, w, t.rows(), t.cols(), random_normal(rng, t.cols()));
  }
}

TEST(QmatvecCudaModel, SmolLM2Block0AndEmbedding) {
  TW_REQUIRE_CUDA_DEVICE();
  check_model_tensors(kSmolLM2File, {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                                     "blk.0.attn_v.weight", "blk.0.attn_output.weight", "blk.0.ffn_gate.weight",
                                     "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"});
}

TEST(QmatvecCudaModel, Qwen15Block0) {
  TW_REQUIRE_CUDA_DEVICE();
  check_model_tensors(kQwen15File, {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight"});
}

// The fixture holds exactly the bytes of the model files (checks scripts/make_cuda_fixture.py).
// Needs no GPU, only the models.
TEST(QmatvecCudaFixture, MatchesModelFiles) {
  for (const auto& e : load_fixture()) {
    SCOPED_TRACE(e.source + ": " + e.name);
    const auto f = gguf::File::open(require_model(e.source));
    const auto& t = f.tensor(e.name);
    ASSERT_EQ(t.type, e.type);
    ASSERT_EQ(t.cols(), e.cols);
    ASSERT_LE(e.first_row + e.rows, t.rows());
    const size_t rb = t.row_bytes();
    EXPECT_EQ(std::memcmp(t.data + e.first_row * rb, e.data.data(), e.data.size()), 0);
  }
}

// Argument checks happen before any CUDA call, so these need no device.
TEST(QmatvecCudaArgs, BadInputsThrow) {
  auto* p = reinterpret_cast<const void*>(uintptr_t{0x10000});  // never dereferenced: checks fail first
  auto* x = reinterpret_cast<const float*>(uintptr_t{0x20000});
  auto* y = reinterpret_cast<float*>(uintptr_t{0x30000});
  for (Type t : {Type::F16, Type::F32, Type::BF16, Type::Q5_1, Type::Q5_K, Type::Q2_K, Type::Q8_K})
    expect_error([&] { qmatvec_cuda({p, t, 8, 256}, x, y); }, "is not supported on CUDA");
  expect_error([&] { qmatvec_cuda({p, static_cast<Type>(99), 8, 256}, x, y); }, "is not supported on CUDA");
  expect_error([&] { qmatvec_cuda({p, Type::Q4_K, 8, 576}, x, y); }, "not a multiple of the Q4_K block size 256");
  expect_error([&] { qmatvec_cuda({p, Type::Q8_0, 8, 33}, x, y); }, "not a multiple");
  expect_error([&] { qmatvec_cuda({p, Type::Q8_0, 0, 32}, x, y); }, "bad shape");
  expect_error([&] { qmatvec_cuda({p, Type::Q8_0, 4, -32}, x, y); }, "bad shape");
  expect_error([&] { qmatvec_cuda({nullptr, Type::Q8_0, 4, 32}, x, y); }, "null pointer");
  expect_error([&] { qmatvec_cuda({p, Type::Q8_0, 4, 32}, nullptr, y); }, "null pointer");
  expect_error([&] { qmatvec_cuda({p, Type::Q8_0, 4, 32}, x + 1, y); }, "16-byte aligned");
  expect_error([&] { qmatvec_cuda({p, Type::Q8_0, int64_t{1} << 40, 32}, x, y); }, "too large");
  EXPECT_TRUE(qmatvec_supported(Type::Q4_K));
  EXPECT_FALSE(qmatvec_supported(Type::Q5_K));
}

// Timing for docs/CUDA.md, run explicitly (scripts/gpu_check.sh), main case the Qwen2.5-1.5B
// ffn_down shape 8960 -> 1536. W is 7.7 MB (Q4_K), inside the 50+ MB L2, so launches rotate over
// enough copies to exceed 3x the L2; timed one launch after another on a stream and as a CUDA graph
// (less launch overhead).
TEST(QmatvecCudaBench, DISABLED_FfnDown1p5B) {
  TW_REQUIRE_CUDA_DEVICE();
  const DeviceInfo info = device_info(0);
  std::printf("device: %s\n", describe(info).c_str());
  std::mt19937_64 rng(fresh_seed());
  struct Shape { Type t; int64_t cols, rows; };
  // Qwen2.5-1.5B ffn_down (Q4_K as asked, Q6_K as in the file) and ffn_up; SmolLM2 ffn_down (Q4_1)
  // and its Q8_0 embedding used as the tied output projection.
  for (const Shape sh : {Shape{Type::Q4_K, 8960, 1536}, Shape{Type::Q6_K, 8960, 1536}, Shape{Type::Q4_K, 1536, 8960},
                         Shape{Type::Q4_1, 1536, 576}, Shape{Type::Q8_0, 576, 49152}}) {
    const Type t = sh.t;
    const int64_t rows = sh.rows, cols = sh.cols;
    const auto w = random_qmatrix(rng, t, rows, cols);
    const auto x = random_normal(rng, cols);
    check_qmatvec(t, w, rows, cols, x);  // the timed kernel is the checked one
    const size_t copies = std::max<size_t>(4, 3 * info.l2_bytes / w.size() + 1);
    DeviceBuffer dw(w.size() * copies), dx(cols * 4), dy(rows * 4 * copies);
    for (size_t c = 0; c < copies; ++c) dw.upload(w.data(), w.size(), c * w.size());
    dx.upload(x.data(), x.size() * 4);
    auto launch = [&](size_t c, cudaStream_t s) {
      qmatvec_cuda({dw.as<uint8_t>() + c * w.size(), t, rows, cols}, dx.as<float>(), dy.as<float>() + c * rows, s);
    };
    cudaStream_t s;
    TW_CUDA_CHECK(cudaStreamCreate(&s));
    cudaEvent_t e0, e1;
    TW_CUDA_CHECK(cudaEventCreate(&e0));
    TW_CUDA_CHECK(cudaEventCreate(&e1));
    const double bytes = double(w.size()) + cols * 4.0 + rows * 4.0;
    const int iters = static_cast<int>(copies) * 20;
    for (int i = 0; i < iters; ++i) launch(i % copies, s);  // warm-up
    std::vector<float> stream_us, graph_us;
    for (int rep = 0; rep < 5; ++rep) {
      TW_CUDA_CHECK(cudaEventRecord(e0, s));
      for (int i = 0; i < iters; ++i) launch(i % copies, s);
      TW_CUDA_CHECK(cudaEventRecord(e1, s));
      TW_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms;
      TW_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      stream_us.push_back(ms * 1000.f / iters);
    }
    cudaGraph_t g;
    cudaGraphExec_t ge;
    TW_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < iters; ++i) launch(i % copies, s);
    TW_CUDA_CHECK(cudaStreamEndCapture(s, &g));
    TW_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
    TW_CUDA_CHECK(cudaGraphLaunch(ge, s));
    for (int rep = 0; rep < 5; ++rep) {
      TW_CUDA_CHECK(cudaEventRecord(e0, s));
      TW_CUDA_CHECK(cudaGraphLaunch(ge, s));
      TW_CUDA_CHECK(cudaEventRecord(e1, s));
      TW_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms;
      TW_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      graph_us.push_back(ms * 1000.f / iters);
    }
    std::sort(stream_us.begin(), stream_us.end());
    std::sort(graph_us.begin(), graph_us.end());
    const float su = stream_us[2], gu = graph_us[2];
    std::printf("BENCH qmatvec %s %lldx%lld (W %.2f MB, %zu copies rotated): stream %.2f us = %.0f GB/s, "
                "graph %.2f us = %.0f GB/s (medians of 5 x %d launches)\n",
                gguf::type_traits(t).name, (long long)cols, (long long)rows, w.size() / 1e6, copies, su,
                bytes / su / 1e3, gu, bytes / gu / 1e3, iters);
    TW_CUDA_CHECK(cudaGraphExecDestroy(ge));
    TW_CUDA_CHECK(cudaGraphDestroy(g));
    TW_CUDA_CHECK(cudaEventDestroy(e0));
    TW_CUDA_CHECK(cudaEventDestroy(e1));
    TW_CUDA_CHECK(cudaStreamDestroy(s));
  }
  // Copy ceiling on this card: a 1 GiB device-to-device copy, bytes read + written.
  const size_t n = size_t{1} << 30;
  DeviceBuffer a(n), b(n);
  TW_CUDA_CHECK(cudaMemset(a.get(), 1, n));
  TW_CUDA_CHECK(cudaMemcpy(b.get(), a.get(), n, cudaMemcpyDeviceToDevice));
  cudaEvent_t e0, e1;
  TW_CUDA_CHECK(cudaEventCreate(&e0));
  TW_CUDA_CHECK(cudaEventCreate(&e1));
  TW_CUDA_CHECK(cudaEventRecord(e0));
  for (int i = 0; i < 10; ++i) TW_CUDA_CHECK(cudaMemcpy(b.get(), a.get(), n, cudaMemcpyDeviceToDevice));
  TW_CUDA_CHECK(cudaEventRecord(e1));
  TW_CUDA_CHECK(cudaEventSynchronize(e1));
  float ms;
  TW_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
  std::printf("BENCH d2d copy 1 GiB: %.0f GB/s (read + write)\n", 10 * 2.0 * n / (ms * 1e-3) / 1e9);
  TW_CUDA_CHECK(cudaEventDestroy(e0));
  TW_CUDA_CHECK(cudaEventDestroy(e1));
}

}  // namespace
}  // namespace tw::cuda
