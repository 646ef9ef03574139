// KV dumps: the K/V cache of a real prefill of real text, plus the real post-RoPE queries of the
// tokens at its end, saved so attention benchmarks (the CPU bench, later the GPU bench) replay real
// data without re-running the model. Written by `twilight bench --attn-dump`, read with validation.
//
// File format, version 1 (little-endian, packed, no padding):
//   char[8]  magic "TWKVDUMP"
//   u32      version (1)
//   char[16] arch (NUL-padded, e.g. "qwen2")
//   char[64] model name (general.name, NUL-padded, truncated)
//   u32      n_layers (of the model), n_heads (H), n_kv_heads (Hkv), head_dim (d)
//   u64      n_tokens: K/V stored for positions 0 .. n_tokens-1
//   u64      q_pos0:   query s is the post-RoPE query of the token at position q_pos0 + s
//   u32      n_steps:  queries stored (q_pos0 + n_steps <= n_tokens: their own K/V are stored too,
//                      so query s attends exactly to positions [0, q_pos0 + s])
//   u32      n_dump_layers, then u32[n_dump_layers] model layer ids (strictly ascending, < n_layers)
//   u32      desc_len, then desc_len bytes: where the tokens came from (UTF-8, free text)
//   per dumped layer i (in the order above):
//     u16 K[n_tokens][Hkv][d]  fp16 bits, post-RoPE K exactly as the KV pool holds it
//     u16 V[n_tokens][Hkv][d]  fp16 bits
//   f32      Q[n_steps][n_dump_layers][H][d]  post-RoPE queries (unscaled)
//   char[8]  end marker "TWKVEND\0"
// The file size must equal what the header implies; anything else is a tw::Error naming the file.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kv/kv_cache.h"

namespace tw::kv {

struct KVDumpInfo {
  std::string arch, model_name, desc;
  int n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int64_t n_tokens = 0, q_pos0 = 0;
  int n_steps = 0;
  std::vector<int> layers;  // model layer ids of the dumped layers, ascending

  void validate() const;                       // tw::Error naming the inconsistency
  uint64_t payload_bytes() const;              // K/V + queries
  // Throws tw::Error when the dump was not made with a model of this fingerprint.
  void check_model(const std::string& arch, const std::string& name, int n_layers, int n_heads, int n_kv_heads,
                   int head_dim) const;
};

struct KVDump {
  KVDumpInfo info;
  std::vector<std::vector<uint16_t>> k, v;  // [n_dump_layers][n_tokens * Hkv * d]
  std::vector<float> q;                     // [n_steps][n_dump_layers][H][d]

  // Dumped layer i, token t, kv head h: [d] fp16 bits.
  const uint16_t* k_row(int i, int64_t t, int h) const { return k[i].data() + row_off(t, h); }
  const uint16_t* v_row(int i, int64_t t, int h) const { return v[i].data() + row_off(t, h); }
  // Query of step s, dumped layer i: [H][d].
  const float* query(int s, int i) const {
    return q.data() + ((size_t)s * info.layers.size() + i) * info.n_heads * info.head_dim;
  }
  size_t row_off(int64_t t, int h) const { return ((size_t)t * info.n_kv_heads + h) * info.head_dim; }
};

// Writes atomically (temporary file + rename): no partial file on error.
void write_kv_dump(const std::string& path, const KVDump& d);
// Reads and validates (magic, version, header consistency, exact size, end marker).
KVDump read_kv_dump(const std::string& path);
// Header only (cheap).
KVDumpInfo read_kv_dump_info(const std::string& path);

// Position in the dump whose K/V fills context position t when the context is longer than the dump
// (n_ctx > n_tokens): t itself while t < n_tokens, then the dump's positions [keep, n_tokens) again
// and again, so the first `keep` tokens (attention sinks) are not duplicated. keep < n_tokens.
int64_t tiled_source(int64_t t, int64_t n_tokens, int64_t keep);

// Fill positions [0, n_ctx) of pool layers 0 .. n_dump_layers-1 (pool layer i = dumped layer i) of seq
// from the dump, tiling past n_tokens (tiled_source with `keep`); reserves the pages, sets seq.n_tokens.
// The pool must have the dump's n_kv_heads, head_dim and at least n_dump_layers layers.
void fill_pool_from_dump(const KVDump& d, KVPool& pool, SeqPages& seq, int64_t n_ctx, int64_t keep);

}  // namespace tw::kv
