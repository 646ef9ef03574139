// exp for softmax loops, written so that loops over it vectorise (std::exp does not without
// -ffast-math): 2^k * poly(r), k = round(x / ln 2), r = x - k ln 2 (two-part ln 2), degree-6 Taylor
// polynomial on |r| <= ln(2)/2, relative error < 3e-7. Inputs x < -87 (and -inf) give 0: weights
// below ~1e-38 of the maximum carry no fp32 mass. Callers pass x <= 0 (scores minus their max).
#pragma once
#include <cstdint>
#include <cstring>

namespace tw::attn {

inline float fast_exp(float x) {
  const float kf = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (x - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = ((int32_t)(kf < -126.f ? -126.f : kf) + 127) << 23;  // clamp: no int conversion of -inf
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.f ? 0.f : p * scale;
}

}  // namespace tw::attn
