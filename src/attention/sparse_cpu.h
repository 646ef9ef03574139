// Sparse decode attention on the CPU (TWILIGHT.md section 1, step 5): exact attention with the
// fp16 K and V of the paged cache over each list of a Selection only, with the same online softmax
// as the dense path (online_softmax.h). The current token n_ctx - 1 is always attended, also when a
// list lacks it (never twice).
// Group mode: list h serves query heads h*G .. h*G+G-1 (K/V rows read once for the group);
// Head mode: list hq serves query head hq (kv head hq / G).
// Split-KV: every list is cut into fixed chunks of kChunkTokens positions, each chunk gives one
// softmax state per query head, and the chunks are merged in order, so the result does not depend
// on the thread count. Per block of 16 listed tokens: K/V rows gathered to fp32 (F16C / AVX-512
// conversions), scores, vectorised exps, V accumulated with o touched once per block. At the AVX-512
// level with d = 64 / 128 the block step is attend_block_avx512.h's (shared with dense decode: K
// converted once for the group, V converted inside the accumulation, the next block prefetched);
// AVX-512 loops for other d % 16 == 0, the portable loops otherwise (TWILIGHT_SIMD=scalar).
#pragma once
#include <cstdint>

#include "attention/dense_cpu.h"
#include "attention/sparse_types.h"
#include "common/threadpool.h"
#include "kv/kv_cache.h"

namespace tw::attn {

// q: [n_heads][d] post-RoPE; out: [n_heads][d]. sel positions in [0, n_ctx), ascending, unique.
void sparse_decode(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                   const Selection& sel, int64_t n_ctx, float* out, ThreadPool& tp);
// The same at a given SIMD level (tests pin each level; the overload above uses ops::active_simd()).
void sparse_decode(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs, const float* q,
                   const Selection& sel, int64_t n_ctx, float* out, ThreadPool& tp, ops::Simd level);

// Scalar reference (double, two-pass softmax per query head over list + current token) for tests.
void sparse_reference(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                      const float* q, const Selection& sel, int64_t n_ctx, float* out);

}  // namespace tw::attn
