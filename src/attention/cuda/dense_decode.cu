#include "attention/cuda/dense_decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/error.h"
#include "ops/cuda/cuda_check.h"

namespace tw::attn::cuda {

namespace {

constexpr int kWarps = 4;  // warps per block; each takes every kWarps-th page of the block's split

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

// Tokens of the sequence the kernels attend to, and its page count.
__device__ __forceinline__ int seq_tokens(const int32_t* seq_len, int b, int max_pages) {
  return max(0, min(seq_len[b], max_pages * kPageSize));
}

// Fragment layouts (PTX mma.m16n8k16; lane = 4 * gi + ti):
//   scores S[head][token] = Q[head][:] . K[token][:]: A = Q (rows = query heads of the group, padded
//   to 16 with zeros), B = K^T (n = 16 tokens of a page as two n8 tiles), k = head dim. The head dim
//   is summed over, so its order is free: lane (gi, ti) loads 16-byte chunks 4i+ti of token rows gi
//   and gi+8 and uses each chunk for two k-steps; q's fragments follow the same permutation.
//   out O[head][dim] += P[head][token] V[token][dim]: A = P straight from the score accumulators
//   (the FlashAttention-2 layout), B = V with k = tokens {2ti, 2ti+1, 2ti+8, 2ti+9} and n = dims; lane
//   (gi, ti) loads chunks gi (+8) of those four rows and pairs the two tokens of a dim with a byte
//   permute. Output dim of accumulator (nt, j): 8 * (2ti + j + 8 * (nt / 8)) + nt % 8.
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) dense_decode_kernel(
    const T* __restrict__ kpool, const T* __restrict__ vpool, const int32_t* __restrict__ page_table,
    const int32_t* __restrict__ seq_len, int max_pages, int n_heads, int group, int pages_per_split,
    const float* __restrict__ q, float* __restrict__ out, float* __restrict__ part_o, float2* __restrict__ part_ml) {
  constexpr int KS = D / 16;  // k-steps of the score mma
  constexpr int NT = D / 8;   // n-tiles of the P.V mma
  constexpr int KC = D / 32;  // 16-byte K chunks per lane per token row
  constexpr int VC = D / 64;  // 16-byte V chunks per lane per token row
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int n_splits = gridDim.x, hkv = gridDim.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, ti = lane & 3;

  const int n = seq_tokens(seq_len, b, max_pages);
  const int np = (n + kPageSize - 1) / kPageSize;
  const int p0 = split * pages_per_split;
  const int p1 = split == n_splits - 1 ? np : min(np, p0 + pages_per_split);
  if (n_splits > 1 && p0 >= np) return;  // the combine kernel skips splits past the sequence

  // q of head gi of the group, scaled by log2(e)/sqrt(d) (softmax in base 2), as hi + lo in T.
  uint32_t qh[KS][2], ql[KS][2];
  {
    const float sc = 1.44269504088896341f / sqrtf((float)D);
    const float* qg = q + ((int64_t)b * n_heads + (int64_t)h * group + gi) * D;
#pragma unroll
    for (int j = 0; j < KS; ++j) {
      const int base = 8 * (4 * (j / 2) + ti) + 4 * (j % 2);
      float4 v = gi < group ? *reinterpret_cast<const float4*>(qg + base) : make_float4(0.f, 0.f, 0.f, 0.f);
      v.x *= sc, v.y *= sc, v.z *= sc, v.w *= sc;
      qh[j][0] = pack2<T>(v.x, v.y);
      qh[j][1] = pack2<T>(v.z, v.w);
      const float2 h0 = unpack2<T>(qh[j][0]), h1 = unpack2<T>(qh[j][1]);
      ql[j][0] = pack2<T>(v.x - h0.x, v.y - h0.y);
      ql[j][1] = pack2<T>(v.z - h1.x, v.w - h1.y);
    }
  }

  float m = -INFINITY, l = 0.f;  // running max (base 2) and sum of this lane's query head gi
  float o[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = 0.f;

  const int32_t* pt = page_table + (int64_t)b * max_pages;
  for (int p = p0 + warp; p < p1; p += kWarps) {
    const int64_t head = ((int64_t)pt[p] * hkv + h) * kPageSize * D;
    const T* kp = kpool + head;
    const T* vp = vpool + head;
    uint4 kr[2][KC], vr[4][VC];
#pragma unroll
    for (int i = 0; i < KC; ++i) {
      kr[0][i] = ldg_stream(kp + gi * D + (4 * i + ti) * 8);
      kr[1][i] = ldg_stream(kp + (gi + 8) * D + (4 * i + ti) * 8);
    }
#pragma unroll
    for (int c = 0; c < VC; ++c) {
      vr[0][c] = ldg_stream(vp + (2 * ti) * D + (gi + 8 * c) * 8);
      vr[1][c] = ldg_stream(vp + (2 * ti + 1) * D + (gi + 8 * c) * 8);
      vr[2][c] = ldg_stream(vp + (2 * ti + 8) * D + (gi + 8 * c) * 8);
      vr[3][c] = ldg_stream(vp + (2 * ti + 9) * D + (gi + 8 * c) * 8);
    }

    float s0[2] = {0.f, 0.f}, s1[2] = {0.f, 0.f};  // tokens 2ti, 2ti+1 and 2ti+8, 2ti+9
#pragma unroll
    for (int j = 0; j < KS; ++j) {
      const int i = j / 2, w = 2 * (j % 2);
      mma_rows8<T>(s0[0], s0[1], qh[j][0], qh[j][1], word(kr[0][i], w), word(kr[0][i], w + 1));
      mma_rows8<T>(s0[0], s0[1], ql[j][0], ql[j][1], word(kr[0][i], w), word(kr[0][i], w + 1));
      mma_rows8<T>(s1[0], s1[1], qh[j][0], qh[j][1], word(kr[1][i], w), word(kr[1][i], w + 1));
      mma_rows8<T>(s1[0], s1[1], ql[j][0], ql[j][1], word(kr[1][i], w), word(kr[1][i], w + 1));
    }
    float sv[4] = {s0[0], s0[1], s1[0], s1[1]};
    const int valid = n - p * kPageSize;
    if (valid < kPageSize) {  // partial last page: slots past the sequence hold anything (even NaN)
      const int tok[4] = {2 * ti, 2 * ti + 1, 2 * ti + 8, 2 * ti + 9};
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (tok[e] >= valid) {
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
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);

  // Merge the warps of the block (log-sum-exp), then write the output or the split's partial.
  __shared__ float s_m[kWarps][kMaxGroup], s_l[kWarps][kMaxGroup];
  __shared__ float s_o[kWarps][kMaxGroup][D];
  if (ti == 0) {
    s_m[warp][gi] = m;
    s_l[warp][gi] = l;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int dim = 8 * (2 * ti + 8 * (nt / 8)) + nt % 8;
    s_o[warp][gi][dim] = o[nt][0];
    s_o[warp][gi][dim + 8] = o[nt][1];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * D; idx += kWarps * 32) {
    const int g = idx / D, dim = idx % D;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, s_m[w][g]);
    float L = 0.f, O = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = mm == -INFINITY ? 0.f : exp2f(s_m[w][g] - mm);
      L += s_l[w][g] * f;
      O += s_o[w][g][dim] * f;
    }
    const int64_t row = (int64_t)b * n_heads + (int64_t)h * group + g;
    if (n_splits == 1) {
      out[row * D + dim] = L > 0.f ? O / L : 0.f;
    } else {
      const int64_t r = row * n_splits + split;
      part_o[r * D + dim] = O;
      if (dim == 0) part_ml[r] = make_float2(mm, L);
    }
  }
}

// Merges the splits of one (sequence, query head): one thread per dim.
template <int D>
__global__ void __launch_bounds__(D) dense_combine_kernel(const float* __restrict__ part_o,
                                                          const float2* __restrict__ part_ml,
                                                          const int32_t* __restrict__ seq_len, int max_pages,
                                                          int n_splits, int pages_per_split, float* __restrict__ out) {
  const int hq = blockIdx.x, b = blockIdx.y, dim = threadIdx.x, n_heads = gridDim.x;
  const int np = (seq_tokens(seq_len, b, max_pages) + kPageSize - 1) / kPageSize;
  const int ns = min(n_splits, (np + pages_per_split - 1) / pages_per_split);  // splits that ran
  const int64_t row = (int64_t)b * n_heads + hq;
  float mm = -INFINITY;
  for (int s = 0; s < ns; ++s) mm = fmaxf(mm, part_ml[row * n_splits + s].x);
  float L = 0.f, O = 0.f;
  for (int s = 0; s < ns; ++s) {
    const float2 ml = part_ml[row * n_splits + s];
    const float f = mm == -INFINITY ? 0.f : exp2f(ml.x - mm);
    L += ml.y * f;
    O += part_o[(row * n_splits + s) * D + dim] * f;
  }
  out[row * D + dim] = L > 0.f ? O / L : 0.f;
}

// How many blocks of the kernel fit on one SM (registers bound it: ~190 per lane at d = 128).
template <typename T, int D>
int blocks_per_sm() {
  static const int n = [] {
    int k = 0;
    TW_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&k, dense_decode_kernel<T, D>, kWarps * 32, 0));
    return std::max(k, 1);
  }();
  return n;
}

int blocks_per_sm(const PagedKV& kv) {
  const bool bf = kv.dtype == KvDtype::BF16;
  if (kv.head_dim == 64) return bf ? blocks_per_sm<__nv_bfloat16, 64>() : blocks_per_sm<__half, 64>();
  return bf ? blocks_per_sm<__nv_bfloat16, 128>() : blocks_per_sm<__half, 128>();
}

template <typename T, int D>
void launch(const PagedKV& kv, const DenseDecodePlan& plan, const float* q, float* out, void* ws,
            cudaStream_t stream) {
  float* part_o = static_cast<float*>(ws);
  float2* part_ml = plan.n_splits > 1
                        ? reinterpret_cast<float2*>(part_o + (size_t)kv.batch * kv.n_heads * plan.n_splits * D)
                        : nullptr;
  const int group = kv.n_heads / kv.n_kv_heads;
  dense_decode_kernel<T, D><<<dim3(plan.n_splits, kv.n_kv_heads, kv.batch), kWarps * 32, 0, stream>>>(
      static_cast<const T*>(kv.k), static_cast<const T*>(kv.v), kv.page_table, kv.seq_len, kv.max_pages,
      kv.n_heads, group, plan.pages_per_split, q, out, part_o, part_ml);
  TW_CUDA_CHECK_LAUNCH();
  if (plan.n_splits > 1) {
    dense_combine_kernel<D><<<dim3(kv.n_heads, kv.batch), D, 0, stream>>>(
        part_o, part_ml, kv.seq_len, kv.max_pages, plan.n_splits, plan.pages_per_split, out);
    TW_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

DenseDecodePlan plan_dense_decode(const PagedKV& kv, int64_t max_seq_len, int sm_count) {
  check_config(kv);
  TW_CHECK(max_seq_len > 0, "dense decode plan: max_seq_len must be positive, got ", max_seq_len);
  TW_CHECK(sm_count > 0, "dense decode plan: sm_count must be positive, got ", sm_count);
  const int64_t np = std::min<int64_t>((max_seq_len + kPageSize - 1) / kPageSize, kv.max_pages);
  const int64_t blocks = (int64_t)kv.batch * kv.n_kv_heads;
  const int64_t slots = (int64_t)sm_count * blocks_per_sm(kv);  // blocks resident at once
  // Time model: waves of resident blocks x (pages per block + a block's fixed cost, ~16 pages: first
  // loads, q setup, merge); the fewest splits within 1% of the best (the bench prints other split
  // counts beside the planned one). At least 2 pages per warp.
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(np / (2 * kWarps), 4096));
  DenseDecodePlan p{1, (int)np, (int)(slots / sm_count)};
  double best = INFINITY;
  for (int64_t s = 1; s <= most; ++s) {
    const int64_t pps = (np + s - 1) / s, real = (np + pps - 1) / pps;
    if (real != s) continue;  // same split as a smaller s
    const int64_t waves = (blocks * real + slots - 1) / slots;
    const double cost = (double)waves * (double)(pps + 16);
    if (cost < 0.99 * best) {
      best = cost;
      p.n_splits = (int)real;
      p.pages_per_split = (int)pps;
    }
  }
  return p;
}

size_t dense_decode_workspace_bytes(const PagedKV& kv, const DenseDecodePlan& plan) {
  if (plan.n_splits <= 1) return 0;
  const size_t rows = (size_t)kv.batch * kv.n_heads * plan.n_splits;
  return rows * kv.head_dim * sizeof(float) + rows * sizeof(float2);
}

void dense_decode(const PagedKV& kv, const DenseDecodePlan& plan, const float* q, float* out, void* workspace,
                  size_t workspace_bytes, cudaStream_t stream) {
  check_config(kv);
  TW_CHECK(plan.n_splits >= 1 && plan.n_splits <= 65535 && plan.pages_per_split >= 1,
           "dense decode: bad plan (", plan.n_splits, " splits of ", plan.pages_per_split, " pages)");
  TW_CHECK(q != nullptr && out != nullptr, "dense decode: null q or out");
  TW_CHECK(reinterpret_cast<uintptr_t>(q) % 16 == 0, "dense decode: q must be 16-byte aligned");
  const size_t need = dense_decode_workspace_bytes(kv, plan);
  TW_CHECK(workspace_bytes >= need && (need == 0 || workspace != nullptr), "dense decode: workspace of ",
           workspace_bytes, " bytes, the plan needs ", need);
  TW_CHECK(reinterpret_cast<uintptr_t>(workspace) % 16 == 0, "dense decode: workspace must be 16-byte aligned");
  const bool bf = kv.dtype == KvDtype::BF16;
  if (kv.head_dim == 64)
    bf ? launch<__nv_bfloat16, 64>(kv, plan, q, out, workspace, stream)
       : launch<__half, 64>(kv, plan, q, out, workspace, stream);
  else
    bf ? launch<__nv_bfloat16, 128>(kv, plan, q, out, workspace, stream)
       : launch<__half, 128>(kv, plan, q, out, workspace, stream);
}

}  // namespace tw::attn::cuda
