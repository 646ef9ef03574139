#include "attention/cuda/dense_decode.h"

#include "attention/cuda/decode_tile.cuh"
#include "attention/cuda/occupancy.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "ops/cuda/cuda_check.h"

namespace tw::attn::cuda {

namespace {

constexpr int kWarps = 4;  // warps per block; each takes every kWarps-th page of the block's split

using namespace tile;

// Tokens of the sequence the kernels attend to, and its page count.
__device__ __forceinline__ int seq_tokens(const int32_t* seq_len, int b, int max_pages) {
  return max(0, min(seq_len[b], max_pages * kPageSize));
}

// One warp per page (a 16-token tile of decode_tile.cuh), warps interleaved over the block's split.
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) dense_decode_kernel(
    const T* __restrict__ kpool, const T* __restrict__ vpool, const int32_t* __restrict__ page_table,
    const int32_t* __restrict__ seq_len, int max_pages, int n_heads, int group, int pages_per_split,
    const float* __restrict__ q, float* __restrict__ out, float* __restrict__ part_o, float2* __restrict__ part_ml) {
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int n_splits = gridDim.x, hkv = gridDim.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, ti = lane & 3;

  const int n = seq_tokens(seq_len, b, max_pages);
  const int np = (n + kPageSize - 1) / kPageSize;
  const int p0 = split * pages_per_split;
  const int p1 = split == n_splits - 1 ? np : min(np, p0 + pages_per_split);
  if (n_splits > 1 && p0 >= np) return;  // the combine kernel skips splits past the sequence

  using Tile = Acc<T, D>;
  __shared__ uint4 s_q[kWarps][Tile::kQSmem];
  Tile acc;
  acc.init(gi < group ? q + ((int64_t)b * n_heads + (int64_t)h * group + gi) * D : nullptr, ti, s_q[warp]);
  const int tok[4] = {2 * ti, 2 * ti + 1, 2 * ti + 8, 2 * ti + 9};
  const int32_t* pt = page_table + (int64_t)b * max_pages;
  using Regs = typename Tile::Regs;
  auto load = [&](Regs& r, int p) {
    const int64_t head = ((int64_t)pt[p] * hkv + h) * kPageSize * D;
    const T* kp = kpool + head;
    const T* vp = vpool + head;
    const T* vrow[4] = {vp + tok[0] * D, vp + tok[1] * D, vp + tok[2] * D, vp + tok[3] * D};
    Tile::load(r, kp + gi * D, kp + (gi + 8) * D, vrow, gi, ti);
  };
  auto compute = [&](Regs& r, int p) {
    const int valid = n - p * kPageSize;  // partial last page: slots past the sequence hold anything
    const bool live_k[2] = {gi < valid, gi + 8 < valid};
    const bool live_v[4] = {tok[0] < valid, tok[1] < valid, tok[2] < valid, tok[3] < valid};
    acc.compute(r, live_k, live_v, valid >= kPageSize);
  };
  // Two pages per warp in flight: the next page's loads go out before this page's math.
  Regs ra, rb;
  if (p0 + warp < p1) load(ra, p0 + warp);
  for (int p = p0 + warp; p < p1; p += 2 * kWarps) {
    const int q1 = p + kWarps;
    if (q1 < p1) load(rb, q1);
    compute(ra, p);
    if (q1 >= p1) break;
    if (q1 + kWarps < p1) load(ra, q1 + kWarps);
    compute(rb, q1);
  }
  acc.finish();

  // Merge the warps of the block (log-sum-exp), then write the output or the split's partial.
  __shared__ float smem[kWarps * kMaxGroup * (D + 2)];
  block_merge<kWarps>(acc, group, smem, [&](int g, int dim, float O, float mm, float L) {
    const int64_t row = (int64_t)b * n_heads + (int64_t)h * group + g;
    if (n_splits == 1) {
      out[row * D + dim] = L > 0.f ? O / L : 0.f;
    } else {
      const int64_t r = row * n_splits + split;
      part_o[r * D + dim] = O;
      if (dim == 0) part_ml[r] = make_float2(mm, L);
    }
  });
}

// Merges the splits of one (sequence, query head), few splits (batch >= 16 splits a sequence 1-16
// ways): one thread per dim, a loop over the splits.
constexpr int kFewSplits = 16;

template <int D>
__global__ void __launch_bounds__(D) dense_combine_kernel(const float* __restrict__ part_o,
                                                          const float2* __restrict__ part_ml,
                                                          const int32_t* __restrict__ seq_len, int max_pages,
                                                          int n_splits, int pages_per_split, float* __restrict__ out) {
  const int hq = blockIdx.x, b = blockIdx.y, dim = threadIdx.x, n_heads = gridDim.x;
  const int np = (seq_tokens(seq_len, b, max_pages) + kPageSize - 1) / kPageSize;
  const int ns = min(n_splits, (np + pages_per_split - 1) / pages_per_split);  // splits that ran
  const int64_t row = (int64_t)b * n_heads + hq;
  const float2* ml = part_ml + row * n_splits;
  const float* po = part_o + row * n_splits * D + dim;
  out[row * D + dim] = merge_few(ns, [&](int s) { return ml[s]; }, [&](int s) { return po[(int64_t)s * D]; });
}

// Many splits (batch 1 splits a sequence 17-4096 ways): eight warps per (sequence, query head) share
// the splits (tile::merge_parts). Before, the loop above: 16 rounds of dependent loads per thread at
// 128 splits (H200, the real-model shape at 1 x 8k: 14.8 -> 11.9 us for the whole decode).
constexpr int kManyThreads = 256;

template <int D>
__global__ void __launch_bounds__(kManyThreads) dense_combine_many_kernel(
    const float* __restrict__ part_o, const float2* __restrict__ part_ml, const int32_t* __restrict__ seq_len,
    int max_pages, int n_splits, int pages_per_split, float* __restrict__ out) {
  const int hq = blockIdx.x, b = blockIdx.y, n_heads = gridDim.x;
  const int np = (seq_tokens(seq_len, b, max_pages) + kPageSize - 1) / kPageSize;
  const int ns = min(n_splits, (np + pages_per_split - 1) / pages_per_split);
  const int64_t row = (int64_t)b * n_heads + hq;
  merge_parts<D, kManyThreads>(
      ns, [&](int s) { return part_ml[row * n_splits + s]; },
      [&](int s) { return part_o + (row * n_splits + s) * D; }, out + row * D);
}

// How many blocks of the kernel fit on one SM (registers bound it: ~220 per lane at d = 128).
int blocks_per_sm(const PagedKV& kv) {
  constexpr int t = kWarps * 32;
  const bool bf = kv.dtype == KvDtype::BF16;
  if (kv.head_dim == 64)
    return bf ? resident_blocks<dense_decode_kernel<__nv_bfloat16, 64>>(t)
              : resident_blocks<dense_decode_kernel<__half, 64>>(t);
  return bf ? resident_blocks<dense_decode_kernel<__nv_bfloat16, 128>>(t)
            : resident_blocks<dense_decode_kernel<__half, 128>>(t);
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
  if (plan.n_splits > kFewSplits) {
    dense_combine_many_kernel<D><<<dim3(kv.n_heads, kv.batch), kManyThreads, 0, stream>>>(
        part_o, part_ml, kv.seq_len, kv.max_pages, plan.n_splits, plan.pages_per_split, out);
    TW_CUDA_CHECK_LAUNCH();
  } else if (plan.n_splits > 1) {
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
