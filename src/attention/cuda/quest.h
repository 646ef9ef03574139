// Quest page selection on the GPU (the CPU reference: select_quest in attention/selectors.h, Group
// mode). For every (sequence, kv head): page score u_p = sum_d max(q_d*kmax_d, q_d*kmin_d) per query
// head on the 8-bit bounds (page_bounds.h: u_p = fma(s, sum_d (q+_d cmax_d + q-_d cmin_d), lo * sum_d q_d)), group score = max over the G query heads (a NaN score, possible only with inf keys, counts as
// +inf); keep ceil(budget / 16) pages (at least 2): the first and the last page always, the rest by
// descending score, ties to the lower page; emit the kept pages' tokens < seq_len, ascending, into a
// TokenLists. A budget >= seq_len, or one that keeps every page, selects every token.
// One kernel, no host sync: a cluster of blocks per (sequence, kv head) scores its pages into shared
// memory, finds the r-th largest score by radix select (up to 4 passes of 8 bits, the cluster's histograms
// summed over distributed shared memory) and emits the pages in order (block scans + the lower
// blocks' totals; each warp writes its kept pages' tokens as one contiguous range).
// Benchmarking aid: TW_QUEST_STOP_AFTER=k (1 scores, 2 radix passes) makes the kernel leave after phase
// k, to time the phases by differences; the lists are then not written.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "attention/cuda/layout.h"

namespace tw::attn::cuda {

// Bytes of quest_select's optional score output: the page scores [batch][Hkv][max_pages] float.
size_t quest_scores_bytes(const PagedKV& kv);

// Tokens a list can receive for this budget: min(max(ceil(budget/16), 2), max_pages) * 16. The
// TokenLists capacity must be at least this.
int64_t quest_list_capacity(const PagedKV& kv, int64_t budget_tokens);

// q: [batch][H][d] float (device, post-RoPE). side: bcode / bparam of every page in use (the INT4 part
// is not read). budget_tokens > 0, the same for every sequence. max_seq_len: a host-side bound on
// seq_len that sizes the cluster per list (longer sequences, up to max_pages * 16, are still scored
// whole, by fewer blocks each). out.count [batch][Hkv] and out.tokens [batch][Hkv][capacity] are
// written. `scores` is optional (the tests check them; the decode step passes none: storing them
// cost 6% of the select at 64 x 128k on the H200): when given, it receives the group score of every
// page of each row whose pages were chosen (not every page kept), [batch][Hkv][max_pages] (entries past
// a row's pages unspecified), and must hold quest_scores_bytes. Bad configuration, budget, capacity or
// score buffer -> tw::Error before any launch. Asynchronous on `stream`.
void quest_select(const PagedKV& kv, const KeySideDev& side, const float* q, int64_t budget_tokens,
                  int64_t max_seq_len, const TokenLists& out, cudaStream_t stream = nullptr,
                  float* scores = nullptr, size_t scores_bytes = 0);

// The same selection as whole pages (layout.h PageLists), for the pruner (prune_topp's PageLists
// input): out.count gets the same token counts, out.pages the kept logical pages ascending (every
// page of the sequence where every token is selected). out.capacity (pages) must be at least
// quest_list_capacity / 16.
void quest_select_pages(const PagedKV& kv, const KeySideDev& side, const float* q, int64_t budget_tokens,
                        int64_t max_seq_len, const PageLists& out, cudaStream_t stream = nullptr);

}  // namespace tw::attn::cuda
