// Double Sparsity selector (Yang et al. 2024): score every token with the partial dot product over
// the r calibrated channels of its kv head, q_c * k_c summed over c in channels(layer, h), read from
// the label cache (DsSide), and keep the top-B0 tokens. Same contract as the selectors of
// selectors.h: one Selection for ONE layer, decode query q [H][d] (post-RoPE), tokens [0, n_ctx),
// lists ascending without duplicates; budget >= n_ctx selects every token; bad input -> tw::Error.
#pragma once
#include <cstdint>

#include "attention/dense_cpu.h"  // HeadShape
#include "attention/ds_side.h"
#include "attention/sparse_types.h"
#include "common/threadpool.h"
#include "kv/kv_cache.h"

namespace tw::attn {

// Keeps the `budget` best tokens plus the current (last) token when it is not among them (budget or
// budget + 1 tokens, like the oracle). Ties: lower position first; a NaN score (only from inf keys)
// ranks as +inf. Head mode ranks each query head's tokens by its own partial score; Group mode ranks
// a kv head's tokens by the max over its G query heads (as Quest combines a group: a token any head
// scores high is kept for the group).
void select_ds(const DsSide& ds, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
               int64_t n_ctx, int64_t budget, GqaMode mode, Selection& out, ThreadPool* tp = nullptr);

// The partial scores (unscaled: no 1/sqrt(d), which does not change the ranking): scores
// [n_lists][n_ctx], n_lists = Hkv (Group: max over the group) or H (Head). Exposed for tests.
void ds_token_scores(const DsSide& ds, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                     int64_t n_ctx, GqaMode mode, float* scores, ThreadPool* tp = nullptr);

}  // namespace tw::attn
