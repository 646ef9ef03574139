// Helpers shared by the token / page selectors (selectors.cpp, select_ds.cpp): input checks, the
// NaN-safe ranking key, top-r by key, and "top k + the current token" list emission.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention/dense_cpu.h"  // HeadShape
#include "attention/sparse_types.h"
#include "kv/kv_cache.h"

namespace tw::attn::detail {

inline int n_lists_of(const HeadShape& hs, GqaMode mode) { return mode == GqaMode::Group ? hs.n_kv_heads : hs.n_heads; }

// tw::Error (prefixed with `who`) unless the head shape matches the cache (Hkv, d), H is a multiple
// of Hkv, the layer exists, q is non-null and 0 < n_ctx <= the sequence's reserved tokens.
void check_common(const char* who, const kv::KVShape& cs, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                  const float* q, int64_t n_ctx);

// Ranking key: NaN (only from inf keys) cannot rule a token / page out, so it ranks as +inf.
inline float rank_key(float x) { return std::isnan(x) ? INFINITY : x; }

// Top r of idx[0..n) by key[idx] descending, ties lower index first; the chosen ones end up in
// idx[0..r) (unordered). r <= 0 or r >= n: idx unchanged.
void top_r(std::vector<int32_t>& idx, const float* key, int64_t r);

// Order-preserving map float -> uint32 for the ranking key: larger key, larger u. NaN ranks as +inf
// (rank_key) and -0.0 as +0.0, so u ties exactly when the float comparison of rank_key ties.
inline uint32_t order_bits(float x) {
  x = rank_key(x);
  if (x == 0.f) x = 0.f;
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The k-th largest (1 <= k <= n) of n order-preserving uint32 keys by radix select (O(n), no sort);
// n_equal_taken = how many of the keys equal to it belong to the top k.
uint32_t kth_largest_bits(const uint32_t* u, int64_t n, int64_t k, int64_t& n_equal_taken);

// Append to out one list: the k best tokens of [0, n_ctx) by key (top_r's order: descending, NaN as
// +inf, ties lower position first), plus the current token n_ctx - 1 when it is not among them;
// ascending. O(n_ctx) (radix select on the key bits). tmp is scratch.
void push_top_k_and_last(Selection& out, const float* key, int64_t n_ctx, int64_t k, std::vector<int32_t>& tmp);

}  // namespace tw::attn::detail
