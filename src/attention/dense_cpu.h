// Exact dense attention on the CPU over the paged KV cache: the reference every sparse path is
// tested against, and the fallback. Online softmax, split over threads (decode: split-KV over page
// ranges per kv head, then merge; prefill: blocks of query tokens per kv head). Every K/V page is
// read once for all G query heads of its kv head (and, in prefill, a block of query tokens).
#pragma once
#include <cstdint>

#include "common/threadpool.h"
#include "kv/kv_cache.h"

namespace tw::ops {
enum class Simd;  // ops/cpu/matmul.h
}

namespace tw::attn {

struct HeadShape {
  int n_heads = 0;     // query heads H
  int n_kv_heads = 0;  // Hkv; G = H / Hkv query heads share one kv head (GQA)
  int head_dim = 0;    // d
};

// One decode query. q: [n_heads][d] (post-RoPE); attends to tokens [0, n_ctx) of seq.
// out: [n_heads][d].
void dense_decode(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                  const float* q, int64_t n_ctx, float* out, ThreadPool& tp);
// The same at a given SIMD level (tests pin each level; the overload above uses ops::active_simd()):
// AVX512 for d = 64 / 128 (attend_block_avx512.h), AVX2 for d % 8 == 0, else the portable loops.
void dense_decode(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                  const float* q, int64_t n_ctx, float* out, ThreadPool& tp, ops::Simd level);

// Causal prefill: n queries at positions pos0 .. pos0+n-1; query i sees tokens [0, pos0+i].
// q: [n][n_heads][d]; out: [n][n_heads][d]. K/V of all n tokens must already be in the cache.
void dense_prefill(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                   const float* q, int64_t n, int64_t pos0, float* out, ThreadPool& tp);

// Scalar, obviously-correct reference (full score vector, two-pass softmax, double accumulation)
// for tests: one query per head at n_ctx tokens. out: [n_heads][d].
void dense_reference(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                     const float* q, int64_t n_ctx, float* out);

}  // namespace tw::attn
