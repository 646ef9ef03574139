// Token sampling, llama.cpp's order: top-k -> top-p -> min-p -> temperature -> draw.
// temp <= 0 is greedy (argmax; the lowest id wins a tie).
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace tw {

struct SamplerParams {
  float temp = 0.8f;    // <= 0: greedy
  int top_k = 40;       // <= 0: off
  float top_p = 0.95f;  // 1: off; in (0, 1]
  float min_p = 0.05f;  // 0: off; in [0, 1]
  uint64_t seed = 0xC0FFEE;

  void validate() const;  // throws tw::Error naming the bad value
};

class Sampler {
 public:
  Sampler(const SamplerParams& p, int n_vocab);
  // Picks a token from logits[n_vocab] (not modified).
  int32_t sample(const float* logits);

 private:
  struct Cand {
    int32_t id;
    float logit;
    float p;
  };
  SamplerParams p_;
  int n_vocab_;
  std::mt19937_64 rng_;
  std::vector<Cand> cand_;
};

int32_t argmax(const float* x, int n);

}  // namespace tw
