// Dense split-KV decode attention on the GPU: the baseline Twilight is measured against and the
// fallback. q [batch][H][d] float -> out [batch][H][d] float over all seq_len[b] tokens of each
// sequence, through the page table (layout.h).
//
// Work: one block per (split, kv head, sequence); the block's warps take pages of its split in turn,
// and each page of K and V is read once for all G query heads of the kv head (GQA sharing). Scores
// and P.V run on the tensor cores (mma.m16n8k16, query heads padded to 16 rows): q is split into
// q_hi + q_lo in the KV dtype so the logits keep ~fp32 accuracy; the softmax weights are rounded to
// the KV dtype before P.V (and the normaliser sums the rounded weights), which is the only rounding
// beyond fp32: relative error ~2e-4 (fp16), ~2e-3 (bf16) of the output.
// Splits > 1: each block writes a partial (max, sum, unnormalised output) to the workspace and a
// second small kernel merges them (log-sum-exp). Splits are chosen on the host from shapes only, so
// a decode step has fixed launches, allocates nothing and can be captured in a CUDA graph.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "attention/cuda/layout.h"

namespace tw::attn::cuda {

struct DenseDecodePlan {
  int n_splits = 1;         // KV splits per (sequence, kv head)
  int pages_per_split = 1;  // pages of each split; the last split also takes every page past the others
  int blocks_per_sm = 0;    // informational: resident blocks per SM the planner assumed
};

// Plan for sequences of at most max_seq_len tokens (a host-side bound; longer sequences are still
// computed correctly, their last split just does more work) on a GPU with sm_count SMs.
DenseDecodePlan plan_dense_decode(const PagedKV& kv, int64_t max_seq_len, int sm_count);

// Workspace bytes dense_decode needs for this plan (0 when n_splits == 1).
size_t dense_decode_workspace_bytes(const PagedKV& kv, const DenseDecodePlan& plan);

// out[b][h] = softmax(q[b][h] . K_b / sqrt(d)) V_b over tokens [0, seq_len[b]). q, out: device,
// [batch][H][d] float. workspace: device, >= dense_decode_workspace_bytes (16-byte aligned).
// seq_len[b] <= 0 gives a zero output row; seq_len is clamped to max_pages * 16. Page table entries
// must lie in [0, n_pages). Bad configuration or plan -> tw::Error before any launch.
// Asynchronous on `stream`.
void dense_decode(const PagedKV& kv, const DenseDecodePlan& plan, const float* q, float* out, void* workspace,
                  size_t workspace_bytes, cudaStream_t stream = nullptr);

}  // namespace tw::attn::cuda
