// Varlen sparse decode attention on the GPU (TWILIGHT.md sections 1.5 and 4.3): exact attention with
// the fp16 / bf16 K and V of the paged cache over one token list per (sequence, kv head), the same
// function as the CPU sparse_decode (attention/sparse_cpu.h) in Group mode:
//   for query head hq = h*G + r of sequence b: softmax(q . K_t / sqrt(d)) V_t over the tokens t of
//   list (b, h), plus the current token seq_len[b] - 1 when the list lacks it (never twice).
// All G query heads of a group are served from one read of each K / V row (online softmax).
//
// Two or three launches, all sizes on the device (no host synchronisation, fixed shapes: capturable in
// a CUDA graph):
//   1. plan (only from a wave of lists, more lists than the attend blocks resident at once): counts ->
//      tokens per item T (from the total, so that the batch fills the GPU; at least kMinChunk) ->
//      per-list prefix of item counts -> the work items, each with its bounds. Below a wave there is
//      no plan: each list splits itself by its own length in the attend kernel;
//   2. attend: a fixed grid of blocks takes the work items; each item is ~T tokens of one list and
//      writes one partial softmax state {m, l, o[d]} per query head of the group, or, when it is its
//      list's only item, the output itself;
//   3. combine: per query head of a list of several items, the log-sum-exp merge of their states.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "attention/cuda/layout.h"

namespace tw::attn::cuda {

// Bytes of workspace sparse_decode needs for this shape and list capacity (its upper bound: every
// list full). Throws tw::Error for an unsupported configuration (head dim, dtype, group size).
size_t sparse_decode_workspace_bytes(const PagedKV& kv, int list_capacity);

// kv: the paged K / V, page table and sequence lengths. q: [batch][H][d] float (post-RoPE).
// lists: one list per (sequence, kv head), positions ascending, unique, in [0, seq_len) (counts are
// clamped to [0, capacity]). out: [batch][H][d] float. workspace: >= sparse_decode_workspace_bytes
// bytes of device memory (contents need no initialisation). Asynchronous on `stream`.
void sparse_decode(const PagedKV& kv, const float* q, const TokenLists& lists, float* out, void* workspace,
                   size_t workspace_bytes, cudaStream_t stream = 0);

}  // namespace tw::attn::cuda
