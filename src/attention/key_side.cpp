#include "attention/key_side.h"

#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "common/fp16.h"
#include "attention/page_bounds.h"

namespace tw::attn {

namespace {

using kv::kPageSize;

#define TW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// The shared quantisation step, written once so the fast and reference paths cannot drift apart.
inline uint8_t int4_code(float k, float zero, float scale) {
  const float x = std::floor((k - zero) / scale + 0.5f);
  return (uint8_t)std::clamp(x, 0.f, 15.f);
}

// Fast path for one (page, head): k16 = the page's fp16 K [kPageSize][d]; slots 0..slot are valid.
// Writes the 8-bit bounds over those slots (page_bounds.h) and the INT4 row of `slot`.
TW_CLONES void update_head(const uint16_t* k16, int slot, int d, uint8_t* bcodes, float* bparam, uint8_t* codes,
                           float* scale, float* zero) {
  // fp16 -> fp32 of the valid slots (vcvtph2ps on F16C targets).
  float kf[kPageSize * 256];  // d <= 256 checked by the constructor
  const _Float16* h = reinterpret_cast<const _Float16*>(k16);
  const int n = (slot + 1) * d;
#pragma omp simd
  for (int i = 0; i < n; ++i) kf[i] = (float)h[i];

  float kmin[256], kmax[256];  // [d] used
  for (int i = 0; i < d; ++i) {
    kmin[i] = kf[i];
    kmax[i] = kf[i];
  }
  for (int j = 1; j <= slot; ++j) {
    const float* kj = kf + (size_t)j * d;
#pragma omp simd
    for (int i = 0; i < d; ++i) {
      kmin[i] = kj[i] < kmin[i] ? kj[i] : kmin[i];
      kmax[i] = kj[i] > kmax[i] ? kj[i] : kmax[i];
    }
  }
  quantize_page_bounds(kmin, kmax, d, bcodes, bparam);

  const float* k = kf + (size_t)slot * d;
  float mn = k[0], mx = k[0];
#pragma omp simd reduction(min : mn) reduction(max : mx)
  for (int i = 0; i < d; ++i) {
    mn = std::min(mn, k[i]);
    mx = std::max(mx, k[i]);
  }
  const float s = std::max((mx - mn) / 15.f, kInt4MinScale);
  uint8_t c[256];
#pragma omp simd
  for (int i = 0; i < d; ++i) c[i] = int4_code(k[i], mn, s);
#pragma omp simd
  for (int i = 0; i < d / 2; ++i) codes[i] = (uint8_t)(c[2 * i] | (c[2 * i + 1] << 4));
  *scale = s;
  *zero = mn;
}

}  // namespace

void int4_quantize_ref(const float* k, int d, uint8_t* codes, float* scale, float* zero) {
  float mn = k[0], mx = k[0];
  for (int i = 1; i < d; ++i) {
    if (k[i] < mn) mn = k[i];
    if (k[i] > mx) mx = k[i];
  }
  const float s = std::max((mx - mn) / 15.f, kInt4MinScale);
  for (int i = 0; i < d / 2; ++i) {
    const uint8_t lo = int4_code(k[2 * i], mn, s), hi = int4_code(k[2 * i + 1], mn, s);
    codes[i] = (uint8_t)(lo | (hi << 4));
  }
  *scale = s;
  *zero = mn;
}

void int4_dequantize(const uint8_t* codes, float scale, float zero, int d, float* out) {
  for (int i = 0; i < d / 2; ++i) {
    out[2 * i] = zero + (float)(codes[i] & 15) * scale;
    out[2 * i + 1] = zero + (float)(codes[i] >> 4) * scale;
  }
}

KeySide::KeySide(const kv::KVShape& s) : shape_(s) {
  TW_CHECK(s.n_layers > 0 && s.n_kv_heads > 0 && s.head_dim > 0 && s.n_pages > 0, "key side: invalid shape");
  TW_CHECK(s.head_dim % 2 == 0 && s.head_dim <= 256, "key side: head_dim ", s.head_dim,
           " unsupported (must be even, at most 256)");
  const size_t heads = (size_t)s.n_pages * s.n_kv_heads;
  for (int l = 0; l < s.n_layers; ++l) {
    bcode_.push_back(huge_buf<uint8_t>(heads * 2 * s.head_dim));
    bparam_.push_back(huge_buf<float>(heads * 2));
    k4_.push_back(huge_buf<uint8_t>(heads * kPageSize * (s.head_dim / 2)));
    k4s_.push_back(huge_buf<float>(heads * kPageSize));
    k4z_.push_back(huge_buf<float>(heads * kPageSize));
  }
}

size_t KeySide::bytes() const {
  const size_t heads = (size_t)shape_.n_layers * shape_.n_pages * shape_.n_kv_heads;
  return heads * (2 * shape_.head_dim + 2 * sizeof(float) + kPageSize * (shape_.head_dim / 2) + 2 * kPageSize * sizeof(float));
}

void KeySide::locate(const kv::KVPool& pool, int layer, const kv::SeqPages& seq, int64_t pos, int32_t& phys,
                     int& slot) const {
  const kv::KVShape& ps = pool.shape();
  TW_CHECK(ps.n_layers == shape_.n_layers && ps.n_kv_heads == shape_.n_kv_heads && ps.head_dim == shape_.head_dim &&
               ps.n_pages == shape_.n_pages,
           "key side: shape does not match the kv pool");
  TW_CHECK(layer >= 0 && layer < shape_.n_layers, "key side: layer ", layer, " out of range");
  TW_CHECK(pos >= 0 && pos / kPageSize < (int64_t)seq.pages.size(), "key side: position ", pos, " not reserved");
  phys = seq.pages[pos / kPageSize];
  TW_CHECK(phys >= 0 && phys < shape_.n_pages, "key side: physical page ", phys, " out of range");
  slot = (int)(pos % kPageSize);
}

void KeySide::append(const kv::KVPool& pool, int layer, const kv::SeqPages& seq, int64_t pos) {
  int32_t phys;
  int slot;
  locate(pool, layer, seq, pos, phys, slot);
  const int d = shape_.head_dim;
  for (int h = 0; h < shape_.n_kv_heads; ++h) {
    const size_t so = slot_off(phys, h) + slot;
    update_head(pool.k_page(layer, phys, h), slot, d, bcode_[layer].get() + 2 * bound_off(phys, h),
                bparam_[layer].get() + 2 * head_index(phys, h), k4_[layer].get() + code_off(phys, h) + (size_t)slot * (d / 2),
                k4s_[layer].get() + so, k4z_[layer].get() + so);
  }
}

void KeySide::append_reference(const kv::KVPool& pool, int layer, const kv::SeqPages& seq, int64_t pos) {
  int32_t phys;
  int slot;
  locate(pool, layer, seq, pos, phys, slot);
  const int d = shape_.head_dim;
  std::vector<float> k(d), kmn(d), kmx(d);
  for (int h = 0; h < shape_.n_kv_heads; ++h) {
    const uint16_t* page = pool.k_page(layer, phys, h);
    for (int i = 0; i < d; ++i) {
      float mn = INFINITY, mx = -INFINITY;
      for (int j = 0; j <= slot; ++j) {
        const float x = fp16_to_fp32(page[(size_t)j * d + i]);
        mn = std::min(mn, x);
        mx = std::max(mx, x);
      }
      kmn[i] = mn;
      kmx[i] = mx;
    }
    quantize_page_bounds(kmn.data(), kmx.data(), d, bcode_[layer].get() + 2 * bound_off(phys, h),
                         bparam_[layer].get() + 2 * head_index(phys, h));
    for (int i = 0; i < d; ++i) k[i] = fp16_to_fp32(page[(size_t)slot * d + i]);
    const size_t so = slot_off(phys, h) + slot;
    int4_quantize_ref(k.data(), d, k4_[layer].get() + code_off(phys, h) + (size_t)slot * (d / 2), k4s_[layer].get() + so,
                      k4z_[layer].get() + so);
  }
}

}  // namespace tw::attn
