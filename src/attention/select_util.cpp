#include "attention/select_util.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "common/error.h"

namespace tw::attn::detail {

void check_common(const char* who, const kv::KVShape& cs, const kv::SeqPages& seq, int layer, const HeadShape& hs,
                  const float* q, int64_t n_ctx) {
  TW_CHECK(hs.n_heads > 0 && hs.n_kv_heads > 0 && hs.n_heads % hs.n_kv_heads == 0, who, ": ", hs.n_heads,
           " query heads not a positive multiple of ", hs.n_kv_heads, " kv heads");
  TW_CHECK(hs.n_kv_heads == cs.n_kv_heads && hs.head_dim == cs.head_dim, who, ": head shape (Hkv ", hs.n_kv_heads,
           ", d ", hs.head_dim, ") does not match the cache (Hkv ", cs.n_kv_heads, ", d ", cs.head_dim, ")");
  TW_CHECK(layer >= 0 && layer < cs.n_layers, who, ": layer ", layer, " out of range");
  TW_CHECK(q != nullptr, who, ": null query");
  TW_CHECK(n_ctx > 0, who, ": n_ctx must be positive, got ", n_ctx);
  TW_CHECK(n_ctx <= std::numeric_limits<int32_t>::max() &&
               (n_ctx + kv::kPageSize - 1) / kv::kPageSize <= (int64_t)seq.pages.size(),
           who, ": n_ctx ", n_ctx, " exceeds the sequence's ", seq.pages.size(), " pages");
}

void top_r(std::vector<int32_t>& idx, const float* key, int64_t r) {
  if (r <= 0 || r >= (int64_t)idx.size()) return;
  auto better = [key](int32_t a, int32_t b) {
    const float ka = rank_key(key[a]), kb = rank_key(key[b]);
    return ka > kb || (ka == kb && a < b);
  };
  std::nth_element(idx.begin(), idx.begin() + r, idx.end(), better);
}

uint32_t kth_largest_bits(const uint32_t* u, int64_t n, int64_t k, int64_t& n_equal_taken) {
  // Radix select on the bits, 11 + 11 + 10, high to low: each level histograms the candidates whose
  // higher bits equal the boundary found so far and walks the buckets from the top until k is reached.
  std::vector<int64_t> cnt(1 << 11);
  std::vector<int32_t> cand, next;
  uint32_t prefix = 0;
  int64_t need = k;  // how many still to take at or below the current prefix
  const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
  for (int lv = 0; lv < 3; ++lv) {
    const int sh = shifts[lv];
    const uint32_t mask = (1u << widths[lv]) - 1;
    std::fill(cnt.begin(), cnt.begin() + (mask + 1), 0);
    if (lv == 0)
      for (int64_t i = 0; i < n; ++i) ++cnt[u[i] >> sh];
    else
      for (int32_t i : cand) ++cnt[(u[i] >> sh) & mask];
    int64_t b = mask;
    for (; b > 0 && cnt[b] < need; --b) need -= cnt[b];
    prefix |= (uint32_t)b << sh;
    if (lv == 2) break;
    // Candidates of the next level: the elements of bucket b.
    const uint32_t hi_mask = ~((1u << sh) - 1);
    next.clear();
    if (lv == 0) {
      for (int64_t i = 0; i < n; ++i)
        if ((u[i] & hi_mask) == prefix) next.push_back((int32_t)i);
    } else {
      for (int32_t i : cand)
        if ((u[i] & hi_mask) == prefix) next.push_back(i);
    }
    cand.swap(next);
  }
  n_equal_taken = need;
  return prefix;
}

void push_top_k_and_last(Selection& out, const float* key, int64_t n_ctx, int64_t k, std::vector<int32_t>& tmp) {
  tmp.clear();
  if (k >= n_ctx) {
    tmp.resize(n_ctx);
    std::iota(tmp.begin(), tmp.end(), 0);
  } else if (k > 0) {
    // The k-th largest key T and how many of the keys equal to T are taken (the lowest positions):
    // then one ascending pass emits the top k in position order, ties broken by lower position.
    std::vector<uint32_t> u(n_ctx);
    for (int64_t i = 0; i < n_ctx; ++i) u[i] = order_bits(key[i]);
    int64_t eq_left = 0;
    const uint32_t T = kth_largest_bits(u.data(), n_ctx, k, eq_left);
    tmp.reserve(k + 1);
    for (int64_t i = 0; i < n_ctx; ++i)
      if (u[i] > T || (u[i] == T && eq_left-- > 0)) tmp.push_back((int32_t)i);
  }
  if (tmp.empty() || tmp.back() != (int32_t)(n_ctx - 1)) tmp.push_back((int32_t)(n_ctx - 1));
  out.push_list(tmp.data(), (int64_t)tmp.size());
}

}  // namespace tw::attn::detail
