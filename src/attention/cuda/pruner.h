// Twilight level 2 on the GPU (TWILIGHT.md sections 1.3-1.4, 4.1-4.2): the fused top-p pruner.
// Same function as the CPU prune_topp (attention/pruner.h) in Group mode, one launch for the batch:
//   per (sequence b, kv head h), over the candidates I0 = in.tokens[b][h][0 .. in.count[b][h]):
//     z_{r,i} = q_r . K~_i / sqrt(d) for the G query heads r = h*G .. h*G+G-1 (K~: the INT4 mirror),
//               in the CPU's integer form (attention/pruner.h): int8 query, exact integer dot,
//               z = scale * (sq * dot + cq) + zero * qsum, bit-identical to the CPU estimate,
//     w_i     = (1/G) sum_r softmax_r(z_r)_i,
//     I1      = exact top-p set of w (topp.h: tau the largest value with sum_{w >= tau} w >= p * sum w,
//               ties at tau kept, zero weights never kept), then floor / cap, plus the current token
//               seq_len[b] - 1 (always kept, ranked first for the floor and cap).
//   out.tokens[b][h] = I1 in ascending position order, out.count[b][h] = |I1|,
//   est_mass[b][h] = sum of w over I1 (the current token counts only when it was a candidate).
//
// One kernel, one pass over the INT4 rows, nothing but the result written to device memory:
//  - a cluster of C thread blocks per (b, h) (C from the I0 capacity, G and the number of lists, see
//    prune_plan: from about half a wave of lists a whole list is one block, C = 1: 8 warps where two
//    fit per SM, else 16, as for B0 = 8192 at G 4), each block scoring a contiguous slice of the list;
//    the scores of all G heads stay in shared memory;
//  - each INT4 row is loaded once and scored for all G heads with integer tensor-core MMAs (m16n8k32,
//    u8 codes x s8 query, int32 accumulators: exact); the query is quantised per head by one thread
//    with the CPU's operations in the CPU's order;
//  - softmax max / sum by block reductions, combined across the cluster through distributed shared
//    memory; weights w in shared memory;
//  - threshold by a 3-level radix select over the weights' float bits (positive floats order like
//    their bits: 11 + 10 + 10 bits), mass histograms per level, so tau is one exact float value
//    (clusters of four or more: every block over a copy of the whole list's weights, PrunePlan);
//  - compaction of the kept positions in list order (block scans, cluster prefix of the counts).
// Larger I0 lists are split over more blocks of the cluster (up to 16); see prune_plan for limits.
// Benchmarking aid: TW_PRUNE_STOP_AFTER=k (1 rows resolved, 2 estimate, 3 softmax and weights,
// 4 threshold, 5 counts) makes the kernel leave after phase k, to time the phases by differences;
// the output is then incomplete.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention/cuda/layout.h"

namespace tw::attn::cuda {

struct PruneParams {
  float p = 0.95f;       // top-p mass, in (0, 1]
  int min_tokens = 0;    // floor (0 = none): lists shorter than this get the heaviest candidates added
  int max_tokens = 0;    // cap (0 = none): at most this many tokens per list, current token included
};

// Launch shape the pruner picks for a configuration (exposed for tests, benchmarks and reports).
struct PrunePlan {
  int cluster = 0;           // thread blocks per (sequence, kv head)
  int chunk = 0;             // candidates per block at most (ceil(capacity / cluster), rounded up to 16)
  size_t smem_bytes = 0;     // dynamic shared memory per block
  int threads = 0;           // per block: 256 (two or three blocks per SM), 512 (one block per SM)
  int per_sm = 0;            // the kernel build: blocks per SM it is made for (1, 2 or 3; its registers)
  bool pages = false;        // the I0 lists are PageLists (their pages after the histograms in shared memory)
  // Clusters of four or more 16-warp blocks (one per SM) over lists of up to 8192 candidates (a
  // single sequence or two at B0 8192): every block copies the whole list's weights to this offset of
  // its shared memory (smem_bytes includes them) and finds the top-p threshold alone; 0: the cluster's
  // radix levels exchange histograms instead.
  size_t wall_off = 0;
};

// Validates and plans; throws tw::Error for unsupported head dim (64, 128), group size (1..8),
// p outside (0, 1], floor/cap, or an I0 capacity (tokens) too large for 16 blocks of shared memory.
// pages: the I0 lists are PageLists (in_capacity = their pages x 16).
PrunePlan prune_plan(const PagedKV& kv, int in_capacity, const PruneParams& prm, bool pages = false);

// The same plan for a GPU of `sms` multiprocessors and `optin` bytes of opt-in shared memory per
// block (prune_plan asks the current device): host code only, so the rule is tested without a GPU.
PrunePlan prune_plan_for(const PagedKV& kv, int in_capacity, const PruneParams& prm, int sms, int optin,
                         bool pages = false);

// Diagnostic for benchmarks: clusters of this plan the GPU holds at once
// (cudaOccupancyMaxActiveClusters); the launch has batch * Hkv of them.
int prune_max_active_clusters(const PagedKV& kv, int in_capacity, const PruneParams& prm, bool pages = false);

// kv: shape, page_table, seq_len (K/V themselves are not read). ks: k4, k4_scale, k4_zero.
// q: [batch][H][d] float. in: I0 lists (positions ascending, unique, in [0, seq_len); counts are
// clamped to [0, in.capacity]). out: I1 lists; out.capacity must be >= in.capacity + 1 (or >= the
// cap when one is set). est_mass: [batch][Hkv] floats (may be null). Asynchronous on `stream`, no
// host synchronisation, no workspace: capturable in a CUDA graph.
void prune_topp(const PagedKV& kv, const KeySideDev& ks, const float* q, const TokenLists& in,
                const PruneParams& prm, const TokenLists& out, float* est_mass, cudaStream_t stream = 0);

// The same with I0 as whole pages (layout.h PageLists, e.g. from quest_select_pages): in.count tokens
// per list, in.capacity pages (I0 capacity in.capacity x 16 tokens). The output and its order are
// those of the token input holding the same tokens, bit for bit; the prologue reads one id and one
// page-table entry per 16 candidates instead of a token and an entry per candidate.
void prune_topp(const PagedKV& kv, const KeySideDev& ks, const float* q, const PageLists& in,
                const PruneParams& prm, const TokenLists& out, float* est_mass, cudaStream_t stream = 0);

}  // namespace tw::attn::cuda
