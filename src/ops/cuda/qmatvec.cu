#include "ops/cuda/qmatvec.h"

#include <climits>
#include <cstddef>
#include <cstdint>

#include "common/error.h"
#include "ops/cuda/common.cuh"
#include "ops/cuda/cuda_check.h"

// Layout: one warp per output row; the row is cut into "units" (a whole 32-element block, or a
// 64-element quarter of a 256-element k-quant super-block) and lane i takes units i, i+32, ...
// so consecutive lanes read consecutive bytes (coalesced). Each unit's dot with x is done in fp32
// (dequantise, multiply, add); the lane sums are reduced with shuffles. x (a few tens of KB) is read
// through the read-only cache by every warp; W, the bulk of the traffic, is read once.
//
// Block offsets come from the structs of gguf/quants.h (offsetof), so the kernels follow the same
// byte layout the CPU reference uses. Blocks of 18/22/34/210 bytes are only 2-byte aligned in a
// row, so those are read as 16-bit words; Q4_1 (20 bytes) as 32-bit words; Q4_K (144 bytes) with
// 16-byte loads.

namespace tw::cuda {
namespace {

using gguf::Type;
using detail::half_bits_to_float;

__device__ __forceinline__ float4 ldx4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ uint32_t ld_u16x2(const uint8_t* p) {  // 4 bytes from a 2-byte-aligned address
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  return uint32_t(__ldg(h)) | uint32_t(__ldg(h + 1)) << 16;
}
__device__ __forceinline__ uint16_t ld_u16(const uint8_t* p) { return __ldg(reinterpret_cast<const uint16_t*>(p)); }
__device__ __forceinline__ float dot4(float4 x, float a, float b, float c, float d) {
  return x.x * a + x.y * b + x.z * c + x.w * d;
}
__device__ __forceinline__ float sum4(float4 x) { return (x.x + x.y) + (x.z + x.w); }
// Byte k of w as float, low and high nibble of byte k.
__device__ __forceinline__ float lo4(uint32_t w, int k) { return float((w >> (8 * k)) & 0xF); }
__device__ __forceinline__ float hi4(uint32_t w, int k) { return float((w >> (8 * k + 4)) & 0xF); }

template <Type T> struct Q;

// Q8_0: x = q * d, q int8.
template <> struct Q<Type::Q8_0> {
  using B = gguf::block_q8_0;
  static constexpr int kElems = gguf::QK, kUnits = 1;
  __device__ static float dot(const uint8_t* b, int, const float* x) {
    const float d = half_bits_to_float(ld_u16(b + offsetof(B, d)));
    const uint8_t* qs = b + offsetof(B, qs);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t q = ld_u16x2(qs + 4 * i);
      s += dot4(ldx4(x + 4 * i), float(int8_t(q)), float(int8_t(q >> 8)), float(int8_t(q >> 16)),
                float(int8_t(q >> 24)));
    }
    return d * s;
  }
};

// Q4_0: x = (q - 8) * d; low nibbles of qs[j] are elements j, high nibbles j + 16.
template <> struct Q<Type::Q4_0> {
  using B = gguf::block_q4_0;
  static constexpr int kElems = gguf::QK, kUnits = 1;
  __device__ static float dot(const uint8_t* b, int, const float* x) {
    const float d = half_bits_to_float(ld_u16(b + offsetof(B, d)));
    const uint8_t* qs = b + offsetof(B, qs);
    float s = 0.f, sx = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t q = ld_u16x2(qs + 4 * i);
      const float4 xl = ldx4(x + 4 * i), xh = ldx4(x + 16 + 4 * i);
      s += dot4(xl, lo4(q, 0), lo4(q, 1), lo4(q, 2), lo4(q, 3)) + dot4(xh, hi4(q, 0), hi4(q, 1), hi4(q, 2), hi4(q, 3));
      sx += sum4(xl) + sum4(xh);
    }
    return d * (s - 8.f * sx);
  }
};

// Q4_1: x = q * d + m.
template <> struct Q<Type::Q4_1> {
  using B = gguf::block_q4_1;
  static constexpr int kElems = gguf::QK, kUnits = 1;
  __device__ static float dot(const uint8_t* b, int, const float* x) {
    const uint32_t dm = __ldg(reinterpret_cast<const uint32_t*>(b + offsetof(B, d)));  // d, m adjacent
    static_assert(offsetof(B, m) == offsetof(B, d) + 2 && offsetof(B, qs) % 4 == 0 && sizeof(B) % 4 == 0);
    const float d = half_bits_to_float(uint16_t(dm)), m = half_bits_to_float(uint16_t(dm >> 16));
    const uint32_t* qs = reinterpret_cast<const uint32_t*>(b + offsetof(B, qs));
    float s = 0.f, sx = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t q = __ldg(qs + i);
      const float4 xl = ldx4(x + 4 * i), xh = ldx4(x + 16 + 4 * i);
      s += dot4(xl, lo4(q, 0), lo4(q, 1), lo4(q, 2), lo4(q, 3)) + dot4(xh, hi4(q, 0), hi4(q, 1), hi4(q, 2), hi4(q, 3));
      sx += sum4(xl) + sum4(xh);
    }
    return d * s + m * sx;
  }
};

// Q5_0: x = (q - 16) * d, q = nibble | (bit j of qh) << 4 for element j (0..31).
template <> struct Q<Type::Q5_0> {
  using B = gguf::block_q5_0;
  static constexpr int kElems = gguf::QK, kUnits = 1;
  __device__ static float dot(const uint8_t* b, int, const float* x) {
    const float d = half_bits_to_float(ld_u16(b + offsetof(B, d)));
    const uint32_t qh = ld_u16x2(b + offsetof(B, qh));
    const uint8_t* qs = b + offsetof(B, qs);
    float s = 0.f, sx = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t q = ld_u16x2(qs + 4 * i);
      const float4 xl = ldx4(x + 4 * i), xh = ldx4(x + 16 + 4 * i);
      float wl[4], wh[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int j = 4 * i + k;
        wl[k] = float(((q >> (8 * k)) & 0xF) | ((qh >> j) & 1) << 4);
        wh[k] = float(((q >> (8 * k + 4)) & 0xF) | ((qh >> (j + 16)) & 1) << 4);
      }
      s += dot4(xl, wl[0], wl[1], wl[2], wl[3]) + dot4(xh, wh[0], wh[1], wh[2], wh[3]);
      sx += sum4(xl) + sum4(xh);
    }
    return d * (s - 16.f * sx);
  }
};

// 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block (ggml get_scale_min_k4),
// read byte-wise from global memory: j depends on the lane, and indexing a register array with it
// would spill to local memory.
__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* q, float& sc, float& mn) {
  if (j < 4) {
    sc = float(__ldg(q + j) & 63);
    mn = float(__ldg(q + j + 4) & 63);
  } else {
    const uint8_t a = __ldg(q + j + 4);
    sc = float((a & 0xF) | ((__ldg(q + j - 4) >> 6) << 4));
    mn = float((a >> 4) | ((__ldg(q + j) >> 6) << 4));
  }
}

// Q4_K: 256 elements in 8 sub-blocks of 32; x = d * sc_j * q - dmin * m_j. Unit u (0..3) covers
// elements 64u..64u+63: the low nibbles of qs[32u..32u+31] (sub-block 2u) then the high nibbles
// (sub-block 2u+1).
template <> struct Q<Type::Q4_K> {
  using B = gguf::block_q4_K;
  static constexpr int kElems = gguf::QK_K, kUnits = 4;
  static_assert(sizeof(B) % 16 == 0 && offsetof(B, qs) % 16 == 0, "16-byte loads of qs need aligned blocks");
  __device__ static float dot(const uint8_t* b, int u, const float* xb) {
    const uint32_t dd = __ldg(reinterpret_cast<const uint32_t*>(b + offsetof(B, d)));  // d, dmin adjacent
    const float d = half_bits_to_float(uint16_t(dd)), dmin = half_bits_to_float(uint16_t(dd >> 16));
    float sc1, m1, sc2, m2;
    scale_min_k4(2 * u, b + offsetof(B, scales), sc1, m1);
    scale_min_k4(2 * u + 1, b + offsetof(B, scales), sc2, m2);
    const uint4* qp = reinterpret_cast<const uint4*>(b + offsetof(B, qs) + 32 * u);
    const uint4 qa = __ldg(qp), qb = __ldg(qp + 1);
    const uint32_t qw[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
    const float* x = xb + 64 * u;
    float s1 = 0.f, s2 = 0.f, sx1 = 0.f, sx2 = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t q = qw[i];
      const float4 xl = ldx4(x + 4 * i), xh = ldx4(x + 32 + 4 * i);
      s1 += dot4(xl, lo4(q, 0), lo4(q, 1), lo4(q, 2), lo4(q, 3));
      s2 += dot4(xh, hi4(q, 0), hi4(q, 1), hi4(q, 2), hi4(q, 3));
      sx1 += sum4(xl);
      sx2 += sum4(xh);
    }
    return d * (sc1 * s1 + sc2 * s2) - dmin * (m1 * sx1 + m2 * sx2);
  }
};

// Q6_K: 256 elements, x = d * scale * (q - 32) with q 6-bit (4 low bits in ql, 2 high in qh) and
// one int8 scale per 16 elements. In half n (0..1), for l in 0..31, byte ql[64n+l], ql[64n+32+l]
// and qh[32n+l] give elements 128n + l, +32, +64, +96. Unit u = (n = u/2, l in 16*(u%2) + 0..15).
template <> struct Q<Type::Q6_K> {
  using B = gguf::block_q6_K;
  static constexpr int kElems = gguf::QK_K, kUnits = 4;
  __device__ static float dot(const uint8_t* b, int u, const float* xb) {
    const int n = u >> 1, h = u & 1;
    const uint8_t* qla = b + offsetof(B, ql) + 64 * n + 16 * h;
    const uint8_t* qlb = qla + 32;
    const uint8_t* qhp = b + offsetof(B, qh) + 32 * n + 16 * h;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + offsetof(B, scales)) + 8 * n + h;
    const float d = half_bits_to_float(ld_u16(b + offsetof(B, d)));
    const float* x = xb + 128 * n + 16 * h;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t a = ld_u16x2(qla + 4 * i), c = ld_u16x2(qlb + 4 * i), hb = ld_u16x2(qhp + 4 * i);
      float w[4][4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t hk = (hb >> (8 * k)) & 0xFF;
        w[0][k] = float(int(((a >> (8 * k)) & 0xF) | ((hk & 3) << 4)) - 32);
        w[1][k] = float(int(((c >> (8 * k)) & 0xF) | (((hk >> 2) & 3) << 4)) - 32);
        w[2][k] = float(int(((a >> (8 * k + 4)) & 0xF) | (((hk >> 4) & 3) << 4)) - 32);
        w[3][k] = float(int(((c >> (8 * k + 4)) & 0xF) | (((hk >> 6) & 3) << 4)) - 32);
      }
#pragma unroll
      for (int g = 0; g < 4; ++g) s[g] += dot4(ldx4(x + 32 * g + 4 * i), w[g][0], w[g][1], w[g][2], w[g][3]);
    }
    return d * (float(__ldg(sc)) * s[0] + float(__ldg(sc + 2)) * s[1] + float(__ldg(sc + 4)) * s[2] +
                float(__ldg(sc + 6)) * s[3]);
  }
};

constexpr int kWarps = 4;  // rows per block: 1536 rows -> 384 blocks, all resident at once on 132 SMs

template <Type T>
__global__ void __launch_bounds__(kWarps * 32)
    qmatvec_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int rows, int blocks_per_row,
                   const float* __restrict__ x, float* __restrict__ y) {
  using QT = Q<T>;
  const int row = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warp leaves together: the shuffles below stay full-warp
  const int lane = threadIdx.x & 31;
  const uint8_t* wr = w + static_cast<size_t>(row) * row_bytes;
  const int units = blocks_per_row * QT::kUnits;
  float acc = 0.f;
#pragma unroll 2
  for (int u = lane; u < units; u += 32) {
    const int blk = u / QT::kUnits, sub = u % QT::kUnits;  // kUnits is 1 or 4: shifts
    acc += QT::dot(wr + static_cast<size_t>(blk) * sizeof(typename QT::B), sub, x + static_cast<size_t>(blk) * QT::kElems);
  }
  acc = detail::warp_sum(acc);
  if (lane == 0) y[row] = acc;
}

template <Type T>
void launch(const DeviceQMatrix& m, const float* x, float* y, cudaStream_t stream) {
  const size_t rb = gguf::row_bytes(T, m.cols);
  const int blocks_per_row = static_cast<int>(m.cols / Q<T>::kElems);
  const unsigned grid = static_cast<unsigned>((m.rows + kWarps - 1) / kWarps);
  qmatvec_kernel<T><<<grid, kWarps * 32, 0, stream>>>(static_cast<const uint8_t*>(m.data), rb,
                                                       static_cast<int>(m.rows), blocks_per_row, x, y);
  TW_CUDA_CHECK_LAUNCH();
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

bool qmatvec_supported(Type t) {
  switch (t) {
    case Type::Q4_0: case Type::Q4_1: case Type::Q5_0: case Type::Q8_0: case Type::Q4_K: case Type::Q6_K:
      return true;
    default:
      return false;
  }
}

void qmatvec_cuda(const DeviceQMatrix& m, const float* x, float* y, cudaStream_t stream) {
  const gguf::TypeTraits tr = gguf::type_traits(m.type);
  TW_CHECK(qmatvec_supported(m.type), "qmatvec_cuda: weight type ", tr.name, " (id ", static_cast<uint32_t>(m.type),
           ") is not supported on CUDA (supported: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K)");
  TW_CHECK(m.rows > 0 && m.cols > 0, "qmatvec_cuda: bad shape ", m.rows, " x ", m.cols);
  TW_CHECK(m.cols % tr.block_elems == 0, "qmatvec_cuda: cols ", m.cols, " is not a multiple of the ", tr.name,
           " block size ", tr.block_elems);
  TW_CHECK(m.rows <= INT_MAX && m.cols / tr.block_elems <= INT_MAX / 4, "qmatvec_cuda: shape ", m.rows, " x ",
           m.cols, " is too large");
  TW_CHECK(m.data && x && y, "qmatvec_cuda: null pointer (W=", m.data, ", x=", x, ", y=", y, ")");
  TW_CHECK(aligned16(m.data) && aligned16(x) && aligned16(y), "qmatvec_cuda: W, x and y must be 16-byte aligned (W=",
           m.data, ", x=", x, ", y=", y, ")");
  switch (m.type) {
    case Type::Q4_0: return launch<Type::Q4_0>(m, x, y, stream);
    case Type::Q4_1: return launch<Type::Q4_1>(m, x, y, stream);
    case Type::Q5_0: return launch<Type::Q5_0>(m, x, y, stream);
    case Type::Q8_0: return launch<Type::Q8_0>(m, x, y, stream);
    case Type::Q4_K: return launch<Type::Q4_K>(m, x, y, stream);
    case Type::Q6_K: return launch<Type::Q6_K>(m, x, y, stream);
    default: break;
  }
  fail("qmatvec_cuda: no kernel for ", tr.name);  // qmatvec_supported and this switch disagree: a bug
}

}  // namespace tw::cuda
