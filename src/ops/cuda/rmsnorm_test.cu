// rmsnorm_cuda against the CPU formula in double: y = x / sqrt(mean(x^2) + eps) * w.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "ops/cuda/cuda_check.h"
#include "ops/cuda/cuda_test_util.h"
#include "ops/cuda/rmsnorm.h"

namespace tw::cuda {
namespace {

using namespace test;

std::vector<double> rmsnorm_reference(const std::vector<float>& x, const std::vector<float>& w, int64_t rows,
                                      int64_t cols, float eps) {
  std::vector<double> y(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < cols; ++c) ss += double(x[r * cols + c]) * x[r * cols + c];
    const double scale = 1.0 / std::sqrt(ss / cols + eps);
    for (int64_t c = 0; c < cols; ++c) y[r * cols + c] = x[r * cols + c] * scale * w[c];
  }
  return y;
}

// Runs on poisoned output (or in place) and compares elementwise: |err| <= 1e-5 |ref| + 1e-6 of the
// row's largest |ref| (fp32 sum of squares over <= 10^4 terms is ~1e-6 relative).
void check_rmsnorm(const std::vector<float>& x, const std::vector<float>& w, int64_t rows, int64_t cols, float eps,
                   bool in_place) {
  SCOPED_TRACE(cat(rows, " x ", cols, in_place ? " in place" : ""));
  DeviceBuffer dx(x.size() * 4), dw(w.size() * 4), dy(x.size() * 4);
  dx.upload(x.data(), x.size() * 4);
  dw.upload(w.data(), w.size() * 4);
  TW_CUDA_CHECK(cudaMemset(dy.get(), 0xFF, dy.size()));  // NaN: unwritten elements show
  float* out = in_place ? dx.as<float>() : dy.as<float>();
  rmsnorm_cuda(dx.as<float>(), dw.as<float>(), out, rows, cols, eps);
  TW_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> y(x.size());
  (in_place ? dx : dy).download(y.data(), y.size() * 4);
  const auto ref = rmsnorm_reference(x, w, rows, cols, eps);
  int bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double rmax = 0;
    for (int64_t c = 0; c < cols; ++c) rmax = std::max(rmax, std::fabs(ref[r * cols + c]));
    for (int64_t c = 0; c < cols; ++c) {
      const size_t i = r * cols + c;
      ASSERT_TRUE(std::isfinite(y[i])) << "element " << r << "," << c << " not written: " << y[i];
      const double e = std::fabs(y[i] - ref[i]);
      if (e > 1e-5 * std::fabs(ref[i]) + 1e-6 * rmax && ++bad <= 5)
        ADD_FAILURE() << "at " << r << "," << c << ": gpu " << y[i] << " ref " << ref[i];
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST(RmsnormCuda, RandomShapes) {
  TW_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cat("seed ", seed, " (rerun with TW_TEST_SEED)"));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> lmag(-3.f, 3.f);
  for (int64_t cols : {1, 31, 257, 576, 896, 1536, 8960, 10001})
    for (int64_t rows : {1, 5, 67}) {
      auto x = random_normal(rng, rows * cols);
      for (int64_t r = 0; r < rows; ++r) {  // rows of very different magnitudes, 1e-3 .. 1e3
        const float m = std::pow(10.f, lmag(rng));
        for (int64_t c = 0; c < cols; ++c) x[r * cols + c] *= m;
      }
      const auto w = random_normal(rng, cols);
      for (float eps : {1e-5f, 1e-6f}) {
        check_rmsnorm(x, w, rows, cols, eps, false);
        check_rmsnorm(x, w, rows, cols, eps, true);
      }
    }
}

// The real SmolLM2 attn_norm weight (from the fixture) on random activations.
TEST(RmsnormCuda, RealNormWeight) {
  TW_REQUIRE_CUDA_DEVICE();
  std::mt19937_64 rng(fresh_seed());
  int found = 0;
  for (const auto& e : load_fixture()) {
    if (e.type != gguf::Type::F32) continue;
    std::vector<float> w(e.cols);
    std::memcpy(w.data(), e.data.data(), e.cols * 4);
    const int64_t rows = 9;
    check_rmsnorm(random_normal(rng, rows * e.cols, 3.f), w, rows, e.cols, 1e-5f, false);
    ++found;
  }
  EXPECT_EQ(found, 1);
}

TEST(RmsnormCudaArgs, BadInputsThrow) {
  auto* x = reinterpret_cast<const float*>(uintptr_t{0x10000});  // never dereferenced
  auto* y = reinterpret_cast<float*>(uintptr_t{0x20000});
  expect_error([&] { rmsnorm_cuda(x, x, y, 0, 16, 1e-5f); }, "bad shape");
  expect_error([&] { rmsnorm_cuda(x, x, y, 4, -1, 1e-5f); }, "bad shape");
  expect_error([&] { rmsnorm_cuda(nullptr, x, y, 4, 16, 1e-5f); }, "null pointer");
  expect_error([&] { rmsnorm_cuda(x, nullptr, y, 4, 16, 1e-5f); }, "null pointer");
  expect_error([&] { rmsnorm_cuda(x, x, y, 4, 16, NAN); }, "eps");
  expect_error([&] { rmsnorm_cuda(x, x, y, 4, 16, -1.f); }, "eps");
  expect_error([&] { rmsnorm_cuda(x, x, y, int64_t{1} << 40, 16, 1e-5f); }, "too large");
}

TEST(DeviceCuda, InfoAndBuffer) {
  TW_REQUIRE_CUDA_DEVICE();
  const DeviceInfo d = device_info(0);
  EXPECT_FALSE(d.name.empty());
  EXPECT_GT(d.sm_count, 0);
  EXPECT_GT(d.mem_bytes, size_t{0});
  expect_error([] { device_info(device_count()); }, "does not exist");
  DeviceBuffer b(64);
  std::vector<uint8_t> in(64), out(64, 0);
  for (int i = 0; i < 64; ++i) in[i] = static_cast<uint8_t>(i * 7 + 1);
  b.upload(in.data(), 64);
  b.download(out.data(), 64);
  EXPECT_EQ(in, out);
  expect_error([&] { b.upload(in.data(), 64, 1); }, "do not fit");
}

}  // namespace
}  // namespace tw::cuda
