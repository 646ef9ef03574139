// The model's small per-vector ops (everything but the weight products, which are in matmul.h).
// Plain loops the compiler vectorises; they are a small share of a decode step.
#pragma once
#include <cstdint>

namespace tw::ops {

// out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i]   (out may alias x)
void rmsnorm(float* out, const float* x, const float* w, int64_t n, float eps);

// How a head vector is rotated. GGUF 'llama' weights were permuted by the converter so that RoPE
// rotates adjacent pairs (x[2i], x[2i+1]); 'qwen2' rotates the halves (x[i], x[i + d/2]) (NeoX).
enum class RopeStyle { Interleaved, NeoX };

// Precomputed inverse frequencies for one head dim: inv_freq[i] = base^(-2i / rot_dim).
struct Rope {
  RopeStyle style = RopeStyle::Interleaved;
  int head_dim = 0;   // d
  int rot_dim = 0;    // rotated dims (<= d), from rope.dimension_count
  float freq_base = 10000.f;
  float freq_scale = 1.f;  // linear scaling (1 = none)
};

// Rotate n_heads head vectors x[n_heads][head_dim] in place for token position pos.
void rope_apply(const Rope& r, float* x, int n_heads, int64_t pos);

// x = silu(x) * y
void silu_mul(float* x, const float* y, int64_t n);
// x += y
void add(float* x, const float* y, int64_t n);
// In-place softmax over n values; returns nothing; -inf entries get weight 0.
void softmax(float* x, int64_t n);

}  // namespace tw::ops
