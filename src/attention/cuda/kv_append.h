// KV append on the GPU: stores the new token's K (post-RoPE) and V of every sequence of the batch in
// its page and, in the same kernel, updates the Quest page bounds and the INT4 key mirror exactly as
// the CPU KeySide does (attention/key_side.h): bounds over the page's slots 0..slot, INT4 row of the
// new token from its K AFTER rounding to the KV dtype (scale = max((max-min)/15, 1e-8), zero = min,
// code = clamp(floor((K - zero) / scale + 0.5), 0, 15)). fp16 results are bit-identical to the CPU's.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention/cuda/layout.h"

namespace tw::attn::cuda {

// k_new, v_new: [batch][Hkv][d] float (device). Token b goes to position positions[b] of sequence b
// (positions: [batch] int32, device), or seq_len[b] - 1 when positions is null (the cache already
// counts the new token). A negative position skips the sequence (an idle slot of the batch); so does
// a position past the page table (max_pages * 16) or whose page entry is outside [0, n_pages) (device
// data cannot be checked on the host without a sync). Pages must be written in slot order, as on the
// CPU, for the bounds to equal a recomputation.
// side: all five pointers set (bounds + INT4 mirror updated) or all null (K/V only); anything else
// is a tw::Error. The K/V pools of kv are written (PagedKV holds them const for the readers).
// Asynchronous on `stream`; no allocation, no host sync (graph-capturable).
void kv_append(const PagedKV& kv, const KeySideDev& side, const float* k_new, const float* v_new,
               const int32_t* positions, cudaStream_t stream = nullptr);

}  // namespace tw::attn::cuda
