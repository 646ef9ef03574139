// Helpers shared by the CUDA tests: device skip, random inputs, the real-rows fixture, references.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fp16.h"
#include "gguf/quants.h"
#include "ops/cuda/device.h"

// Every test that needs the GPU starts with this: without a device it is reported as skipped.
#define TW_REQUIRE_CUDA_DEVICE()                                           \
  do {                                                                     \
    if (!::tw::cuda::available()) GTEST_SKIP() << "no CUDA device";        \
  } while (0)

namespace tw::cuda::test {

// A fresh seed per run (inputs differ run to run, as they should for a kernel check); tests print it
// with SCOPED_TRACE so a failure can be replayed with TW_TEST_SEED.
inline uint64_t fresh_seed() {
  if (const char* s = std::getenv("TW_TEST_SEED"); s && *s) return std::stoull(s);
  return (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}();
}

// Config-level sharding of a sweep test, for runs too slow to take the whole sweep at once
// (compute-sanitizer's racecheck: scripts/gpu_sanitize.sh). TW_TEST_SHARD="i/n" runs the configs whose
// index % n == i; unset, every config. A malformed value is an error, not a silent full run. The
// skipped configs draw no random numbers, so a failing shard replays with its seed (TW_TEST_SEED) and
// the same TW_TEST_SHARD.
inline bool in_test_shard(int index) {
  const char* s = std::getenv("TW_TEST_SHARD");
  if (!s || !*s) return true;
  int i = -1, n = 0;
  char tail = 0;
  TW_CHECK(std::sscanf(s, "%d/%d%c", &i, &n, &tail) == 2 && n > 0 && i >= 0 && i < n, "TW_TEST_SHARD=", s,
           ": expected i/n with 0 <= i < n");
  return index % n == i;
}

inline std::vector<float> random_normal(std::mt19937_64& rng, size_t n, float stddev = 1.f) {
  std::normal_distribution<float> nd(0.f, stddev);
  std::vector<float> v(n);
  for (auto& f : v) f = nd(rng);
  return v;
}

// Byte offsets of the fp16 scale fields of each block type: random bytes everywhere else are valid
// quants, but a random fp16 can be Inf/NaN, so these get finite random values instead.
inline std::vector<size_t> half_fields(gguf::Type t) {
  using namespace gguf;
  switch (t) {
    case Type::Q4_0: return {offsetof(block_q4_0, d)};
    case Type::Q4_1: return {offsetof(block_q4_1, d), offsetof(block_q4_1, m)};
    case Type::Q5_0: return {offsetof(block_q5_0, d)};
    case Type::Q8_0: return {offsetof(block_q8_0, d)};
    case Type::Q4_K: return {offsetof(block_q4_K, d), offsetof(block_q4_K, dmin)};
    case Type::Q6_K: return {offsetof(block_q6_K, d)};
    default: fail("half_fields: no layout for type ", type_traits(t).name);
  }
}

// rows x cols of random valid blocks (scales of magnitude 1e-3..1e-1, either sign).
inline std::vector<uint8_t> random_qmatrix(std::mt19937_64& rng, gguf::Type t, int64_t rows, int64_t cols) {
  const gguf::TypeTraits tr = gguf::type_traits(t);
  const size_t nblocks = static_cast<size_t>(rows * (cols / tr.block_elems));
  std::vector<uint8_t> w(nblocks * tr.block_bytes);
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
  std::uniform_real_distribution<float> mag(-3.f, -1.f);
  std::bernoulli_distribution neg(0.5);
  const auto fields = half_fields(t);
  for (size_t i = 0; i < nblocks; ++i) {
    for (size_t off : fields) {
      const float v = std::pow(10.f, mag(rng)) * (neg(rng) ? -1.f : 1.f);
      const uint16_t h = fp32_to_fp16(v);
      std::memcpy(&w[i * tr.block_bytes + off], &h, 2);
    }
  }
  return w;
}

// Reference: dequantise each row with the CPU reference, dot with x in double. Also returns
// sum |w_i x_i| per row, the scale the fp32 rounding error is measured against.
struct QRef {
  std::vector<double> y, abs_sum;
};
inline QRef qmatvec_reference(gguf::Type t, const uint8_t* w, int64_t rows, int64_t cols, const std::vector<float>& x) {
  QRef r;
  r.y.resize(rows);
  r.abs_sum.resize(rows);
  const size_t rb = gguf::row_bytes(t, cols);
  std::vector<float> deq(cols);
  for (int64_t i = 0; i < rows; ++i) {
    gguf::dequantize_row(t, w + i * rb, deq.data(), cols);
    double s = 0, a = 0;
    for (int64_t c = 0; c < cols; ++c) {
      s += double(deq[c]) * x[c];
      a += std::fabs(double(deq[c]) * x[c]);
    }
    r.y[i] = s;
    r.abs_sum[i] = a;
  }
  return r;
}

// Real rows extracted from the models by scripts/make_cuda_fixture.py.
struct FixtureEntry {
  std::string name, source;
  gguf::Type type = gguf::Type::F32;
  int64_t cols = 0, first_row = 0, rows = 0;
  std::vector<uint8_t> data;
};

inline std::vector<FixtureEntry> load_fixture() {
  const std::string path = std::string(TW_SOURCE_DIR) + "/src/ops/cuda/testdata/real_rows.bin";
  std::ifstream f(path, std::ios::binary);
  TW_CHECK(f, "cannot open fixture ", path, " (regenerate with scripts/make_cuda_fixture.py)");
  auto rd = [&](void* p, size_t n) {
    f.read(static_cast<char*>(p), static_cast<std::streamsize>(n));
    TW_CHECK(f, "fixture ", path, " is truncated");
  };
  auto u32 = [&] { uint32_t v; rd(&v, 4); return v; };
  auto i64 = [&] { int64_t v; rd(&v, 8); return v; };
  auto str = [&] { const uint32_t n = u32(); TW_CHECK(n < 4096, "fixture: bad string length"); std::string s(n, '\0'); rd(s.data(), n); return s; };
  char magic[4];
  rd(magic, 4);
  TW_CHECK(std::memcmp(magic, "TWFX", 4) == 0, "fixture ", path, ": bad magic");
  TW_CHECK(u32() == 1, "fixture ", path, ": unknown version");
  const uint32_t count = u32();
  std::vector<FixtureEntry> out(count);
  for (auto& e : out) {
    e.name = str();
    e.source = str();
    e.type = static_cast<gguf::Type>(u32());
    e.cols = i64();
    e.first_row = i64();
    e.rows = i64();
    const int64_t nbytes = i64();
    TW_CHECK(nbytes >= 0 && nbytes < (64 << 20), "fixture: bad size");
    TW_CHECK(static_cast<size_t>(nbytes) == gguf::row_bytes(e.type, e.cols) * e.rows, "fixture entry ", e.name,
             ": ", nbytes, " bytes do not match its shape");
    e.data.resize(nbytes);
    rd(e.data.data(), nbytes);
  }
  return out;
}

// Runs fn and checks it throws tw::Error whose message contains `part`.
inline void expect_error(const std::function<void()>& fn, const std::string& part) {
  try {
    fn();
    ADD_FAILURE() << "expected tw::Error containing '" << part << "', nothing was thrown";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << "message: " << e.what();
  }
}

}  // namespace tw::cuda::test
