#include "attention/cuda/quest.h"

#include <cooperative_groups.h>

#include <algorithm>
#include <cmath>
#include <cub/block/block_scan.cuh>
#include <map>
#include <mutex>
#include <utility>

#include "attention/cuda/cluster.cuh"
#include "attention/cuda/imma.cuh"
#include "attention/page_bounds.h"
#include "common/error.h"
#include "ops/cuda/cuda_check.h"

namespace cg = cooperative_groups;

namespace tw::attn::cuda {

namespace {

constexpr int kBins = 256;           // radix bins (8-bit digits), one per thread of the first 256
constexpr int kMaxCluster = 16;      // blocks per list (non-portable above 8)
constexpr size_t kSelectSmemLimit = size_t(200) << 10;  // the block's keys and emit slots: ~24k pages

__device__ __forceinline__ int seq_tokens(const int32_t* seq_len, int b, int max_pages) {
  return max(0, min(seq_len[b], max_pages * kPageSize));
}

// Unsigned key in the order of the float (-0 and +0 equal, as the CPU's comparison has them).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f + 0.f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Page p of the block's run at p + 4 (p / 32) in shared memory: the radix passes and the emit read a
// thread's contiguous run of pages (a multiple of 4 long) by 16-byte loads that hit distinct banks
// across a quarter warp (runs of 32 pages: 36 words apart).
__host__ __device__ __forceinline__ int kidx(int p) { return p + 4 * (p >> 5); }

// Pages of each block's run when `pages` are split over a cluster of C blocks: ceil(pages / C) rounded
// up to 32 (whole 32-page chunks). The kernel splits the sequence's pages; the host sizes shared memory
// for max_pages.
__host__ __device__ __forceinline__ int run_of(int pages, int C) { return ((pages + C - 1) / C + 31) & ~31; }

// One cluster of C blocks per (kv head, sequence): the page scores, the radix select of the r-th
// largest and the ordered emit in one kernel. Block c of the cluster owns the contiguous run of pages
// [c per, (c + 1) per) (per = ceil(np / C) rounded to 32), scores it and keeps the keys in shared
// memory; the four 8-bit radix passes sum the cluster's histograms over distributed shared memory (one
// cluster barrier per pass); the emit offsets are each block's scan plus the lower blocks' totals.
// A separate emit kernel (one block per list) took 15 / 27 us of the step at 16 x 32k / 128k on the
// H200 (ncu), most of it barriers and atomics with nothing to overlap them.
//
// Scores: the integer score of page_bounds.h, bit-identical to the CPU's. The dots of 16 pages with
// every head of the group are one tensor-core product per 32 code bytes: A = 16 page rows of 2D codes
// (the cmin row, then the cmax row, as stored), B = the int8 query split by sign (column = head: q8-
// against cmin, q8+ against cmax), exact in int32, so the order of the k dimension is free. Lane
// (g, t) loads 16 contiguous bytes of rows g and g + 8 per 64-byte slab (a warp load covers 8 rows x
// 64 B: whole sectors); word w of slab i is k-step 2i + w / 2, slot (w & 1) (a0 / a2). Then
// page_bound_score per (page, head) and the max over the group's heads (NaN ranks as +inf). Warps take
// the block's 32-page chunks in turn: the page table is read 32 entries per load, the codes of those
// 32 pages (two tiles) go out together.
// NT threads per block: 256 (two blocks per SM), or 512 (one) where a list would otherwise be a
// cluster of two 256-thread blocks sharing SMs with other lists' blocks: the same warps per SM
// without the cluster barriers.
template <int D, int NT, bool kPageOut>
__global__ void __launch_bounds__(NT) quest_select_kernel(
    const uint8_t* __restrict__ bcode, const float* __restrict__ bparam, const int32_t* __restrict__ page_table,
    const int32_t* __restrict__ seq_len, int max_pages, int n_heads, int group, int64_t budget,
    const float* __restrict__ q, float* __restrict__ scores, int32_t* __restrict__ count,
    int32_t* __restrict__ tokens, int capacity, int stop) {
  constexpr int NS = 2 * D / 64;  // 64-byte slabs per codes row (one 16-byte load per lane each)
  constexpr int KS = 2 * NS;      // k32-steps per row
  cg::cluster_group cl = cg::this_cluster();
  const int C = (int)cl.num_blocks(), rank = (int)cl.block_rank();
  const int h = blockIdx.y, b = blockIdx.z, hkv = gridDim.y;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  extern __shared__ __align__(16) uint32_t s_keys[];  // [kidx(per)]: order keys of the block's pages

  const int n = seq_tokens(seq_len, b, max_pages);
  const int np = (n + kPageSize - 1) / kPageSize;
  const int64_t li = (int64_t)b * hkv + h;
  int32_t* dst = tokens + li * capacity;
  const int64_t n_sel = (budget + kPageSize - 1) / kPageSize;
  const int per = run_of(np, C);
  const int per_full = run_of(max_pages, C);  // the run the host sized shared memory for
  const int bb = min(np, rank * per), be = min(np, bb + per);
  // Uniform over the cluster (same list): these blocks leave before any cluster barrier.
  if (n == 0) {
    if (rank == 0 && tid == 0) count[li] = 0;
    return;
  }
  if (budget >= n || n_sel >= np) {  // every token
    if constexpr (kPageOut)
      for (int p = bb + tid; p < be; p += NT) dst[p] = p;
    else
      for (int t = bb * kPageSize + tid; t < min(n, be * kPageSize); t += NT) dst[t] = t;
    if (rank == 0 && tid == 0) count[li] = n;
    return;
  }
  // Here n_sel < np, so np >= 2: first and last page are distinct; r middle pages to choose.
  const int r = n_sel > 2 ? (int)(n_sel - 2) : 0;

  __shared__ uint32_t hist[2][kBins];  // radix passes alternate: one cluster barrier each
  __shared__ uint32_t s_tot[kBins];
  __shared__ uint32_t s_digit, s_need;
  __shared__ long long s_agg;  // this block's (sure << 32 | tie) page counts, read by the cluster
  static_assert(NT >= kBins && kBins == 256, "one radix bin per thread of the first 256");
  const bool binner = NT == kBins || tid < kBins;  // this thread owns bin tid
  if (binner) hist[0][tid] = 0u, hist[1][tid] = 0u;

  // The int8 query (quantize_quest_query), one warp per head: amax by a butterfly (order-free), the
  // same float operations per element, q8sum in integers. Stored as B rows of 2D bytes: min(q8, 0)
  // against the cmin codes, max(q8, 0) against the cmax codes; heads >= group stay zero.
  __shared__ __align__(16) int8_t s_b[kMaxGroup][2 * D];
  __shared__ float s_sq[kMaxGroup];
  __shared__ int s_q8sum[kMaxGroup];
  static_assert(NT / 32 >= kMaxGroup, "one warp per head");
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
      const int rq = (int)fminf(fmaxf(rintf(x[e] * inv), -127.f), 127.f);
      t += rq;
      s_b[warp][lane + 32 * e] = (int8_t)(rq < 0 ? rq : 0);
      s_b[warp][D + lane + 32 * e] = (int8_t)(rq > 0 ? rq : 0);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) s_sq[warp] = amax / 127.f, s_q8sum[warp] = t;
  }
  __syncthreads();

  // ---- scores of the block's pages ----
  {
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
    float* const out = scores != nullptr ? scores + li * max_pages : nullptr;  // optional (tests)
    auto score = [&](float2 par, float sq, int q8sum, int dot, bool live) {
      const float v = page_bound_score(par.x, par.y, sq, q8sum, dot);
      return live ? (isnan(v) ? INFINITY : v) : -INFINITY;  // NaN cannot rule a page out
    };
    // Head h's code row (this lane's 16 bytes of it) and {lo, s} in physical page 0; page p is
    // p * page_bytes code bytes and p * hkv params further.
    const uint8_t* const code_h = bcode + (int64_t)h * 2 * D + t4 * 16;
    const float2* const par_h = reinterpret_cast<const float2*>(bparam) + h;
    const int64_t page_bytes = (int64_t)hkv * 2 * D;
    for (int r0 = bb + 32 * warp; r0 < be; r0 += NT) {
      const int phys_lane = r0 + lane < be ? pt[r0 + lane] : 0;
      // The 32 pages' codes (two tiles of 16 rows) go out together; then the two products. The loads
      // are unconditional: a row past the run reads physical page 0 and its score is never stored
      // (predicated loads with zero fill cost ~100 instructions per 32 pages).
      uint4 ca[2][NS], cb[2][NS];  // tile u: rows g and g + 8
      float2 pa[2], pb[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int ka = 16 * u + g, kb = ka + 8;
        const int phA = __shfl_sync(0xffffffffu, phys_lane, ka), phB = __shfl_sync(0xffffffffu, phys_lane, kb);
        const uint8_t* rowA = code_h + phA * page_bytes;
        const uint8_t* rowB = code_h + phB * page_bytes;
#pragma unroll
        for (int i = 0; i < NS; ++i) {
          ca[u][i] = __ldg(reinterpret_cast<const uint4*>(rowA + 64 * i));
          cb[u][i] = __ldg(reinterpret_cast<const uint4*>(rowB + 64 * i));
        }
        pa[u] = __ldg(par_h + (int64_t)phA * hkv);
        pb[u] = __ldg(par_h + (int64_t)phB * hkv);
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        // Two accumulator chains (each slab's two k-steps), summed after: half the dependent IMMA latency.
        int c[4] = {0, 0, 0, 0}, c2[4] = {0, 0, 0, 0};
#pragma unroll
        for (int i = 0; i < NS; ++i) {
          imma16832(c, ca[u][i].x, cb[u][i].x, ca[u][i].y, cb[u][i].y, bq[2 * i][0], bq[2 * i][1]);
          imma16832(c2, ca[u][i].z, cb[u][i].z, ca[u][i].w, cb[u][i].w, bq[2 * i + 1][0], bq[2 * i + 1][1]);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) c[k] += c2[k];
        // c: (row g, heads 2t, 2t + 1), (row g + 8, same heads); the group max over the 4 lanes of a row.
        float va = fmaxf(score(pa[u], sq0, qs0, c[0], h0 < group), score(pa[u], sq1, qs1, c[1], h1 < group));
        float vb = fmaxf(score(pb[u], sq0, qs0, c[2], h0 < group), score(pb[u], sq1, qs1, c[3], h1 < group));
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
          va = fmaxf(va, __shfl_xor_sync(0xffffffffu, va, o));
          vb = fmaxf(vb, __shfl_xor_sync(0xffffffffu, vb, o));
        }
        const int pa_ = r0 + 16 * u + g, pb_ = pa_ + 8;
        if (t4 == 0 && pa_ < be) {
          s_keys[kidx(pa_ - bb)] = order_key(va);
          if (out) out[pa_] = va;
        }
        if (t4 == 1 && pb_ < be) {
          s_keys[kidx(pb_ - bb)] = order_key(vb);
          if (out) out[pb_] = vb;
        }
      }
    }
  }
  __syncthreads();  // the block's keys are in shared memory
  if (stop == 1) {  // benchmarking aid (TW_QUEST_STOP_AFTER): scores only
    if (C > 1) cl.sync();
    return;
  }

  // A block alone in its cluster (more lists than resident clusters of two) needs only block barriers
  // (cluster.cuh; H200: select 64 x 32k 102.7 -> 98.8 us, 64 x 128k 315.5 -> 312.5; batch 1 and 16
  // unchanged).

  // ---- radix select over the cluster: the r-th largest key among the middle pages 1 .. np-2 ----
  auto is_mid = [&](int p) { return p > 0 && p < np - 1; };
  // Thread t takes a contiguous run of the block's pages (here and in the emit), a multiple of 4 long,
  // read 8 keys at a time by two 16-byte loads (keys past the run are read, never used: a run ends
  // inside the block's allocation, whose length per is a multiple of 32). Keys kept in registers for
  // all passes instead (runs up to 32) were slower everywhere: 32-fold unrolled passes and emit.
  // Runs shorter than 4 pages (blocks of under 1024 pages) stay 1-3 long: more threads share them.
  const int cpt0 = (be - bb + NT - 1) / NT;
  const int cpt = cpt0 >= 4 ? (cpt0 + 3) & ~3 : cpt0;
  const int pb = min(be, bb + tid * cpt), pe = min(be, pb + cpt);
  auto keys8 = [&](int p0, uint32_t (&key)[8]) {
    if ((cpt & 3) == 0) {
      const uint4 a = *reinterpret_cast<const uint4*>(&s_keys[kidx(p0 - bb)]);
      const uint4 b =
          p0 + 4 < pe ? *reinterpret_cast<const uint4*>(&s_keys[kidx(p0 + 4 - bb)]) : make_uint4(0u, 0u, 0u, 0u);
      key[0] = a.x, key[1] = a.y, key[2] = a.z, key[3] = a.w, key[4] = b.x, key[5] = b.y, key[6] = b.z, key[7] = b.w;
    } else {  // cpt < 4: one run
#pragma unroll
      for (int u = 0; u < 3; ++u) key[u] = p0 + u < pe ? s_keys[kidx(p0 + u - bb)] : 0u;
#pragma unroll
      for (int u = 3; u < 8; ++u) key[u] = 0u;
    }
  };
  // f(p, key) for this thread's pages in order (the passes and the emit).
  auto for_keys = [&](auto&& f) {
    for (int p0 = pb; p0 < pe; p0 += 8) {
      uint32_t key[8];
      keys8(p0, key);
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (p0 + u >= pe) break;
        f(p0 + u, key[u]);
      }
    }
  };
  uint32_t prefix = 0, mask = 0, need = (uint32_t)r;
  if (r > 0) {
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      uint32_t* hb = hist[pass & 1];
      // A thread counts its candidates as runs of one digit: a shared atomic when the digit changes,
      // and for the last run one per warp when the warp's last runs share a digit (the early passes
      // put nearly every key in one or two bins). Per-key warp aggregation (ballot + match.any per
      // 256 pages) made the passes and the emit 76 of the select's 343 us at 64 x 128k (H200; 48 now).
      uint32_t run_d = 0, run_n = 0;
      for_keys([&](int p, uint32_t key) {
        if (is_mid(p) && (key & mask) == prefix) {
          const uint32_t d = (key >> shift) & 255u;
          if (d != run_d && run_n > 0) {
            atomicAdd(&hb[run_d], run_n);
            run_n = 0;
          }
          run_d = d;
          ++run_n;
        }
      });
      const unsigned act = __ballot_sync(0xffffffffu, run_n > 0);
      if (act != 0u) {
        const uint32_t d0 = __shfl_sync(0xffffffffu, run_d, __ffs(act) - 1);
        if (__all_sync(0xffffffffu, run_n == 0 || run_d == d0)) {
          const uint32_t n_all = __reduce_add_sync(0xffffffffu, run_n);
          if (lane == 0) atomicAdd(&hb[d0], n_all);
        } else if (run_n > 0) {
          atomicAdd(&hb[run_d], run_n);
        }
      }
      // Every block's histogram of this pass is complete; every remote read of the other buffer (the
      // previous pass) is done, so it is cleared for the next pass below.
      cluster_sync(cl, C);
      if (binner) {
        uint32_t tot = 0;
        if (C == 1)  // the block's own (block_field inside the loop compiled to ~100 more instructions)
          tot = hb[tid];
        else
          for (int c = 0; c < C; ++c) tot += cl.map_shared_rank(hb, c)[tid];
        s_tot[tid] = tot;
        hist[(pass + 1) & 1][tid] = 0u;
      }
      __syncthreads();
      if (warp == 0) {  // the digit where the count from the top reaches `need`
        uint32_t v[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) sum += (v[j] = s_tot[255 - 8 * lane - j]);
        uint32_t incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += y;
        }
        uint32_t before = incl - sum;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (before < need && need <= before + v[j]) {
            s_digit = 255u - 8u * lane - j;
            s_need = (need - before) | (need - before == v[j] ? 0x80000000u : 0u);  // top bit: the whole bin
          }
          before += v[j];
        }
      }
      __syncthreads();
      const uint32_t sn = s_need;
      prefix |= s_digit << shift;
      mask |= 0xFFu << shift;
      need = sn & 0x7fffffffu;
      // The boundary bin is kept whole: no lower digit is needed. Every key >= prefix (its lower bits
      // 0) is kept, i.e. key > prefix - 1 with no ties to take. After three passes this is the rule
      // (24 bits leave ~one key per bin), so the fourth pass is mostly skipped. (A prefix of 0, the
      // bin of -inf keys, keeps the passes going: prefix - 1 would wrap.)
      if ((sn >> 31) != 0u && prefix != 0u) {
        prefix -= 1u;
        need = 0u;
        break;
      }
    }
  }

  if (stop == 2) {  // benchmarking aid: scores and radix passes (the last pass's remote reads done)
    if (C > 1) cl.sync();
    return;
  }
  // ---- emit: rank of a kept page = sure pages before it (first page, keys above the threshold) + ties
  // before it, capped at `need`. Thread t takes contiguous pages of the block's run: its counts, one
  // 64-bit block scan (sure << 32 | tie) for its offsets within the block, the lower blocks' totals for
  // the block's, then its kept pages in order. ----
  // f(p, sure, tie) for this thread's pages in order.
  auto each_page = [&](auto&& f) {
    for_keys([&](int p, uint32_t key) {
      const bool mid = r > 0 && is_mid(p);
      const int sure = p == 0 || p == np - 1 || (mid && key > prefix);
      const int tie = !sure && mid && key == prefix;
      f(p, sure, tie);
    });
  };
  int n_sure = 0, n_tie = 0;
  each_page([&](int, int su, int ti) { n_sure += su, n_tie += ti; });
  using Scan = cub::BlockScan<long long, NT>;
  __shared__ typename Scan::TempStorage scan_tmp;
  long long excl, agg;
  Scan(scan_tmp).ExclusiveSum(((long long)n_sure << 32) | n_tie, excl, agg);
  if (tid == 0) s_agg = agg;
  cluster_sync(cl, C);  // every block's totals are published
  long long base = 0;
  for (int c = 0; c < rank; ++c) base += *cl.map_shared_rank(&s_agg, c);  // rank > 0: C > 1
  excl += base;
  int sure_before = (int)(excl >> 32), tie_before = (int)(excl & 0xffffffffLL);
  // A warp's pages are contiguous, so its kept pages are a contiguous range of ranks: each thread puts
  // its own at their slots in shared memory (the keys' run, past the keys), then the warp writes their
  // tokens in order, 512 contiguous bytes per store (a thread writing its own pages' 64 bytes made
  // each store 32 scattered pieces). Only the warp synchronises.
  int32_t* s_sel = reinterpret_cast<int32_t*>(s_keys) + kidx(per_full);  // [per_full], by rank - base rank
  const int base_rank = (int)(base >> 32) + min((int)(base & 0xffffffffLL), (int)need);
  auto next_rank = [&] { return sure_before + min(tie_before, (int)need); };  // of this thread's next kept page
  const int my_first = next_rank();
  each_page([&](int p, int su, int ti) {
    if (su || (ti && (uint32_t)tie_before < need)) s_sel[next_rank() - base_rank] = p;
    sure_before += su, tie_before += ti;
  });
  const int w_first = __shfl_sync(0xffffffffu, my_first, 0);
  const int w_end = __shfl_sync(0xffffffffu, next_rank(), 31);
  __syncwarp();
  if constexpr (kPageOut) {  // the pages themselves (PageLists)
    for (int i = lane; i < w_end - w_first; i += 32) dst[w_first + i] = s_sel[w_first - base_rank + i];
  } else {
    const bool vec = (reinterpret_cast<uintptr_t>(dst) & 15) == 0;  // any capacity is allowed
    int32_t* const o = dst + (size_t)w_first * kPageSize;
    for (int i = lane; i < (w_end - w_first) * (kPageSize / 4); i += 32) {  // four tokens of one page each
      const int t0 = s_sel[w_first - base_rank + i / (kPageSize / 4)] * kPageSize + 4 * (i % (kPageSize / 4));
      if (vec && t0 + 3 < n) {
        *reinterpret_cast<int4*>(o + 4 * i) = make_int4(t0, t0 + 1, t0 + 2, t0 + 3);
      } else {
        for (int k = 0; k < 4 && t0 + k < n; ++k) o[4 * i + k] = t0 + k;
      }
    }
  }
  // r + 2 pages, all full but the last.
  if (rank == 0 && tid == 0) count[li] = (r + 1) * kPageSize + (n - (np - 1) * kPageSize);
  if (C > 1) cl.sync();  // no block leaves while another may still read its s_agg
}

// Shared memory of a block whose run holds up to `per` pages (a multiple of 32): its keys, then the
// emit's kept pages.
size_t select_smem(int per) { return (size_t)(kidx(per) + per) * sizeof(uint32_t); }

// Clusters of C blocks (each with `smem` bytes) the device holds at once for this kernel, 0 where it
// cannot schedule that size; the kernel's attributes are set on first use. Clusters are placed within
// a GPC, so this is below (SMs x blocks per SM) / C where a GPC's slots do not divide by C. Cached per
// (head dim, threads, C, smem); not stream work. The token and page outputs' builds have the same
// resources; the attributes are set on both.
template <int D, int NT>
int active_clusters(int C, size_t smem) {
  static std::mutex mu;
  static std::map<std::pair<int, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(C, smem);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  auto kern = quest_select_kernel<D, NT, false>;
  static const bool attrs = [] {
    for (auto k : {quest_select_kernel<D, NT, false>, quest_select_kernel<D, NT, true>}) {
      TW_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kSelectSmemLimit));
      TW_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    }
    return true;
  }();
  (void)attrs;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_launch(dim3(C, 1, 1), NT, C, smem, nullptr, attr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kern, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // a size the device cannot schedule: not a choice, not an error
    n = 0;
  }
  cache[key] = n;
  return n;
}

template <int D>
void launch_select(const PagedKV& kv, const KeySideDev& side, const float* q, int64_t budget_tokens,
                   int64_t max_seq_len, const TokenLists& out, bool page_out, float* scores, cudaStream_t stream) {
  // Cluster size: the most blocks per list (at most kMaxCluster, at least one 32-page chunk per warp)
  // that keep the launch to one wave of resident clusters: the radix passes and the emit hold a block's
  // slot with little to overlap them, so a second wave would wait for them (H200, 32 lists x 2048 pages:
  // 8 blocks per list, 264 block slots / 32 lists, ran as two waves of clusters: 26 us against 17).
  // Past one wave (more lists than resident blocks), one block per list. A block's run is sized from
  // max_pages, the page table's bound, so any seq_len the table allows fits.
  const int64_t np = std::min<int64_t>((max_seq_len + kPageSize - 1) / kPageSize, kv.max_pages);
  const int64_t lists = (int64_t)kv.batch * kv.n_kv_heads;
  auto per_of = [&](int c) { return run_of(kv.max_pages, c); };
  const int64_t chunks = (np + 255) / 256;  // 32-page chunks per warp at C = 1 (256 threads)
  int C = 1;
  for (int c = (int)std::min<int64_t>(kMaxCluster, chunks); c > 1; --c) {
    const size_t sm = select_smem(per_of(c));
    if (sm <= kSelectSmemLimit && active_clusters<D, 256>(c, sm) >= lists) {
      C = c;
      break;
    }
  }
  // Very long page tables: more blocks until a block's run fits its shared memory.
  while (select_smem(per_of(C)) > kSelectSmemLimit && C < kMaxCluster) ++C;
  // Blocks of 512 threads, half as many per list, where the clusters' 256-thread blocks would share
  // SMs anyway (more blocks than SMs): the same warps per SM, fewer (or no) cluster barriers.
  int NT = 256;
  if (C % 2 == 0 && lists * C > sm_count()) {
    const size_t sm = select_smem(per_of(C / 2));
    if (sm <= kSelectSmemLimit && active_clusters<D, 512>(C / 2, sm) >= lists) NT = 512, C /= 2;
  }
  const size_t smem = select_smem(per_of(C));
  TW_CHECK(smem <= kSelectSmemLimit, "quest: ", kv.max_pages, " pages per sequence need ", smem,
           " bytes of shared memory per block at ", C, " blocks per list (limit ", kSelectSmemLimit, ")");
  TW_CHECK((NT == 256 ? active_clusters<D, 256>(C, smem) : active_clusters<D, 512>(C, smem)) > 0,
           "quest: this device cannot schedule clusters of ", C, " blocks of ", smem, " bytes of shared memory (",
           kv.max_pages, " pages per sequence)");
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_launch(dim3(C, kv.n_kv_heads, kv.batch), NT, C, smem, stream, attr);
  const int group = kv.n_heads / kv.n_kv_heads;
  // TW_QUEST_STOP_AFTER=k (benchmarking aid, quest.h): the kernel leaves after phase k.
  static const int stop = bench_knob("TW_QUEST_STOP_AFTER");
  auto kern = page_out ? (NT == 256 ? quest_select_kernel<D, 256, true> : quest_select_kernel<D, 512, true>)
                       : (NT == 256 ? quest_select_kernel<D, 256, false> : quest_select_kernel<D, 512, false>);
  TW_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern,
                                   side.bcode, side.bparam, kv.page_table, kv.seq_len, kv.max_pages, kv.n_heads,
                                   group, budget_tokens, q, scores, out.count, out.tokens, out.capacity, stop));
}

}  // namespace

size_t quest_scores_bytes(const PagedKV& kv) {
  return (size_t)kv.batch * kv.n_kv_heads * kv.max_pages * sizeof(float);
}

int64_t quest_list_capacity(const PagedKV& kv, int64_t budget_tokens) {
  const int64_t n_sel = (budget_tokens + kPageSize - 1) / kPageSize;
  return std::min<int64_t>(std::max<int64_t>(n_sel, 2), kv.max_pages) * kPageSize;
}

namespace {

// The checks both outputs share; `capacity` counts the list's entries of `per_entry` tokens each.
void check_select(const PagedKV& kv, const KeySideDev& side, const float* q, int64_t budget_tokens,
                  int64_t max_seq_len, int64_t capacity, int per_entry, const char* unit) {
  check_config(kv);
  TW_CHECK(side.bcode != nullptr && side.bparam != nullptr, "quest: null page bounds (bcode / bparam)");
  TW_CHECK(reinterpret_cast<uintptr_t>(side.bcode) % 16 == 0 && reinterpret_cast<uintptr_t>(side.bparam) % 8 == 0,
           "quest: page bound codes must be 16-byte aligned (params 8-byte)");
  TW_CHECK(q != nullptr, "quest: null q");
  TW_CHECK(budget_tokens > 0, "quest: budget must be positive, got ", budget_tokens);
  TW_CHECK(max_seq_len > 0, "quest: max_seq_len must be positive, got ", max_seq_len);
  const int64_t cap = quest_list_capacity(kv, budget_tokens);
  TW_CHECK(capacity * per_entry >= cap, "quest: ", unit, " list capacity ", capacity, " < ", cap / per_entry,
           " (budget ", budget_tokens, " rounded up to pages)");
}

void run_select(const PagedKV& kv, const KeySideDev& side, const float* q, int64_t budget_tokens, int64_t max_seq_len,
                const TokenLists& out, bool page_out, float* scores, cudaStream_t stream) {
  if (kv.head_dim == 64)
    launch_select<64>(kv, side, q, budget_tokens, max_seq_len, out, page_out, scores, stream);
  else
    launch_select<128>(kv, side, q, budget_tokens, max_seq_len, out, page_out, scores, stream);
}

}  // namespace

void quest_select(const PagedKV& kv, const KeySideDev& side, const float* q, int64_t budget_tokens,
                  int64_t max_seq_len, const TokenLists& out, cudaStream_t stream, float* scores,
                  size_t scores_bytes) {
  TW_CHECK(out.count != nullptr && out.tokens != nullptr, "quest: null token lists");
  check_select(kv, side, q, budget_tokens, max_seq_len, out.capacity, 1, "token");
  if (scores != nullptr) {
    const size_t need = quest_scores_bytes(kv);
    TW_CHECK(scores_bytes >= need, "quest: score buffer of ", scores_bytes, " bytes, needs ", need);
  }
  run_select(kv, side, q, budget_tokens, max_seq_len, out, false, scores, stream);
}

void quest_select_pages(const PagedKV& kv, const KeySideDev& side, const float* q, int64_t budget_tokens,
                        int64_t max_seq_len, const PageLists& out, cudaStream_t stream) {
  TW_CHECK(out.count != nullptr && out.pages != nullptr, "quest: null page lists");
  check_select(kv, side, q, budget_tokens, max_seq_len, out.capacity, kPageSize, "page");
  run_select(kv, side, q, budget_tokens, max_seq_len, TokenLists{out.count, out.pages, out.capacity}, true, nullptr,
             stream);
}

}  // namespace tw::attn::cuda
