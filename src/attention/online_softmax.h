// The one building block of every attention path (dense, split-KV, sparse): a running softmax
// state {m, l, o} over a stream of scores, and merge() to combine states computed on disjoint
// parts of the context (the split-KV reduction). Output = o / l.
#pragma once
#include <cmath>
#include <cstdint>

namespace tw::attn {

// State for one query head; o points at head_dim floats owned by the caller.
struct SoftmaxState {
  float m = -INFINITY;  // running max of scores
  float l = 0.f;        // running sum of exp(score - m)
  float* o = nullptr;   // running sum of exp(score - m) * v, [head_dim]
};

// Merge b into a (both over the same head_dim d).
inline void merge(SoftmaxState& a, const SoftmaxState& b, int d) {
  if (b.m == -INFINITY) return;
  if (a.m == -INFINITY) {
    a.m = b.m;
    a.l = b.l;
    for (int i = 0; i < d; ++i) a.o[i] = b.o[i];
    return;
  }
  const float m = std::fmax(a.m, b.m);
  const float sa = std::exp(a.m - m), sb = std::exp(b.m - m);
  a.l = a.l * sa + b.l * sb;
  for (int i = 0; i < d; ++i) a.o[i] = a.o[i] * sa + b.o[i] * sb;
  a.m = m;
}

// out[d] = o / l (zeros when the state saw no token).
inline void finish(const SoftmaxState& s, float* out, int d) {
  const float inv = s.l > 0 ? 1.f / s.l : 0.f;
  for (int i = 0; i < d; ++i) out[i] = s.o[i] * inv;
}

}  // namespace tw::attn
