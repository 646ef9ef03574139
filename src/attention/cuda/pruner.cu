#include "attention/cuda/pruner.h"

#include <cooperative_groups.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include "attention/cuda/cluster.cuh"
#include "attention/cuda/imma.cuh"
#include "common/error.h"
#include "ops/cuda/cuda_check.h"

namespace cg = cooperative_groups;

namespace tw::attn::cuda {

namespace {

// Three builds of the kernel, by blocks per SM (the plan's threads and shared memory): three (<= 75 KB,
// 8 warps, registers <= 85), two (<= 113 KB, 8 warps, registers <= 128) or one (16 warps, registers
// <= 128: a whole B0 = 8192 list in one block, no cluster barriers, the same 16 warps per SM as two
// blocks; also any block past the two-block limit).
constexpr size_t kThreeBlockSmem = size_t(75) << 10;
constexpr size_t kTwoBlockSmem = size_t(113) << 10;
constexpr int threads_of(int blocks_per_sm) { return blocks_per_sm == 1 ? 512 : 256; }
// The score area (prune_kernel): a token's fp16 scores take Gp slots, G rounded up to 2, 4 or 8 (this
// is log2 Gp), so a 16-byte unit holds whole tokens; an entry takes at least the 8 bytes of the weight
// and keep flag that later overlay the scores.
__host__ __device__ constexpr int score_slots_log2(int G) { return G <= 2 ? 1 : G <= 4 ? 2 : 3; }
__host__ __device__ constexpr int score_entry_bytes(int slots_log2) { return (2 << slots_log2) > 8 ? 2 << slots_log2 : 8; }
constexpr int kMaxWarps = 16;
constexpr int kBins = 1024;        // every radix level: level 1 = bits 29..20 (weights <= 1 have bit 30 clear
                                   // below 2.0), levels 2 and 3 = bits 19..10 and 9..0
constexpr int kMaxCluster = 16;
constexpr uint32_t kPrioKey = 0x3fc00000u;  // 1.5f: the current token's rank for floor / cap, above any weight


using u64 = unsigned long long;
// The scale a dead row reads in the three-block build's estimate (see kNanDead): a quiet NaN.
__device__ const float kDeadScale = __builtin_nanf("");
// Histogram masses are fixed point, w * 2^52 (w <= ~1: sums stay far below 2^63): integer atomics
// add up exactly in any order, so every run and every block of a cluster sees the same sums, and
// the rounding (2^-53 per weight) is far below float's.
__device__ __forceinline__ u64 fixed_mass(float w) { return __float2ull_rn(w * 0x1p52f); }
constexpr double kFixedUnit = 0x1p-52;

// Block-wide fixed fields at the start of dynamic shared memory; the same layout in every block of a
// cluster, so a field's address maps to the other blocks' copies (distributed shared memory).
struct Small {
  float qsum[kMaxGroup];     // per head: sum of qs = q / sqrt(d) (the zero-point term)
  float sq[kMaxGroup];       // per head: the int8 query's scale
  float cq[kMaxGroup];       // per head: 7.5 * sum of the query's rounding residuals
  float wred[kMaxWarps][kMaxGroup];
  float cmax[kMaxGroup];     // this block's score max per head (read by the cluster)
  float csum[kMaxGroup];     // this block's exp sum per head (read by the cluster)
  float gmax[kMaxGroup];     // per head: the cluster's score max
  float ginv[kMaxGroup];     // per head: 1 / (cluster exp sum * G)
  u64 ured[kMaxWarps];
  int ired[kMaxWarps];
  int sel_bin;
  u64 sel_cum, sel_total;
  int ccount;                // this block's count (published to the cluster)
  u64 cmass;                 // this block's kept mass, fixed point (published)
  int8_t q8[kMaxGroup][128]; // the int8 query per head
};

struct Args {
  const int32_t* page_table;
  const int32_t* seq_len;
  const uint8_t* k4;
  const float* k4s;
  const float* k4z;
  const float* q;
  const int32_t* in_count;
  const int32_t* in_tokens;  // the I0 lists' tokens, or (page input) their pages
  int32_t* out_count;
  int32_t* out_tokens;
  float* est_mass;
  int64_t n_pages;
  int max_pages, n_kv_heads, group, in_cap, out_cap;
  int in_stride;  // entries between lists of in_tokens: in_cap, or (page input) in_cap / 16 (derivable,
                  // but derived in the kernel it cost the three-block d 128 build 40 bytes of spill)
  float p;
  int min_tokens, max_tokens;
  int chunk, npad;  // npad: the block's entries rounded up to 32 (the score area's length)
  int stop;  // benchmarking aid (TW_PRUNE_STOP_AFTER): leave after phase `stop` (0 = run everything)
  int wall_off;  // bytes into dynamic shared memory of the whole list's weights (PrunePlan::wall_off), 0: none
};

// Row code loads: D/8 bytes per lane (a quarter of the row).
template <int D>
struct RowBytes;
template <>
struct RowBytes<128> {
  using T = uint4;
  static constexpr int kWords = 4;
  __device__ static void words(const T& v, uint32_t (&w)[4]) { w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w; }
};
template <>
struct RowBytes<64> {
  using T = uint2;
  static constexpr int kWords = 2;
  __device__ static void words(const T& v, uint32_t (&w)[2]) { w[0] = v.x, w[1] = v.y; }
};

// An opaque copy of a pointer: the estimate's code addresses are then one wide multiply-add of the row
// onto the per-lane base (IMAD.WIDE.U32); with a visible base the compiler re-associates the lane offset
// into an OR and a 64-bit add: four instructions per load in an issue-sensitive loop.
template <class T>
__device__ __forceinline__ const T* opaque(const T* p) {
  asm("mov.b64 %0, %0;" : "+l"(p));
  return p;
}

// An int the compiler cannot recompute (a volatile move), so a loop keeps it in a register.
__device__ __forceinline__ int pinned(int x) {
  asm volatile("mov.b32 %0, %0;" : "+r"(x));
  return x;
}

// exp(x) as the bare MUFU ex2.approx.ftz (relative error ~1e-6 for the |x| <= 87 used here; the CPU's
// fast_exp is within 3e-7: the weights agree far inside the tests' 1e-5 boundary tolerance). exp2f
// would add a denormal rescale, but results below 2^-126 only arise for x < -87.3, which every
// caller maps to 0 anyway.
__device__ __forceinline__ float exp_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Inclusive scan of one u64 per thread in thread order (integers: exact, order-free); `excl` gets
// the exclusive value and `total` the block's sum. NT: threads of the block.
template <int NT>
__device__ u64 block_scan_incl(u64 v, u64& excl, u64& total, Small& S) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const u64 own = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += u;
  }
  __syncthreads();
  if (lane == 31) S.ured[warp] = v;
  __syncthreads();
  u64 off = 0, all = 0;
  for (int w = 0; w < NT / 32; ++w) {
    if (w == warp) off = all;
    all += S.ured[w];
  }
  total = all;
  excl = off + v - own;
  return off + v;
}

// Exclusive scan of one int per thread; *total gets the block sum.
template <int NT>
__device__ int block_scan_excl_int(int v, int* total, Small& S) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += u;
  }
  __syncthreads();
  if (lane == 31) S.ired[warp] = x;
  __syncthreads();
  int off = 0, tot = 0;
  for (int w = 0; w < NT / 32; ++w) {
    if (w == warp) off = tot;
    tot += S.ired[w];
  }
  *total = tot;
  return off + x - v;
}

// Histograms: per bin the fixed-point mass in three 19-bit limbs, [3][kBins] u32 (count mode: the
// count in limb 0). Native 32-bit shared atomics, no 64-bit CAS loops; a limb sums at most kMaxChunk
// values below 2^19, so it cannot overflow (3 x 19 bits hold w * 2^52 for w < 2). Integer sums:
// every block of the cluster and every run sees the same values.
constexpr int kLimbBits = 19;
constexpr int kMaxChunk = 8192;  // candidates per block at most (limb overflow bound, see plan)
__device__ __forceinline__ u64 limb_value(uint32_t l0, uint32_t l1, uint32_t l2) {
  return (u64)l0 + ((u64)l1 << kLimbBits) + ((u64)l2 << (2 * kLimbBits));
}

// Histogram add of one weight's three limbs. `all`: every limb is added, zeros included, with no test:
// the level-1 pass adds every entry, and tested adds compile to a branch per limb, whose resolution
// stalled that pass; the lower levels, where most entries are skipped, keep the tests.
__device__ __forceinline__ void hist_add(uint32_t* hc, uint32_t bin, float w, bool all = false) {
  const u64 f = fixed_mass(w);
  constexpr uint32_t kMask = (1u << kLimbBits) - 1;
  const uint32_t l0 = (uint32_t)f & kMask, l1 = (uint32_t)(f >> kLimbBits) & kMask, l2 = (uint32_t)(f >> (2 * kLimbBits));
  if (all || l0) atomicAdd(&hc[bin], l0);
  if (all || l1) atomicAdd(&hc[kBins + bin], l1);
  if (all || l2) atomicAdd(&hc[2 * kBins + bin], l2);
}

// One radix level: the cluster's histograms of this level are summed bin by bin, scanned from the
// top bin down, and the first bin where cum0 + (value above and in the bin) >= target is returned
// with cum0 + the value above it. `clear` (the previous level's buffer, whose remote readers are done
// once every block has passed this level's cluster barrier) is zeroed for the next level; the block
// scan's barriers order that before the next level's adds.
// frac > 0 (level 1 of the mass select): target = ceil(frac * total of these histograms), which the
// scan reaches whenever the total is positive. A lower level's histograms hold exactly the masses (or
// counts) of the bin chosen above them (integers add up exactly), so their scan reaches the target
// too. Only an all-zero level 1 (no positive weight) finds no bin: bin_out = -1.
// kLocal: the block's own histograms only (a whole-list select in every block of the cluster).
template <int NT, bool kLocal = false>
__device__ void scan_level(cg::cluster_group& cl, Small& S, const uint32_t* hist, uint32_t* clear, bool count_mode,
                           double frac, u64 target, u64 cum0, int& bin_out, u64& cum_out) {
  const int C = kLocal ? 1 : (int)cl.num_blocks();
  cluster_sync(cl, C);  // every block's histogram of this level is complete (a block barrier too)
  // This thread's bins: bin0 .. bin0 + BPT - 1, v[i] = bin bin0 + BPT - 1 - i (descending), read by
  // one 16-byte (8-byte at 512 threads) load per limb.
  constexpr int BPT = kBins / NT;
  static_assert(BPT == 4 || BPT == 2, "four or two bins per thread");
  using Vec = std::conditional_t<BPT == 4, uint4, uint2>;
  auto lanes = [](const Vec& x, uint32_t (&o)[BPT]) {  // o[i]: bin bin0 + BPT - 1 - i
    if constexpr (BPT == 4)
      o[0] = x.w, o[1] = x.z, o[2] = x.y, o[3] = x.x;
    else
      o[0] = x.y, o[1] = x.x;
  };
  u64 v[BPT];
#pragma unroll
  for (int i = 0; i < BPT; ++i) v[i] = 0;
  const int bin0 = kBins - BPT * (threadIdx.x + 1);
#pragma unroll 2
  for (int r = 0; r < C; ++r) {
    const uint32_t* hr = block_field(cl, C, hist, r);
    uint32_t l0[BPT];
    lanes(*reinterpret_cast<const Vec*>(hr + bin0), l0);
    if (count_mode) {
#pragma unroll
      for (int i = 0; i < BPT; ++i) v[i] += l0[i];
    } else {
      uint32_t l1[BPT], l2[BPT];
      lanes(*reinterpret_cast<const Vec*>(hr + kBins + bin0), l1);
      lanes(*reinterpret_cast<const Vec*>(hr + 2 * kBins + bin0), l2);
#pragma unroll
      for (int i = 0; i < BPT; ++i) v[i] += limb_value(l0[i], l1[i], l2[i]);
    }
  }
  for (int i = threadIdx.x; i < 3 * kBins; i += NT) clear[i] = 0u;
  u64 tsum = 0;
#pragma unroll
  for (int i = 0; i < BPT; ++i) tsum += v[i];
  if (threadIdx.x == 0) S.sel_bin = -1;
  u64 excl, total;
  const u64 incl = block_scan_incl<NT>(tsum, excl, total, S);  // has __syncthreads: the reset is visible
  if (frac > 0.0) target = (u64)ceil(frac * (double)total);
  if (threadIdx.x == 0) S.sel_total = total;
  if (cum0 + excl < target && cum0 + incl >= target) {  // this thread's bins hold the crossing
    u64 run = cum0 + excl;
#pragma unroll
    for (int i = 0; i < BPT; ++i) {  // descending bins
      if (v[i] != 0 && run < target && run + v[i] >= target) {
        S.sel_bin = bin0 + BPT - 1 - i;
        S.sel_cum = run;
      }
      run += v[i];
    }
  }
  __syncthreads();
  bin_out = S.sel_bin;
  cum_out = S.sel_cum;
  // No barrier: S.sel_* are written again only after the next level's cluster barrier.
}

// Radix select over the block's keys, over the whole cluster: the largest key value v with
// (mass or count of keys >= v) >= target; `cum_above` gets the value of keys > v. Two histogram
// buffers alternate, so a buffer is only cleared after every block has passed the next level's
// cluster barrier (its remote readers are done); `next` is the buffer the first level uses.
// first_built: the caller already built level 1's histogram (mass mode) in hist[next].
// kLocal: over this block's keys and histograms alone, with block barriers (the caller holds the whole
// list's keys).
template <int NT, bool kLocal = false, class KeyFn>
__device__ uint32_t radix_select(cg::cluster_group& cl, Small& S, const float* ws, int m, KeyFn key_of, bool count_mode,
                                 bool first_built, double frac, u64 target, uint32_t* const (&hist)[2], int& next,
                                 u64& cum_above) {
  uint32_t prefix = 0;
  u64 cum = 0;
#pragma unroll 1
  for (int level = 0; level < 3; ++level) {
    uint32_t* hc = next ? hist[1] : hist[0];
    const int shift = level == 0 ? 20 : level == 1 ? 10 : 0;
    // Four consecutive weights per thread in one 16-byte load (ws is 16-byte aligned; the row's padding
    // past m is readable and masked here).
#pragma unroll 1
    for (int j = 4 * threadIdx.x; j < m && !(level == 0 && first_built); j += 4 * NT) {
      const float4 w4 = *reinterpret_cast<const float4*>(ws + j);
      const float wv[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        uint32_t k;
        if (j + u >= m || !key_of(j + u, wv[u], k)) continue;
        if (level > 0 && (k >> (shift + 10)) != prefix) continue;
        const uint32_t bin = (k >> shift) & (kBins - 1);
        if (count_mode)
          atomicAdd(&hc[bin], 1u);
        else
          hist_add(hc, bin, wv[u]);
      }
    }
    int bin;
    u64 before;
    // The other buffer is cleared for the next level inside (its last remote readers are done then).
    scan_level<NT, kLocal>(cl, S, hc, next ? hist[0] : hist[1], count_mode, level == 0 ? frac : 0.0, target, cum, bin,
                           before);
    if (level == 0 && frac > 0.0) target = (u64)ceil(frac * (double)S.sel_total);
    next ^= 1;
    if (bin < 0) bin = 0;  // nothing selectable: no positive weight
    prefix = (prefix << 10) | (uint32_t)bin;
    cum = before;
  }
  cum_above = cum;
  return prefix;
}

// kPages: the I0 lists are whole pages (layout.h PageLists: token j = page j / 16's slot j % 16), so
// the prologue resolves one page-table entry per 16 candidates and the tokens of the output come from
// the block's pages in shared memory instead of a second read of the list.
template <int D, int MINB, bool kPages>
__global__ void __launch_bounds__(threads_of(MINB), MINB) prune_kernel(const Args a) {
  constexpr int kThreads = threads_of(MINB), kWarps = kThreads / 32;
  // 16-row tiles whose loads a warp has in flight, in every build. The one- and two-block builds had 8
  // (128 registers, at the cap): with 4 (112-116 registers) the two tiles' IMMA chains overlap (below)
  // and the estimate is faster, so the loads in flight were not what bound it (H200, 128 / 256 / 512
  // lists x B0 8192: 44.5 / 84.1 / 164.4 -> 43.6 / 82.3 / 158.8 us; 8 lists -0.8 us, 112 lists -2.3).
  constexpr int kUnroll = 4;
  using RB = RowBytes<D>;
  cg::cluster_group cl = cg::this_cluster();
  const int C = (int)cl.num_blocks();
  const int rank = (int)cl.block_rank();
  const int h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = a.group;

  // kLean (page input, every build): no per-candidate row indices; the estimate derives a row from
  // its page's entry in s_rb.
  constexpr bool kLean = kPages;
  // The score area (smem_for): the estimate's fp16 scores, token-major [npad][Gp] (Gp = G rounded up
  // to 2, 4 or 8: a 16-byte unit holds whole tokens); then the group weights w [npad] fp32 over its
  // start (each weight overlays units at or before its own, so one barrier per round orders them),
  // and the keep flags [npad] int32 at byte 4 npad. fp16 scores (the CPU's definition, pruner.h) make
  // a G 4 block of 8192 candidates ~94 KB: two per SM, one wave of 264 lists (fp32 took ~159 KB).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Small& S = *reinterpret_cast<Small*>(smem_raw);
  unsigned char* const zb = smem_raw + ((sizeof(Small) + 15) & ~size_t(15));
  const int gsh = score_slots_log2(G);
  __half* const zh = reinterpret_cast<__half*>(zb);
  float* const ws = reinterpret_cast<float*>(zb);
  int32_t* const flag = reinterpret_cast<int32_t*>(zb + (size_t)4 * a.npad);
  int32_t* rowidx = reinterpret_cast<int32_t*>(zb + (size_t)a.npad * score_entry_bytes(gsh));  // [chunk], token input
  // Token input: the histograms overlay the row indices, which the estimate is the last to read (they
  // are cleared after it); page input has no row indices. So a token-input block is no larger than a
  // page-input block plus max(0, chunk - 6 kBins) words and runs as many blocks per SM (a G 4 block of
  // 8192: 100304 B instead of 124880, two per SM, as the plan, decided on page input, assumes).
  uint32_t* histA = reinterpret_cast<uint32_t*>(rowidx);  // [3][kBins]
  uint32_t* histB = histA + 3 * kBins;
  int32_t* s_pages = reinterpret_cast<int32_t*>(histB + 3 * kBins);  // [chunk / 16]: kPages, the block's pages
  // kLean, per page of the slice: its first row | (valid tokens - 1) in the low 4 bits (the row of
  // slot 0 is a multiple of 16), or INT_MIN (no valid token: every row it gives is negative, i.e. dead).
  int32_t* s_rb = s_pages + a.chunk / kPageSize;

  const int list = b * a.n_kv_heads + h;
  const int n = min(max(a.in_count[list], 0), a.in_cap);
  const int cur = a.seq_len[b] - 1;
  const int32_t* toks_all = a.in_tokens + (size_t)list * a.in_stride;  // kPages: the list's pages
  const int32_t last = kPages ? (n > 0 ? toks_all[(n - 1) / kPageSize] * kPageSize + (n - 1) % kPageSize : -1)
                              : (n > 0 ? toks_all[n - 1] : -1);
  const bool cur_is_cand = n > 0 && last == cur;
  const int extra = (cur_is_cand || cur < 0) ? 0 : 1;
  int32_t* out_toks = a.out_tokens + (size_t)list * a.out_cap;

  if (n == 0) {  // uniform over the cluster (same list): no barrier is skipped by only some blocks
    if (rank == 0 && tid == 0) {
      if (extra) out_toks[0] = cur;
      a.out_count[list] = extra;
      if (a.est_mass) a.est_mass[list] = 0.f;
    }
    return;
  }
  // Slices of whole pages (a multiple of 16, <= chunk): page input needs it, and token input splits the
  // same way, so both sum the softmax over the same blocks (the same floats, the same output).
  const int per = (n + C * kPageSize - 1) / (C * kPageSize) * kPageSize;
  const int beg = min(n, rank * per);
  const int m = min(n, beg + per) - beg;
  const int32_t* toks = toks_all + beg;  // token input only
  // Entry j of the block's slice (kPages: beg is a multiple of 16, the slice's pages are in s_pages).
  auto tok_at = [&](int j) -> int32_t {
    if constexpr (kPages)
      return s_pages[j / kPageSize] * kPageSize + j % kPageSize;
    else
      return toks[j];
  };

  // ---- prologue: row indices resolved, histograms cleared, query scaled and split ----
  // Row indices: token -> page -> row, two dependent loads per candidate, kRows candidates per thread
  // in flight (one round covers a block of up to kRows x kThreads candidates); the histograms are cleared
  // while the first tokens load. H200, 128 lists x 8192: the prologue took 6.4 us of a 52-us block
  // with two rounds of 8 after the query; 4.6 us now.
  constexpr int kRows = MINB >= 3 ? 8 : 16;
  int tk[kRows];
  auto load_tokens = [&](int j0) {
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int j = j0 + u * kThreads;
      tk[u] = j < m ? toks[j] : -1;
    }
  };
  auto resolve_rows = [&](int j0) {
    int ph[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u)
      ph[u] = (tk[u] >= 0 && tk[u] <= cur) ? a.page_table[(size_t)b * a.max_pages + tk[u] / kPageSize] : -1;
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int j = j0 + u * kThreads;
      if (j < m)
        rowidx[j] = kv_row(ph[u], a.n_pages, a.n_kv_heads, h, tk[u]);
    }
  };
  // The query's loads go out with the tokens' and it is quantised while they load; every lane then
  // builds its B fragments from the int8 bytes (before: the query after the rows, and one warp building
  // the fragments for the block: two load latencies and two barriers more; 256 lists x B0 8192 on the
  // H200 90.4 -> 89.2 us, 8 lists 25.9 -> 24.8).
  // Page input: one page per thread, its id loaded now, resolved with the query in flight.
  const int np_s = (m + kPageSize - 1) / kPageSize;
  const int32_t* pages = toks_all + beg / kPageSize;
  int lp0 = -1;
  if constexpr (kPages)
    lp0 = tid < np_s ? pages[tid] : -1;
  else
    load_tokens(tid);
  const float qscale = 1.f / sqrtf((float)D);
  const float* qh = a.q + ((size_t)b * a.n_kv_heads * G + (size_t)h * G) * D;
  float qx[D / 32];
  if (warp < G)
#pragma unroll
    for (int e = 0; e < D / 32; ++e) qx[e] = qh[(size_t)warp * D + lane + 32 * e];
  // Page input: the histograms cleared, but for histB's first G * D words: the query's scratch below
  // (zeroed by the warps that use it). Token input clears them after the estimate (they overlay the rows).
  static_assert(kWarps >= kMaxGroup && kMaxGroup * 128 <= 3 * kBins, "one warp per head; scratch fits histB");
  if constexpr (kPages)
    for (int i = tid; i < 6 * kBins; i += kThreads)
      if (i < 3 * kBins || i >= 3 * kBins + G * D) histA[i] = 0u;
  // Page input: the page's table entry goes out now, its latency behind the query's quantisation.
  int ph0 = -1;
  if constexpr (kPages) ph0 = (lp0 >= 0 && lp0 < a.max_pages) ? a.page_table[(size_t)b * a.max_pages + lp0] : -1;
  // The query in int8, as the CPU's quantize_query_int8 (pruner.h), one warp per head: x = q * qscale
  // and sq are the CPU's float operations; the max is order-free; qsum is summed in the CPU's order
  // (one lane, from shared memory; token input, whose rows overlay that scratch, from shuffles in the
  // same order: the same float); the rounding residuals x - sq * q8 are exact in double (sq * q8
  // has 31 bits; x is within half a step of it), so only their double sum's order differs from the
  // CPU's, far below the rounding of cq to float.
  if (warp < G) {
    float* xs = reinterpret_cast<float*>(histB) + (size_t)warp * D;  // G * D <= 3 * kBins words
    float x[D / 32], amax = 0.f;
#pragma unroll
    for (int e = 0; e < D / 32; ++e) {
      x[e] = qx[e] * qscale;
      if constexpr (kPages) xs[lane + 32 * e] = x[e];
      amax = fmaxf(amax, fabsf(x[e]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float sq = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    double res = 0.0;
#pragma unroll
    for (int e = 0; e < D / 32; ++e) {
      const float r = fminf(fmaxf(rintf(x[e] * inv), -127.f), 127.f);
      S.q8[warp][lane + 32 * e] = (int8_t)r;
      res += (double)x[e] - (double)sq * (double)r;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) res += __shfl_xor_sync(0xffffffffu, res, o);
    float qs_tok = 0.f;  // token input: element 32 e + l from lane l, in index order
    if constexpr (!kPages)
#pragma unroll
      for (int e = 0; e < D / 32; ++e)
#pragma unroll 4
        for (int l = 0; l < 32; ++l) qs_tok += __shfl_sync(0xffffffffu, x[e], l);
    __syncwarp();
    if (lane == 0) {
      float qs = 0.f;
      if constexpr (kPages)
        for (int i = 0; i < D; ++i) qs += xs[i];
      else
        qs = qs_tok;
      S.sq[warp] = sq;
      S.cq[warp] = (float)(7.5 * res);
      S.qsum[warp] = qs;
    }
    __syncwarp();
    if constexpr (kPages)
#pragma unroll
      for (int e = 0; e < D / 32; ++e) reinterpret_cast<uint32_t*>(xs)[lane + 32 * e] = 0u;
  }
  if constexpr (kPages) {
    for (int k = tid; k < np_s; k += kThreads) {
      const int lp = k == tid ? lp0 : pages[k];
      s_pages[k] = lp;
      const int ph = k == tid ? ph0 : (lp >= 0 && lp < a.max_pages) ? a.page_table[(size_t)b * a.max_pages + lp] : -1;
      const int t0 = lp * kPageSize, base = kv_row(ph, a.n_pages, a.n_kv_heads, h, t0);
      s_rb[k] = (base >= 0 && t0 <= cur) ? base | min(cur - t0, kPageSize - 1) : INT_MIN;
    }
  } else {
    resolve_rows(tid);
    for (int j0 = tid + kRows * kThreads; j0 < m; j0 += kRows * kThreads) {
      load_tokens(j0);
      resolve_rows(j0);
    }
  }
  __syncthreads();  // rows, histograms and the query are in shared memory

  // B fragments (the int8 query, column = head), built by every lane from the query bytes: the head
  // dim is summed exactly in int32, so its order is free. Lane (g, t)'s A data is the quarter t of two
  // code rows, dims base .. base + D/4 - 1 with base = t * D/4; code word j holds dims base + 8j ..
  // base + 8j + 7 (low nibbles: even dims, high: odd). k32-step j: k-slots 4t..4t+3 <- the even dims
  // of word j, 16+4t..16+4t+3 <- the odd dims.
  const int g = lane >> 2, t4 = lane & 3;
  uint2 bq[RB::kWords];  // this lane's B fragments, in registers for the whole estimate
#pragma unroll
  for (int j = 0; j < RB::kWords; ++j) {
    const uint2 v = g < G ? *reinterpret_cast<const uint2*>(&S.q8[g][t4 * (D / 4) + 8 * j]) : make_uint2(0u, 0u);
    bq[j] = make_uint2(__byte_perm(v.x, v.y, 0x6420), __byte_perm(v.x, v.y, 0x7531));  // even bytes, odd bytes
  }
  // Heads of this lane's accumulator columns (>= G: unused).
  // Pinned in the one- and two-block builds: their page-input estimate loop recomputed 2 t4 + {0, 1}
  // and the tests against G for every tile (270 instructions per 4 tiles, against 246 with tokens; H200,
  // 32 lists 27.9 -> 27.1 us, the Qwen 1.5B shape at batch 16 27.6 -> 26.9); the three-block build,
  // pinned, got 0.7 us slower at 8 lists.
  const int hc0 = MINB >= 3 ? 2 * t4 : pinned(2 * t4), hc1 = hc0 + 1;
  const float qs0 = hc0 < G ? S.qsum[hc0] : 0.f, qs1 = hc1 < G ? S.qsum[hc1] : 0.f;
  const float sq0 = hc0 < G ? S.sq[hc0] : 0.f, sq1 = hc1 < G ? S.sq[hc1] : 0.f;
  const float cq0 = hc0 < G ? S.cq[hc0] : 0.f, cq1 = hc1 < G ? S.cq[hc1] : 0.f;

  if (a.stop == 1) { __syncthreads(); cluster_sync(cl, C); return; }
  // ---- estimate: 16-row tiles per warp, double-buffered: the loads of kUnroll / 2 tiles are in
  // flight while the previous kUnroll / 2 are multiplied and stored ----
  constexpr int kHalf = kUnroll / 2;
  // Dead rows (-1): the two- and one-block builds keep each tile's rows g and g + 8 for a live flag; the
  // three-block build (80 registers, whose estimate loop spilled for them) gives a dead row the NaN of
  // kDeadScale as its scale instead, so its scores are NaN, which the block max skips (fmaxf) and the
  // softmax maps to 0 (H200, 8 lists x B0 8192: 25.1 -> 23.9 us; the same in the two-block build made
  // it spill and was 1-3% slower at 128-512 lists).
  // The two variants below are written out in full on purpose: sharing their common lines (one
  // shuffle pair, selects on kNanDead) reordered the two-block build's code and made ptxas spill 24
  // bytes in its estimate loop (scripts/cuda_sass.py); written out, that build's SASS is unchanged.
  constexpr bool kNanDead = MINB >= 3;
  constexpr int kFlags = kNanDead ? 1 : kHalf;
  struct Frag {
    typename RB::T ca[kHalf], cb[kHalf];  // code quarters of rows g and g + 8
    float sz[kHalf];                      // lane < 16: scale of row lane, else zero of row lane - 16
    int rg[kFlags], rg8[kFlags];          // rows g and g + 8 (-1: none); unused with kNanDead
  };
  // Per column of this lane (heads hc0, hc1): the running max of its scores and the sum of exp(z - max)
  // rescaled when the max grows (online softmax), so that S needs no pass over the scores later.
  float lmax0 = -INFINITY, lmax1 = -INFINITY, lsum0 = 0.f, lsum1 = 0.f;
  auto online = [&](float& mx, float& sm, float x, float y) {  // x, y: two scores (-inf: none)
    const float mn = fmaxf(mx, fmaxf(x, y));
    if (mn > mx) {  // rare after the first tiles
      sm *= exp_fast(mx - mn);  // mx = -inf: 0 (sm is 0 then)
      mx = mn;
    }
    if (mx > -INFINITY) sm += exp_fast(x - mx) + exp_fast(y - mx);
  };
  const int ntiles = (m + 15) / 16;
  // Per-lane bases, so each load's address is one unsigned wide multiply-add of its row (< 2^31).
  const uint8_t* const k4_lane = opaque(a.k4 + t4 * (D / 8));
  const float* const sz_lane = lane < 16 ? a.k4s : a.k4z;
  auto load = [&](Frag& f, int tile0) {
#pragma unroll
    for (int u = 0; u < kHalf; ++u) {
      const int tile = tile0 + u * kWarps;
      const int jr = tile * 16 + (lane & 15);
      int ri = -1;
      if (tile < ntiles && jr < m) {
        if constexpr (kLean) {  // the row from its page's entry (a candidate past the valid tokens: -1)
          const int e = s_rb[jr / kPageSize], i = jr % kPageSize;
          ri = i <= (e & (kPageSize - 1)) ? (e & ~(kPageSize - 1)) + i : -1;
        } else {
          ri = rowidx[jr];
        }
      }
      // Unconditional loads: a dead row (-1) reads row 0 and its score is -inf by the flag (or NaN by its
      // scale), never by the data (predicated loads with a zero fill cost instructions in this
      // issue-sensitive loop).
      if constexpr (kNanDead) {
        f.sz[u] = *(ri >= 0 ? sz_lane + (uint32_t)ri : &kDeadScale);
        const int rg = __shfl_sync(0xffffffffu, ri, g), rg8 = __shfl_sync(0xffffffffu, ri, g + 8);
        f.ca[u] = __ldg(reinterpret_cast<const typename RB::T*>(k4_lane + (size_t)(uint32_t)max(rg, 0) * (D / 2)));
        f.cb[u] = __ldg(reinterpret_cast<const typename RB::T*>(k4_lane + (size_t)(uint32_t)max(rg8, 0) * (D / 2)));
      } else {
        f.sz[u] = sz_lane[(uint32_t)max(ri, 0)];
        f.rg[u] = __shfl_sync(0xffffffffu, ri, g);
        f.rg8[u] = __shfl_sync(0xffffffffu, ri, g + 8);
        f.ca[u] = __ldg(reinterpret_cast<const typename RB::T*>(k4_lane + (size_t)(uint32_t)max(f.rg[u], 0) * (D / 2)));
        f.cb[u] = __ldg(reinterpret_cast<const typename RB::T*>(k4_lane + (size_t)(uint32_t)max(f.rg8[u], 0) * (D / 2)));
      }
    }
  };
  auto compute = [&](const Frag& f, int tile0) {
    // The tiles' products first, then their scores, so that the kHalf tiles' IMMA chains overlap (ptxas
    // kept each tile's products and scores together, the chains back to back).
    int accs[kHalf][4];
#pragma unroll
    for (int u = 0; u < kHalf; ++u) {
      // Two accumulator chains (even and odd words), summed after: half the dependent IMMA latency.
      int acc[4] = {0, 0, 0, 0}, acc2[4] = {0, 0, 0, 0};
      uint32_t wa[RB::kWords], wb[RB::kWords];
      RB::words(f.ca[u], wa);
      RB::words(f.cb[u], wb);
#pragma unroll
      for (int j = 0; j < RB::kWords; ++j) {  // one code word = 8 dims of rows g and g + 8
        const uint2 bj = bq[j];
        imma16832(j % 2 ? acc2 : acc, wa[j] & 0x0f0f0f0fu, wb[j] & 0x0f0f0f0fu, (wa[j] >> 4) & 0x0f0f0f0fu,
                  (wb[j] >> 4) & 0x0f0f0f0fu, bj.x, bj.y);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) accs[u][i] = acc[i] + acc2[i];
    }
#pragma unroll
    for (int u = 0; u < kHalf; ++u) {
      const int tile = tile0 + u * kWarps;
      const int (&acc)[4] = accs[u];
      const float sc_g = __shfl_sync(0xffffffffu, f.sz[u], g), zp_g = __shfl_sync(0xffffffffu, f.sz[u], 16 + g);
      const float sc_g8 = __shfl_sync(0xffffffffu, f.sz[u], g + 8), zp_g8 = __shfl_sync(0xffffffffu, f.sz[u], 24 + g);
      if (tile >= ntiles) continue;
      const int j0 = tile * 16 + g, j1 = j0 + 8;
      // z = fma(scale, fma(sq, dot, cq), zero * qsum): the CPU estimate's operations (pruner.h), then
      // rounded to fp16 in pairs (heads hc0, hc1), at most 65504 (rounding after the clamp is the same:
      // a NaN-preserving min, so the three-block build's dead rows stay NaN). The others' dead rows
      // are -inf after it.
      const __half2 kHi = __floats2half2_rn(65504.f, 65504.f);
      __half2 h0 = __floats2half2_rn(fmaf(sc_g, fmaf(sq0, (float)acc[0], cq0), zp_g * qs0),
                                     fmaf(sc_g, fmaf(sq1, (float)acc[1], cq1), zp_g * qs1));
      __half2 h1 = __floats2half2_rn(fmaf(sc_g8, fmaf(sq0, (float)acc[2], cq0), zp_g8 * qs0),
                                     fmaf(sc_g8, fmaf(sq1, (float)acc[3], cq1), zp_g8 * qs1));
      h0 = __hmin2_nan(h0, kHi);
      h1 = __hmin2_nan(h1, kHi);
      if constexpr (!kNanDead) {
        const __half2 kDead = __floats2half2_rn(-INFINITY, -INFINITY);
        h0 = f.rg[u] >= 0 ? h0 : kDead;
        h1 = f.rg8[u] >= 0 ? h1 : kDead;
      }
      if (hc0 < G) {  // a column hc1 >= G is padding of the token's Gp slots
        if (j0 < m) *reinterpret_cast<__half2*>(zh + (j0 << gsh) + hc0) = h0;
        if (j1 < m) *reinterpret_cast<__half2*>(zh + (j1 << gsh) + hc0) = h1;
        float2 a = __half22float2(h0), c = __half22float2(h1);
        if (j0 >= m) a = make_float2(-INFINITY, -INFINITY);
        if (j1 >= m) c = make_float2(-INFINITY, -INFINITY);
        if constexpr (kNanDead) {  // the max only (fmaxf skips a dead row's NaN); S in a pass below
          lmax0 = fmaxf(lmax0, fmaxf(a.x, c.x));
          lmax1 = fmaxf(lmax1, fmaxf(a.y, c.y));
        } else {
          online(lmax0, lsum0, a.x, c.x);
          online(lmax1, lsum1, a.y, c.y);
        }
      }
    }
  };
  {
    constexpr int kStep = kWarps * kHalf;  // tiles per half step of the whole block
    Frag fa, fb;
    load(fa, warp);
    for (int tile0 = warp; tile0 < ntiles; tile0 += 2 * kStep) {
      load(fb, tile0 + kStep);
      compute(fa, tile0);
      load(fa, tile0 + 2 * kStep);  // past the end: dead rows (row 0, L2-resident)
      compute(fb, tile0 + kStep);
    }
  }
  // The compaction's tokens, loaded now for the phases below to hide: warp w's segment [s0, s1) of
  // the block's slice (a multiple of 32 long), kPre per lane at most; the rest load in the compaction.
  const int seg = ((m + kWarps - 1) / kWarps + 31) & ~31;
  const int s0 = min(m, warp * seg), s1 = min(m, s0 + seg);
  constexpr int kPre = MINB >= 3 || kPages ? 0 : 16;  // none at three blocks per SM (they would spill), nor
                                                     // for page input (the tokens come from shared memory)
  int32_t pre_tok[kPre > 0 ? kPre : 1];
#pragma unroll
  for (int u = 0; u < kPre; ++u) {
    const int j = s0 + 32 * u + lane;
    pre_tok[u] = j < s1 ? tok_at(j) : 0;
  }
  // Block max per head: over the lanes of one column (xor over g), then over warps.
  float bmax0 = lmax0, bmax1 = lmax1;
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    bmax0 = fmaxf(bmax0, __shfl_xor_sync(0xffffffffu, bmax0, o));
    bmax1 = fmaxf(bmax1, __shfl_xor_sync(0xffffffffu, bmax1, o));
  }
  if (lane < 4) {
    if (hc0 < kMaxGroup) S.wred[warp][hc0] = bmax0;
    if (hc1 < kMaxGroup) S.wred[warp][hc1] = bmax1;
  }
  __syncthreads();
  // Token input: every warp is past the estimate, the last reader of the row indices under the
  // histograms; the barrier below orders the clearing before the weights pass's first adds.
  if constexpr (!kLean)
    for (int i = tid; i < 6 * kBins; i += kThreads) histA[i] = 0u;
  if (tid < G) {
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, S.wred[w][tid]);
    S.cmax[tid] = mx;
    if (C == 1) S.gmax[tid] = mx;  // a block alone is the list: no exchange below
  }
  __syncthreads();

  if (a.stop == 2) { __syncthreads(); cluster_sync(cl, C); return; }
  // ---- softmax statistics: the cluster's max M per head first (one exchange), then the lanes' online
  // sums rescaled to it (a second exchange gives S); exponents below -87 give 0 (fast_exp.h's rule). Only cluster-wide values enter e, so equal
  // scores get equal e in every block: exact ties stay ties (a per-block max, rescaled later by
  // exp(M_c - M), rounded differently per block and split tie groups across blocks). ----
  if (C > 1) {
    cl.sync();  // every block's max is published
    if (tid < G) {
      float mx = -INFINITY;
      for (int r = 0; r < C; ++r) mx = fmaxf(mx, cl.map_shared_rank(S.cmax, r)[tid]);
      S.gmax[tid] = mx;
    }
    __syncthreads();
  }
  // The weights pass below takes one 16-byte unit of scores (8 / Gp whole tokens) per thread at a
  // time: these phases are latency-bound, and a vector load is the one way to get several
  // shared-memory values in flight that the scheduler does not pull apart. A unit's tokens past m
  // count 0. (A separate pass for S, e = exp(z - M) taken twice as fp16 scores leave no room to
  // store it, made this phase 2.7 / 4 us slower at 128 / 256 lists x B0 8192; hence the online sums.)
  float gmr[kMaxGroup];
#pragma unroll
  for (int r = 0; r < kMaxGroup; ++r) gmr[r] = r < G ? S.gmax[r] : 0.f;
  auto e_of = [&](uint32_t word, int k, int r) {  // half k % 2 of `word`, head r (compile-time k, r)
    const float x = __half2float(__ushort_as_half((unsigned short)(k % 2 ? word >> 16 : word & 0xffffu))) - gmr[r];
    const bool low = kNanDead ? !(x >= -87.f) : x < -87.f;  // kNanDead: a NaN (dead row) gives 0 too
    return (low || gmr[r] == -INFINITY) ? 0.f : exp_fast(x);
  };
  const int nunits = (m + (8 >> gsh) - 1) >> (3 - gsh);  // units covering [0, m)
  const uint4* const zu = reinterpret_cast<const uint4*>(zb);
  auto by_group = [&](auto pass) {  // the pass with Gp as a compile-time constant
    if (gsh == 1)
      pass(std::integral_constant<int, 2>{});
    else if (gsh == 2)
      pass(std::integral_constant<int, 4>{});
    else
      pass(std::integral_constant<int, 8>{});
  };
  // S per head: each lane's online sum rescaled to the cluster's max, summed over the column's lanes
  // and then over warps. (A rescaled sum rounds differently from the CPU's sum of exp(z - M) in its
  // order, as any GPU order does: the float sum is the definition's, not its bits.) The three-block
  // build (80 registers: the online sums made its estimate loop spill) sums in a pass over the scores.
  if constexpr (kNanDead) {
    by_group([&](auto gp) {
      constexpr int GP = decltype(gp)::value, T = 8 / GP;
      float ls[GP];
#pragma unroll
      for (int r = 0; r < GP; ++r) ls[r] = 0.f;
#pragma unroll 2
      for (int i = tid; i < nunits; i += kThreads) {
        const uint4 u4 = zu[i];
        const uint32_t wd[4] = {u4.x, u4.y, u4.z, u4.w};
#pragma unroll
        for (int k = 0; k < 8; ++k)
          if (k % GP < G && i * T + k / GP < m) ls[k % GP] += e_of(wd[k / 2], k, k % GP);
      }
#pragma unroll
      for (int r = 0; r < GP; ++r) {
        if (r >= G) break;
        const float sr = warp_sum(ls[r]);
        if (lane == 0) S.wred[warp][r] = sr;
      }
    });
  } else {
    const float gm0 = hc0 < G ? S.gmax[hc0] : -INFINITY, gm1 = hc1 < G ? S.gmax[hc1] : -INFINITY;
    float c0 = lmax0 > -INFINITY && gm0 > -INFINITY ? lsum0 * exp_fast(lmax0 - gm0) : 0.f;
    float c1 = lmax1 > -INFINITY && gm1 > -INFINITY ? lsum1 * exp_fast(lmax1 - gm1) : 0.f;
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      c0 += __shfl_xor_sync(0xffffffffu, c0, o);
      c1 += __shfl_xor_sync(0xffffffffu, c1, o);
    }
    if (lane < 4) {  // (the block max's readers of S.wred passed a barrier since)
      if (hc0 < G) S.wred[warp][hc0] = c0;
      if (hc1 < G) S.wred[warp][hc1] = c1;
    }
  }
  __syncthreads();
  // 1 / (S G) of head tid from the list's exp sum S (0 for a head without a finite score).
  auto ginv_of = [&](float sr) { return S.gmax[tid] != -INFINITY ? 1.f / (sr * (float)G) : 0.f; };
  if (tid < G) {
    float sr = 0.f;
    for (int w = 0; w < kWarps; ++w) sr += S.wred[w][tid];
    S.csum[tid] = sr;
    if (C == 1) S.ginv[tid] = ginv_of(sr);
  }
  // Written out for C > 1 only: block_field's loop for every C compiled to ~170 more instructions.
  if (C > 1) {
    cl.sync();  // every block's sum is published (and every remote read of cmax is done)
    if (tid < G) {
      float sr = 0.f;
      for (int r = 0; r < C; ++r) sr += cl.map_shared_rank(S.csum, r)[tid];  // block order: the same in every block
      S.ginv[tid] = ginv_of(sr);
    }
  }
  __syncthreads();

  // ---- group weights w = sum_r exp(z_r - M_r) / (S_r G) (the CPU's operations: e * (1 / (S G))),
  // over the start of the score area; the level-1 histogram of the top-p select is built in the same
  // pass. A unit's weights overlay units at or before it (4 bytes per token over 2 Gp >= 4), so a
  // barrier between a round's reads and its writes is all the ordering needed. ----
  uint32_t* const hist[2] = {histA, histB};
  const bool topp = a.p < 1.f;
  {
    float gi[kMaxGroup];
#pragma unroll
    for (int r = 0; r < kMaxGroup; ++r) gi[r] = r < G ? S.ginv[r] : 0.f;
    by_group([&](auto gp) {
      constexpr int GP = decltype(gp)::value, T = 8 / GP, kU = 4;  // kU units per thread and round
#pragma unroll 1
      for (int base = 0; base < nunits; base += kU * kThreads) {  // block-uniform rounds
        float w[kU][T];
#pragma unroll
        for (int v = 0; v < kU; ++v) {  // kU independent units in flight
          const int i = base + v * kThreads + tid;
          const uint4 u4 = i < nunits ? zu[i] : make_uint4(0u, 0u, 0u, 0u);
          const uint32_t wd[4] = {u4.x, u4.y, u4.z, u4.w};
#pragma unroll
          for (int t = 0; t < T; ++t) {
            w[v][t] = 0.f;
#pragma unroll
            for (int r = 0; r < GP; ++r)  // the CPU's order: head 0 first
              if (r < G) w[v][t] += e_of(wd[(t * GP + r) / 2], t * GP + r, r) * gi[r];
            if (i * T + t >= m) w[v][t] = 0.f;  // past the slice (and past the last unit): 0, never kept
          }
        }
        __syncthreads();  // every unit of the round is read before a weight overlays one
#pragma unroll
        for (int v = 0; v < kU; ++v) {
          const int i = base + v * kThreads + tid;
          if (i >= nunits) break;
          if constexpr (T == 4)
            reinterpret_cast<float4*>(ws)[i] = make_float4(w[v][0], w[v][1], w[v][2], w[v][3]);
          else if constexpr (T == 2)
            reinterpret_cast<float2*>(ws)[i] = make_float2(w[v][0], w[v][1]);
          else
            ws[i] = w[v][0];
          if (topp) {
#pragma unroll
            for (int t = 0; t < T; ++t)
              hist_add(histA, (__float_as_uint(w[v][t]) >> 20) & (kBins - 1), w[v][t], true);  // past m: adds 0
          }
        }
      }
    });
  }
  __syncthreads();

  int next = 0;
  const bool forced_here = cur_is_cand && beg + m == n;  // the current token is this block's last entry

  if (a.stop == 3) { __syncthreads(); cluster_sync(cl, C); return; }
  // ---- top-p threshold (keys of positive weights; zeros never kept) ----
  uint32_t tau_key = 1u;  // p = 1: every positive weight
  if (topp) {
    // Target p * total, the total being the level-1 histograms' sum (topp.cpp does the same).
    auto key_fn = [&](int, float w, uint32_t& k) {
      k = __float_as_uint(w);
      return k != 0u;
    };
    u64 above;
    bool found = false;
    // Only the 16-warp build has the path (the plan sets wall_off for no other): the others' registers
    // and spills stay as they were.
    if constexpr (MINB == 1) if (C > 1 && a.wall_off > 0) {
      // Every block of the cluster copies the whole list's weights (its own and, through distributed
      // shared memory, the others': nothing writes them after the weights pass) and selects over them
      // alone: one cluster barrier and one remote read of each weight, instead of a barrier and every
      // block's three histograms per level. The level-1 histogram gets the other blocks' weights added
      // to this block's. Integer masses: every block finds the same threshold, the cluster's.
      float* const wall = reinterpret_cast<float*>(smem_raw + a.wall_off);
      cl.sync();  // every block's weights are complete
      for (int r = 0; r < C; ++r) {
        const int rb = min(n, r * per), rm = min(n, rb + per) - rb;
        const float* const wr = r == rank ? ws : cl.map_shared_rank(ws, r);
        for (int j = 4 * tid; j < rm; j += 4 * kThreads) {
          const float4 w4 = *reinterpret_cast<const float4*>(wr + j);
          const float wv[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            if (j + u >= rm) break;
            wall[rb + j + u] = wv[u];
            if (r != rank) hist_add(histA, (__float_as_uint(wv[u]) >> 20) & (kBins - 1), wv[u]);
          }
        }
      }
      __syncthreads();
      tau_key = radix_select<kThreads, true>(cl, S, wall, n, key_fn, false, true, (double)a.p, 0ull, hist, next, above);
      found = true;
    }
    if (!found) tau_key = radix_select<kThreads>(cl, S, ws, m, key_fn, false, true, (double)a.p, 0ull, hist, next, above);
    if (tau_key == 0u) tau_key = 1u;
  }

  if (a.stop == 4) { __syncthreads(); cluster_sync(cl, C); return; }
  // ---- keep flags (at byte 4 npad of the score area, dead scores by now); count and kept mass published
  // to the cluster together ----
  // Warp w owns the contiguous segment [s0, s1) of the block's slice (a multiple of 32 long): counts
  // and the ordered output go 32 list entries at a time (ballots; coalesced, no bank conflicts).
  // The first count takes the keep test from the threshold and writes the flags of its own warp's
  // segment as it goes (no separate flags pass); floor / cap rewrite the flags and count from them.
  int warp_off = 0;  // this warp's first output slot within the block's
  // keep(j, w, flag) decides entry j (weight w, stored flag) from registers; write_flags stores the
  // decisions as flags. Four consecutive entries per lane (16-byte loads and stores; s0 is a multiple of
  // 32, the padding past m is readable), the warp's count summed over its lanes.
  auto count_and_publish = [&](auto keep, bool write_flags) {
    int cnt = 0;
    u64 lm = 0;
#pragma unroll 1
    for (int j = s0 + 4 * lane; j < s1; j += 4 * 32) {
      const float4 w4 = *reinterpret_cast<const float4*>(ws + j);
      const float wv[4] = {w4.x, w4.y, w4.z, w4.w};
      int4 f4 = write_flags ? make_int4(0, 0, 0, 0) : *reinterpret_cast<const int4*>(flag + j);
      int fv[4] = {f4.x, f4.y, f4.z, f4.w};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const bool f = j + u < s1 && keep(j + u, wv[u], fv[u]);
        fv[u] = f;
        cnt += f;
        if (f) lm += fixed_mass(wv[u]);
      }
      if (write_flags) *reinterpret_cast<int4*>(flag + j) = make_int4(fv[0], fv[1], fv[2], fv[3]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) lm += __shfl_xor_sync(0xffffffffu, lm, o);
    __syncthreads();  // earlier readers of ired / ured are done
    if (lane == 0) S.ired[warp] = cnt, S.ured[warp] = lm;
    __syncthreads();
    int off = 0, tot = 0;
    u64 mtot = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) off += S.ired[w];
      tot += S.ired[w];
      mtot += S.ured[w];  // integers: exact in any order
    }
    warp_off = off;
    if (tid == 0) S.ccount = tot, S.cmass = mtot;
    cluster_sync(cl, C);
  };
  count_and_publish(
      [&](int j, float w, int32_t) {
        const uint32_t k = __float_as_uint(w);
        return (k >= tau_key && k != 0u) || (forced_here && j == m - 1);
      },
      true);
  // The cluster's counts and kept mass, and this block's output offset (read again after floor / cap).
  int kept, off;
  u64 mass;
  auto gather_counts = [&]() {
    kept = off = 0;
    mass = 0;
    for (int r = 0; r < C; ++r) {
      const int cr = *block_field(cl, C, &S.ccount, r);
      if (r < rank) off += cr;
      kept += cr;
      mass += *block_field(cl, C, &S.cmass, r);
    }
  };
  gather_counts();

  // ---- floor / cap: the k heaviest (current token first, ties by lower list index) ----
  const int size = kept + extra;
  const bool need_floor = a.min_tokens > size && kept < n;
  const bool need_cap = a.max_tokens > 0 && size > a.max_tokens;
  if (need_floor || need_cap) {
    cluster_sync(cl, C);  // every block has read the counts above before S.ccount is written again
    const int k = min(max((need_cap ? a.max_tokens : a.min_tokens) - extra, 0), n);
    auto prio_of = [&](int j, float w) -> uint32_t {  // entry j's rank key, w its weight
      return (forced_here && j == m - 1) ? kPrioKey : __float_as_uint(w);
    };
    auto prio = [&](int j) { return prio_of(j, ws[j]); };
    if (k == 0) {
      for (int j = tid; j < m; j += kThreads) flag[j] = 0;
    } else {
      auto key_fn = [&](int j, float w, uint32_t& kk) {
        kk = prio_of(j, w);
        return true;
      };
      u64 above;
      const uint32_t vk = radix_select<kThreads>(cl, S, ws, m, key_fn, true, false, 0.0, (u64)k, hist, next, above);
      const int need = k - (int)above;  // ties at vk to keep, lowest list index first
      // Ties in list order: this block's offset among the cluster's ties, then an ordered block scan.
      int nt = 0;
      for (int j = tid; j < m; j += kThreads) nt += prio(j) == vk;
      int ttot;
      (void)block_scan_excl_int<kThreads>(nt, &ttot, S);
      if (tid == 0) S.ccount = ttot;
      __syncthreads();
      cluster_sync(cl, C);
      int toff = 0;
      for (int r = 0; r < rank; ++r) toff += *block_field(cl, C, &S.ccount, r);
      __syncthreads();
      cluster_sync(cl, C);  // every block has read S.ccount before it is reused below
      for (int base = 0; base < m; base += kThreads) {
        const int j = base + tid;
        const uint32_t kk = j < m ? prio(j) : 0u;
        const bool tie = j < m && kk == vk;
        int rtot;
        const int r = block_scan_excl_int<kThreads>(tie ? 1 : 0, &rtot, S);
        if (j < m) flag[j] = kk > vk || (tie && toff + r < need);
        toff += rtot;
      }
    }
    __syncthreads();
    count_and_publish([&](int, float, int32_t fl) { return fl != 0; }, false);
    gather_counts();
  }
  if (rank == 0 && tid == 0) {
    a.out_count[list] = kept + extra;
    if (a.est_mass) a.est_mass[list] = (float)((double)mass * kFixedUnit);
  }

  if (a.stop == 5) { __syncthreads(); cluster_sync(cl, C); return; }
  // ---- ordered compaction of the kept positions ----
  // 8 x 32 entries per round: the preloaded tokens first, then rounds whose token loads are in flight
  // together (stores could alias them).
  int o = off + warp_off;
  auto emit = [&](const bool (&f)[8], const int32_t (&tk)[8]) {
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const uint32_t bal = __ballot_sync(0xffffffffu, f[u]);
      if (f[u]) out_toks[o + __popc(bal & ((1u << lane) - 1u))] = tk[u];
      o += __popc(bal);
    }
  };
#pragma unroll
  for (int rr = 0; rr < kPre / 8; ++rr) {
    const int base = s0 + rr * 8 * 32;
    if (base >= s1) break;  // warp-uniform
    bool f[8];
    int32_t tk[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int j = base + 32 * u + lane;
      f[u] = j < s1 && flag[j];
      tk[u] = pre_tok[8 * rr + u];
    }
    emit(f, tk);
  }
  for (int base = s0 + kPre * 32; base < s1; base += 8 * 32) {
    bool f[8];
    int32_t tk[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int j = base + 32 * u + lane;
      f[u] = j < s1 && flag[j];
      tk[u] = f[u] ? tok_at(j) : 0;
    }
    emit(f, tk);
  }
  if (rank == C - 1 && tid == 0 && extra) out_toks[kept] = cur;  // every candidate is < cur: still ascending
  // No block leaves while others may read its shared memory. Their last remote reads (the counts)
  // have returned values long used, so a relaxed arrive suffices: no fence for the output stores.
  if (C > 1) asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
}

struct Shape {
  int d, G;
};

Shape check_args(const PagedKV& kv, int in_capacity, const PruneParams& prm) {
  check_config(kv);  // head dim, dtype, group size, batch, pointers
  const int G = kv.n_heads / kv.n_kv_heads;
  TW_CHECK(kv.n_pages * kv.n_kv_heads * kPageSize < (int64_t(1) << 31), "pruner (CUDA): ", kv.n_pages,
           " pages x ", kv.n_kv_heads, " kv heads exceed the 32-bit row index");
  TW_CHECK(prm.p > 0.f && prm.p <= 1.f, "pruner (CUDA): p = ", prm.p, " is not in (0, 1]");
  TW_CHECK(prm.min_tokens >= 0 && prm.max_tokens >= 0, "pruner (CUDA): negative floor or cap");
  TW_CHECK(prm.max_tokens == 0 || prm.max_tokens >= prm.min_tokens, "pruner (CUDA): cap ", prm.max_tokens,
           " below floor ", prm.min_tokens);
  TW_CHECK(in_capacity > 0, "pruner (CUDA): I0 capacity ", in_capacity, " must be positive");
  return {kv.head_dim, G};
}

// The score area ([npad][Gp] fp16 scores, later the weights and the flags: at least 8 bytes per entry),
// then token input's row indices with the two histogram sets over them (the larger of the two), or page
// input's two histogram sets and the block's pages and a row base per page (chunk / 16 each).
size_t smem_for(int G, int chunk, bool pages, int* npad_out) {
  const int npad = (chunk + 31) / 32 * 32;
  if (npad_out) *npad_out = npad;
  const size_t hist = (size_t)2 * 3 * kBins * 4;
  return ((sizeof(Small) + 15) & ~size_t(15)) + (size_t)npad * score_entry_bytes(score_slots_log2(G)) +
         (pages ? (size_t)chunk / kPageSize * 8 + hist : std::max((size_t)chunk * 4, hist));  // token: rows under the histograms
}

// The kernel for a plan, its attributes set once (the largest shared memory any plan may ask,
// clusters up to 16); not stream work, and done once, so graph captures stay free of it. No carveout
// preference: the maximal one (set before) left a 16-warp block of 190 KB (G 4) 28 KB of L1, where the
// driver's own choice can leave 60 (the 196-KB configuration); that made the estimate faster, likely
// because its loads in flight take L1 lines (H200, 128 / 256 / 512 lists x B0 8192: 43.6 / 81.9 /
// 158.0 -> 41.8 / 78.2 / 151.6 us; 8 lists, three smaller blocks per SM, unchanged). With fp16 scores
// a G 4 block of 8192 on page input is ~94 KB, two per SM.
template <bool P>
void (*kernel_of(int head_dim, int per_sm))(Args) {
  return per_sm == 3   ? (head_dim == 128 ? prune_kernel<128, 3, P> : prune_kernel<64, 3, P>)
         : per_sm == 2 ? (head_dim == 128 ? prune_kernel<128, 2, P> : prune_kernel<64, 2, P>)
                       : (head_dim == 128 ? prune_kernel<128, 1, P> : prune_kernel<64, 1, P>);
}

void (*kernel_for(int head_dim, const PrunePlan& plan))(Args) {
  const int per_sm = plan.per_sm;
  void (*kern)(Args) = plan.pages ? kernel_of<true>(head_dim, per_sm) : kernel_of<false>(head_dim, per_sm);
  static std::once_flag once[12];
  std::call_once(once[(plan.pages ? 6 : 0) + (head_dim == 128 ? 3 : 0) + per_sm - 1], [kern] {
    int dev = 0, optin = 0;
    TW_CUDA_CHECK(cudaGetDevice(&dev));
    TW_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    TW_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    TW_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  });
  return kern;
}

// The plan's launch: a cluster of plan.cluster blocks per list; `attr` must outlive the config.
cudaLaunchConfig_t launch_config(const PrunePlan& plan, const PagedKV& kv, cudaStream_t stream,
                                 cudaLaunchAttribute& attr) {
  return cluster_launch(dim3(plan.cluster, kv.n_kv_heads, kv.batch), plan.threads, plan.cluster,
                        plan.smem_bytes, stream, attr);
}

}  // namespace

PrunePlan prune_plan_for(const PagedKV& kv, int in_capacity, const PruneParams& prm, int sms, int optin, bool pages) {
  const Shape sh = check_args(kv, in_capacity, prm);
  TW_CHECK(sms > 0 && optin > 0, "pruner (CUDA): ", sms, " SMs, ", optin, " bytes of shared memory per block");
  TW_CHECK(!pages || in_capacity % kPageSize == 0, "pruner (CUDA): page input of ", in_capacity,
           " tokens, not whole pages");
  // Blocks per list: from a target of tokens per block, then more until a block's slice fits
  // kMaxChunk and, preferably, the shared memory of the target's blocks per SM, else up to the opt-in
  // limit. The target (H200, G 4, B0 8192, the plans timed side by side; BENCHMARKS):
  //  - blocks of 2048 in clusters (three per SM) while those fill at most half the SMs (one or two
  //    sequences), so that the estimate runs on many SMs (8 lists: 22.2 us, against 25.9 for clusters
  //    of two blocks of 4096);
  //  - clusters of two blocks of 4096 while those blocks fit one per SM: 32 / 64 lists 26.2 / 30.0 us,
  //    against 28.9 / 40.9 for clusters of 2048, whose threshold exchange grows with the cluster;
  //  - beyond, a whole list in one block: the same 16 warps per SM as two 8-warp blocks of a cluster,
  //    without cluster barriers or remote reads (96 / 256 lists 39.9 / 85.7 us, against 42.3 / 88.0
  //    for clusters of 4096). One 8-warp block where the list fits two (or three) per SM, else one
  //    16-warp block (past the two-block limit): the same warps per SM, but past a wave of lists the
  //    smaller blocks hold twice the lists at once, so each wave's latency-bound phases are paid half
  //    as often (B0 4096: 256 / 512 lists 48.6 / 93.2 -> 40.6 / 76.6 us; 128 lists level).
  // At G 6 blocks of 2048 do not fit three per SM; forcing smaller ones was slower (Qwen 1.5B shape,
  // 32 lists: 39.5 -> 45.3 us).
  auto chunk_of = [&](int c) { return ((in_capacity + c - 1) / c + 15) / 16 * 16; };  // per block
  const int64_t lists = (int64_t)kv.batch * kv.n_kv_heads;
  // These thresholds for 2049-8192 candidates (the range measured); other capacities keep the earlier
  // rule: blocks of 2048 while they fit one wave at three per SM, whole lists from 7/8 of a wave.
  const int c2k = std::min((in_capacity + 2047) / 2048, kMaxCluster), c4k = (in_capacity + 4095) / 4096;
  const bool mid = c2k > 1 && in_capacity <= kMaxChunk;
  const bool few = (mid ? 2 * lists * c2k <= sms : lists * c2k <= 3 * sms) &&
                   smem_for(sh.G, chunk_of(c2k), true, nullptr) <= kThreeBlockSmem;
  // Whole lists, each in one block (8 or 16 warps: below).
  const bool whole = !few && (mid ? lists * c4k > sms : lists * 8 >= 7 * sms) && in_capacity <= kMaxChunk &&
                     smem_for(sh.G, chunk_of(1), true, nullptr) <= (size_t)optin;
  static const int tpb_knob = bench_knob("TW_PRUNE_TOKENS_PER_BLOCK"), smem_knob_kb = bench_knob("TW_PRUNE_SMEM_KB"),
                   threads_knob = bench_knob("TW_PRUNE_THREADS"),  // 512 / 256: 16 / 8 warps (A/B runs)
                   per_sm_knob = bench_knob("TW_PRUNE_PER_SM");     // 3 / 2: the 8-warp build (A/B runs)
  // Lists longer than a block's kMaxChunk: blocks of kMaxChunk, the fewest per cluster (each block
  // reads every other block's histograms in every radix level), from 32 such blocks on; below, the
  // few-sequence rule's blocks of 2048 spread the estimate over more SMs. H200, B0 32768 at G 4,
  // clusters of 4 x 8192 (16-warp blocks) against 8 x 4096 (two per SM) and 16 x 2048 (three per SM):
  // 8 lists 39.4 / 45.4 / 92.4 us, 24 lists 44.8 / 68.8 / 224, 128 lists 217 / 308 / 871, 512 lists
  // 792 / 1098 / 3266; B0 16384: 16 lists 36.0 (2 x 8192) against 45.5 (8 x 2048), but 8 lists (16
  // blocks of 8192) 34.7 against 32.1.
  const int c8k = (in_capacity + kMaxChunk - 1) / kMaxChunk;
  const bool long_lists = in_capacity > kMaxChunk && (!few || lists * c8k >= 32);
  const int tpb = tpb_knob >= 256 ? tpb_knob
                  : long_lists ? kMaxChunk
                  : few ? 2048
                  : whole ? kMaxChunk
                  : 4096;
  const int cmin = std::clamp((in_capacity + tpb - 1) / tpb, 1, kMaxCluster);
  const size_t first_limit = smem_knob_kb > 0 ? size_t(smem_knob_kb) << 10
                             : tpb <= 2048    ? kThreeBlockSmem
                             : tpb <= 4096    ? kTwoBlockSmem
                                              : (size_t)optin;
  for (size_t limit : {first_limit, (size_t)optin}) {
    for (int c = cmin; c <= kMaxCluster; ++c) {
      const int chunk = chunk_of(c);
      // Decided on page input's size (the Twilight step's); token input (its row indices under the
      // histograms: at most 3.5 bytes more per candidate, none up to 6144 candidates) takes the same
      // plan, so both give the same output bit for bit (the softmax sums' order follows the block's
      // threads), at fewer blocks per SM only where its size exceeds the target.
      const size_t smem = smem_for(sh.G, chunk, true, nullptr);
      if (chunk <= kMaxChunk && smem <= limit) {
        // Past the two-block limit (a block has an SM to itself): the 16-warp build; also while the
        // blocks do not outnumber the SMs (each SM holds one block then: 16 warps give it all the SM's
        // warps, 8 leave half idle). H200, prune µs, 8 / 16 warps: G 4 B0 8192, 32 lists (clusters of
        // 2 x 4096) 31.7 / 27.1, 64 lists 34.6 / 30.2, 16 lists (4 x 2048) 25.2 / 24.8; G 6 (Qwen 1.5B
        // dump), 32 / 48 lists 33.6 / 28.0, 35.3 / 29.7.
        const int64_t blocks = lists * c;
        const bool sm_each = blocks <= sms;
        const bool knob16 = threads_knob == 512, knob8 = threads_knob == 256 && smem <= kTwoBlockSmem;
        const int threads = knob16 || (!knob8 && (smem > kTwoBlockSmem || sm_each)) ? threads_of(1) : threads_of(2);
        // 8-warp blocks: the three-block build (80 registers) only where a third block per SM saves a
        // wave and the slices are small, chunk x (G + 1) <= 12288 (those whose fp32 scores fitted three
        // per SM, where it was measured); else the two-block build, which is faster per block (H200,
        // 512 lists of 2048 at G 4, two waves either way: 55.9 us three per SM, 47.7 two; clusters of
        // 2 x 4096 at G 4, 32 / 64 lists: the three-block build was 4.4 / 5.5 us slower).
        const bool saves_wave = (blocks + 3 * sms - 1) / (3 * sms) < (blocks + 2 * sms - 1) / (2 * sms);
        const bool three = smem <= kThreeBlockSmem && chunk * (sh.G + 1) <= 12288 &&
                           (per_sm_knob == 3 || (per_sm_knob != 2 && saves_wave));
        const int per_sm = threads == threads_of(1) ? 1 : three ? 3 : 2;
        PrunePlan plan{c, chunk, pages ? smem : smem_for(sh.G, chunk, false, nullptr), threads, per_sm, pages};
        // The whole-list threshold (pruner.cu, top-p) for clusters of four or more 16-warp blocks, which
        // have an SM each, so the list's weights (4 bytes per candidate) cost no occupancy. H200, B0 8192
        // at G 4, exchange -> whole list: 8 / 16 lists (clusters of four blocks of 2048; the threshold
        // was 8.7 of 23.5 us) 23.1 / 23.5 -> 21.9 / 22.3 us, but 32 lists (two blocks of 4096, whose
        // exchange reads one other block) 25.3 -> 26.0, and the Qwen 1.5B shape at batch 16 (32 lists of
        // two blocks) 2-3 us slower. TW_PRUNE_CLUSTER_TOPP=1 keeps the exchange (A/B runs).
        static const bool cluster_topp = bench_knob("TW_PRUNE_CLUSTER_TOPP") > 0;
        const size_t wall_off = (plan.smem_bytes + 15) & ~size_t(15);
        const size_t wall_bytes = (size_t)(in_capacity + 3) / 4 * 16;
        if (!cluster_topp && c >= 4 && per_sm == 1 && in_capacity <= kMaxChunk && wall_off + wall_bytes <= (size_t)optin) {
          plan.wall_off = wall_off;
          plan.smem_bytes = wall_off + wall_bytes;
        }
        return plan;
      }
    }
  }
  fail("pruner (CUDA): I0 capacity ", in_capacity, " with group size ", sh.G, " does not fit ", kMaxCluster,
       " blocks of shared memory");
}

PrunePlan prune_plan(const PagedKV& kv, int in_capacity, const PruneParams& prm, bool pages) {
  int dev = 0, optin = 0;
  TW_CUDA_CHECK(cudaGetDevice(&dev));
  TW_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return prune_plan_for(kv, in_capacity, prm, sm_count(), optin, pages);
}

namespace {

// in_tokens / in_count: the I0 lists, in_cap tokens each (page input: in_cap / 16 pages).
void launch_prune(const PagedKV& kv, const KeySideDev& ks, const float* q, const int32_t* in_count,
                  const int32_t* in_tokens, int in_cap, bool pages, const PruneParams& prm, const TokenLists& out,
                  float* est_mass, cudaStream_t stream) {
  const PrunePlan plan = prune_plan(kv, in_cap, prm, pages);
  TW_CHECK(ks.k4 && ks.k4_scale && ks.k4_zero, "pruner (CUDA): null INT4 key mirror");
  TW_CHECK(q, "pruner (CUDA): null query");
  TW_CHECK(in_count && in_tokens && out.count && out.tokens, "pruner (CUDA): null ", pages ? "page" : "token",
           " lists");
  const int need_out = prm.max_tokens > 0 ? std::min(prm.max_tokens, in_cap + 1) : in_cap + 1;
  TW_CHECK(out.capacity >= need_out, "pruner (CUDA): output capacity ", out.capacity, " < ", need_out,
           " (I0 capacity + the current token)");

  Args a{};
  a.page_table = kv.page_table;
  a.seq_len = kv.seq_len;
  a.k4 = ks.k4;
  a.k4s = ks.k4_scale;
  a.k4z = ks.k4_zero;
  a.q = q;
  a.in_count = in_count;
  a.in_tokens = in_tokens;
  a.out_count = out.count;
  a.out_tokens = out.tokens;
  a.est_mass = est_mass;
  a.n_pages = kv.n_pages;
  a.max_pages = kv.max_pages;
  a.n_kv_heads = kv.n_kv_heads;
  a.group = kv.n_heads / kv.n_kv_heads;
  a.in_cap = in_cap;
  a.in_stride = pages ? in_cap / kPageSize : in_cap;
  a.out_cap = out.capacity;
  a.p = prm.p;
  a.min_tokens = prm.min_tokens;
  a.max_tokens = prm.max_tokens;
  a.chunk = plan.chunk;
  static const int stop = bench_knob("TW_PRUNE_STOP_AFTER");
  a.stop = stop;
  a.wall_off = (int)plan.wall_off;
  smem_for(a.group, plan.chunk, pages, &a.npad);

  void (*kern)(Args) = kernel_for(kv.head_dim, plan);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = launch_config(plan, kv, stream, attr);
  TW_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, a));
}

}  // namespace

void prune_topp(const PagedKV& kv, const KeySideDev& ks, const float* q, const TokenLists& in,
                const PruneParams& prm, const TokenLists& out, float* est_mass, cudaStream_t stream) {
  launch_prune(kv, ks, q, in.count, in.tokens, in.capacity, false, prm, out, est_mass, stream);
}

void prune_topp(const PagedKV& kv, const KeySideDev& ks, const float* q, const PageLists& in,
                const PruneParams& prm, const TokenLists& out, float* est_mass, cudaStream_t stream) {
  TW_CHECK(in.capacity > 0 && in.capacity <= INT32_MAX / kPageSize, "pruner (CUDA): page list capacity ",
           in.capacity);
  launch_prune(kv, ks, q, in.count, in.pages, in.capacity * kPageSize, true, prm, out, est_mass, stream);
}

int prune_max_active_clusters(const PagedKV& kv, int in_capacity, const PruneParams& prm, bool pages) {
  const PrunePlan plan = prune_plan(kv, in_capacity, prm, pages);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = launch_config(plan, kv, 0, attr);
  int n = 0;
  TW_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, kernel_for(kv.head_dim, plan), &cfg));
  return n;
}

}  // namespace tw::attn::cuda
