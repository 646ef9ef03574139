#include "engine/sampler.h"

#include <algorithm>
#include <cmath>

#include "common/error.h"

namespace tw {

void SamplerParams::validate() const {
  TW_CHECK(std::isfinite(temp), "--temp must be a finite number, got ", temp);
  TW_CHECK(top_p > 0.f && top_p <= 1.f, "--top-p must be in (0, 1], got ", top_p);
  TW_CHECK(min_p >= 0.f && min_p <= 1.f, "--min-p must be in [0, 1], got ", min_p);
}

int32_t argmax(const float* x, int n) {
  int32_t best = 0;
  for (int i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

Sampler::Sampler(const SamplerParams& p, int n_vocab) : p_(p), n_vocab_(n_vocab), rng_(p.seed) {
  p_.validate();
  TW_CHECK(n_vocab > 0, "sampler: empty vocabulary");
}

int32_t Sampler::sample(const float* logits) {
  if (p_.temp <= 0.f) return argmax(logits, n_vocab_);
  cand_.resize(n_vocab_);
  for (int i = 0; i < n_vocab_; ++i) cand_[i] = {i, logits[i], 0.f};
  auto by_logit = [](const Cand& a, const Cand& b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); };
  // top-k
  size_t n = cand_.size();
  if (p_.top_k > 0 && (size_t)p_.top_k < n) {
    std::partial_sort(cand_.begin(), cand_.begin() + p_.top_k, cand_.end(), by_logit);
    n = p_.top_k;
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  cand_.resize(n);
  // softmax of the (sorted) survivors at temperature 1, as llama.cpp's top-p / min-p see them
  auto softmax = [&](float t) {
    const float m = cand_[0].logit;
    double s = 0;
    for (Cand& c : cand_) s += (c.p = std::exp((c.logit - m) / t));
    for (Cand& c : cand_) c.p = (float)(c.p / s);
  };
  softmax(1.f);
  // top-p: smallest prefix with mass >= top_p
  if (p_.top_p < 1.f) {
    double cum = 0;
    size_t keep = cand_.size();
    for (size_t i = 0; i < cand_.size(); ++i) {
      cum += cand_[i].p;
      if (cum >= p_.top_p) {
        keep = i + 1;
        break;
      }
    }
    cand_.resize(keep);
  }
  // min-p: drop tokens below min_p * p(max)
  if (p_.min_p > 0.f) {
    const float thr = p_.min_p * cand_[0].p;
    size_t keep = 1;
    while (keep < cand_.size() && cand_[keep].p >= thr) ++keep;
    cand_.resize(keep);
  }
  // temperature, then draw
  softmax(p_.temp);
  std::uniform_real_distribution<double> U(0.0, 1.0);
  const double r = U(rng_);
  double cum = 0;
  for (const Cand& c : cand_) {
    cum += c.p;
    if (r < cum) return c.id;
  }
  return cand_.back().id;
}

}  // namespace tw
