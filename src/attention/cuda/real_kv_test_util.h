// Real-model input for the attention CUDA tests: the K/V cache and post-RoPE queries of a real prefill,
// dumped by `twilight bench --attn-dump` (kv/kv_dump.h), named by the environment variable TW_REAL_KV.
// scripts/gpu_bench.sh sets it from REAL_KV; without it these tests skip (and say why), as every GPU
// test does without a device. The dump is too large to commit (8k tokens of a 1.5B model: 33 MB).
//
// A real batch: sequence s replays dumped layer layers[s] for its first lens[s] positions, tiled past the
// dump's end as the GPU benchmark does (kv::tiled_source, the first kKeep tokens kept once), and its query
// is that layer's first dumped query (the token right after the dump's context). A sequence shorter than
// the dump thus pairs a real query with a real prefix that query never attended to: real value
// distributions and real score concentration, not the model's own output at that length.
#pragma once
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "attention/cuda/pruner_test_util.h"
#include "attention/pruner.h"
#include "attention/selectors.h"
#include "common/fp16.h"
#include "common/threadpool.h"
#include "kv/kv_dump.h"

namespace tw::attn::cuda::real {

constexpr int64_t kKeep = 16;  // the GPU benchmark's --keep default

// The dump named by TW_REAL_KV, read (and validated) once; nullptr when the variable is unset or empty.
// A set but unreadable path is a test failure (tw::Error from read_kv_dump), not a skip.
inline const kv::KVDump* dump() {
  static const std::unique_ptr<kv::KVDump> d = []() -> std::unique_ptr<kv::KVDump> {
    const char* p = std::getenv("TW_REAL_KV");
    if (!p || !*p) return nullptr;
    return std::make_unique<kv::KVDump>(kv::read_kv_dump(p));
  }();
  return d.get();
}

#define TW_REQUIRE_REAL_KV()                                                                                \
  do {                                                                                                      \
    if (!::tw::attn::cuda::real::dump())                                                                    \
      GTEST_SKIP() << "TW_REAL_KV is not set: no real-model KV dump (twilight bench --attn-dump; "          \
                      "scripts/gpu_bench.sh sets it from REAL_KV)";                                         \
  } while (0)

// K and V of dumped layer `layer` at context position t, kv head h, as floats (fp16 values).
inline void row(const kv::KVDump& d, int layer, int64_t t, int h, float* k, float* v) {
  const int64_t src = kv::tiled_source(t, d.info.n_tokens, kKeep);
  const uint16_t* kr = d.k_row(layer, src, h);
  const uint16_t* vr = d.v_row(layer, src, h);
  for (int i = 0; i < d.info.head_dim; ++i) {
    if (k) k[i] = fp16_to_fp32(kr[i]);
    if (v) v[i] = fp16_to_fp32(vr[i]);
  }
}

// Sequences (dumped layer, length) as a test batch in the dump's shape: CPU cache, key side and device
// arrays (ptest::make_batch), queries from the dump.
inline std::unique_ptr<ptest::Batch> batch(const kv::KVDump& d, const std::vector<int>& layers,
                                           const std::vector<int>& lens, KvDtype dtype) {
  TW_CHECK(layers.size() == lens.size() && !lens.empty(), "real batch: one layer per sequence");
  const int H = d.info.n_heads, Hkv = d.info.n_kv_heads, D = d.info.head_dim;
  ptest::BatchSpec spec;
  spec.n_heads = H, spec.n_kv_heads = Hkv, spec.head_dim = D, spec.dtype = dtype, spec.seq_len = lens;
  spec.key_fn = [&d, layers](int s, int t, int h, float* k) { row(d, layers[s], t, h, k, nullptr); };
  spec.value_fn = [&d, layers](int s, int t, int h, float* v) { row(d, layers[s], t, h, nullptr, v); };
  for (size_t s = 0; s < lens.size(); ++s) {
    TW_CHECK(layers[s] >= 0 && layers[s] < (int)d.info.layers.size(), "real batch: no dumped layer ", layers[s]);
    const float* q = d.query(0, layers[s]);
    spec.query.insert(spec.query.end(), q, q + (size_t)H * D);
  }
  std::mt19937_64 unused(0);  // every value comes from the dump
  return ptest::make_batch(spec, unused);
}

// The sequences the real-model tests share: the dump's own length, 4x that length (tiled: long context)
// and two shorter prefixes, so a ragged batch with lists from one page to past a wave of pruner blocks;
// sequence s replays dumped layer standard_layer(d, s), so every dumped layer (up to four) is used.
inline std::vector<int> standard_lens(const kv::KVDump& d) {
  const int n = (int)d.info.n_tokens;
  return {n, 4 * n, std::max(1, n * 5 / 8), std::max(1, n / 7)};
}
inline int standard_layer(const kv::KVDump& d, int s) { return s % (int)d.info.layers.size(); }

inline std::unique_ptr<ptest::Batch> standard_batch(const kv::KVDump& d, KvDtype dtype) {
  const std::vector<int> lens = standard_lens(d);
  std::vector<int> layers;
  for (size_t s = 0; s < lens.size(); ++s) layers.push_back(standard_layer(d, (int)s));
  return batch(d, layers, lens, dtype);
}

// The CPU decode chain for sequence s of a test batch: Quest's candidates at budget b0 (select_quest,
// Group mode), then the top-p pruner at p (prune_topp): what the GPU step computes.
inline void cpu_chain(const ptest::Batch& B, int s, int64_t b0, float p, ThreadPool& tp, Selection& cand,
                      Selection& kept) {
  const int L = B.spec.seq_len[s];
  const float* q = B.q.data() + (size_t)s * B.spec.n_heads * B.spec.head_dim;
  select_quest(*B.side, B.seqs[s], 0, B.hs(), q, L, b0, GqaMode::Group, cand);
  PruneOptions opt;
  opt.p = p;
  std::vector<PruneStats> stats;
  prune_topp(*B.side, B.seqs[s], 0, B.hs(), q, cand, L, opt, kept, stats, tp);
}

}  // namespace tw::attn::cuda::real
