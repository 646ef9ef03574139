#include "attention/cuda/sparse_decode.h"

#include "attention/cuda/decode_tile.cuh"
#include "attention/cuda/occupancy.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/error.h"
#include "ops/cuda/cuda_check.h"

namespace tw::attn::cuda {

namespace {

// Tokens per work item (T, a multiple of 128): at least kMinChunk (bounds the workspace; an item's
// row lookups and merge are a fixed cost: H200, batch 1 x 32k, fixed-budget Quest 49 -> 40 us and
// Twilight p 0.95 attend 29.6 -> 23.5 us with 256 instead of 128), at most kMaxChunk (long lists
// always split).
constexpr int kMinChunk = 256;
constexpr int kMaxChunk = 2048;
constexpr int kWaveChunk = 1024;  // at least this many tokens per item once the lists fill a wave (plan_kernel)
constexpr int kPlanThreads = 1024;
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = 32 * kAttnWarps;
constexpr int kItemsPerSm = 4;     // the planner aims at this many work items per SM (H200: 4 beat 2, 8, 16)
constexpr int kWhole = 1 << 30;    // item flag: the list's only item, which writes the output itself (no combine)

// Programmatic dependent launch of the attend and combine kernels: each may start (blocks resident,
// parameters loaded) while the kernel before it still runs, and waits (griddepcontrol.wait, which
// returns once that grid has finished and its writes are visible) before its first read of them. In
// the graph-replayed step it hides about one launch latency per edge (H200, one call, two alternations:
// concentrated 16 x 32k p 0.85 92.9 / 92.7 -> 92.0 / 91.6 us, diffuse 16 x 128k p 0.95 198.0 / 197.9 ->
// 197.1 / 196.9). Not used before the pruner or the plan: every kernel of the step launched this way
// made the step slower (docs/BENCHMARKS.md).
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// Workspace layout (all int32 / float, 16-byte aligned pieces).
struct Layout {
  size_t hdr = 0;        // int[4]: n_items
  size_t start = 0;      // int[n_lists + 1]: first work item of each list
  size_t items = 0;      // int4[max_items]: list, first entry j0, end j1, listed count n (entries >= n: the
                         // current token) | kWhole when the item is the list's only one
  size_t part = 0;       // float[max_items][G][d + 2]: o[d], m, l
  size_t total = 0;
  int max_items = 0;
};

size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

Layout layout_for(const PagedKV& kv, int cap) {
  Layout L;
  const int n_lists = kv.batch * kv.n_kv_heads;
  const int G = kv.n_heads / kv.n_kv_heads;
  const int64_t per_list = (int64_t(cap) + 1 + kMinChunk - 1) / kMinChunk;
  const int64_t max_items = per_list * n_lists;
  TW_CHECK(max_items < (int64_t(1) << 30), "sparse decode: ", n_lists, " lists of capacity ", cap,
           " need too many work items");
  L.max_items = (int)max_items;
  L.hdr = 0;
  L.start = align16(16);
  L.items = L.start + align16(size_t(n_lists + 1) * 4);
  L.part = L.items + align16(size_t(max_items) * 16);
  L.total = L.part + align16(size_t(max_items) * G * (kv.head_dim + 2) * 4);
  return L;
}

struct Args {
  const void* k;
  const void* v;
  const int32_t* page_table;
  const int32_t* seq_len;
  const float* q;
  const int32_t* count;
  const int32_t* tokens;
  float* out;
  int* hdr;
  int* start;
  int4* items;
  float* part;
  int64_t n_pages;
  int batch, n_kv_heads, group, max_pages, cap, max_items, sm_count, items_per_sm;
  int slots;  // attend blocks resident at once (SMs x blocks per SM)
};

__device__ __forceinline__ int list_len(const Args& a, int list, int* extra_out) {
  const int b = list / a.n_kv_heads;
  const int n = min(max(a.count[list], 0), a.cap);
  const int cur = a.seq_len[b] - 1;
  const int extra = (cur >= 0 && (n == 0 || a.tokens[(size_t)list * a.cap + n - 1] != cur)) ? 1 : 0;
  if (extra_out) *extra_out = extra;
  return n + extra;
}

// One block: tokens per item from the total, then the per-list prefix of item counts and the items.
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(const Args a) {
  __shared__ long long red[kPlanThreads / 32];
  __shared__ int sc[kPlanThreads / 32];
  __shared__ int s_T, s_carry;
  pdl_launch_dependents();  // the attend grid may start now; it waits for this grid's end before its reads
  const int n_lists = a.batch * a.n_kv_heads;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  long long tot = 0;
  int len0 = 0, extra0 = 0;  // list tid's, kept for the second pass (its loads are dependent: count, then the last token)
  for (int i = tid; i < n_lists; i += kPlanThreads) {
    int e;
    const int l = list_len(a, i, &e);
    if (i == tid) len0 = l, extra0 = e;
    tot += l;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) tot += __shfl_xor_sync(0xffffffffu, tot, o);
  if (lane == 0) red[warp] = tot;
  __syncthreads();
  if (tid == 0) {
    long long s = 0;
    for (int w = 0; w < kPlanThreads / 32; ++w) s += red[w];
    const long long want = (long long)a.sm_count * a.items_per_sm;
    long long T = (s + want - 1) / want;
    T = (T + kAttnThreads - 1) / kAttnThreads * kAttnThreads;  // whole 16-token tiles, two per warp
    s_T = (int)std::min<long long>(std::max<long long>(T, kMinChunk), kMaxChunk);
    // A wave of lists or more: items of at least kWaveChunk entries, since splitting a shorter list adds
    // a combine and a second item's fixed costs, not parallelism (H200, concentrated 64 x 32k p 0.85,
    // ~500 entries per list: T 512 split the lists over 640 in two). Longer lists still split at T: items
    // of the cap instead left a tail of long single items (diffuse 64 x 128k p 0.85, ~1000 per list).
    if (n_lists >= a.slots) s_T = max(s_T, kWaveChunk);
    s_carry = 0;
  }
  __syncthreads();
  const int T = s_T;
  for (int base = 0; base < n_lists; base += kPlanThreads) {
    const int i = base + tid;
    int extra = extra0;
    const int len = i >= n_lists ? 0 : base == 0 ? len0 : list_len(a, i, &extra);
    // Items per list: items of T entries and the rest, except that a rest under T / 4 entries is spread
    // over the other items (whole tiles, at most kMaxChunk entries): a list of T + 8 entries was two
    // items, the second of 8, which cost a whole item's row lookups and merge, and a combine, for half
    // a tile. Equal items of len / T rounded to the nearest (up to 1.5 T) balanced worse (H200, 16 x 128k
    // p 0.95: attend +2 us).
    int nc = (len + T - 1) / T, per = T;
    if (nc > 1 && len - (nc - 1) * T < T / 4 && (len + nc - 2) / (nc - 1) <= kMaxChunk) {
      --nc;
      per = ((len + nc - 1) / nc + 15) / 16 * 16;  // <= kMaxChunk (a multiple of 16)
      nc = (len + per - 1) / per;                  // <= the count above
    }
    int x = nc;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += u;
    }
    if (lane == 31) sc[warp] = x;
    __syncthreads();
    int off = s_carry;
    for (int w = 0; w < warp; ++w) off += sc[w];
    const int first = off + x - nc;
    if (i < n_lists) {
      a.start[i] = first;
      for (int c = 0; c < nc; ++c)
        a.items[first + c] = make_int4(i, c * per, min(len, (c + 1) * per), (len - extra) | (nc == 1 ? kWhole : 0));
    }
    __syncthreads();
    if (tid == kPlanThreads - 1) s_carry = first + nc;
    __syncthreads();
  }
  if (tid == 0) {
    a.start[n_lists] = s_carry;
    a.hdr[0] = s_carry;
  }
}

// One item = entries [j0, j1) of a list (the current token appended as the last entry when the
// list lacks it). The block first resolves every entry's K / V row (token -> page -> row: two
// dependent loads, once per item), then its warps take 16-entry tiles (decode_tile.cuh, the dense
// kernel's arithmetic) and the block merges them into the item's partial state.
template <int D, typename E>
__global__ void __launch_bounds__(kAttnThreads) attend_kernel(const Args a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gi = lane >> 2, ti = lane & 3;
  const int G = a.group;
  __shared__ int s_row[kMaxChunk];
  __shared__ float smem[kAttnWarps * kMaxGroup * (D + 2)];
  using Tile = tile::Acc<E, D>;
  __shared__ uint4 s_q[kAttnWarps][Tile::kQSmem];
  pdl_wait();               // the plan's items, complete and visible
  pdl_launch_dependents();  // the combine's blocks may start once every attend block has
  const int n_items = a.hdr[0];
  const E* kpool = static_cast<const E*>(a.k);
  const E* vpool = static_cast<const E*>(a.v);
  const int tok[4] = {2 * ti, 2 * ti + 1, 2 * ti + 8, 2 * ti + 9};

  for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
    // The plan's item carries its bounds: the entries' loads need no list-length lookups (count, then
    // the list's last token: two dependent loads before the first row).
    const int4 it = a.items[item];
    const int list = it.x, j0 = it.y, cnt = it.z - it.y, n = it.w & ~kWhole;
    const bool whole = (it.w & kWhole) != 0;
    const int b = list / a.n_kv_heads, h = list % a.n_kv_heads;
    const int cur = a.seq_len[b] - 1;
    const int32_t* toks = a.tokens + (size_t)list * a.cap;
    const int32_t* pt = a.page_table + (size_t)b * a.max_pages;
    // The query first: its loads do not wait for the rows, so their latency hides behind the rows'.
    Tile acc;
    acc.init(gi < G ? a.q + ((size_t)b * a.n_kv_heads * G + (size_t)h * G + gi) * D : nullptr, ti, s_q[warp]);
    // Rows resolved kRows entries per thread at a time (token, then page: two dependent loads each),
    // their loads in flight together: H200, fixed-budget Quest (items of 2048 entries) 3-5% faster
    // than one entry at a time; 16 at a time was no better.
    constexpr int kRows = 8;
    for (int x0 = threadIdx.x; x0 < cnt; x0 += kRows * kAttnThreads) {
      int t[kRows];
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int x = x0 + u * kAttnThreads, j = j0 + x;
        t[u] = x >= cnt ? -1 : j < n ? toks[j] : cur;
      }
      int phys[kRows];
#pragma unroll
      for (int u = 0; u < kRows; ++u) phys[u] = (t[u] >= 0 && t[u] <= cur) ? pt[t[u] / kPageSize] : -1;
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int x = x0 + u * kAttnThreads;
        if (x < cnt) s_row[x] = kv_row(phys[u], a.n_pages, a.n_kv_heads, h, t[u]);
      }
    }
    __syncthreads();

    using Regs = typename Tile::Regs;
    // A dead entry (past the chunk, or a bad token) reads row 0, a readable row, and is masked. The
    // liveness of a tile is read again from s_row when it is computed, not held from its load: the
    // registers are the tiles' in flight.
    auto row_of = [&](int base) {  // lanes 16..31 repeat 0..15
      return base + (lane & 15) < cnt ? s_row[base + (lane & 15)] : -1;
    };
    auto load = [&](Regs& r, int base) {
      const int mine = row_of(base);
      const int rk0 = max(__shfl_sync(0xffffffffu, mine, gi), 0), rk1 = max(__shfl_sync(0xffffffffu, mine, gi + 8), 0);
      const E* vrow[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) vrow[e] = vpool + (size_t)max(__shfl_sync(0xffffffffu, mine, tok[e]), 0) * D;
      Tile::load(r, kpool + (size_t)rk0 * D, kpool + (size_t)rk1 * D, vrow, gi, ti);
    };
    auto compute = [&](Regs& r, int base) {
      const int mine = row_of(base);
      const bool live_k[2] = {__shfl_sync(0xffffffffu, mine, gi) >= 0, __shfl_sync(0xffffffffu, mine, gi + 8) >= 0};
      bool live_v[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) live_v[e] = __shfl_sync(0xffffffffu, mine, tok[e]) >= 0;
      acc.compute(r, live_k, live_v, __all_sync(0xffffffffu, mine >= 0));
    };
    // Two tiles per warp in flight: the next tile's loads go out before this tile's math.
    constexpr int kStride = kAttnWarps * 16;
    Regs ra, rb;
    if (warp * 16 < cnt) load(ra, warp * 16);
    for (int base = warp * 16; base < cnt; base += 2 * kStride) {
      const int b1 = base + kStride;
      if (b1 < cnt) load(rb, b1);
      compute(ra, base);
      if (b1 >= cnt) break;
      if (b1 + kStride < cnt) load(ra, b1 + kStride);
      compute(rb, b1);
    }
    acc.finish();

    float* part = a.part + (size_t)item * G * (D + 2);
    float* out = a.out + ((size_t)b * a.n_kv_heads + h) * G * D;
    tile::block_merge<kAttnWarps>(acc, G, smem, [&](int g, int d, float O, float mm, float L) {
      if (whole) {  // the list's only item: its state is the output (the combine skips the list)
        out[(size_t)g * D + d] = L > 0.f ? O / L : 0.f;
        return;
      }
      part[(size_t)g * (D + 2) + d] = O;
      if (d == 0) {
        part[(size_t)g * (D + 2) + D] = mm;
        part[(size_t)g * (D + 2) + D + 1] = L;
      }
    });
    __syncthreads();  // s_row and smem are reused by the next item
  }
}

// Per query head (block), its list's items merged. Few items (batch >= 16: 1-4 per list): one thread
// per dim loops over them, no barriers. More (batch 1: 10-33): eight warps share them
// (tile::merge_parts); the loop took a dependent round of loads per item there (H200, batch 1 x 32k,
// fixed-budget Quest 38.2 -> 35.2 us). Without the cut-off the barriers made the real-model shape's
// batch-16 attend (3 items per list) 0.5-1 us slower.
constexpr int kCombThreads = 256;
constexpr int kFewItems = 4;

template <int D>
__global__ void __launch_bounds__(kCombThreads) combine_kernel(const Args a) {
  const int hq = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  pdl_wait();  // the items' partial states
  const int G = a.group, h = hq / G, r = hq % G;
  const int list = b * a.n_kv_heads + h;
  const int i0 = a.start[list], n = a.start[list + 1] - i0;
  if (n == 1) return;  // written by its only item (kWhole)
  auto part_of = [&](int i) { return a.part + ((size_t)(i0 + i) * G + r) * (D + 2); };  // o[D], m, l
  float* out = a.out + ((size_t)b * a.n_kv_heads * G + hq) * D;

  auto ml_of = [&](int i) { return *reinterpret_cast<const float2*>(part_of(i) + D); };  // m in log2 units
  if (n <= kFewItems) {  // block-uniform
    if (tid < D) out[tid] = tile::merge_few(n, ml_of, [&](int i) { return part_of(i)[tid]; });
    return;
  }
  tile::merge_parts<D, kCombThreads>(n, ml_of, part_of, out);
}

// kernel<<<grid, block, 0, stream>>>(a), as a programmatic dependent of the stream's previous kernel.
template <class K>
void launch_pdl(K kernel, dim3 grid, dim3 block, cudaStream_t stream, const Args& a) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  TW_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, a));
}

}  // namespace

size_t sparse_decode_workspace_bytes(const PagedKV& kv, int list_capacity) {
  check_config(kv);
  TW_CHECK(list_capacity > 0, "sparse decode: list capacity ", list_capacity, " must be positive");
  return layout_for(kv, list_capacity).total;
}

void sparse_decode(const PagedKV& kv, const float* q, const TokenLists& lists, float* out, void* workspace,
                   size_t workspace_bytes, cudaStream_t stream) {
  check_config(kv);
  TW_CHECK(lists.capacity > 0 && lists.count && lists.tokens, "sparse decode: empty or null token lists");
  TW_CHECK(q && out, "sparse decode: null query or output");
  TW_CHECK(kv.n_pages * kv.n_kv_heads * kPageSize < (int64_t(1) << 31), "sparse decode: ", kv.n_pages, " pages x ",
           kv.n_kv_heads, " kv heads exceed the 32-bit row index");
  const Layout L = layout_for(kv, lists.capacity);
  TW_CHECK(workspace && workspace_bytes >= L.total, "sparse decode: workspace of ", workspace_bytes, " bytes < ",
           L.total, " (sparse_decode_workspace_bytes)");
  TW_CHECK(reinterpret_cast<uintptr_t>(workspace) % 16 == 0, "sparse decode: workspace must be 16-byte aligned");
  char* ws = static_cast<char*>(workspace);
  Args a{};
  a.k = kv.k;
  a.v = kv.v;
  a.page_table = kv.page_table;
  a.seq_len = kv.seq_len;
  a.q = q;
  a.count = lists.count;
  a.tokens = lists.tokens;
  a.out = out;
  a.hdr = reinterpret_cast<int*>(ws + L.hdr);
  a.start = reinterpret_cast<int*>(ws + L.start);
  a.items = reinterpret_cast<int4*>(ws + L.items);
  a.part = reinterpret_cast<float*>(ws + L.part);
  a.n_pages = kv.n_pages;
  a.batch = kv.batch;
  a.n_kv_heads = kv.n_kv_heads;
  a.group = kv.n_heads / kv.n_kv_heads;
  a.max_pages = kv.max_pages;
  a.cap = lists.capacity;
  a.max_items = L.max_items;
  a.sm_count = sm_count();
  static const int ips = bench_knob("TW_SPARSE_ITEMS_PER_SM");
  a.items_per_sm = ips > 0 ? ips : kItemsPerSm;

  // Fixed grid (shapes only): blocks loop over however many items the plan made.
  const int grid = std::min(L.max_items, a.sm_count * 16);
  const bool bf = kv.dtype == KvDtype::BF16;
  auto by_dtype = [&](auto d_tag) {
    constexpr int D = decltype(d_tag)::value;
    a.slots = a.sm_count * (bf ? resident_blocks<attend_kernel<D, __nv_bfloat16>>(kAttnThreads)
                               : resident_blocks<attend_kernel<D, __half>>(kAttnThreads));
    plan_kernel<<<1, kPlanThreads, 0, stream>>>(a);
    TW_CUDA_CHECK_LAUNCH();
    if (bf)
      launch_pdl(attend_kernel<D, __nv_bfloat16>, dim3(grid), dim3(kAttnThreads), stream, a);
    else
      launch_pdl(attend_kernel<D, __half>, dim3(grid), dim3(kAttnThreads), stream, a);
  };
  using D128 = std::integral_constant<int, 128>;
  using D64 = std::integral_constant<int, 64>;
  if (kv.head_dim == 128) {
    by_dtype(D128{});
    launch_pdl(combine_kernel<128>, dim3(kv.n_heads, kv.batch), dim3(kCombThreads), stream, a);
  } else {
    by_dtype(D64{});
    launch_pdl(combine_kernel<64>, dim3(kv.n_heads, kv.batch), dim3(kCombThreads), stream, a);
  }
}

}  // namespace tw::attn::cuda
