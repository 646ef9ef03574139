// One warp's online-softmax decode step over a tile of 16 K / V rows on the tensor cores, shared by the
// dense decode (a tile = one page) and the varlen sparse decode (a tile = 16 listed tokens, each row
// gathered on its own). Same arithmetic in both, so "sparse with every token listed == dense" holds
// to the rounding of the order of tiles only.
//
// Fragment layouts (PTX mma.m16n8k16; the 16 A rows are tokens, never padding; lane = 4 * gi + ti):
//   scores, transposed: S^T[token][head] = K[token][:] . Q[head][:]: A = K (the 16 tokens of the tile
//   as rows), B = Q^T (n = the query heads of the group, padded to 8 with zeros), k = head dim. The
//   head dim is summed over, so its order is free: lane (gi, ti) loads 16-byte chunks 4i+ti of token
//   rows gi and gi+8 and uses each chunk for two k-steps; q's fragments follow the same permutation.
//   Lane (gi, ti) gets tokens gi, gi+8 x heads 2ti, 2ti+1.
//   P^T (rounded to T) goes from that accumulator layout to the B layout of the next product by two
//   8x8 transposes in registers (movmatrix): lane (gi, ti) then holds P[head gi][tokens 2ti, 2ti+1,
//   2ti+8, 2ti+9].
//   out, transposed: O^T[dim][head] += V^T[dim][token] P^T[token][head]: A = V^T, m-tile mt = (c, w)
//   (c < D/64, w < 4) has rows gi -> dim 8 (gi + 8c) + 2w and gi+8 -> that dim + 1, so lane (gi, ti)
//   reads them from its 16-byte chunks gi + 8c of token rows {2ti, 2ti+1, 2ti+8, 2ti+9} (a byte
//   permute pairs the two tokens of a dim). Lane (gi, ti) accumulates heads 2ti, 2ti+1 x dims
//   8 (gi + 8c) + 2w + {0, 1}.
// An earlier layout put the query heads in the A rows (16 rows, at most 8 used): half of every
// product was padding, and each product re-zeroed its two unused accumulators (~100 of ~525
// instructions per tile).
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

// D += A B, m16n8k16, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The warp's 8x8 matrix of 16-bit pairs (lane: row lane / 4, columns 2 (lane % 4) + {0, 1}) transposed.
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
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
  static constexpr int MT = D / 16;  // m-tiles (16 dims each) of the P.V mma
  static constexpr int KC = D / 32;  // 16-byte K chunks per lane per token row
  static constexpr int VC = D / 64;  // 16-byte V chunks per lane per token row
  // The query of head gi, scaled, as hi + lo parts in T, in warp-private shared memory: [k-step][lane]
  // {hi0, hi1, lo0, lo1}. In registers it took 32 of them; both kernels then sat at 255 and spilled
  // the tiles they had in flight.
  static constexpr int kQSmem = KS * 32;  // uint4 per warp
  uint4* qs;
  float m[2] = {-INFINITY, -INFINITY};  // heads 2ti, 2ti+1: running max (base 2)
  float l[2] = {0.f, 0.f};              // and this lane's share of the sum
  float o[MT][4];                       // m-tile mt = 4c + w: {head 2ti, 2ti+1} x {dim d, d + 1}, d = 8 (gi + 8c) + 2w

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
    for (int mt = 0; mt < MT; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;
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

  // One tile's scores, softmax update and P.V. live_k[e]: whether tokens gi, gi+8 (this lane's score
  // rows) count; live_v[e]: whether tokens {2ti, 2ti+1, 2ti+8, 2ti+9} (its V rows) count (a dead
  // token's score is -inf and its V is zeroed: 0 * NaN would poison the product); all_live
  // (warp-uniform): every token of the tile counts, the masking is skipped.
  __device__ __forceinline__ void compute(Regs& r, const bool (&live_k)[2], const bool (&live_v)[4], bool all_live) {
    auto& kr = r.kr;
    auto& vr = r.vr;
    float s[4] = {0.f, 0.f, 0.f, 0.f};  // (token gi, head 2ti), (gi, 2ti+1), (gi+8, 2ti), (gi+8, 2ti+1)
    float s_lo[4] = {0.f, 0.f, 0.f, 0.f};  // the lo parts' chain: two chains of KS dependent MMAs, not one of 2 KS
#pragma unroll
    for (int j = 0; j < KS; ++j) {
      const int i = j / 2, w = 2 * (j % 2);
      const uint4 qv = qs[j * 32 + (threadIdx.x & 31)];  // {hi0, hi1, lo0, lo1}
      const uint32_t a0 = word(kr[0][i], w), a1 = word(kr[1][i], w), a2 = word(kr[0][i], w + 1),
                     a3 = word(kr[1][i], w + 1);
      mma16816<T>(s, a0, a1, a2, a3, qv.x, qv.y);
      mma16816<T>(s_lo, a0, a1, a2, a3, qv.z, qv.w);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) s[e] += s_lo[e];
    if (!all_live) {
      if (!live_k[0]) s[0] = s[1] = -INFINITY;
      if (!live_k[1]) s[2] = s[3] = -INFINITY;
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (!live_v[e])
#pragma unroll
          for (int c = 0; c < VC; ++c) vr[e][c] = make_uint4(0, 0, 0, 0);
    }
    // Per head: the max over the tile's 16 tokens (lanes of equal ti), the running state, the weights.
    float alpha[2];
    uint32_t pk[2];  // P^T rows gi, gi+8 as T pairs (heads 2ti, 2ti+1)
    float p[4];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = fmaxf(s[hh], s[2 + hh]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      const float m_new = fmaxf(m[hh], mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;
      alpha[hh] = exp2f(m[hh] - base);
      m[hh] = m_new;
      p[hh] = exp2f(s[hh] - base);
      p[2 + hh] = exp2f(s[2 + hh] - base);
    }
    pk[0] = pack2<T>(p[0], p[1]);
    pk[1] = pack2<T>(p[2], p[3]);
    // The normaliser sums the rounded weights P.V uses, so the output stays a convex combination.
    const float2 r0 = unpack2<T>(pk[0]), r1 = unpack2<T>(pk[1]);
    l[0] = l[0] * alpha[0] + (r0.x + r1.x);
    l[1] = l[1] * alpha[1] + (r0.y + r1.y);
    const uint32_t b0 = transpose8x8(pk[0]), b1 = transpose8x8(pk[1]);  // P[head gi][tokens 2ti.., 2ti+8..]
#pragma unroll
    for (int c = 0; c < VC; ++c)
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int mt = 4 * c + w;
        // dim d (low halves) and d + 1 (high halves) of tokens 2ti, 2ti+1 and of 2ti+8, 2ti+9
        const uint32_t a0 = __byte_perm(word(vr[0][c], w), word(vr[1][c], w), 0x5410u);
        const uint32_t a1 = __byte_perm(word(vr[0][c], w), word(vr[1][c], w), 0x7632u);
        const uint32_t a2 = __byte_perm(word(vr[2][c], w), word(vr[3][c], w), 0x5410u);
        const uint32_t a3 = __byte_perm(word(vr[2][c], w), word(vr[3][c], w), 0x7632u);
        o[mt][0] *= alpha[0], o[mt][2] *= alpha[0];
        o[mt][1] *= alpha[1], o[mt][3] *= alpha[1];
        mma16816<T>(o[mt], a0, a1, a2, a3, b0, b1);
      }
  }

  // After the last tile: each head's sum over the eight lanes that share it.
  __device__ __forceinline__ void finish() {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 4);
      l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 8);
      l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 16);
    }
  }
};

// Block-level merge of W warps' states (log-sum-exp, base 2) for `group` heads, then
// write(g, dim, O, mm, L) once per (head g, dim): O / L is the output, mm the max (log2 units).
// Shared memory: W * kMaxGroup * (D + 2) floats, passed in (the caller owns the block's smem).
template <int W, typename T, int D, typename Write>
__device__ __forceinline__ void block_merge(const Acc<T, D>& a, int group, float* smem, Write write) {
  static_assert(kMaxGroup == 8, "a lane holds heads 2ti, 2ti+1 of the 8 columns");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, ti = lane & 3;
  float* s_m = smem;                       // [W][kMaxGroup]
  float* s_l = s_m + W * kMaxGroup;        // [W][kMaxGroup]
  float* s_o = s_l + W * kMaxGroup;        // [W][kMaxGroup][D]
  if (gi == 0) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      s_m[warp * kMaxGroup + 2 * ti + hh] = a.m[hh];
      s_l[warp * kMaxGroup + 2 * ti + hh] = a.l[hh];
    }
  }
#pragma unroll
  for (int c = 0; c < Acc<T, D>::VC; ++c)
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int mt = 4 * c + w, dim = 8 * (gi + 8 * c) + 2 * w;
      float* o0 = s_o + (warp * kMaxGroup + 2 * ti) * D + dim;  // head 2ti; head 2ti+1 is D further
      o0[0] = a.o[mt][0], o0[1] = a.o[mt][2];
      o0[D] = a.o[mt][1], o0[D + 1] = a.o[mt][3];
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

// One dim of the merge of n partial states of one query head (split-KV parts of the dense decode, work
// items of the sparse one), for few parts: this thread's loop over them. ml_of(i) -> float2 {m (log2
// units), l}, o_at(i) -> the part's o at this thread's dim. Returns O / L (0 when nothing counted).
template <class MlFn, class OFn>
__device__ __forceinline__ float merge_few(int n, MlFn ml_of, OFn o_at) {
  float mm = -INFINITY, O = 0.f, L = 0.f;
  for (int i = 0; i < n; ++i) mm = fmaxf(mm, ml_of(i).x);
  if (mm != -INFINITY)
    for (int i = 0; i < n; ++i) {
      const float2 v = ml_of(i);
      const float f = exp2f(v.x - mm);
      L += v.y * f;
      O += o_at(i) * f;
    }
  return L > 0.f ? O / L : 0.f;
}

// Merges n partial states of one query head (split-KV parts of the dense decode, work items of the
// sparse one) into out[0..D), for many parts: ml_of(i) -> float2 {m (log2 units), l}, o_of(i) -> the part's o[D]
// (8-byte aligned). Called by every thread of a block of `Threads`; for many parts (batch 1 splits a
// sequence up to 128 ways): each part's weight once (one thread per part) into shared memory, then warp
// w adds the o of parts w, w + W, ... over all dims (a lane's D/32 consecutive dims, eight parts' loads
// in flight) and the warps' sums are added. One thread per dim looping over the parts took a dependent
// round of loads per part (H200, 128 splits: 16 rounds).
template <int D, int Threads, class MlFn, class OFn>
__device__ __forceinline__ void merge_parts(int n, MlFn ml_of, OFn o_of, float* out) {
  static_assert(D == 64 || D == 128, "a lane's dims are one or two float2");
  constexpr int W = Threads / 32, V = D / 32, kChunk = 1024;  // parts whose weights are held at once
  __shared__ float s_f[kChunk];
  __shared__ float s_red[W];
  __shared__ float s_o[W][D];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float mm = -INFINITY;
  for (int i = tid; i < n; i += Threads) mm = fmaxf(mm, ml_of(i).x);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
  if (lane == 0) s_red[warp] = mm;
  __syncthreads();
  mm = s_red[0];
#pragma unroll
  for (int w = 1; w < W; ++w) mm = fmaxf(mm, s_red[w]);

  float acc[V] = {}, ls = 0.f;
  for (int c = 0; c < n; c += kChunk) {
    const int cnt = min(kChunk, n - c);
    __syncthreads();  // the previous chunk's readers of s_f (and of s_red, the first time) are done
    for (int k = tid; k < cnt; k += Threads) {
      const float2 v = ml_of(c + k);
      const float f = mm == -INFINITY ? 0.f : exp2f(v.x - mm);
      s_f[k] = f;
      ls += v.y * f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = warp; k < cnt; k += W) {
      const float* p = o_of(c + k) + lane * V;
      const float f = s_f[k];
#pragma unroll
      for (int v = 0; v < V; v += 2) {
        const float2 x = *reinterpret_cast<const float2*>(p + v);
        acc[v] += x.x * f;
        acc[v + 1] += x.y * f;
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ls += __shfl_xor_sync(0xffffffffu, ls, o);
#pragma unroll
  for (int v = 0; v < V; ++v) s_o[warp][lane * V + v] = acc[v];
  __syncthreads();  // every reader of s_f and s_red is done
  if (lane == 0) s_red[warp] = ls;
  __syncthreads();
  if (tid < D) {
    float O = 0.f, L = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) O += s_o[w][tid], L += s_red[w];
    out[tid] = L > 0.f ? O / L : 0.f;
  }
}

}  // namespace tw::attn::cuda::tile
