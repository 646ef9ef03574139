// Helpers shared by the attention tests (header-only; included by *_test.cpp only).
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "kv/kv_cache.h"

namespace tw::attn::test_util {

// Fill positions [0, n) of one layer with random K (N(0, kscale^2)) and V (N(0, 1)): kscale sets how
// peaked attention is (1: diffuse, 2.5: a few tokens dominate). Sets seq.n_tokens = n.
inline void fill_random(kv::KVPool& pool, kv::SeqPages& seq, int layer, int64_t n, std::mt19937& rng, float kscale) {
  const kv::KVShape& s = pool.shape();
  std::normal_distribution<float> N(0.f, 1.f);
  pool.reserve(seq, n);
  std::vector<float> k(s.n_kv_heads * s.head_dim), v(k.size());
  for (int64_t t = 0; t < n; ++t) {
    for (auto& x : k) x = N(rng) * kscale;
    for (auto& x : v) x = N(rng);
    pool.write(layer, seq, t, k.data(), v.data());
  }
  seq.n_tokens = n;
}

}  // namespace tw::attn::test_util
