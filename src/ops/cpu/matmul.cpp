#include "ops/cpu/matmul.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "ops/cpu/quant_dot.h"

namespace tw::ops {

using gguf::Type;

// ---- SIMD level --------------------------------------------------------------------------------

const char* simd_name(Simd s) {
  switch (s) {
    case Simd::Scalar: return "scalar";
    case Simd::AVX2: return "avx2";
    case Simd::AVX512: return "avx512";
  }
  return "?";
}

bool simd_supported(Simd s) {
  switch (s) {
    case Simd::Scalar: return true;
#if defined(__x86_64__) && defined(__GNUC__)
    case Simd::AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             detail::avx2_kernel(Type::Q8_0) != nullptr;
    case Simd::AVX512:
      return simd_supported(Simd::AVX2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni") && detail::avx512_kernel(Type::Q8_0) != nullptr;
#else
    default: return false;
#endif
  }
  return false;
}

Simd best_simd() {
  if (simd_supported(Simd::AVX512)) return Simd::AVX512;
  if (simd_supported(Simd::AVX2)) return Simd::AVX2;
  return Simd::Scalar;
}

Simd parse_simd(const char* name) {
  const std::string s = name ? name : "";
  if (s == "scalar") return Simd::Scalar;
  if (s == "avx2") return Simd::AVX2;
  if (s == "avx512") return Simd::AVX512;
  fail("TWILIGHT_SIMD: unknown SIMD level '", s, "' (expected scalar, avx2 or avx512)");
}

static Simd simd_from_env() {
  const char* env = std::getenv("TWILIGHT_SIMD");
  if (env == nullptr || *env == '\0') return best_simd();
  const Simd s = parse_simd(env);
  TW_CHECK(simd_supported(s), "TWILIGHT_SIMD=", env, ": this CPU does not support that SIMD level");
  return s;
}

Simd active_simd() {
  static const Simd level = simd_from_env();  // a throw leaves it uninitialised: the next call retries
  return level;
}

bool matmul_supported(Type t) {
  switch (t) {
    case Type::F32: case Type::F16: case Type::BF16: case Type::Q4_0: case Type::Q4_1: case Type::Q5_0:
    case Type::Q5_1: case Type::Q8_0: case Type::Q4_K: case Type::Q5_K: case Type::Q6_K:
      return true;
    default:
      return false;
  }
}

// ---- matrix views ------------------------------------------------------------------------------

QMatrix as_matrix(const gguf::TensorInfo& t) {
  TW_CHECK(t.ne.size() == 2, "tensor '", t.name, "': expected a 2-D weight matrix, got ", t.ne.size(), " dims");
  TW_CHECK(matmul_supported(t.type), "tensor '", t.name, "': type ", gguf::type_traits(t.type).name,
           " is not supported by the CPU matmul");
  const int64_t be = gguf::type_traits(t.type).block_elems;
  TW_CHECK(t.ne[0] > 0 && t.ne[1] > 0 && t.ne[0] % be == 0, "tensor '", t.name, "': row length ", t.ne[0],
           " is not a positive multiple of the block size ", be);
  QMatrix m;
  m.type = t.type;
  m.cols = t.ne[0];
  m.rows = t.ne[1];
  m.data = t.data;
  m.row_bytes = gguf::row_bytes(t.type, m.cols);
  TW_CHECK(t.data != nullptr && t.nbytes >= m.row_bytes * static_cast<size_t>(m.rows), "tensor '", t.name,
           "': data is missing or shorter than its shape");
  return m;
}

static void check_matrix(const QMatrix& W, const char* what) {
  TW_CHECK(matmul_supported(W.type), what, ": weight type ", gguf::type_traits(W.type).name, " is not supported");
  const int64_t be = gguf::type_traits(W.type).block_elems;
  TW_CHECK(W.rows > 0 && W.cols > 0 && W.cols % be == 0, what, ": bad shape ", W.rows, "x", W.cols, " for type ",
           gguf::type_traits(W.type).name, " (cols must be a positive multiple of ", be, ")");
  TW_CHECK(W.data != nullptr, what, ": null weight data");
  TW_CHECK(W.row_bytes >= gguf::row_bytes(W.type, W.cols), what, ": row_bytes ", W.row_bytes, " < ",
           gguf::row_bytes(W.type, W.cols), " needed for ", W.cols, " columns");
}

void get_row(const QMatrix& W, int64_t r, float* out) {
  check_matrix(W, "get_row");
  TW_CHECK(r >= 0 && r < W.rows, "get_row: row ", r, " out of range [0, ", W.rows, ")");
  detail::dequantize_row_ref(W.type, W.data + static_cast<size_t>(r) * W.row_bytes, W.cols, out);
}

// ---- kernels -----------------------------------------------------------------------------------

namespace {

// The scalar level: the reference dot, one activation row at a time.
struct Kernel {
  Type type;
  detail::RowKernel fn = nullptr;  // nullptr = scalar reference
  void operator()(const uint8_t* w, const uint8_t* const* acts, int nc, int64_t cols, float* out) const {
    if (fn) {
      fn(w, acts, nc, cols, out);
    } else {
      for (int c = 0; c < nc; ++c) out[c] = detail::dot_ref(type, w, acts[c], cols);
    }
  }
};

Kernel pick_kernel(Type t, Simd level) {
  TW_CHECK(simd_supported(level), "matmul: SIMD level ", simd_name(level), " is not supported on this CPU");
  Kernel k{t, nullptr};
  if (level == Simd::AVX512) k.fn = detail::avx512_kernel(t);
  if (level == Simd::AVX2) k.fn = detail::avx2_kernel(t);
  TW_CHECK(level == Simd::Scalar || k.fn != nullptr, "matmul: no ", simd_name(level), " kernel for type ",
           gguf::type_traits(t).name);
  return k;
}

// Per-thread scratch for the quantised activations (matvec runs hundreds of times per token).
std::vector<uint8_t>& act_scratch(size_t bytes) {
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < bytes) buf.resize(bytes);
  return buf;
}

}  // namespace

void matvec(const QMatrix& W, const float* x, float* y, ThreadPool& pool, Simd level) {
  check_matrix(W, "matvec");
  TW_CHECK(x != nullptr && y != nullptr, "matvec: null input or output");
  const Kernel k = pick_kernel(W.type, level);
  const size_t arb = detail::act_row_bytes(W.type, W.cols);
  std::vector<uint8_t>& buf = act_scratch(arb);
  detail::quantize_act_row(W.type, x, W.cols, buf.data());
  const uint8_t* act = buf.data();
  // Grain of 16 rows keeps each thread's slice a whole number of cache lines of y.
  pool.parallel_for_grain(W.rows, 16, [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) k(W.data + static_cast<size_t>(r) * W.row_bytes, &act, 1, W.cols, y + r);
  });
}

void matmul(const QMatrix& W, const float* X, int64_t n, float* Y, ThreadPool& pool, Simd level) {
  check_matrix(W, "matmul");
  TW_CHECK(n >= 0, "matmul: negative row count ", n);
  if (n == 0) return;
  TW_CHECK(X != nullptr && Y != nullptr, "matmul: null input or output");
  if (n == 1) return matvec(W, X, Y, pool, level);
  const Kernel k = pick_kernel(W.type, level);
  const size_t arb = detail::act_row_bytes(W.type, W.cols);
  std::vector<uint8_t>& buf = act_scratch(arb * static_cast<size_t>(n));
  uint8_t* acts = buf.data();
  pool.parallel_for(n, [&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; ++i)
      detail::quantize_act_row(W.type, X + i * W.cols, W.cols, acts + static_cast<size_t>(i) * arb);
  });

  const int64_t chunk = std::clamp<int64_t>(static_cast<int64_t>((512u << 10) / arb), 8, 256);
  const int64_t rows = W.rows;

  // Rows r in [t0, t1) against activation rows [c0, c1), cols_per_call activation rows per kernel
  // call so each weight block is unpacked once per group.
  auto rowwise = [&](int64_t t0, int64_t t1, int64_t c0, int64_t c1) {
    const int group = detail::cols_per_call(static_cast<int>(level));
    const uint8_t* ap[detail::kMaxCols];
    float tmp[detail::kMaxCols];
    for (int64_t g = c0; g < c1; g += group) {
      const int nc = static_cast<int>(std::min<int64_t>(group, c1 - g));
      for (int c = 0; c < nc; ++c) ap[c] = acts + static_cast<size_t>(g + c) * arb;
      for (int64_t r = t0; r < t1; ++r) {
        k(W.data + static_cast<size_t>(r) * W.row_bytes, ap, nc, W.cols, tmp);
        for (int c = 0; c < nc; ++c) Y[(g + c) * rows + r] = tmp[c];
      }
    }
  };

  const detail::Interleaved8 il = level == Simd::AVX512 ? detail::avx512_interleaved8(W.type) : detail::Interleaved8{};
  if (il.kernel != nullptr && n >= 12) {
    // Interleaved path: repack 8 weight rows at a time (into L1/L2), then stream the activation
    // rows of the chunk past them; rows left over (rows % 8) take the row-wise kernels. Below ~12
    // activation rows the repacking costs more than it saves (measured on Zen 4).
    const size_t pb = il.packed_bytes(W.cols);
    // Each chunk of activation rows repacks the weights again, so chunks are large (activations up
    // to ~4 MB, served from L3): with L2-sized chunks the Q6_K repack cost ~25% (ffn_down, 8960 cols).
    const int64_t ichunk = std::max<int64_t>(64, static_cast<int64_t>((4u << 20) / arb));
    pool.parallel_for_grain(rows, 8, [&](int64_t r0, int64_t r1, int) {
      thread_local std::vector<uint8_t> store;
      if (store.size() < pb + 64) store.resize(pb + 64);
      uint8_t* packed = store.data() + (64 - reinterpret_cast<uintptr_t>(store.data()) % 64) % 64;  // 32-byte loads
      const int64_t r8 = r0 + (r1 - r0) / 8 * 8;
      for (int64_t c0 = 0; c0 < n; c0 += ichunk) {
        const int64_t c1 = std::min(n, c0 + ichunk);
        for (int64_t g8 = r0; g8 < r8; g8 += 8) {
          il.repack(W.data + static_cast<size_t>(g8) * W.row_bytes, W.row_bytes, W.cols, packed);
          const uint8_t* ap[4];
          float* op[4];
          for (int64_t g = c0; g < c1; g += 4) {
            const int nc = static_cast<int>(std::min<int64_t>(4, c1 - g));
            for (int c = 0; c < nc; ++c) {
              ap[c] = acts + static_cast<size_t>(g + c) * arb;
              op[c] = Y + (g + c) * rows + g8;
            }
            il.kernel(packed, ap, nc, W.cols, op);
          }
        }
        if (r8 < r1) rowwise(r8, r1, c0, c1);
      }
    });
    return;
  }

  // Row-wise path. Blocking: a chunk of activation rows sized for L2, a tile of weight rows sized
  // for L1; inside, groups of cols_per_call activation rows against each weight row of the tile,
  // so the tile stays in L1 while all groups of the chunk stream past it. (Measured on Zen 4 and an
  // AVX-512 Xeon: the tile/chunk sizes matter little, within ~10%; the number of activation rows
  // per kernel call matters most.)
  const int64_t tile = std::clamp<int64_t>(static_cast<int64_t>((16u << 10) / W.row_bytes), 1, 64);
  pool.parallel_for_grain(rows, tile, [&](int64_t r0, int64_t r1, int) {
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t c1 = std::min(n, c0 + chunk);
      for (int64_t t0 = r0; t0 < r1; t0 += tile) rowwise(t0, std::min(r1, t0 + tile), c0, c1);
    }
  });
}

void matvec(const QMatrix& W, const float* x, float* y, ThreadPool& pool) { matvec(W, x, y, pool, active_simd()); }

void matmul(const QMatrix& W, const float* X, int64_t n, float* Y, ThreadPool& pool) {
  matmul(W, X, n, Y, pool, active_simd());
}

}  // namespace tw::ops
