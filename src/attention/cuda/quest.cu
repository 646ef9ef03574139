#include "attention/cuda/quest.h"

#include <algorithm>
#include <cmath>
#include <cub/block/block_scan.cuh>

#include "attention/cuda/imma.cuh"
#include "attention/page_bounds.h"
#include "common/error.h"
#include "ops/cuda/cuda_check.h"

namespace tw::attn::cuda {

namespace {

constexpr int kScoreWarps = 8;
// The emit block: 512 threads (H200, 16 x 128k: the emit kernel 31 us at 256 threads, one block of 8
// warps per SM having too little to overlap; 1024 threads need more than 64 registers and spill).
constexpr int kSelectThreads = 512;

__device__ __forceinline__ int seq_tokens(const int32_t* seq_len, int b, int max_pages) {
  return max(0, min(seq_len[b], max_pages * kPageSize));
}

// Group scores of pages of one (sequence, kv head): the integer score of page_bounds.h, bit-identical
// to the CPU's. The dots of 16 pages with every head of the group are one tensor-core product per 32
// code bytes: A = 16 page rows of 2D codes (the cmin row, then the cmax row, as stored), B = the int8
// query split by sign (column = head: q8- against cmin, q8+ against cmax), exact in int32, so the
// order of the k dimension is free. Lane (g, t) loads 16 contiguous bytes of rows g and g + 8 per
// 64-byte slab (a warp load covers 8 rows x 64 B: whole sectors); word w of slab i is k-step
// 2i + w / 2, slot (w & 1) (a0 / a2). Then page_bound_score per (page, head) and the max over the
// group's heads (NaN ranks as +inf). Each warp owns a run of `ppw` pages (a multiple of 32): the page
// table is read 32 entries per load, the codes of those 32 pages (two tiles) go out together.
template <int D>
__global__ void __launch_bounds__(kScoreWarps * 32) quest_score_kernel(
    const uint8_t* __restrict__ bcode, const float* __restrict__ bparam, const int32_t* __restrict__ page_table,
    const int32_t* __restrict__ seq_len, int max_pages, int n_heads, int group, int ppw, const float* __restrict__ q,
    float* __restrict__ scores) {
  constexpr int NS = 2 * D / 64;  // 64-byte slabs per codes row (one 16-byte load per lane each)
  constexpr int KS = 2 * NS;      // k32-steps per row
  const int h = blockIdx.y, b = blockIdx.z, hkv = gridDim.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

  // The int8 query (quantize_quest_query), one warp per head: amax by a butterfly (order-free), the
  // same float operations per element, q8sum in integers. Stored as B rows of 2D bytes: min(q8, 0)
  // against the cmin codes, max(q8, 0) against the cmax codes; heads >= group stay zero.
  __shared__ __align__(16) int8_t s_b[kMaxGroup][2 * D];
  __shared__ float s_sq[kMaxGroup];
  __shared__ int s_q8sum[kMaxGroup];
  static_assert(kScoreWarps >= kMaxGroup, "one warp per head");
  if (warp < kMaxGroup) {
    const float* qg = q + ((int64_t)b * n_heads + (int64_t)h * group + warp) * D;
    float x[D / 32], amax = 0.f;
#pragma unroll
    for (int e = 0; e < D / 32; ++e) {
      x[e] = warp < group ? qg[lane + 32 * e] : 0.f;
      amax = fmaxf(amax, fabsf(x[e]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int t = 0;
#pragma unroll
    for (int e = 0; e < D / 32; ++e) {
      const int r = (int)fminf(fmaxf(rintf(x[e] * inv), -127.f), 127.f);
      t += r;
      s_b[warp][lane + 32 * e] = (int8_t)(r < 0 ? r : 0);
      s_b[warp][D + lane + 32 * e] = (int8_t)(r > 0 ? r : 0);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) s_sq[warp] = amax / 127.f, s_q8sum[warp] = t;
  }
  __syncthreads();
  const int np = (seq_tokens(seq_len, b, max_pages) + kPageSize - 1) / kPageSize;
  const int beg = (blockIdx.x * kScoreWarps + warp) * ppw, end = min(np, beg + ppw);
  if (beg >= end) return;  // no barrier below

  // B fragments: lane (n = g, t) holds k-slots 4t..4t+3 (b0) and 16+4t..16+4t+3 (b1) of column g,
  // i.e. the query bytes facing the lane's own A words (same t, same byte offsets).
  uint32_t bq[KS][2];
  const uint32_t* brow = reinterpret_cast<const uint32_t*>(s_b[g]);
#pragma unroll
  for (int j = 0; j < KS; ++j) {
    const int w0 = (j / 2) * 16 + t4 * 4 + (2 * j) % 4;  // word of slab j / 2, lane t's 16 bytes
    bq[j][0] = brow[w0];
    bq[j][1] = brow[w0 + 1];
  }
  // This lane's accumulator columns: heads 2t and 2t + 1.
  const int h0 = 2 * t4, h1 = 2 * t4 + 1;
  const float sq0 = h0 < group ? s_sq[h0] : 0.f, sq1 = h1 < group ? s_sq[h1] : 0.f;
  const int qs0 = h0 < group ? s_q8sum[h0] : 0, qs1 = h1 < group ? s_q8sum[h1] : 0;

  const int32_t* pt = page_table + (int64_t)b * max_pages;
  float* out = scores + ((int64_t)b * hkv + h) * max_pages;
  auto score = [&](float2 par, float sq, int q8sum, int dot, bool live) {
    const float v = page_bound_score(par.x, par.y, sq, q8sum, dot);
    return live ? (isnan(v) ? INFINITY : v) : -INFINITY;  // NaN cannot rule a page out
  };
  for (int r0 = beg; r0 < end; r0 += 32) {
    const int phys_lane = r0 + lane < end ? pt[r0 + lane] : 0;
    // The 32 pages' codes (two tiles of 16 rows) go out together; then the two products.
    uint4 ca[2][NS], cb[2][NS];  // tile u: rows g and g + 8
    float2 pa[2], pb[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int ka = 16 * u + g, kb = ka + 8;
      const int phA = __shfl_sync(0xffffffffu, phys_lane, ka), phB = __shfl_sync(0xffffffffu, phys_lane, kb);
      const bool la = r0 + ka < end, lb = r0 + kb < end;
      const uint8_t* rowA = bcode + ((int64_t)phA * hkv + h) * 2 * D + t4 * 16;
      const uint8_t* rowB = bcode + ((int64_t)phB * hkv + h) * 2 * D + t4 * 16;
#pragma unroll
      for (int i = 0; i < NS; ++i) {
        ca[u][i] = la ? __ldg(reinterpret_cast<const uint4*>(rowA + 64 * i)) : uint4{};
        cb[u][i] = lb ? __ldg(reinterpret_cast<const uint4*>(rowB + 64 * i)) : uint4{};
      }
      pa[u] = la ? __ldg(reinterpret_cast<const float2*>(bparam) + (int64_t)phA * hkv + h) : make_float2(0.f, 0.f);
      pb[u] = lb ? __ldg(reinterpret_cast<const float2*>(bparam) + (int64_t)phB * hkv + h) : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      int c[4] = {0, 0, 0, 0};
#pragma unroll
      for (int i = 0; i < NS; ++i) {
        imma16832(c, ca[u][i].x, cb[u][i].x, ca[u][i].y, cb[u][i].y, bq[2 * i][0], bq[2 * i][1]);
        imma16832(c, ca[u][i].z, cb[u][i].z, ca[u][i].w, cb[u][i].w, bq[2 * i + 1][0], bq[2 * i + 1][1]);
      }
      // c: (row g, heads 2t, 2t + 1), (row g + 8, same heads); the group max over the 4 lanes of a row.
      float va = fmaxf(score(pa[u], sq0, qs0, c[0], h0 < group), score(pa[u], sq1, qs1, c[1], h1 < group));
      float vb = fmaxf(score(pb[u], sq0, qs0, c[2], h0 < group), score(pb[u], sq1, qs1, c[3], h1 < group));
#pragma unroll
      for (int o = 1; o < 4; o <<= 1) {
        va = fmaxf(va, __shfl_xor_sync(0xffffffffu, va, o));
        vb = fmaxf(vb, __shfl_xor_sync(0xffffffffu, vb, o));
      }
      const int ka = 16 * u + g, kb = ka + 8;
      if (t4 == 0 && r0 + ka < end) out[r0 + ka] = va;
      if (t4 == 1 && r0 + kb < end) out[r0 + kb] = vb;
    }
  }
}

// Unsigned key in the order of the float (-0 and +0 equal, as the CPU's comparison has them).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f + 0.f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kKeysPerThread = 8192 / kSelectThreads;  // keys a thread keeps in registers: up to 8192 pages (128k tokens)

// One block per (kv head, sequence): radix-select the r-th largest key among the middle pages
// (1 .. np-2; up to 8192 of them held in registers across the four passes, longer rows re-read), then
// one scan emits first page, pages above the threshold, the lowest-index pages at the threshold, last
// page, in ascending order.
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
  const int mid = np - 2;

  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_digit, s_need;
  uint32_t prefix = 0, mask = 0, need = r;
  // Rows of up to 8192 middle pages: their keys in registers for the radix passes and, transposed, in
  // shared memory for the emit (key of page p at p + p / 32: a thread's run of pages hits 32 banks).
  const bool cached = r > 0 && mid <= kKeysPerThread * kSelectThreads;
  __shared__ uint32_t s_keys[kKeysPerThread * kSelectThreads + kKeysPerThread * kSelectThreads / 32 + 8];
  auto kidx = [](int p) { return p + (p >> 5); };
  if (r > 0) {
    const int warp = tid >> 5, lane = tid & 31;
    uint32_t keys[kKeysPerThread];
    if (cached) {
#pragma unroll
      for (int k = 0; k < kKeysPerThread; ++k) {
        const int p = 1 + k * kSelectThreads + tid;
        keys[k] = p < np - 1 ? order_key(sc[p]) : 0u;
        if (p < np - 1) s_keys[kidx(p)] = keys[k];
      }
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kSelectThreads) hist[i] = 0;
      __syncthreads();
      auto add = [&](uint32_t key, bool in) {
        const bool cand = in && (key & mask) == prefix;
        const uint32_t digit = (key >> shift) & 255u;
        // Warp-aggregated increments: early passes put most keys in one or two bins.
        const unsigned act = __ballot_sync(0xffffffffu, cand);
        if (cand) {
          const unsigned same = __match_any_sync(act, digit);
          if (lane == __ffs(same) - 1) atomicAdd(&hist[digit], (uint32_t)__popc(same));
        }
      };
      if (cached) {
#pragma unroll
        for (int k = 0; k < kKeysPerThread; ++k) {
          if (k * kSelectThreads >= mid) break;  // uniform over the block
          add(keys[k], 1 + k * kSelectThreads + tid < np - 1);
        }
      } else {
        for (int base = 1; base < np - 1; base += kSelectThreads) {
          const int p = base + tid;
          const bool in = p < np - 1;
          add(in ? order_key(sc[p]) : 0u, in);
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
  // before it, capped at `need`. Thread t takes the contiguous pages [t cpt, (t + 1) cpt): its counts,
  // one 64-bit block scan (sure << 32 | tie) for its offsets, then its kept pages in order: one scan
  // and two passes over the keys (shared memory, or the L2-resident scores past 8192 pages), where a
  // scan per 256 pages put a load and a barrier on the path 32 times at 128k.
  const int cpt = (np + kSelectThreads - 1) / kSelectThreads;
  const int pb = min(np, tid * cpt), pe = min(np, pb + cpt);
  __syncthreads();  // s_keys written (the radix passes end with a barrier too; r = 0 skips them)
  auto key_at = [&](int p) {
    if (p <= 0 || p >= np - 1 || r == 0) return 0u;
    return cached ? s_keys[kidx(p)] : order_key(sc[p]);
  };
  // f(p, sure, tie) for this thread's pages in order, their keys loaded 8 at a time.
  auto each_page = [&](auto&& f) {
    for (int p0 = pb; p0 < pe; p0 += 8) {
      uint32_t key[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) key[u] = p0 + u < pe ? key_at(p0 + u) : 0u;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int p = p0 + u;
        if (p >= pe) break;
        const int sure = p == 0 || p == np - 1 || (r > 0 && key[u] > prefix);
        const int tie = !sure && r > 0 && key[u] == prefix;
        f(p, sure, tie);
      }
    }
  };
  int n_sure = 0, n_tie = 0;
  each_page([&](int, int su, int ti) { n_sure += su, n_tie += ti; });
  using Scan = cub::BlockScan<long long, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  long long excl;
  Scan(scan_tmp).ExclusiveSum(((long long)n_sure << 32) | n_tie, excl);
  int sure_before = (int)(excl >> 32), tie_before = (int)(excl & 0xffffffffLL);
  const bool vec = (reinterpret_cast<uintptr_t>(dst) & 15) == 0;  // any capacity is allowed
  each_page([&](int p, int su, int ti) {
    if (su || (ti && (uint32_t)tie_before < need)) {
      const int rank = sure_before + min(tie_before, (int)need);
      const int t0 = p * kPageSize, cnt = min(kPageSize, n - t0);
      int32_t* o = dst + rank * kPageSize;
      if (cnt == kPageSize && vec) {
#pragma unroll
        for (int k = 0; k < kPageSize; k += 4) *reinterpret_cast<int4*>(o + k) = make_int4(t0 + k, t0 + k + 1, t0 + k + 2, t0 + k + 3);
      } else {
        for (int k = 0; k < cnt; ++k) o[k] = t0 + k;
      }
    }
    sure_before += su, tie_before += ti;
  });
  // r + 2 pages, all full but the last.
  if (tid == 0) count[li] = (r + 1) * kPageSize + (n - (np - 1) * kPageSize);
}

template <int D>
void launch_score(const PagedKV& kv, const KeySideDev& side, const float* q, int64_t max_seq_len, float* scores,
                  cudaStream_t stream) {
  const int64_t np = std::min<int64_t>((max_seq_len + kPageSize - 1) / kPageSize, kv.max_pages);
  // Pages per warp: enough warps to fill the GPU (~48 per SM), at least 32 pages each (the q setup
  // and page-table round are per warp), at most 256.
  const int64_t rows = np * kv.n_kv_heads * kv.batch;
  const int64_t want = (int64_t)sm_count() * 48;
  const int ppw = (int)std::min<int64_t>(256, std::max<int64_t>(32, (rows + want - 1) / want + 31) / 32 * 32);
  const int gx = (int)std::max<int64_t>(1, (np + (int64_t)kScoreWarps * ppw - 1) / ((int64_t)kScoreWarps * ppw));
  const dim3 grid(gx, kv.n_kv_heads, kv.batch);
  const int group = kv.n_heads / kv.n_kv_heads;
  quest_score_kernel<D><<<grid, kScoreWarps * 32, 0, stream>>>(side.bcode, side.bparam, kv.page_table, kv.seq_len,
                                                               kv.max_pages, kv.n_heads, group, ppw, q, scores);
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
  TW_CHECK(side.bcode != nullptr && side.bparam != nullptr, "quest: null page bounds (bcode / bparam)");
  TW_CHECK(reinterpret_cast<uintptr_t>(side.bcode) % 16 == 0 && reinterpret_cast<uintptr_t>(side.bparam) % 8 == 0,
           "quest: page bound codes must be 16-byte aligned (params 8-byte)");
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
  if (kv.head_dim == 64)
    launch_score<64>(kv, side, q, max_seq_len, scores, stream);
  else
    launch_score<128>(kv, side, q, max_seq_len, scores, stream);
  quest_emit_kernel<<<dim3(kv.n_kv_heads, kv.batch), kSelectThreads, 0, stream>>>(
      scores, kv.seq_len, kv.max_pages, budget_tokens, out.count, out.tokens, out.capacity);
  TW_CUDA_CHECK_LAUNCH();
}

}  // namespace tw::attn::cuda
