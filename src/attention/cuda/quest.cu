#include "attention/cuda/quest.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cub/block/block_scan.cuh>

#include "common/error.h"
#include "ops/cuda/cuda_check.h"

namespace tw::attn::cuda {

namespace {

constexpr int kScoreWarps = 8;
constexpr int kScorePages = kScoreWarps * 8;  // pages per block pass: 4 lanes per page
constexpr int kSelectThreads = 256;

__device__ __forceinline__ int seq_tokens(const int32_t* seq_len, int b, int max_pages) {
  return max(0, min(seq_len[b], max_pages * kPageSize));
}

// 8 values of T in a 16-byte vector -> float.
template <typename T>
__device__ __forceinline__ void to_float8(const uint4& v, float* f) {
  const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = float(h[i]);
}

// Group scores of pages of one (sequence, kv head). 4 lanes per page, each summing a quarter of the
// head dim (16-byte chunks quarter, quarter+4, ...), then two shuffles. The per-dim term is the CPU's
// q+ * kmax + q- * kmin (= max(q*kmax, q*kmin) as kmax >= kmin), NaN-propagating the same way.
template <typename T, int D>
__global__ void __launch_bounds__(kScoreWarps * 32) quest_score_kernel(
    const T* __restrict__ kmin, const T* __restrict__ kmax, const int32_t* __restrict__ page_table,
    const int32_t* __restrict__ seq_len, int max_pages, int n_heads, int group, const float* __restrict__ q,
    float* __restrict__ scores) {
  constexpr int CH = D / 32;  // chunks per lane per row
  const int h = blockIdx.y, b = blockIdx.z, hkv = gridDim.y;
  const int np = (seq_tokens(seq_len, b, max_pages) + kPageSize - 1) / kPageSize;
  if (blockIdx.x * kScorePages >= np) return;  // whole block: before any barrier

  __shared__ __align__(16) float s_q[kMaxGroup][2][D];  // q+ = max(q, 0), q- = min(q, 0)
  for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
    const int g = idx / D, dim = idx % D;
    const float x = q[((int64_t)b * n_heads + (int64_t)h * group + g) * D + dim];
    s_q[g][0][dim] = x > 0.f ? x : 0.f;
    s_q[g][1][dim] = x < 0.f ? x : 0.f;
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, quarter = lane & 3;
  const int32_t* pt = page_table + (int64_t)b * max_pages;
  float* out = scores + ((int64_t)b * hkv + h) * max_pages;
  for (int base = blockIdx.x * kScorePages; base < np; base += gridDim.x * kScorePages) {
    const int p = base + warp * 8 + (lane >> 2);
    float u[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) u[g] = 0.f;
    if (p < np) {
      const int64_t row = ((int64_t)pt[p] * hkv + h) * D;
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        const int d0 = 8 * (quarter + 4 * c);
        float mx[8], mn[8];
        to_float8<T>(__ldg(reinterpret_cast<const uint4*>(kmax + row + d0)), mx);
        to_float8<T>(__ldg(reinterpret_cast<const uint4*>(kmin + row + d0)), mn);
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
          if (g >= group) break;
          const float* qp = &s_q[g][0][d0];
          const float* qn = &s_q[g][1][d0];
#pragma unroll
          for (int i = 0; i < 8; ++i) u[g] += qp[i] * mx[i] + qn[i] * mn[i];
        }
      }
    }
    float best = -INFINITY;
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= group) break;
      float x = u[g] + __shfl_xor_sync(0xffffffffu, u[g], 1);
      x += __shfl_xor_sync(0xffffffffu, x, 2);
      best = fmaxf(best, isnan(x) ? INFINITY : x);  // NaN cannot rule a page out
    }
    if (quarter == 0 && p < np) out[p] = best;
  }
}

// Unsigned key in the order of the float (-0 and +0 equal, as the CPU's comparison has them).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f + 0.f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One block per (kv head, sequence): radix-select the r-th largest key among the middle pages
// (1 .. np-2), then one scan emits first page, pages above the threshold, the lowest-index pages at
// the threshold, last page, in ascending order.
__global__ void __launch_bounds__(kSelectThreads) quest_emit_kernel(const float* __restrict__ scores,
                                                                     const int32_t* __restrict__ seq_len,
                                                                     int max_pages, int64_t budget,
                                                                     int32_t* __restrict__ count,
                                                                     int32_t* __restrict__ tokens, int capacity) {
  const int h = blockIdx.x, b = blockIdx.y, hkv = gridDim.x, tid = threadIdx.x;
  const int n = seq_tokens(seq_len, b, max_pages);
  const int np = (n + kPageSize - 1) / kPageSize;
  const int64_t li = (int64_t)b * hkv + h;
  int32_t* dst = tokens + li * capacity;
  const float* sc = scores + li * max_pages;
  const int64_t n_sel = (budget + kPageSize - 1) / kPageSize;
  if (n == 0) {
    if (tid == 0) count[li] = 0;
    return;
  }
  if (budget >= n || n_sel >= np) {  // every token
    for (int t = tid; t < n; t += kSelectThreads) dst[t] = t;
    if (tid == 0) count[li] = n;
    return;
  }
  // Here n_sel < np, so np >= 2: first and last page are distinct; r middle pages to choose.
  const int r = n_sel > 2 ? (int)(n_sel - 2) : 0;

  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_digit, s_need;
  uint32_t prefix = 0, mask = 0, need = r;
  if (r > 0) {
    const int warp = tid >> 5, lane = tid & 31;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kSelectThreads) hist[i] = 0;
      __syncthreads();
      for (int base = 1; base < np - 1; base += kSelectThreads) {
        const int p = base + tid;
        const bool in = p < np - 1;
        const uint32_t key = in ? order_key(sc[p]) : 0u;
        const bool cand = in && (key & mask) == prefix;
        const uint32_t digit = (key >> shift) & 255u;
        // Warp-aggregated increments: early passes put most keys in one or two bins.
        const unsigned act = __ballot_sync(0xffffffffu, cand);
        if (cand) {
          const unsigned same = __match_any_sync(act, digit);
          if (lane == __ffs(same) - 1) atomicAdd(&hist[digit], (uint32_t)__popc(same));
        }
      }
      __syncthreads();
      if (warp == 0) {  // the digit where the count from the top reaches `need`
        uint32_t v[8], tot = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) tot += (v[j] = hist[255 - 8 * lane - j]);
        uint32_t incl = tot;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += y;
        }
        uint32_t before = incl - tot;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (before < need && need <= before + v[j]) {
            s_digit = 255u - 8u * lane - j;
            s_need = need - before;
          }
          before += v[j];
        }
      }
      __syncthreads();
      prefix |= s_digit << shift;
      mask |= 0xFFu << shift;
      need = s_need;
    }
  }

  // Emit: rank of a kept page = sure pages before it (first page, keys above the threshold) + ties
  // before it, capped at `need`. One 64-bit scan carries both counts (sure << 32 | tie).
  using Scan = cub::BlockScan<long long, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  long long carry = 0;
  for (int base = 0; base < np; base += kSelectThreads) {
    const int p = base + tid;
    int sure = 0, tie = 0;
    if (p < np) {
      if (p == 0 || p == np - 1) {
        sure = 1;
      } else if (r > 0) {
        const uint32_t key = order_key(sc[p]);
        sure = key > prefix;
        tie = key == prefix;
      }
    }
    long long excl, agg;
    Scan(scan_tmp).ExclusiveSum(((long long)sure << 32) | tie, excl, agg);
    excl += carry;
    const int sure_before = (int)(excl >> 32), tie_before = (int)(excl & 0xffffffffLL);
    if (sure || (tie && (uint32_t)tie_before < need)) {
      const int rank = sure_before + min(tie_before, (int)need);
      const int t0 = p * kPageSize, cnt = min(kPageSize, n - t0);
      for (int k = 0; k < cnt; ++k) dst[rank * kPageSize + k] = t0 + k;
    }
    carry += agg;
    __syncthreads();  // scan_tmp is reused
  }
  // r + 2 pages, all full but the last.
  if (tid == 0) count[li] = (r + 1) * kPageSize + (n - (np - 1) * kPageSize);
}

template <typename T, int D>
void launch_score(const PagedKV& kv, const KeySideDev& side, const float* q, int64_t max_seq_len, float* scores,
                  cudaStream_t stream) {
  const int64_t np = std::min<int64_t>((max_seq_len + kPageSize - 1) / kPageSize, kv.max_pages);
  const int gx = (int)std::max<int64_t>(1, (np + kScorePages - 1) / kScorePages);
  quest_score_kernel<T, D><<<dim3(gx, kv.n_kv_heads, kv.batch), kScoreWarps * 32, 0, stream>>>(
      static_cast<const T*>(side.kmin), static_cast<const T*>(side.kmax), kv.page_table, kv.seq_len, kv.max_pages,
      kv.n_heads, kv.n_heads / kv.n_kv_heads, q, scores);
  TW_CUDA_CHECK_LAUNCH();
}

}  // namespace

size_t quest_workspace_bytes(const PagedKV& kv) {
  return (size_t)kv.batch * kv.n_kv_heads * kv.max_pages * sizeof(float);
}

int64_t quest_list_capacity(const PagedKV& kv, int64_t budget_tokens) {
  const int64_t n_sel = (budget_tokens + kPageSize - 1) / kPageSize;
  return std::min<int64_t>(std::max<int64_t>(n_sel, 2), kv.max_pages) * kPageSize;
}

void quest_select(const PagedKV& kv, const KeySideDev& side, const float* q, int64_t budget_tokens,
                  int64_t max_seq_len, const TokenLists& out, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream) {
  check_config(kv);
  TW_CHECK(side.kmin != nullptr && side.kmax != nullptr, "quest: null page bounds (kmin / kmax)");
  TW_CHECK(reinterpret_cast<uintptr_t>(side.kmin) % 16 == 0 && reinterpret_cast<uintptr_t>(side.kmax) % 16 == 0,
           "quest: page bounds must be 16-byte aligned");
  TW_CHECK(q != nullptr, "quest: null q");
  TW_CHECK(budget_tokens > 0, "quest: budget must be positive, got ", budget_tokens);
  TW_CHECK(max_seq_len > 0, "quest: max_seq_len must be positive, got ", max_seq_len);
  TW_CHECK(out.count != nullptr && out.tokens != nullptr, "quest: null token lists");
  const int64_t cap = quest_list_capacity(kv, budget_tokens);
  TW_CHECK(out.capacity >= cap, "quest: token list capacity ", out.capacity, " < ", cap,
           " (budget ", budget_tokens, " rounded up to pages)");
  const size_t need = quest_workspace_bytes(kv);
  TW_CHECK(workspace != nullptr && workspace_bytes >= need, "quest: workspace of ", workspace_bytes,
           " bytes, needs ", need);
  float* scores = static_cast<float*>(workspace);
  const bool bf = kv.dtype == KvDtype::BF16;
  if (kv.head_dim == 64)
    bf ? launch_score<__nv_bfloat16, 64>(kv, side, q, max_seq_len, scores, stream)
       : launch_score<__half, 64>(kv, side, q, max_seq_len, scores, stream);
  else
    bf ? launch_score<__nv_bfloat16, 128>(kv, side, q, max_seq_len, scores, stream)
       : launch_score<__half, 128>(kv, side, q, max_seq_len, scores, stream);
  quest_emit_kernel<<<dim3(kv.n_kv_heads, kv.batch), kSelectThreads, 0, stream>>>(
      scores, kv.seq_len, kv.max_pages, budget_tokens, out.count, out.tokens, out.capacity);
  TW_CUDA_CHECK_LAUNCH();
}

}  // namespace tw::attn::cuda
