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
constexpr int kWaveChunk = 1024;  // at least this many tokens per item once the lists fill a wave (min_T)
constexpr int kPlanThreads = 1024;
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = 32 * kAttnWarps;
constexpr int kItemsPerSm = 4;     // the split aims at this many work items per SM (H200: 4 beat 2, 8, 16)
constexpr int kWhole = 1 << 30;    // planned item flag: the list's only item, which writes the output itself

// Programmatic dependent launch of the attend and combine kernels: each may start (blocks resident,
// parameters loaded) while the kernel before it still runs, and waits (griddepcontrol.wait, which
// returns once that grid has finished and its writes are visible) before its first read of them. In
// the graph-replayed step it hid about one launch latency per edge (H200, one call, two alternations:
// concentrated 16 x 32k p 0.85 92.9 / 92.7 -> 92.0 / 91.6 us, diffuse 16 x 128k p 0.95 198.0 / 197.9 ->
// 197.1 / 196.9); after the pruner (no plan kernel below a wave of lists) it is ~0.3 us faster than a
// plain launch. The pruner and the plan kernel themselves are launched plainly: launched early, each
// made the step slower (docs/BENCHMARKS.md).
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// Workspace layout (16-byte aligned pieces). Item c of list i keeps its state in part slot
// i * per_list + c.
struct Layout {
  size_t hdr = 0;        // int[4]: the planned items' number (plan_kernel)
  size_t n_items = 0;    // int[n_lists]: each list's items (the plan, or the list's first item; read by the combine)
  size_t items = 0;      // int4[max_items]: planned items: part slot, first entry j0, end j1, listed count n
                         // (entries >= n: the current token) | kWhole when the item is the list's only one
  size_t part = 0;       // float[n_lists * per_list][G][d + 2]: o[d], m, l
  size_t total = 0;
  int per_list = 0;      // items a list can have at most: ceil((capacity + 1) / kMinChunk)
};

size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

Layout layout_for(const PagedKV& kv, int cap) {
  Layout L;
  const int n_lists = kv.batch * kv.n_kv_heads;
  const int G = kv.n_heads / kv.n_kv_heads;
  const int64_t per_list = (int64_t(cap) + 1 + kMinChunk - 1) / kMinChunk;
  TW_CHECK(per_list * n_lists < (int64_t(1) << 30), "sparse decode: ", n_lists, " lists of capacity ", cap,
           " need too many work items");
  const size_t max_items = size_t(per_list) * n_lists;
  L.per_list = (int)per_list;
  L.hdr = 0;
  L.n_items = 16;
  L.items = L.n_items + align16(size_t(n_lists) * 4);
  L.part = L.items + align16(max_items * 16);
  L.total = L.part + align16(max_items * G * (kv.head_dim + 2) * 4);
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
  int* n_items;
  int4* items;
  float* part;
  int64_t n_pages;
  int batch, n_kv_heads, group, max_pages, cap;
  int n_lists, per_list;
  int want;      // work items the split aims at for the whole batch (SMs x items per SM)
  int min_T;     // kMinChunk, or kWaveChunk once the lists fill a wave of attend blocks
  int planned;   // 1: plan_kernel made the items (a wave of lists or more); 0: each list splits itself
  int max_c;     // unplanned: items any list can have (<= per_list; the attend grid is n_lists x max_c)
};

__device__ __forceinline__ int list_len(const Args& a, int list, int* extra_out) {
  const int b = list / a.n_kv_heads;
  const int n = min(max(a.count[list], 0), a.cap);
  const int cur = a.seq_len[b] - 1;
  const int extra = (cur >= 0 && (n == 0 || a.tokens[(size_t)list * a.cap + n - 1] != cur)) ? 1 : 0;
  if (extra_out) *extra_out = extra;
  return n + extra;
}

// T for `total` entries: about `want` items, in whole 16-token tiles two per warp, in [min_T, kMaxChunk].
// Once the lists fill a wave (min_T = kWaveChunk), splitting a shorter list adds a combine and a second
// item's fixed costs, not parallelism (H200, concentrated 64 x 32k p 0.85, ~500 entries per list: T 512
// split the lists over 640 in two); longer lists still split at T: items of the cap instead left a tail
// of long single items (diffuse 64 x 128k p 0.85, ~1000 per list).
__device__ __forceinline__ int tokens_per_item(long long total, const Args& a) {
  long long T = (total + a.want - 1) / a.want;
  T = (T + kAttnThreads - 1) / kAttnThreads * kAttnThreads;
  return (int)min(max(T, (long long)a.min_T), (long long)kMaxChunk);
}

// A list of len entries in items of T entries and the rest, except that a rest under T / 4 entries is
// spread over the other items (whole tiles, at most kMaxChunk entries): a list of T + 8 entries was two
// items, the second of 8, which cost a whole item's row lookups and merge, and a combine, for half a
// tile. Equal items of len / T rounded to the nearest (up to 1.5 T) balanced worse (H200, 16 x 128k p
// 0.95: attend +2 us). n: items, per: entries per item (>= T).
struct Split {
  int n, per;
};

__device__ __forceinline__ Split split_list(int len, int T) {
  int nc = (len + T - 1) / T, per = T;
  if (nc > 1 && len - (nc - 1) * T < T / 4 && (len + nc - 2) / (nc - 1) <= kMaxChunk) {
    --nc;
    per = ((len + nc - 1) / nc + 15) / 16 * 16;  // <= kMaxChunk (a multiple of 16)
    nc = (len + per - 1) / per;                  // <= the count above
  }
  return {nc, per};
}

// A wave of lists or more: one block plans the batch. T from the total, then the per-list prefix of
// item counts and the items, in list order, so that the attend grid takes them one after another with
// no empty blocks among them. (Below a wave each list splits itself in the attend kernel, with no kernel
// between the pruner and the attention: 0-3.8 us faster at batch 1-16 on the H200. Per-list splits in
// a wave of lists gave long lists long single items, and their grid of slots (list, item) many empty
// blocks among the items: diffuse 64 x 128k p 0.85 +4 us; docs/BENCHMARKS.md.)
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(const Args a) {
  __shared__ long long red[kPlanThreads / 32];
  __shared__ int sc[kPlanThreads / 32];
  __shared__ int s_T, s_carry;
  pdl_launch_dependents();  // the attend grid may start now; it waits for this grid's end before its reads
  const int n_lists = a.n_lists;
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
    s_T = tokens_per_item(s, a);
    s_carry = 0;
  }
  __syncthreads();
  const int T = s_T;
  for (int base = 0; base < n_lists; base += kPlanThreads) {
    const int i = base + tid;
    int extra = extra0;
    const int len = i >= n_lists ? 0 : base == 0 ? len0 : list_len(a, i, &extra);
    const Split sp = split_list(len, T);
    int x = sp.n;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += u;
    }
    if (lane == 31) sc[warp] = x;
    __syncthreads();
    int off = s_carry;
    for (int w = 0; w < warp; ++w) off += sc[w];
    const int first = off + x - sp.n;
    if (i < n_lists) {
      a.n_items[i] = sp.n;
      for (int c = 0; c < sp.n; ++c)
        a.items[first + c] = make_int4(i * a.per_list + c, c * sp.per, min(len, (c + 1) * sp.per),
                                       (len - extra) | (sp.n == 1 ? kWhole : 0));
    }
    __syncthreads();
    if (tid == kPlanThreads - 1) s_carry = first + sp.n;
    __syncthreads();
  }
  if (tid == 0) a.hdr[0] = s_carry;
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
  pdl_wait();               // the kernel before it (the plan, the pruner or the select) complete, its writes visible
  pdl_launch_dependents();  // the combine's blocks may start once every attend block has
  const E* kpool = static_cast<const E*>(a.k);
  const E* vpool = static_cast<const E*>(a.v);
  const int tok[4] = {2 * ti, 2 * ti + 1, 2 * ti + 8, 2 * ti + 9};

  // Planned: y is the plan's item y. Unplanned: y is slot (list y / max_c, item c), list-major, and the
  // list splits itself by its own length: T = len x lists / want (tokens_per_item of len x lists), for
  // lists of equal length the batch's T (about want items in all), for a ragged batch about want / lists
  // items per list, longer ones longer (a plan over the total would make them all ~T). A slot past its
  // list's items finds none after one load (the count: item c needs c x min_T < len, as per >= min_T).
  // Bound: T >= len x lists / want gives ceil(len / T) <= ceil(want / lists), unless T is kMaxChunk,
  // where it is ceil((cap + 1) / kMaxChunk); max_c is the larger.
  const int n_slots = a.planned ? a.hdr[0] : a.n_lists * a.max_c;
  for (int y = blockIdx.x; y < n_slots; y += gridDim.x) {
    int list, slot, j0, cnt, n;
    bool whole;
    if (a.planned) {
      const int4 it = a.items[y];  // the item carries its bounds: no list-length lookups
      slot = it.x, list = slot / a.per_list, j0 = it.y, cnt = it.z - it.y, n = it.w & ~kWhole;
      whole = (it.w & kWhole) != 0;
    } else {
      list = y / a.max_c;
      const int c = y - list * a.max_c;
      if (c > 0 && (long long)c * a.min_T >= (long long)min(max(a.count[list], 0), a.cap) + 1) continue;
      int extra;
      const int len = list_len(a, list, &extra);  // two dependent loads: the count, then the list's last token
      const Split sp = split_list(len, tokens_per_item((long long)len * a.n_lists, a));
      if (c == 0 && threadIdx.x == 0) a.n_items[list] = sp.n;  // for the combine
      if (c >= sp.n) continue;
      slot = list * a.per_list + c, j0 = c * sp.per, cnt = min(len, j0 + sp.per) - j0, n = len - extra;
      whole = sp.n == 1;
    }
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

    float* part = a.part + (size_t)slot * G * (D + 2);
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
  const int n = a.n_items[list];
  if (n == 1) return;  // written by its only item
  const float* part0 = a.part + ((size_t)list * a.per_list * G + r) * (D + 2);
  auto part_of = [&](int i) { return part0 + (size_t)i * G * (D + 2); };  // o[D], m, l
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
  a.n_items = reinterpret_cast<int*>(ws + L.n_items);
  a.items = reinterpret_cast<int4*>(ws + L.items);
  a.part = reinterpret_cast<float*>(ws + L.part);
  a.n_pages = kv.n_pages;
  a.batch = kv.batch;
  a.n_kv_heads = kv.n_kv_heads;
  a.group = kv.n_heads / kv.n_kv_heads;
  a.max_pages = kv.max_pages;
  a.cap = lists.capacity;
  a.n_lists = kv.batch * kv.n_kv_heads;
  a.per_list = L.per_list;
  static const int ips = bench_knob("TW_SPARSE_ITEMS_PER_SM");
  const int sms = sm_count();
  a.want = sms * (ips > 0 ? ips : kItemsPerSm);
  const bool bf = kv.dtype == KvDtype::BF16;
  // A/B aid: TW_SPARSE_SPLIT=1 plans at every size, 2 never (each list splits itself).
  static const int split_knob = bench_knob("TW_SPARSE_SPLIT");
  auto by_dtype = [&](auto d_tag) {
    constexpr int D = decltype(d_tag)::value;
    const int slots = sms * (bf ? resident_blocks<attend_kernel<D, __nv_bfloat16>>(kAttnThreads)
                                : resident_blocks<attend_kernel<D, __half>>(kAttnThreads));
    const bool wave = a.n_lists >= slots;
    a.min_T = wave ? kWaveChunk : kMinChunk;
    a.planned = split_knob == 1 || (split_knob != 2 && wave);
    // Unplanned: the attend kernel's bound on a list's items (the workspace holds per_list >= it).
    const int64_t by_want = (int64_t(a.want) + a.n_lists - 1) / a.n_lists;
    const int64_t by_cap = (int64_t(a.cap) + 1 + kMaxChunk - 1) / kMaxChunk;
    a.max_c = (int)std::min<int64_t>(std::max(by_want, by_cap), L.per_list);
    // Fixed grids (shapes only). Planned: blocks loop over however many items the plan made, 16 per SM
    // at most, the surplus exiting at once. Unplanned: one block per slot. Either way the hardware hands
    // blocks out as others finish, which balances unequal items better than blocks looping over a
    // fixed share (docs/BENCHMARKS.md).
    const int grid = a.planned ? (int)std::min<int64_t>(int64_t(a.n_lists) * L.per_list, int64_t(sms) * 16)
                               : a.n_lists * a.max_c;  // < 2^30 (layout_for)
    if (a.planned) {
      plan_kernel<<<1, kPlanThreads, 0, stream>>>(a);
      TW_CUDA_CHECK_LAUNCH();
    }
    launch_pdl(bf ? attend_kernel<D, __nv_bfloat16> : attend_kernel<D, __half>, dim3(grid), dim3(kAttnThreads),
               stream, a);
    launch_pdl(combine_kernel<D>, dim3(kv.n_heads, kv.batch), dim3(kCombThreads), stream, a);
  };
  if (kv.head_dim == 128)
    by_dtype(std::integral_constant<int, 128>{});
  else
    by_dtype(std::integral_constant<int, 64>{});
}

}  // namespace tw::attn::cuda
