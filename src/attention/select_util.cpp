#include "attention/select_util.h"

#include <algorithm>
#include <cmath>
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

void push_top_k_and_last(Selection& out, const float* key, int64_t n_ctx, int64_t k, std::vector<int32_t>& tmp) {
  tmp.resize(n_ctx);
  std::iota(tmp.begin(), tmp.end(), 0);
  top_r(tmp, key, k);
  tmp.resize(std::min<int64_t>(k, n_ctx));
  if (std::find(tmp.begin(), tmp.end(), (int32_t)(n_ctx - 1)) == tmp.end()) tmp.push_back((int32_t)(n_ctx - 1));
  std::sort(tmp.begin(), tmp.end());
  out.push_list(tmp.data(), (int64_t)tmp.size());
}

}  // namespace tw::attn::detail
