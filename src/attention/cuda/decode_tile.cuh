// One warp's online-softmax decode step over a tile of 16 K / V rows on the tensor cores, shared by the
// dense decode (a tile = one page) and the varlen sparse decode (a tile = 16 listed tokens, each row
// gathered on its own). Same arithmetic in both, so "sparse with every token listed == dense" holds
// to the rounding of the order of tiles only.
//
// Fragment layouts (PTX mma.m16n8k16; lane = 4 * gi + ti):
//   scores S[head][token] = Q[head][:] . K[token][:]: A = Q (rows = query heads of the group, padded
//   to 16 with zeros), B = K^T (n = the 16 tokens of the tile as two n8 tiles), k = head dim. The head
//   dim is summed over, so its order is free: lane (gi, ti) loads 16-byte chunks 4i+ti of token rows gi
//   and gi+8 and uses each chunk for two k-steps; q's fragments follow the same permutation.
//   out O[head][dim] += P[head][token] V[token][dim]: A = P straight from the score accumulators
//   (the FlashAttention-2 layout), B = V with k = tokens {2ti, 2ti+1, 2ti+8, 2ti+9} and n = dims; lane
//   (gi, ti) loads chunks gi (+8) of those four rows and pairs the two tokens of a dim with a byte
//   permute. Output dim of accumulator (nt, j): 8 * (2ti + j + 8 * (nt / 8)) + nt % 8.
// Softmax in base 2: q carries log2(e)/sqrt(d), so m is in log2 units (merge with exp2f).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention/cuda/layout.h"

namespace tw::attn::cuda::tile {

// Two floats -> one register of two T (low half = a), round to nearest even.
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t r);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t r) {
  return __half22float2(*reinterpret_cast<const __half2*>(&r));
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t r) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&r));
}

// D += A B, m16n8k16, fp32 accumulators. A rows 8..15 are always zero here (query heads live in rows
// 0..7), so their two registers are passed as 0 and C rows 8..15 are dropped.
template <typename T>
__device__ __forceinline__ void mma_rows8(float& c0, float& c1, uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  float c2 = 0.f, c3 = 0.f;
  if constexpr (std::is_same_v<T, __half>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// 16-byte streaming load: K/V are read once per step, keep them out of L1.
__device__ __forceinline__ uint4 ldg_stream(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
  return r;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T, int D>
struct Acc {
  static constexpr int KS = D / 16;  // k-steps of the score mma
  static constexpr int NT = D / 8;   // n-tiles of the P.V mma
  static constexpr int KC = D / 32;  // 16-byte K chunks per lane per token row
  static constexpr int VC = D / 64;  // 16-byte V chunks per lane per token row
  // The query of head gi, scaled, as hi + lo parts in T, in warp-private shared memory: [k-step][lane]
  // {hi0, hi1, lo0, lo1}. In registers it took 32 of them; both kernels then sat at 255 and spilled
  // the tiles they had in flight.
  static constexpr int kQSmem = KS * 32;  // uint4 per warp
  uint4* qs;
  float m = -INFINITY, l = 0.f;      // running max (base 2) and this lane's share of the sum
  float o[NT][2];

  // qg: head gi's query row [D] (float, 16-byte aligned), or nullptr when gi >= the group size.
  // qs_warp: kQSmem uint4 of shared memory owned by this warp; each lane reads back only what it
  // wrote, so no barrier is needed.
  __device__ __forceinline__ void init(const float* qg, int ti, uint4* qs_warp) {
    const float sc = 1.44269504088896341f / sqrtf((float)D);
    qs = qs_warp;
#pragma unroll
    for (int j = 0; j < KS; ++j) {
      const int base = 8 * (4 * (j / 2) + ti) + 4 * (j % 2);
      float4 v = qg ? *reinterpret_cast<const float4*>(qg + base) : make_float4(0.f, 0.f, 0.f, 0.f);
      v.x *= sc, v.y *= sc, v.z *= sc, v.w *= sc;
      const uint32_t h0 = pack2<T>(v.x, v.y), h1 = pack2<T>(v.z, v.w);
      const float2 f0 = unpack2<T>(h0), f1 = unpack2<T>(h1);
      const uint32_t l0 = pack2<T>(v.x - f0.x, v.y - f0.y), l1 = pack2<T>(v.z - f1.x, v.w - f1.y);
      qs[j * 32 + (threadIdx.x & 31)] = make_uint4(h0, h1, l0, l1);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = 0.f;
  }

  // A tile's K / V fragments in registers (loaded one tile ahead of the math by the callers, so a
  // warp has two tiles of loads in flight).
  struct Regs {
    uint4 kr[2][KC], vr[4][VC];
  };

  // k0 / k1: rows of tile tokens gi and gi+8; v[e]: rows of tokens {2ti, 2ti+1, 2ti+8, 2ti+9}. Every row
  // must be readable memory (a dead token's row may hold anything, even NaN: compute masks it). Loads
  // are unconditional (a predicated load per chunk cost the dense kernel 25% of its bandwidth).
  __device__ __forceinline__ static void load(Regs& r, const T* k0, const T* k1, const T* const (&v)[4], int gi,
                                              int ti) {
#pragma unroll
    for (int i = 0; i < KC; ++i) {
      r.kr[0][i] = ldg_stream(k0 + (4 * i + ti) * 8);
      r.kr[1][i] = ldg_stream(k1 + (4 * i + ti) * 8);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int c = 0; c < VC; ++c) r.vr[e][c] = ldg_stream(v[e] + (gi + 8 * c) * 8);
  }

  // One tile's scores, softmax update and P.V. live[e]: whether tokens {2ti, 2ti+1, 2ti+8, 2ti+9}
  // count (a dead token's score is -inf and its V is zeroed); all_live (warp-uniform): every token of
  // the tile counts, the masking is skipped.
  __device__ __forceinline__ void compute(Regs& r, const bool (&live)[4], bool all_live) {
    auto& kr = r.kr;
    auto& vr = r.vr;
    float s0[2] = {0.f, 0.f}, s1[2] = {0.f, 0.f};  // tokens 2ti, 2ti+1 and 2ti+8, 2ti+9
#pragma unroll
    for (int j = 0; j < KS; ++j) {
      const int i = j / 2, w = 2 * (j % 2);
      const uint4 qv = qs[j * 32 + (threadIdx.x & 31)];  // {hi0, hi1, lo0, lo1}
      mma_rows8<T>(s0[0], s0[1], qv.x, qv.y, word(kr[0][i], w), word(kr[0][i], w + 1));
      mma_rows8<T>(s0[0], s0[1], qv.z, qv.w, word(kr[0][i], w), word(kr[0][i], w + 1));
      mma_rows8<T>(s1[0], s1[1], qv.x, qv.y, word(kr[1][i], w), word(kr[1][i], w + 1));
      mma_rows8<T>(s1[0], s1[1], qv.z, qv.w, word(kr[1][i], w), word(kr[1][i], w + 1));
    }
    float sv[4] = {s0[0], s0[1], s1[0], s1[1]};
    if (!all_live) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (!live[e]) {
          sv[e] = -INFINITY;
#pragma unroll
          for (int c = 0; c < VC; ++c) vr[e][c] = make_uint4(0, 0, 0, 0);
        }
    }
    float mx = fmaxf(fmaxf(sv[0], sv[1]), fmaxf(sv[2], sv[3]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx);
    const float base = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m - base);
    const uint32_t pa0 = pack2<T>(exp2f(sv[0] - base), exp2f(sv[1] - base));
    const uint32_t pa2 = pack2<T>(exp2f(sv[2] - base), exp2f(sv[3] - base));
    // The normaliser sums the rounded weights P.V uses, so the output stays a convex combination.
    const float2 r0 = unpack2<T>(pa0), r2 = unpack2<T>(pa2);
    l = l * alpha + ((r0.x + r0.y) + (r2.x + r2.y));
    m = m_new;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = nt / 8, w = (nt % 8) / 2;
      const uint32_t sel = (nt & 1) ? 0x7632u : 0x5410u;  // high or low halves of the two tokens
      const uint32_t b0 = __byte_perm(word(vr[0][c], w), word(vr[1][c], w), sel);
      const uint32_t b1 = __byte_perm(word(vr[2][c], w), word(vr[3][c], w), sel);
      o[nt][0] *= alpha;
      o[nt][1] *= alpha;
      mma_rows8<T>(o[nt][0], o[nt][1], pa0, pa2, b0, b1);
    }
  }

  // After the last tile: the row sum over the four lanes of a head.
  __device__ __forceinline__ void finish() {
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
  }
};

// Block-level merge of W warps' states (log-sum-exp, base 2) for `group` heads, then
// write(g, dim, O, mm, L) once per (head g, dim): O / L is the output, mm the max (log2 units).
// Shared memory: W * kMaxGroup * (D + 2) floats, passed in (the caller owns the block's smem).
template <int W, typename T, int D, typename Write>
__device__ __forceinline__ void block_merge(const Acc<T, D>& a, int group, float* smem, Write write) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, ti = lane & 3;
  float* s_m = smem;                       // [W][kMaxGroup]
  float* s_l = s_m + W * kMaxGroup;        // [W][kMaxGroup]
  float* s_o = s_l + W * kMaxGroup;        // [W][kMaxGroup][D]
  if (ti == 0) {
    s_m[warp * kMaxGroup + gi] = a.m;
    s_l[warp * kMaxGroup + gi] = a.l;
  }
#pragma unroll
  for (int nt = 0; nt < Acc<T, D>::NT; ++nt) {
    const int dim = 8 * (2 * ti + 8 * (nt / 8)) + nt % 8;
    s_o[(warp * kMaxGroup + gi) * D + dim] = a.o[nt][0];
    s_o[(warp * kMaxGroup + gi) * D + dim + 8] = a.o[nt][1];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * D; idx += W * 32) {
    const int g = idx / D, dim = idx % D;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < W; ++w) mm = fmaxf(mm, s_m[w * kMaxGroup + g]);
    float L = 0.f, O = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      const float f = mm == -INFINITY ? 0.f : exp2f(s_m[w * kMaxGroup + g] - mm);
      L += s_l[w * kMaxGroup + g] * f;
      O += s_o[(w * kMaxGroup + g) * D + dim] * f;
    }
    write(g, dim, O, mm, L);
  }
}

}  // namespace tw::attn::cuda::tile
