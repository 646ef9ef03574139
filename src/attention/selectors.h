// Base selectors (TWILIGHT.md section 1, step 2): fixed-budget baselines and Twilight's level 1.
// Each fills a Selection for ONE layer of one sequence and one decode query q [H][d] (post-RoPE)
// over tokens [0, n_ctx). Lists: one per kv head (GqaMode::Group) or per query head (GqaMode::Head),
// positions ascending, no duplicates. A budget >= n_ctx selects every token. Bad input (budget <= 0,
// n_ctx <= 0, n_ctx beyond the sequence's pages, H not a multiple of Hkv, shapes that do not match
// the cache) throws tw::Error.
#pragma once
#include <cstdint>

#include "attention/dense_cpu.h"  // HeadShape
#include "attention/key_side.h"
#include "attention/sparse_types.h"
#include "common/threadpool.h"
#include "kv/kv_cache.h"

namespace tw::attn {

// Quest: page score u_p = sum_d max(q~_d*kmax_{p,d}, q~_d*kmin_{p,d}) on the 8-bit bounds with the int8
// query q~ (page_bounds.h: an upper bound of q~.k for every token of the page, computed exactly in
// integers; quest_page_upper_bounds below bounds q.k itself). Keeps ceil(budget_tokens / 16) pages in total (at least 2): the first page (sink)
// and the last (partial) page always, the rest by descending score (ties: lower page first; a NaN score,
// possible only with inf keys, counts as +inf: it cannot rule the page out). Group mode: a page's
// score for a kv head is the max over its G query heads. Emits the selected pages' tokens < n_ctx.
// Bounds of the last page may cover tokens >= n_ctx (still an upper bound of the ones < n_ctx).
void select_quest(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                  int64_t n_ctx, int64_t budget_tokens, GqaMode mode, Selection& out);
// Same result, page scoring split over the pool's threads.
void select_quest(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                  int64_t n_ctx, int64_t budget_tokens, GqaMode mode, Selection& out, ThreadPool& tp);

// StreamingLLM: the first `sinks` tokens and the last `window` tokens (window >= 1: the current token
// is always attended), same list for each of n_lists lists.
void select_streaming(int64_t n_ctx, int64_t sinks, int64_t window, int n_lists, GqaMode mode, Selection& out);

// Oracle top-k (analysis only): exact scores q.k/sqrt(d) from the fp16 cache. Keeps the k best tokens
// plus the current (last) token when it is not among them (so the list holds the true top-k, and
// k or k+1 tokens). Ties: lower position first.
// Head mode ranks each query head's tokens by its score. Group mode ranks a kv head's tokens by
// max over its G query heads of the softmax-normalised weights w_{g,t} = softmax_t(s_{g,t}): raw
// scores of different heads live on different scales (a head with a flat distribution would dominate
// a sum of logits otherwise), while the normalised weight is the token's share of that head's output;
// the max keeps every head's heavy tokens (a union-like choice, as the group kernel needs).
void select_topk_oracle(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                        const float* q, int64_t n_ctx, int64_t k, GqaMode mode, Selection& out);

// Every token [0, n_ctx) in each of n_lists lists.
void select_all(int64_t n_ctx, int n_lists, GqaMode mode, Selection& out);

// Page scores of Quest (exposed for tests and for level-1 variants such as page-level top-p): the
// integer score of page_bounds.h (int8 query against the 8-bit bounds), an upper bound of q~.k over
// the page for the int8 query q~. Writes scores [n_lists][n_pages] with n_pages = ceil(n_ctx / 16),
// n_lists = Hkv (Group) or H (Head).
void quest_page_scores(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                       int64_t n_ctx, GqaMode mode, float* scores, ThreadPool* tp = nullptr);

// Upper bounds of q.k over each page for the float query itself (the pruner's guard needs a true
// bound): the Head-mode page score plus the int8 query's slack, max_i |q_i - sq q8_i| times
// sum_i max(|kmin_i|, |kmax_i|) of the decoded bounds. bounds: [H][n_pages].
void quest_page_upper_bounds(const KeySide& ks, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                             const float* q, int64_t n_ctx, float* bounds, ThreadPool* tp = nullptr);

}  // namespace tw::attn
