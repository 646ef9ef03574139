#include "ops/cpu/elementwise.h"

#include <cmath>

namespace tw::ops {

void rmsnorm(float* out, const float* x, const float* w, int64_t n, float eps) {
  double ss = 0;  // double: n up to a few thousand, keeps the norm exact to float precision
  for (int64_t i = 0; i < n; ++i) ss += (double)x[i] * x[i];
  const float scale = (float)(1.0 / std::sqrt(ss / (double)n + (double)eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

void rope_apply(const Rope& r, float* x, int n_heads, int64_t pos) {
  const int half = r.rot_dim / 2;
  for (int i = 0; i < half; ++i) {
    // theta = pos * base^(-2i/rot_dim), as ggml computes it (in float, by powers)
    const float inv = std::pow(r.freq_base, -2.0f * (float)i / (float)r.rot_dim);
    const float theta = (float)pos * r.freq_scale * inv;
    const float c = std::cos(theta), s = std::sin(theta);
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + (int64_t)h * r.head_dim;
      const int a = r.style == RopeStyle::Interleaved ? 2 * i : i;
      const int b = r.style == RopeStyle::Interleaved ? 2 * i + 1 : i + half;
      const float x0 = v[a], x1 = v[b];
      v[a] = x0 * c - x1 * s;
      v[b] = x0 * s + x1 * c;
    }
  }
}

void silu_mul(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] / (1.0f + std::exp(-x[i])) * y[i];
}

void add(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void softmax(float* x, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::fmax(m, x[i]);
  if (m == -INFINITY) {  // all masked: define as zeros rather than NaN
    for (int64_t i = 0; i < n; ++i) x[i] = 0;
    return;
  }
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  const float inv = (float)(1.0 / s);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

}  // namespace tw::ops
