#include "ops/cuda/qmatvec.h"

#include <climits>
#include <cstddef>
#include <cstdint>

#include "common/error.h"
#include "ops/cuda/common.cuh"
#include "ops/cuda/cuda_check.h"

// Layout: one to four warps per output row; the row is cut into "units" (8 elements of a 32-element
// block, 16 of a 256-element k-quant super-block) and thread i of the row takes units i, i + n, ...
// (n threads per row) so consecutive lanes read consecutive bytes of W and of x (coalesced). Each unit's dot with x is done in fp32
// (dequantise, multiply, add); the lane sums are reduced with shuffles. x (a few tens of KB) is read
// through the read-only cache by every warp; W, the bulk of the traffic, is read once.
//
// Block offsets come from the structs of gguf/quants.h (offsetof), so the kernels follow the same
// byte layout the CPU reference uses. Blocks of 18/22/34/210 bytes are only 2-byte aligned in a
// row, so those are read as 16-bit words; Q4_1 (20 bytes) as 32-bit words; Q4_K (144 bytes) with
// 8-byte loads.

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

// Each 32-element block is split into 4 units of 8 elements (4 lanes per block): lane t of the
// block reads qs bytes 4t..4t+3, i.e. elements 4t..4t+3 (low nibbles) and 16+4t..16+4t+3 (high),
// so the 4 lanes of a block read x from one 128-byte line. (A lane per block made each warp-wide
// x load touch 32 lines and the L1 throughput, not DRAM, bounded the kernel.)

// Q8_0: x = q * d, q int8. Unit t: bytes/elements 8t..8t+7.
template <> struct Q<Type::Q8_0> {
  using B = gguf::block_q8_0;
  static constexpr int kElems = gguf::QK, kUnits = 4;
  __device__ static float dot(const uint8_t* b, int t, const float* x) {
    const float d = half_bits_to_float(ld_u16(b + offsetof(B, d)));
    const uint8_t* qs = b + offsetof(B, qs) + 8 * t;
    const uint32_t q0 = ld_u16x2(qs), q1 = ld_u16x2(qs + 4);
    const float4 x0 = ldx4(x + 8 * t), x1 = ldx4(x + 8 * t + 4);
    const float s = dot4(x0, float(int8_t(q0)), float(int8_t(q0 >> 8)), float(int8_t(q0 >> 16)), float(int8_t(q0 >> 24))) +
                    dot4(x1, float(int8_t(q1)), float(int8_t(q1 >> 8)), float(int8_t(q1 >> 16)), float(int8_t(q1 >> 24)));
    return d * s;
  }
};

// Q4_0: x = (q - 8) * d; low nibbles of qs[j] are elements j, high nibbles j + 16.
template <> struct Q<Type::Q4_0> {
  using B = gguf::block_q4_0;
  static constexpr int kElems = gguf::QK, kUnits = 4;
  __device__ static float dot(const uint8_t* b, int t, const float* x) {
    const float d = half_bits_to_float(ld_u16(b + offsetof(B, d)));
    const uint32_t q = ld_u16x2(b + offsetof(B, qs) + 4 * t);
    const float4 xl = ldx4(x + 4 * t), xh = ldx4(x + 16 + 4 * t);
    const float s = dot4(xl, lo4(q, 0), lo4(q, 1), lo4(q, 2), lo4(q, 3)) + dot4(xh, hi4(q, 0), hi4(q, 1), hi4(q, 2), hi4(q, 3));
    return d * (s - 8.f * (sum4(xl) + sum4(xh)));
  }
};

// Q4_1: x = q * d + m.
template <> struct Q<Type::Q4_1> {
  using B = gguf::block_q4_1;
  static constexpr int kElems = gguf::QK, kUnits = 4;
  static_assert(offsetof(B, m) == offsetof(B, d) + 2 && offsetof(B, qs) % 4 == 0 && sizeof(B) % 4 == 0);
  __device__ static float dot(const uint8_t* b, int t, const float* x) {
    const uint32_t dm = __ldg(reinterpret_cast<const uint32_t*>(b + offsetof(B, d)));  // d, m adjacent
    const float d = half_bits_to_float(uint16_t(dm)), m = half_bits_to_float(uint16_t(dm >> 16));
    const uint32_t q = __ldg(reinterpret_cast<const uint32_t*>(b + offsetof(B, qs)) + t);
    const float4 xl = ldx4(x + 4 * t), xh = ldx4(x + 16 + 4 * t);
    const float s = dot4(xl, lo4(q, 0), lo4(q, 1), lo4(q, 2), lo4(q, 3)) + dot4(xh, hi4(q, 0), hi4(q, 1), hi4(q, 2), hi4(q, 3));
    return d * s + m * (sum4(xl) + sum4(xh));
  }
};

// Q5_0: x = (q - 16) * d, q = nibble | (bit j of qh) << 4 for element j (0..31).
template <> struct Q<Type::Q5_0> {
  using B = gguf::block_q5_0;
  static constexpr int kElems = gguf::QK, kUnits = 4;
  __device__ static float dot(const uint8_t* b, int t, const float* x) {
    const float d = half_bits_to_float(ld_u16(b + offsetof(B, d)));
    const uint32_t qh = ld_u16x2(b + offsetof(B, qh));
    const uint32_t q = ld_u16x2(b + offsetof(B, qs) + 4 * t);
    const uint32_t hl = qh >> (4 * t), hh = qh >> (4 * t + 16);  // 5th bits of this unit's elements
    const float4 xl = ldx4(x + 4 * t), xh = ldx4(x + 16 + 4 * t);
    float wl[4], wh[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      wl[k] = float(((q >> (8 * k)) & 0xF) | ((hl >> k) & 1) << 4);
      wh[k] = float(((q >> (8 * k + 4)) & 0xF) | ((hh >> k) & 1) << 4);
    }
    const float s = dot4(xl, wl[0], wl[1], wl[2], wl[3]) + dot4(xh, wh[0], wh[1], wh[2], wh[3]);
    return d * (s - 16.f * (sum4(xl) + sum4(xh)));
  }
};

// 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block (ggml get_scale_min_k4),
// read byte-wise from global memory: j depends on the lane, and indexing a register array with it
// would spill to local memory. The 4 lanes that share a sub-block pair read the same bytes (L1
// broadcast).
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

// Q4_K: 256 elements in 8 sub-blocks of 32; x = d * sc_j * q - dmin * m_j. qs[32c..32c+31] hold
// elements 64c..64c+31 (low nibbles, sub-block 2c) and 64c+32..64c+63 (high, sub-block 2c+1).
// 16 units of 16 elements: unit t = (c = t/4, r = t%4) takes qs bytes 32c+8r..+7, so lanes
// t..t+3 read one contiguous 32-byte run of qs and two 128-byte lines of x.
template <> struct Q<Type::Q4_K> {
  using B = gguf::block_q4_K;
  static constexpr int kElems = gguf::QK_K, kUnits = 16;
  static_assert(sizeof(B) % 8 == 0 && offsetof(B, qs) % 8 == 0, "8-byte loads of qs need aligned blocks");
  __device__ static float dot(const uint8_t* b, int t, const float* xb) {
    const int c = t >> 2, r = t & 3;
    const uint32_t dd = __ldg(reinterpret_cast<const uint32_t*>(b + offsetof(B, d)));  // d, dmin adjacent
    const float d = half_bits_to_float(uint16_t(dd)), dmin = half_bits_to_float(uint16_t(dd >> 16));
    float sc1, m1, sc2, m2;
    scale_min_k4(2 * c, b + offsetof(B, scales), sc1, m1);
    scale_min_k4(2 * c + 1, b + offsetof(B, scales), sc2, m2);
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(b + offsetof(B, qs) + 32 * c + 8 * r));
    const float* x = xb + 64 * c + 8 * r;
    const float4 xl0 = ldx4(x), xl1 = ldx4(x + 4), xh0 = ldx4(x + 32), xh1 = ldx4(x + 36);
    const float s1 = dot4(xl0, lo4(q.x, 0), lo4(q.x, 1), lo4(q.x, 2), lo4(q.x, 3)) +
                     dot4(xl1, lo4(q.y, 0), lo4(q.y, 1), lo4(q.y, 2), lo4(q.y, 3));
    const float s2 = dot4(xh0, hi4(q.x, 0), hi4(q.x, 1), hi4(q.x, 2), hi4(q.x, 3)) +
                     dot4(xh1, hi4(q.y, 0), hi4(q.y, 1), hi4(q.y, 2), hi4(q.y, 3));
    const float sx1 = sum4(xl0) + sum4(xl1), sx2 = sum4(xh0) + sum4(xh1);
    return d * (sc1 * s1 + sc2 * s2) - dmin * (m1 * sx1 + m2 * sx2);
  }
};

// Q6_K: 256 elements, x = d * scale * (q - 32) with q 6-bit (4 low bits in ql, 2 high in qh) and
// one int8 scale per 16 elements. In half n (0..1), for l in 0..31, bytes ql[64n+l], ql[64n+32+l]
// and qh[32n+l] give elements 128n + l, +32, +64, +96 (scales 8n + l/16 + 0, 2, 4, 6).
// 16 units: unit t = (n = t/8, l = 4*(t%8) .. +3), so 8 lanes read 32 contiguous bytes of each
// array and one 128-byte line of x per group.
template <> struct Q<Type::Q6_K> {
  using B = gguf::block_q6_K;
  static constexpr int kElems = gguf::QK_K, kUnits = 16;
  __device__ static float dot(const uint8_t* b, int t, const float* xb) {
    const int n = t >> 3, l = 4 * (t & 7);
    const uint32_t a = ld_u16x2(b + offsetof(B, ql) + 64 * n + l);
    const uint32_t c = ld_u16x2(b + offsetof(B, ql) + 64 * n + 32 + l);
    const uint32_t hb = ld_u16x2(b + offsetof(B, qh) + 32 * n + l);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + offsetof(B, scales)) + 8 * n + l / 16;
    const float d = half_bits_to_float(ld_u16(b + offsetof(B, d)));
    const float* x = xb + 128 * n + l;
    float w[4][4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t hk = (hb >> (8 * k)) & 0xFF;
      w[0][k] = float(int(((a >> (8 * k)) & 0xF) | ((hk & 3) << 4)) - 32);
      w[1][k] = float(int(((c >> (8 * k)) & 0xF) | (((hk >> 2) & 3) << 4)) - 32);
      w[2][k] = float(int(((a >> (8 * k + 4)) & 0xF) | (((hk >> 4) & 3) << 4)) - 32);
      w[3][k] = float(int(((c >> (8 * k + 4)) & 0xF) | (((hk >> 6) & 3) << 4)) - 32);
    }
    float s = 0.f;
#pragma unroll
    for (int g = 0; g < 4; ++g)
      s += float(__ldg(sc + 2 * g)) * dot4(ldx4(x + 32 * g), w[g][0], w[g][1], w[g][2], w[g][3]);
    return d * s;
  }
};

// A block of 128 threads handles 4 / kWarpsPerRow rows, kWarpsPerRow warps per row. Long rows get 4
// warps so a 1536 x 8960 matrix runs ~1500 threads per SM: enough loads in flight to cover DRAM
// latency (a warp per row left the SMs mostly idle waiting on memory). Tried and dropped: two rows
// per thread sharing the x loads (halves x traffic through L1) ran 13% slower on 1536 x 8960 Q4_K,
// with half as many threads in flight (docs/CUDA.md).
constexpr int kBlockThreads = 128;

template <Type T, int kWarpsPerRow>
__global__ void __launch_bounds__(kBlockThreads)
    qmatvec_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int rows, int blocks_per_row,
                   const float* __restrict__ x, float* __restrict__ y) {
  using QT = Q<T>;
  constexpr int kRowsPerBlock = kBlockThreads / 32 / kWarpsPerRow;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * kRowsPerBlock + warp / kWarpsPerRow;
  const int part = (warp % kWarpsPerRow) * 32 + lane;  // this thread's index within its row's threads
  float acc = 0.f;
  if (row < rows) {  // no early return: the block-wide barrier below needs every thread
    const uint8_t* wr = w + static_cast<size_t>(row) * row_bytes;
    const int units = blocks_per_row * QT::kUnits;
#pragma unroll 4
    for (int u = part; u < units; u += 32 * kWarpsPerRow) {
      const int blk = u / QT::kUnits, sub = u % QT::kUnits;  // kUnits is a power of 2: shifts
      acc += QT::dot(wr + static_cast<size_t>(blk) * sizeof(typename QT::B), sub,
                     x + static_cast<size_t>(blk) * QT::kElems);
    }
  }
  acc = detail::warp_sum(acc);
  if constexpr (kWarpsPerRow == 1) {
    if (row < rows && lane == 0) y[row] = acc;
  } else {
    __shared__ float partial[kBlockThreads / 32];
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (row < rows && lane == 0 && warp % kWarpsPerRow == 0) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < kWarpsPerRow; ++i) s += partial[warp + i];
      y[row] = s;
    }
  }
}

template <Type T, int kWarpsPerRow>
void launch_wpr(const DeviceQMatrix& m, const float* x, float* y, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kBlockThreads / 32 / kWarpsPerRow;
  const unsigned grid = static_cast<unsigned>((m.rows + kRowsPerBlock - 1) / kRowsPerBlock);
  qmatvec_kernel<T, kWarpsPerRow><<<grid, kBlockThreads, 0, stream>>>(
      static_cast<const uint8_t*>(m.data), gguf::row_bytes(T, m.cols), static_cast<int>(m.rows),
      static_cast<int>(m.cols / Q<T>::kElems), x, y);
  TW_CUDA_CHECK_LAUNCH();
}

template <Type T>
void launch(const DeviceQMatrix& m, const float* x, float* y, cudaStream_t stream) {
  const int64_t units = m.cols / Q<T>::kElems * Q<T>::kUnits;  // threads with work per row
  if (units >= 256) return launch_wpr<T, 4>(m, x, y, stream);
  if (units >= 64) return launch_wpr<T, 2>(m, x, y, stream);
  launch_wpr<T, 1>(m, x, y, stream);
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
  TW_CHECK(m.rows <= INT_MAX && m.cols / tr.block_elems <= INT_MAX / 16, "qmatvec_cuda: shape ", m.rows, " x ",
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
