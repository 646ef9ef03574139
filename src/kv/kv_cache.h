// Paged KV cache shared by the CPU and CUDA backends.
//
// Memory is a pool of physical pages per layer; a page holds kPageSize consecutive tokens of ONE
// kv head, contiguous, so a decode kernel reads a page of a head as one block
// (16 x 128 x 2 B = 4 KiB at d = 128). A sequence owns a page table mapping its logical pages
// (token / 16) to physical pages; the same physical page id is used in every layer.
// Per-page side data for sparse attention (Quest key min/max, INT4 key mirror) is indexed by the
// same (physical page, kv head) and is added by the attention layer, not stored here.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/huge_buf.h"

namespace tw::kv {

constexpr int kPageSize = 16;

struct KVShape {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int64_t n_pages = 0;  // physical pages in the pool (capacity = n_pages * kPageSize tokens)
};

// One sequence's view of the pool.
struct SeqPages {
  std::vector<int32_t> pages;  // logical page -> physical page
  int64_t n_tokens = 0;        // tokens whose K/V are stored (positions 0 .. n_tokens-1)
};

class KVPool {
 public:
  explicit KVPool(const KVShape& shape);

  const KVShape& shape() const { return shape_; }
  int64_t free_pages() const { return (int64_t)free_.size(); }
  size_t bytes() const;  // K + V storage

  // Make seq able to hold n_tokens tokens (allocates pages); throws tw::Error when the pool is full.
  void reserve(SeqPages& seq, int64_t n_tokens);
  // Return all pages of seq to the pool and empty it.
  void release(SeqPages& seq);

  // Store K and V of one token (post-RoPE K), k/v: [n_kv_heads][head_dim] fp32 -> fp16.
  // The token's page must have been reserved. Does not change seq.n_tokens (the caller advances it
  // once all layers of a step have written).
  void write(int layer, const SeqPages& seq, int64_t pos, const float* k, const float* v);

  // Page of (layer, physical page, kv head): [kPageSize][head_dim] fp16 bits.
  const uint16_t* k_page(int layer, int32_t phys, int head) const {
    return k_[layer].get() + page_offset(phys, head);
  }
  const uint16_t* v_page(int layer, int32_t phys, int head) const {
    return v_[layer].get() + page_offset(phys, head);
  }

 private:
  size_t page_offset(int32_t phys, int head) const {
    return ((size_t)phys * shape_.n_kv_heads + head) * kPageSize * shape_.head_dim;
  }
  KVShape shape_;
  // Per layer: [n_pages][n_kv_heads][kPageSize][head_dim]. Left uninitialised on purpose: the OS
  // maps pages as they are first written, so a 32k-token pool costs memory only as it fills.
  std::vector<HugeBuf<uint16_t>> k_, v_;
  std::vector<int32_t> free_;                 // free physical pages (stack)
};

}  // namespace tw::kv
