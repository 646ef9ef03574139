// Tests for the CPU weight products (matmul.h): every supported weight type at every SIMD level the
// machine has, against (a) the scalar integer reference (dot_ref) and (b) dequantise-to-fp32 +
// double-precision dot with the unquantised activations. The block layouts themselves are checked
// against llama.cpp's Python reference (gguf package) through a small committed fixture.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fp16.h"
#include "common/paths.h"
#include "gguf/gguf.h"
#include "ops/cpu/matmul.h"
#include "ops/cpu/quant_dot.h"

namespace tw::ops {
namespace {

using gguf::Type;

const Type kTypes[] = {Type::F32, Type::F16, Type::BF16, Type::Q4_0, Type::Q4_1, Type::Q5_0,
                       Type::Q5_1, Type::Q8_0, Type::Q4_K, Type::Q5_K, Type::Q6_K};

std::vector<Simd> levels() {
  std::vector<Simd> v;
  for (Simd s : {Simd::Scalar, Simd::AVX2, Simd::AVX512})
    if (simd_supported(s)) v.push_back(s);
  return v;
}

int block_elems(Type t) { return gguf::type_traits(t).block_elems; }
bool is_kquant(Type t) { return t == Type::Q4_K || t == Type::Q5_K || t == Type::Q6_K; }

void put_f16(uint8_t* p, float v) {
  const uint16_t h = fp32_to_fp16(v);
  std::memcpy(p, &h, 2);
}

// Random valid weights: random quant bits, fp16 scales drawn in a realistic range (random bytes
// there could be inf/nan, which no real file has).
std::vector<uint8_t> random_matrix(Type t, int64_t rows, int64_t cols, std::mt19937& rng) {
  const size_t rb = gguf::row_bytes(t, cols);
  std::vector<uint8_t> data(rb * rows);
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  std::uniform_real_distribution<float> scale(-0.05f, 0.05f);
  if (t == Type::F32 || t == Type::F16 || t == Type::BF16) {
    const int64_t n = rows * cols;
    for (int64_t i = 0; i < n; ++i) {
      const float v = normal(rng);
      if (t == Type::F32) std::memcpy(&data[4 * i], &v, 4);
      if (t == Type::F16) put_f16(&data[2 * i], v);
      if (t == Type::BF16) { const uint16_t h = fp32_to_bf16(v); std::memcpy(&data[2 * i], &h, 2); }
    }
    return data;
  }
  for (auto& b : data) b = static_cast<uint8_t>(byte(rng));
  const int bb = gguf::type_traits(t).block_bytes;
  std::vector<int> fields;  // byte offsets of the fp16 fields in a block
  switch (t) {
    case Type::Q4_0: case Type::Q5_0: case Type::Q8_0: fields = {0}; break;
    case Type::Q4_1: case Type::Q5_1: case Type::Q4_K: case Type::Q5_K: fields = {0, 2}; break;
    case Type::Q6_K: fields = {208}; break;
    default: ADD_FAILURE() << "no layout for type";
  }
  for (size_t off = 0; off + bb <= data.size(); off += bb)
    for (int f : fields) put_f16(&data[off + f], scale(rng));
  return data;
}

// The same rows with every quant bit cleared: what remains is the per-block offset (the min of
// Q4_1/Q5_1/Q4_K/Q5_K; -8d / -16d / -32d for the symmetric types; 0 for Q8_0 and floats).
std::vector<uint8_t> offsets_only(Type t, std::vector<uint8_t> d) {
  const int bb = gguf::type_traits(t).block_bytes;
  if (t == Type::F32 || t == Type::F16 || t == Type::BF16) return std::vector<uint8_t>(d.size(), 0);
  for (size_t off = 0; off + bb <= d.size(); off += bb) {
    uint8_t* p = &d[off];
    switch (t) {
      case Type::Q4_0: std::memset(p + 2, 0, 16); break;
      case Type::Q4_1: std::memset(p + 4, 0, 16); break;
      case Type::Q5_0: std::memset(p + 2, 0, 20); break;
      case Type::Q5_1: std::memset(p + 4, 0, 20); break;
      case Type::Q8_0: std::memset(p + 2, 0, 32); break;
      case Type::Q4_K: std::memset(p + 16, 0, 128); break;        // keep d, dmin, scales
      case Type::Q5_K: std::memset(p + 16, 0, 160); break;
      case Type::Q6_K: std::memset(p, 0, 192); break;             // ql, qh
      default: break;
    }
  }
  return d;
}

std::vector<float> random_x(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 63);
  std::vector<float> x(n);
  for (auto& v : x) v = normal(rng) * (pick(rng) == 0 ? 8.0f : 1.0f);  // some outliers, like real activations
  return x;
}

QMatrix view(Type t, int64_t rows, int64_t cols, const std::vector<uint8_t>& d) {
  return QMatrix{t, rows, cols, d.data(), gguf::row_bytes(t, cols)};
}

// Values the quantised activation row a stands for (what the integer dots actually multiply).
std::vector<float> dequantized_act(Type t, int64_t cols, const std::vector<uint8_t>& a) {
  std::vector<float> v(cols);
  switch (detail::act_kind(t)) {
    case detail::ActKind::Q8_0: case detail::ActKind::Q8_1: {
      const auto* b = reinterpret_cast<const detail::ActQ8*>(a.data());
      for (int64_t j = 0; j < cols; ++j) v[j] = b[j / 32].d * b[j / 32].qs[j % 32];
      break;
    }
    case detail::ActKind::Q8_K: {
      const auto* b = reinterpret_cast<const detail::ActQ8K*>(a.data());
      for (int64_t j = 0; j < cols; ++j) v[j] = b[j / 256].d * b[j / 256].qs[j % 256];
      break;
    }
    default: std::memcpy(v.data(), a.data(), cols * sizeof(float));
  }
  return v;
}

// Error bounds for one row w (dequantised), offsets w0, activation x and its quantised form xq.
//
// (a) SIMD vs scalar reference: the integer block sums are exact in both, only the fp32 combination
//     differs. Each result is a sum of at most nb + 8 rounded terms (nb blocks, an 8-lane tree),
//     every term bounded by |scale parts| * |x|, so each side errs by at most (nb + 8) * 2^-24 * S
//     with S = sum_i (|w_i| + |w0_i|) * |xq_i| (the offset part enters the k-quant/_1 min terms
//     separately, hence |w0|). Both sides: twice that.
// (b) vs double with the unquantised x: the activation rounding error per element is at most
//     d/2 (d = amax_block/127) plus the fp16 rounding of d (127 * d * 2^-11 = 0.062 d) and of
//     q8_1's s (another 0.062 d spread over the block): |e_i| <= 0.65 d; F16/BF16 round x with
//     relative error 2^-11 / 2^-8 (+ the fp16 subnormal step). Bound: sum_i (|w_i|+|w0_i|)*e_i + (a).
//     That bound is strict but loose (errors add like sqrt(n), the bound like n), so the scalar
//     reference is also held to a statistical bound: 6 sigma of the rounding noise (uniform errors,
//     variance d^2/12 per element) plus the correlated fp16 rounding of d. Fixed seeds keep it exact
//     to reproduce; a wrong scale or layout misses it by orders of magnitude.
struct Bounds {
  double fp32 = 0, strict = 0, stat = 0;
};

Bounds bounds(Type t, const float* w, const float* w0, const float* x, const float* xq, int64_t cols) {
  const int64_t group = is_kquant(t) ? 256 : 32;  // activation quantisation block
  const int64_t nb = cols / block_elems(t) + (block_elems(t) == 1 ? cols / 8 : 0);
  double S = 0, strict = 0, var = 0, corr = 0;
  for (int64_t g0 = 0; g0 < cols; g0 += group) {
    double amax = 0;
    for (int64_t i = g0; i < g0 + group && i < cols; ++i) amax = std::max(amax, std::fabs((double)x[i]));
    const double d = amax / 127.0;
    for (int64_t i = g0; i < g0 + group && i < cols; ++i) {
      const double mag = std::fabs((double)w[i]) + std::fabs((double)w0[i]);
      S += mag * std::fabs((double)xq[i]);
      double e;
      switch (t) {
        case Type::F32: e = 0; break;
        case Type::F16: e = std::fabs((double)x[i]) * std::ldexp(1.0, -11) + std::ldexp(1.0, -25); break;
        case Type::BF16: e = std::fabs((double)x[i]) * std::ldexp(1.0, -8); break;
        default: e = 0.65 * d; break;
      }
      strict += mag * e;
      if (block_elems(t) > 1) {
        var += mag * mag * d * d / 12.0;
        corr += mag * std::fabs((double)x[i]) * std::ldexp(1.0, -10);  // fp16 d (and s) rounding
      } else {
        var += mag * mag * e * e;
      }
    }
  }
  Bounds b;
  b.fp32 = 2.0 * (nb + 8) * std::ldexp(1.0, -24) * S + 1e-30;
  b.strict = strict + b.fp32;
  b.stat = 6.0 * std::sqrt(var) + corr + b.fp32;
  return b;
}

// Everything a check needs about one (W, x) pair.
struct Case {
  Type t;
  int64_t rows, cols;
  std::vector<uint8_t> w;
  std::vector<float> wf, w0f;  // dequantised rows, and their offsets-only version
  std::vector<float> x;        // n x cols
  int64_t n;

  Case(Type t_, int64_t rows_, int64_t cols_, int64_t n_, uint32_t seed) : t(t_), rows(rows_), cols(cols_), n(n_) {
    std::mt19937 rng(seed);
    w = random_matrix(t, rows, cols, rng);
    const std::vector<uint8_t> w0 = offsets_only(t, w);
    wf.resize(rows * cols);
    w0f.resize(rows * cols);
    const size_t rb = gguf::row_bytes(t, cols);
    for (int64_t r = 0; r < rows; ++r) {
      detail::dequantize_row_ref(t, w.data() + r * rb, cols, wf.data() + r * cols);
      detail::dequantize_row_ref(t, w0.data() + r * rb, cols, w0f.data() + r * cols);
    }
    x = random_x(n * cols, rng);
  }

  // Quantised activation row i and its dequantised values.
  std::vector<uint8_t> act(int64_t i) const {
    std::vector<uint8_t> a(detail::act_row_bytes(t, cols));
    detail::quantize_act_row(t, x.data() + i * cols, cols, a.data());
    return a;
  }
  std::vector<float> act_values(const std::vector<uint8_t>& a) const { return dequantized_act(t, cols, a); }

  // Check Y (n x rows) from the kernel under test.
  void check(const std::vector<float>& Y, const std::string& what) const {
    const size_t rb = gguf::row_bytes(t, cols);
    for (int64_t i = 0; i < n; ++i) {
      const std::vector<uint8_t> a = act(i);
      const std::vector<float> xq = act_values(a);
      const float* xi = x.data() + i * cols;
      for (int64_t r = 0; r < rows; ++r) {
        const float* wr = wf.data() + r * cols;
        const Bounds b = bounds(t, wr, w0f.data() + r * cols, xi, xq.data(), cols);
        const float ref = detail::dot_ref(t, w.data() + r * rb, a.data(), cols);
        double exact = 0;
        for (int64_t j = 0; j < cols; ++j) exact += (double)wr[j] * xi[j];
        const float got = Y[i * rows + r];
        ASSERT_NEAR(got, ref, b.fp32) << what << " vs scalar reference, x row " << i << " W row " << r;
        ASSERT_NEAR(got, exact, b.strict) << what << " vs double, x row " << i << " W row " << r;
        ASSERT_NEAR(ref, exact, b.stat) << what << " scalar reference vs double (6 sigma), x row " << i << " W row " << r;
      }
    }
  }
};

std::string label(Type t, Simd s, int64_t rows, int64_t cols, int64_t n, int threads) {
  return cat(gguf::type_traits(t).name, " ", simd_name(s), " ", rows, "x", cols, " n=", n, " threads=", threads);
}

// Column counts per type: the model widths (576 SmolLM2, 896 Qwen 0.5B, 1536 Qwen 1.5B) where the
// block size allows, and a non-multiple of 16 for the float types (exercises the scalar tails).
std::vector<int64_t> col_sizes(Type t) {
  if (is_kquant(t)) return {256, 1536};
  if (block_elems(t) == 32) return {576, 896, 1536};
  return {576, 904, 13};
}

// ---- tests ---------------------------------------------------------------------------------------

TEST(Dequant, MatchesLlamaCppPythonReference) {
  std::ifstream f(std::string(TW_SOURCE_DIR) + "/src/ops/cpu/testdata/dequant_ref.bin", std::ios::binary);
  ASSERT_TRUE(f) << "missing fixture: run scripts/gen_ops_quant_fixture.py";
  char magic[4];
  uint32_t count = 0;
  f.read(magic, 4);
  f.read(reinterpret_cast<char*>(&count), 4);
  ASSERT_EQ(std::string(magic, 4), "TWQF");
  ASSERT_EQ(count, std::size(kTypes));
  for (uint32_t k = 0; k < count; ++k) {
    uint32_t hdr[3];
    f.read(reinterpret_cast<char*>(hdr), sizeof(hdr));
    ASSERT_TRUE(f);
    const Type t = static_cast<Type>(hdr[0]);
    std::vector<uint8_t> raw(hdr[2]);
    std::vector<float> want(hdr[1]), got(hdr[1]);
    f.read(reinterpret_cast<char*>(raw.data()), raw.size());
    f.read(reinterpret_cast<char*>(want.data()), want.size() * 4);
    ASSERT_TRUE(f);
    ASSERT_EQ(raw.size(), gguf::row_bytes(t, hdr[1])) << gguf::type_traits(t).name;
    // Through the public get_row too: one row of hdr[1] columns.
    get_row(QMatrix{t, 1, hdr[1], raw.data(), raw.size()}, 0, got.data());
    for (uint32_t i = 0; i < hdr[1]; ++i)
      ASSERT_NEAR(got[i], want[i], 1e-6f * std::fabs(want[i]) + 1e-12f) << gguf::type_traits(t).name << " element " << i;
  }
}

// llama.cpp's own CPU result (ggml_mul_mat, see scripts/gen_ops_ggml_fixture.py) on small random
// matrices: we must agree to fp32 rounding at every level, which holds only if the activations are
// quantised exactly as llama.cpp does and every block dot is the same integer sum.
TEST(Matmul, MatchesLlamaCppGgml) {
  std::ifstream f(std::string(TW_SOURCE_DIR) + "/src/ops/cpu/testdata/ggml_matmul_ref.bin", std::ios::binary);
  ASSERT_TRUE(f) << "missing fixture: run scripts/gen_ops_ggml_fixture.py";
  char magic[4];
  uint32_t count = 0;
  f.read(magic, 4);
  f.read(reinterpret_cast<char*>(&count), 4);
  ASSERT_EQ(std::string(magic, 4), "TWGM");
  ASSERT_EQ(count, std::size(kTypes));
  for (uint32_t k = 0; k < count; ++k) {
    uint32_t h[5];
    f.read(reinterpret_cast<char*>(h), sizeof(h));
    ASSERT_TRUE(f);
    const Type t = static_cast<Type>(h[0]);
    const int64_t rows = h[1], cols = h[2], n = h[3];
    std::vector<uint8_t> w(h[4]);
    std::vector<float> x(n * cols), want(n * rows);
    f.read(reinterpret_cast<char*>(w.data()), w.size());
    f.read(reinterpret_cast<char*>(x.data()), x.size() * 4);
    f.read(reinterpret_cast<char*>(want.data()), want.size() * 4);
    ASSERT_TRUE(f);
    ASSERT_EQ(w.size(), gguf::row_bytes(t, cols) * rows);
    const std::vector<uint8_t> w0 = offsets_only(t, w);
    std::vector<float> wf(cols), w0f(cols);
    double worst = 0;  // largest |difference| / tolerance, printed as evidence of how close we are
    for (Simd s : levels()) {
      ThreadPool pool(2);
      std::vector<float> Y(n * rows, NAN);
      matmul(view(t, rows, cols, w), x.data(), n, Y.data(), pool, s);
      for (int64_t i = 0; i < n; ++i) {
        std::vector<uint8_t> a(detail::act_row_bytes(t, cols));
        detail::quantize_act_row(t, x.data() + i * cols, cols, a.data());
        const std::vector<float> xq = dequantized_act(t, cols, a);
        for (int64_t r = 0; r < rows; ++r) {
          detail::dequantize_row_ref(t, w.data() + r * gguf::row_bytes(t, cols), cols, wf.data());
          detail::dequantize_row_ref(t, w0.data() + r * gguf::row_bytes(t, cols), cols, w0f.data());
          // Only the fp32 summation order may differ: the same bound as Bounds::fp32.
          const double tol = bounds(t, wf.data(), w0f.data(), x.data() + i * cols, xq.data(), cols).fp32;
          worst = std::max(worst, std::fabs(Y[i * rows + r] - want[i * rows + r]) / tol);
          ASSERT_NEAR(Y[i * rows + r], want[i * rows + r], tol)
              << gguf::type_traits(t).name << " " << simd_name(s) << " x row " << i << " W row " << r;
        }
      }
    }
    std::printf("  %-5s vs ggml: max |diff| = %.3f of the fp32 tolerance\n", gguf::type_traits(t).name, worst);
  }
}

TEST(ActQuant, Q8RoundTripAndSums) {
  std::mt19937 rng(7);
  const std::vector<float> x = random_x(512, rng);
  for (Type t : {Type::Q8_0, Type::Q4_1, Type::Q4_K}) {
    std::vector<uint8_t> a(detail::act_row_bytes(t, 512));
    detail::quantize_act_row(t, x.data(), 512, a.data());
    if (t == Type::Q4_K) {
      const auto* b = reinterpret_cast<const detail::ActQ8K*>(a.data());
      for (int k = 0; k < 2; ++k) {
        for (int s = 0; s < 16; ++s) {
          int sum = 0;
          for (int j = 0; j < 16; ++j) sum += b[k].qs[16 * s + j];
          EXPECT_EQ(sum, b[k].bsums[s]);
        }
        for (int s = 0; s < 8; ++s)
          EXPECT_FLOAT_EQ(b[k].sum32[s], b[k].d * (b[k].bsums[2 * s] + b[k].bsums[2 * s + 1]));
        for (int j = 0; j < 256; ++j) EXPECT_NEAR(b[k].d * b[k].qs[j], x[256 * k + j], 0.5001 * std::fabs(b[k].d));
      }
    } else {
      const auto* b = reinterpret_cast<const detail::ActQ8*>(a.data());
      for (int k = 0; k < 16; ++k) {
        int sum = 0, amax = 0;
        for (int j = 0; j < 32; ++j) { sum += b[k].qs[j]; amax = std::max(amax, std::abs((int)b[k].qs[j])); }
        EXPECT_EQ(amax, 127);  // the largest element maps to +-127
        EXPECT_NEAR(b[k].s, b[k].d * sum, std::fabs(b[k].d * sum) * 1e-3 + 1e-6);
        for (int j = 0; j < 32; ++j) EXPECT_NEAR(b[k].d * b[k].qs[j], x[32 * k + j], 0.6 * b[k].d);
      }
    }
  }
  // All-zero blocks quantise to zeros with d = 0, not NaN.
  std::vector<float> z(256, 0.0f);
  std::vector<uint8_t> a(detail::act_row_bytes(Type::Q6_K, 256));
  detail::quantize_act_row(Type::Q6_K, z.data(), 256, a.data());
  EXPECT_EQ(reinterpret_cast<const detail::ActQ8K*>(a.data())->d, 0.0f);
}

TEST(Matvec, AllTypesAllLevels) {
  uint32_t seed = 100;
  for (Type t : kTypes) {
    for (int64_t cols : col_sizes(t)) {
      // 37 rows: not a multiple of the 16-row grain, so the thread split has a ragged end.
      Case cs(t, 37, cols, 1, ++seed);
      for (Simd s : levels()) {
        for (int threads : {1, 2}) {
          ThreadPool pool(threads);
          std::vector<float> y(cs.rows, NAN);
          matvec(view(t, cs.rows, cols, cs.w), cs.x.data(), y.data(), pool, s);
          cs.check(y, label(t, s, cs.rows, cols, 1, threads));
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

TEST(Matmul, AllTypesAllLevels) {
  uint32_t seed = 500;
  for (Type t : kTypes) {
    for (int64_t cols : col_sizes(t)) {
      for (int64_t n : {1, 3, 13, 17}) {  // partial groups of 8 (AVX-512) / 4 activation rows; 13 = 8 + 4 + 1
        Case cs(t, 23, cols, n, ++seed);
        for (Simd s : levels()) {
          for (int threads : {1, 2}) {
            ThreadPool pool(threads);
            std::vector<float> Y(n * cs.rows, NAN);
            matmul(view(t, cs.rows, cols, cs.w), cs.x.data(), n, Y.data(), pool, s);
            cs.check(Y, label(t, s, cs.rows, cols, n, threads));
            if (HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

// Big enough to cross the GEMM's cache blocking: the row-wise path's 256-row activation chunk
// (n = 260) and 64-row weight tile (100 rows), with ragged ends and a last group of 4 (260 = 32 * 8
// + 4); the interleaved path's 8-row groups with a tail (100 = 12 * 8 + 4) and, with 8960 columns,
// its ~360-row activation chunk (n = 400).
TEST(Matmul, CrossesChunkAndTileBoundaries) {
  struct Shape { Type t; int64_t rows, cols, n; };
  for (const Shape& sh : {Shape{Type::Q4_K, 100, 256, 260}, Shape{Type::Q8_0, 100, 256, 260}, Shape{Type::Q6_K, 100, 256, 260},
                          Shape{Type::Q5_K, 100, 256, 260}, Shape{Type::Q6_K, 17, 8960, 400}}) {
    Case cs(sh.t, sh.rows, sh.cols, sh.n, 900 + static_cast<uint32_t>(sh.t) + static_cast<uint32_t>(sh.cols));
    for (Simd s : levels()) {
      ThreadPool pool(2);
      std::vector<float> Y(cs.n * cs.rows, NAN);
      matmul(view(sh.t, cs.rows, sh.cols, cs.w), cs.x.data(), cs.n, Y.data(), pool, s);
      cs.check(Y, label(sh.t, s, cs.rows, sh.cols, cs.n, 2));
      if (HasFatalFailure()) return;
    }
  }
}

TEST(Matmul, RealTensorFromSmolLM2) {
  const gguf::File file = gguf::File::open(require_model(kSmolLM2File));
  std::mt19937 rng(3);
  int checked = 0;
  for (const char* name : {"blk.0.ffn_down.weight", "blk.0.attn_q.weight", "token_embd.weight"}) {
    const gguf::TensorInfo* ti = file.find_tensor(name);
    ASSERT_NE(ti, nullptr) << name;
    const QMatrix W = as_matrix(*ti);
    EXPECT_EQ(W.rows, ti->ne[1]);
    EXPECT_EQ(W.cols, ti->ne[0]);
    // First 64 rows are plenty and keep the double-precision reference cheap.
    const int64_t rows = std::min<int64_t>(64, W.rows);
    QMatrix sub = W;
    sub.rows = rows;
    const int64_t n = 5;
    const std::vector<float> X = random_x(n * W.cols, rng);
    std::vector<float> wrow(W.cols);
    for (Simd s : levels()) {
      ThreadPool pool(2);
      std::vector<float> Y(n * rows);
      matmul(sub, X.data(), n, Y.data(), pool, s);
      for (int64_t i = 0; i < n; ++i) {
        std::vector<uint8_t> a(detail::act_row_bytes(W.type, W.cols));
        detail::quantize_act_row(W.type, X.data() + i * W.cols, W.cols, a.data());
        for (int64_t r = 0; r < rows; ++r) {
          get_row(W, r, wrow.data());
          double exact = 0, mag = 0;
          for (int64_t j = 0; j < W.cols; ++j) {
            exact += (double)wrow[j] * X[i * W.cols + j];
            mag += std::fabs((double)wrow[j] * X[i * W.cols + j]);
          }
          const float ref = detail::dot_ref(W.type, W.data + r * W.row_bytes, a.data(), W.cols);
          ASSERT_NEAR(Y[i * rows + r], ref, 1e-5 * mag) << name << " " << simd_name(s);
          // Activation quantisation: 8-bit, errors ~1% of sum |w x| at most on real weights.
          ASSERT_NEAR(Y[i * rows + r], exact, 0.02 * mag) << name << " " << simd_name(s);
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 0);
}

TEST(Matmul, BadInputsThrow) {
  ThreadPool pool(1);
  std::vector<uint8_t> d(gguf::row_bytes(Type::Q4_0, 64) * 2);
  float x[64] = {}, y[2];
  EXPECT_THROW(matvec(QMatrix{Type::Q4_0, 2, 48, d.data(), 36}, x, y, pool), Error);   // 48 % 32 != 0
  EXPECT_THROW(matvec(QMatrix{Type::Q4_0, 2, 64, nullptr, 36}, x, y, pool), Error);
  EXPECT_THROW(matvec(QMatrix{Type::Q4_0, 2, 64, d.data(), 10}, x, y, pool), Error);   // row_bytes too small
  EXPECT_THROW(matvec(QMatrix{Type::Q2_K, 2, 256, d.data(), 84}, x, y, pool), Error);  // unsupported type
  EXPECT_THROW(matmul(QMatrix{Type::Q4_0, 2, 64, d.data(), 36}, x, -1, y, pool), Error);
  EXPECT_THROW(get_row(QMatrix{Type::Q4_0, 2, 64, d.data(), 36}, 2, y), Error);
  EXPECT_THROW(parse_simd("sse9"), Error);
  EXPECT_THROW(parse_simd(nullptr), Error);
  EXPECT_EQ(parse_simd("avx512"), Simd::AVX512);
  EXPECT_EQ(parse_simd("scalar"), Simd::Scalar);
  gguf::TensorInfo ti;
  ti.name = "norm";
  ti.type = Type::F32;
  ti.ne = {64};
  EXPECT_THROW(as_matrix(ti), Error);  // 1-D
  ti.ne = {64, 2};
  EXPECT_THROW(as_matrix(ti), Error);  // no data
}

TEST(Simd, ActiveLevelIsSupported) {
  // TWILIGHT_SIMD (when the test runner sets it) must name a supported level; otherwise the best.
  const Simd s = active_simd();
  EXPECT_TRUE(simd_supported(s));
  if (std::getenv("TWILIGHT_SIMD") == nullptr) {
    EXPECT_EQ(s, best_simd());
  }
}

}  // namespace
}  // namespace tw::ops
