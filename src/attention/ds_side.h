// Double Sparsity (Yang et al. 2024, arXiv 2408.07092): the per-model channel file and the "label
// cache", the side structure its selector scores tokens with.
//  - Channels: per (layer, kv head), r offline-calibrated "heavy" channels of the post-RoPE K (the
//    ones with the largest mean |q_c * k_c| over real text, `twilight calibrate`). Stored in ranked
//    order (heaviest first).
//  - Label cache: per (layer, physical page, kv head) the fp16 K values of those r channels for the
//    page's 16 slots, channel-major [r][kPageSize] (r * 32 B per page, vs d * 32 B of K): scoring a
//    page is r multiply-adds of 16-wide vectors (one channel of the query times one row). Copied
//    bit-exactly from the pool's fp16 K on every append (the values attention uses), never recomputed.
// Separate from KeySide (Quest bounds + INT4 mirror) because it is needed only with ds, depends on a
// calibration file, and its shape (r) is per model; it mirrors KeySide's append contract.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kv/kv_cache.h"

namespace tw::attn {

// The channel file. Text, line oriented (see write_ds_channels):
//   twilight-ds-channels 1
//   arch <arch> / name <general.name> / fingerprint <16 hex> / n_layers N / n_kv_heads N /
//   head_dim N / r N / calib_tokens N
//   then n_layers * n_kv_heads lines "layer head c_0 .. c_{r-1}" (ranked, heaviest first).
struct DsChannels {
  std::string arch, name, fingerprint;  // identity of the model it was calibrated on
  int n_layers = 0, n_kv_heads = 0, head_dim = 0;
  int r = 0;                            // channels per (layer, kv head)
  int64_t calib_tokens = 0;             // tokens the statistic was collected over
  std::vector<int32_t> ch;              // [n_layers][n_kv_heads][r], distinct per row, in [0, head_dim)

  const int32_t* at(int layer, int h) const { return ch.data() + ((size_t)layer * n_kv_heads + h) * r; }
  void validate(const std::string& what) const;  // tw::Error naming `what` and the problem
};

DsChannels read_ds_channels(const std::string& path);
void write_ds_channels(const std::string& path, const DsChannels& c);  // atomically (temp file + rename)

// Error (naming the file's model and this one) unless the file was made for this model: same
// n_layers, n_kv_heads, head_dim, and (when `fingerprint` is non-empty) the same fingerprint.
void check_ds_model(const DsChannels& c, const std::string& path, int n_layers, int n_kv_heads, int head_dim,
                    const std::string& fingerprint);

// Largest r the label cache supports (the scorer converts a page's labels on the stack).
constexpr int kDsMaxR = 256;

// Default r: d / 4 (16 at d = 64, 32 at d = 128), at least 1.
inline int ds_default_r(int head_dim) { return head_dim / 4 > 0 ? head_dim / 4 : 1; }

// The calibration statistic (Double Sparsity's offline calibration with "qk" labels, the default of
// its public code: every token paired with itself): per (layer, kv head, channel c) the sum over
// tokens t and over the kv head's G query heads g of |q_{t,g,c} * k_{t,c}|, post-RoPE. The heavy
// channels are the r largest (= largest mean). Summed over the group because one label cache per
// kv head serves all G query heads.
class DsCalibration {
 public:
  DsCalibration(int n_layers, int n_heads, int n_kv_heads, int head_dim);
  // n tokens of one layer: q [n][H*d], k [n][Hkv*d] (the Model::QKObserver arguments).
  void add(int layer, int64_t n, const float* q, const float* k);
  int64_t tokens(int layer) const { return tokens_[layer]; }
  // sum [d] of (layer, kv head).
  const double* sum(int layer, int h) const { return sum_.data() + ((size_t)layer * hkv_ + h) * d_; }
  // Top r channels per (layer, kv head), ranked (largest statistic first, ties: lower channel first).
  // Identity fields (arch, name, fingerprint) are left to the caller; calib_tokens = tokens(0).
  DsChannels channels(int r) const;

 private:
  int n_layers_, h_, hkv_, d_;
  std::vector<int64_t> tokens_;  // (n_layers)
  std::vector<double> sum_;      // [n_layers][Hkv][d]
};

class DsSide {
 public:
  // shape must match the channels (n_layers, n_kv_heads, head_dim).
  DsSide(const kv::KVShape& shape, DsChannels channels);

  const kv::KVShape& shape() const { return shape_; }
  const DsChannels& channels() const { return ch_; }
  int r() const { return ch_.r; }
  size_t bytes() const;

  // Copy the labels of token `pos` of seq in `layer` for every kv head. Call right after
  // pool.write(layer, seq, pos, ...) (same contract as KeySide::append).
  void append(const kv::KVPool& pool, int layer, const kv::SeqPages& seq, int64_t pos);

  // [r][kPageSize] fp16 bits: channel i (= channels().at(layer, h)[i]) of slot j at i * kPageSize + j.
  const uint16_t* labels(int layer, int32_t phys, int h) const {
    return lab_[layer].get() + ((size_t)phys * shape_.n_kv_heads + h) * kv::kPageSize * ch_.r;
  }

 private:
  kv::KVShape shape_;
  DsChannels ch_;
  std::vector<std::unique_ptr<uint16_t[]>> lab_;  // per layer [n_pages][n_kv_heads][r][kPageSize], uninitialised
};

}  // namespace tw::attn
