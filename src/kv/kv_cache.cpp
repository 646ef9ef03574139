#include "kv/kv_cache.h"

#include "common/error.h"
#include "common/fp16.h"

namespace tw::kv {

KVPool::KVPool(const KVShape& s) : shape_(s) {
  TW_CHECK(s.n_layers > 0 && s.n_kv_heads > 0 && s.head_dim > 0 && s.n_pages > 0, "kv cache: invalid shape");
  const size_t per_layer = (size_t)s.n_pages * s.n_kv_heads * kPageSize * s.head_dim;
  for (int l = 0; l < s.n_layers; ++l) {
    k_.push_back(huge_buf<uint16_t>(per_layer));
    v_.push_back(huge_buf<uint16_t>(per_layer));
  }
  free_.reserve(s.n_pages);
  for (int64_t p = s.n_pages - 1; p >= 0; --p) free_.push_back((int32_t)p);  // hand out 0, 1, 2, ... first
}

size_t KVPool::bytes() const {
  return 2 * (size_t)shape_.n_layers * shape_.n_pages * shape_.n_kv_heads * kPageSize * shape_.head_dim * sizeof(uint16_t);
}

void KVPool::reserve(SeqPages& seq, int64_t n_tokens) {
  const int64_t need = (n_tokens + kPageSize - 1) / kPageSize;
  const int64_t more = need - (int64_t)seq.pages.size();
  if (more <= 0) return;
  if (more > (int64_t)free_.size())
    fail("kv cache full: ", n_tokens, " tokens need ", need, " pages, ", seq.pages.size() + free_.size(),
         " available (capacity ", shape_.n_pages * kPageSize, " tokens)");
  for (int64_t i = 0; i < more; ++i) {
    seq.pages.push_back(free_.back());
    free_.pop_back();
  }
}

void KVPool::release(SeqPages& seq) {
  for (auto it = seq.pages.rbegin(); it != seq.pages.rend(); ++it) free_.push_back(*it);
  seq.pages.clear();
  seq.n_tokens = 0;
}

void KVPool::write(int layer, const SeqPages& seq, int64_t pos, const float* k, const float* v) {
  const int64_t lp = pos / kPageSize;
  TW_CHECK(layer >= 0 && layer < shape_.n_layers, "kv cache: layer ", layer, " out of range");
  TW_CHECK(pos >= 0 && lp < (int64_t)seq.pages.size(), "kv cache: position ", pos, " not reserved");
  const int32_t phys = seq.pages[lp];
  const int slot = (int)(pos % kPageSize);
  const int d = shape_.head_dim;
  for (int h = 0; h < shape_.n_kv_heads; ++h) {
    uint16_t* kd = k_[layer].get() + page_offset(phys, h) + (size_t)slot * d;
    uint16_t* vd = v_[layer].get() + page_offset(phys, h) + (size_t)slot * d;
    for (int i = 0; i < d; ++i) {
      kd[i] = fp32_to_fp16(k[h * d + i]);
      vd[i] = fp32_to_fp16(v[h * d + i]);
    }
  }
}

}  // namespace tw::kv
