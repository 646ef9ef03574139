#include "attention/cuda/quest.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cub/block/block_scan.cuh>

#include "attention/page_bounds.h"
#include "common/error.h"
#include "ops/cuda/cuda_check.h"

namespace tw::attn::cuda {

namespace {

constexpr int kScoreWarps = 8;
constexpr int kSelectThreads = 256;

__device__ __forceinline__ int seq_tokens(const int32_t* seq_len, int b, int max_pages) {
  return max(0, min(seq_len[b], max_pages * kPageSize));
}

// N bound codes (N = 4, 8, 16 bytes) loaded as one vector; word(v, w) = its w-th 32-bit word.
template <int N> struct CodesOf;
template <> struct CodesOf<16> { using T = uint4; };
template <> struct CodesOf<8> { using T = uint2; };
template <> struct CodesOf<4> { using T = uint32_t; };
template <int N>
__device__ __forceinline__ uint32_t word(const typename CodesOf<N>::T& v, int w) {
  if constexpr (N == 16) return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
  else if constexpr (N == 8) return w == 0 ? v.x : v.y;
  else return v;
}

// d += sum of the 4 products u8 (a) x s8 (b): the CPU's vpdpbusd lane, exact.
__device__ __forceinline__ int dp4a_us(uint32_t a, uint32_t b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Group scores of pages of one (sequence, kv head): the integer score of page_bounds.h, bit-identical
// to the CPU's. A page's codes row (cmax or cmin, d bytes) is spread over LPR lanes, DPL = D / LPR
// bytes each; a lane keeps its dims of the int8 query (q8+ and q8-, packed 4 per word) for the whole
// group in registers and the codes stream through: per head and 4 dims two dp4a (u8 x s8, exact int32),
// then a reduce-scatter of the G dots over the row's lanes, and page_bound_score for the lane's head.
// NaN (non-finite keys) ranks as +inf. Each warp owns a run of `ppw` pages: the page table is read 32
// entries per load, then UNR row steps of loads go out together.
template <int D, int GP, int LPR, int UNR>
__global__ void __launch_bounds__(kScoreWarps * 32) quest_score_kernel(
    const uint8_t* __restrict__ bcode, const float* __restrict__ bparam, const int32_t* __restrict__ page_table,
    const int32_t* __restrict__ seq_len, int max_pages, int n_heads, int group, int ppw, const float* __restrict__ q,
    float* __restrict__ scores) {
  constexpr int DPL = D / LPR;   // code bytes (dims) per lane
  constexpr int W = DPL / 4;     // 32-bit words per lane
  constexpr int PPR = 32 / LPR;  // pages per row step of the warp
  constexpr int PPS = PPR * UNR;
  static_assert(32 % PPS == 0, "a round of 32 page-table entries is whole steps");
  static_assert(GP <= LPR, "the reduce-scatter needs a lane per head");
  using V = typename CodesOf<DPL>::T;
  const int h = blockIdx.y, b = blockIdx.z, hkv = gridDim.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sub = lane % LPR, slot = lane / LPR;
  const int np = (seq_tokens(seq_len, b, max_pages) + kPageSize - 1) / kPageSize;
  const int beg = (blockIdx.x * kScoreWarps + warp) * ppw, end = min(np, beg + ppw);
  if (beg >= end) return;  // no barrier in this kernel

  // The int8 query (quantize_quest_query): amax by a butterfly over the row's lanes (order-free), the
  // same float operations per element, sum q8 in integers.
  uint32_t qp[GP][W], qn[GP][W];
  float sq[GP];
  int q8sum[GP];
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    const float* qg = q + ((int64_t)b * n_heads + (int64_t)h * group + g) * D + sub * DPL;
    float x[DPL], amax = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      x[i] = g < group ? qg[i] : 0.f;
      amax = fmaxf(amax, fabsf(x[i]));
    }
#pragma unroll
    for (int o = 1; o < LPR; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    sq[g] = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int t = 0;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      uint32_t p = 0, n = 0;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = (int)fminf(fmaxf(rintf(x[4 * w + e] * inv), -127.f), 127.f);
        t += r;
        p |= (uint32_t)(uint8_t)(int8_t)(r > 0 ? r : 0) << (8 * e);
        n |= (uint32_t)(uint8_t)(int8_t)(r < 0 ? r : 0) << (8 * e);
      }
      qp[g][w] = p, qn[g][w] = n;
    }
#pragma unroll
    for (int o = 1; o < LPR; o <<= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    q8sum[g] = t;
  }
  // The head whose dot this lane ends with after the reduce-scatter below: bit l of the lane picks
  // the upper half at level l.
  int my_head = 0;
#pragma unroll
  for (int l = 0, n = GP; n > 1; ++l, n >>= 1) my_head += ((lane >> l) & 1) ? n / 2 : 0;
  float my_sq = 0.f;
  int my_q8sum = 0;
#pragma unroll
  for (int g = 0; g < GP; ++g)
    if (g == my_head) my_sq = sq[g], my_q8sum = q8sum[g];

  const int32_t* pt = page_table + (int64_t)b * max_pages;
  float* out = scores + ((int64_t)b * hkv + h) * max_pages;
  for (int r0 = beg; r0 < end; r0 += 32) {
    const int phys_lane = r0 + lane < end ? pt[r0 + lane] : 0;
#pragma unroll 1
    for (int s0 = 0; s0 < 32 && r0 + s0 < end; s0 += PPS) {
      V mx[UNR], mn[UNR];
      float2 par[UNR];
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int k = s0 + u * PPR + slot;
        const int phys = __shfl_sync(0xffffffffu, phys_lane, k);
        if (r0 + k < end) {
          const int64_t ph = (int64_t)phys * hkv + h;
          mn[u] = __ldg(reinterpret_cast<const V*>(bcode + ph * 2 * D + sub * DPL));
          mx[u] = __ldg(reinterpret_cast<const V*>(bcode + ph * 2 * D + D + sub * DPL));
          par[u] = __ldg(reinterpret_cast<const float2*>(bparam) + ph);
        } else {
          mx[u] = V{}, mn[u] = V{}, par[u] = make_float2(0.f, 0.f);
        }
      }
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        int x[GP];
#pragma unroll
        for (int g = 0; g < GP; ++g) {
          x[g] = 0;
#pragma unroll
          for (int w = 0; w < W; ++w) {
            x[g] = dp4a_us(word<DPL>(mx[u], w), qp[g][w], x[g]);
            x[g] = dp4a_us(word<DPL>(mn[u], w), qn[g][w], x[g]);
          }
        }
        // Reduce-scatter over the row's lanes: at level l, lanes with bit l set keep the upper half of
        // the heads and send the lower half (GP - 1 shuffles in all), then a plain butterfly over the
        // remaining lane bits: 2 GP - 1 + log2(LPR / GP) shuffles per row step, not GP log2(LPR).
#pragma unroll
        for (int l = 0, n = GP; n > 1; ++l, n >>= 1) {
          const bool up = (lane >> l) & 1;
#pragma unroll
          for (int j = 0; j < n / 2; ++j) {
            const int send = up ? x[j] : x[j + n / 2], keep = up ? x[j + n / 2] : x[j];
            x[j] = keep + __shfl_xor_sync(0xffffffffu, send, 1 << l);
          }
        }
#pragma unroll
        for (int o = GP; o < LPR; o <<= 1) x[0] += __shfl_xor_sync(0xffffffffu, x[0], o);
        const float v = page_bound_score(par[u].x, par[u].y, my_sq, my_q8sum, x[0]);
        float best = my_head < group ? (isnan(v) ? INFINITY : v) : -INFINITY;  // NaN cannot rule a page out
#pragma unroll
        for (int o = 1; o < GP; o <<= 1) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, o));
        const int k = s0 + u * PPR + slot;
        if (sub == 0 && r0 + k < end) out[r0 + k] = best;
      }
    }
  }
}

// Unsigned key in the order of the float (-0 and +0 equal, as the CPU's comparison has them).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f + 0.f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kKeysPerThread = 32;  // keys a thread keeps in registers: up to 8192 pages (128k tokens)

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
  auto go = [&](auto kern) {
    kern<<<grid, kScoreWarps * 32, 0, stream>>>(side.bcode, side.bparam, kv.page_table, kv.seq_len, kv.max_pages,
                                                kv.n_heads, group, ppw, q, scores);
  };
  // LPR = D / 16 lanes per row (16-byte code loads), at least one lane per head; 4 row steps of loads
  // in flight per warp (H200, 64 x 128k, G 4: 2 steps 450 us, 4 415 us, 8 445 us: 128 registers, one
  // block per SM fewer).
  auto pick = [&](auto gp) {
    constexpr int GP = decltype(gp)::value;
    constexpr int LPR = D / 16 > GP ? D / 16 : GP;
    go(quest_score_kernel<D, GP, LPR, (32 / LPR) * 4 <= 32 ? 4 : 2>);
  };
  if (group <= 1) pick(std::integral_constant<int, 1>{});
  else if (group <= 2) pick(std::integral_constant<int, 2>{});
  else if (group <= 4) pick(std::integral_constant<int, 4>{});
  else pick(std::integral_constant<int, 8>{});
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
