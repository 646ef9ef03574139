// Side structures of the key cache that Twilight needs (TWILIGHT.md sections 1 and 5), indexed like
// the KV pool pages: (layer, physical page, kv head).
//  - Quest page bounds: the element-wise min / max of K over the page's tokens, kept in 8 bits per
//    value with one affine step per (page, kv head) (page_bounds.h: the definition, conservative:
//    the decoded bounds bracket the exact ones). Codes [2][d] bytes (min row, max row) and
//    param {lo, s}: 2d + 8 bytes per (page, kv head), half of fp16 bounds, the bytes Quest scoring
//    reads. A page's bound gives u_p = sum_d max(q_d*kmax_d, q_d*kmin_d) >= q.k_t for every token t
//    of the page (kmin / kmax the decoded bounds).
//  - INT4 key mirror: per (token, kv head), asymmetric over the head dim:
//      scale = max((max(K) - min(K)) / 15, 1e-8), zero = min(K),
//      code  = clamp(floor((K - zero) / scale + 0.5), 0, 15)   (round half up; K - zero >= 0),
//    two codes per byte (element 2i in the low nibble, 2i+1 in the high). K~ = zero + code * scale is
//    within scale/2 of K.
// Everything is computed from the fp16 K stored in the pool (the values attention really uses), so it
// is updated on append and never recomputed per decode step.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kv/kv_cache.h"

namespace tw::attn {

constexpr float kInt4MinScale = 1e-8f;

class KeySide {
 public:
  explicit KeySide(const kv::KVShape& shape);  // head_dim must be even (two INT4 codes per byte)

  const kv::KVShape& shape() const { return shape_; }
  size_t bytes() const;

  // Update the side data of token `pos` of seq in `layer`, for every kv head. Call right after
  // pool.write(layer, seq, pos, ...). The page's bounds are recomputed from its slots 0 .. pos % 16,
  // so they always equal a from-scratch recomputation as long as a page's slots are written in order
  // (appends, truncate-and-rewrite, pages reused by another sequence all satisfy this).
  void append(const kv::KVPool& pool, int layer, const kv::SeqPages& seq, int64_t pos);
  // Scalar reference of append (same arithmetic, obviously correct; for tests). Results are bit-identical.
  void append_reference(const kv::KVPool& pool, int layer, const kv::SeqPages& seq, int64_t pos);

  // Page bounds (page_bounds.h): [2][d] codes (cmin row, then cmax row) and {lo, s}.
  const uint8_t* bound_codes(int layer, int32_t phys, int h) const {
    return bcode_[layer].get() + 2 * bound_off(phys, h);
  }
  const float* bound_param(int layer, int32_t phys, int h) const {
    return bparam_[layer].get() + 2 * head_index(phys, h);
  }
  // [kPageSize][d/2] bytes: slot j's codes at j * d/2.
  const uint8_t* k4(int layer, int32_t phys, int h) const { return k4_[layer].get() + code_off(phys, h); }
  // [kPageSize] floats.
  const float* k4_scale(int layer, int32_t phys, int h) const { return k4s_[layer].get() + slot_off(phys, h); }
  const float* k4_zero(int layer, int32_t phys, int h) const { return k4z_[layer].get() + slot_off(phys, h); }

 private:
  size_t head_index(int32_t phys, int h) const { return (size_t)phys * shape_.n_kv_heads + h; }
  size_t bound_off(int32_t phys, int h) const { return head_index(phys, h) * shape_.head_dim; }
  size_t code_off(int32_t phys, int h) const { return head_index(phys, h) * kv::kPageSize * (shape_.head_dim / 2); }
  size_t slot_off(int32_t phys, int h) const { return head_index(phys, h) * kv::kPageSize; }
  void locate(const kv::KVPool& pool, int layer, const kv::SeqPages& seq, int64_t pos, int32_t& phys, int& slot) const;

  kv::KVShape shape_;
  // Per layer, left uninitialised (like the pool): [n_pages][n_kv_heads][2][d] bound codes and [2] params,
  // [n_pages][n_kv_heads][kPageSize][d/2] codes, [n_pages][n_kv_heads][kPageSize] scale / zero.
  std::vector<HugeBuf<uint8_t>> bcode_;
  std::vector<HugeBuf<float>> bparam_, k4s_, k4z_;
  std::vector<HugeBuf<uint8_t>> k4_;
};

// Scalar reference quantiser (the definition above). k: [d] -> codes [d/2], scale, zero.
void int4_quantize_ref(const float* k, int d, uint8_t* codes, float* scale, float* zero);

// Dequantise one INT4 row: out[i] = zero + code_i * scale. codes [d/2] -> out [d].
void int4_dequantize(const uint8_t* codes, float scale, float zero, int d, float* out);

}  // namespace tw::attn
