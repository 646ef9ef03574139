#include "attention/topp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "common/error.h"

namespace tw::attn {

namespace {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void check_args(const float* w, int64_t n, float p) {
  TW_CHECK(p > 0.f && p <= 1.f, "top-p: p = ", p, " is not in (0, 1]");
  TW_CHECK(n >= 0 && n < ((int64_t)1 << 31), "top-p: n = ", n, " out of range");
  TW_CHECK(n == 0 || w != nullptr, "top-p: null weights");
}

[[noreturn]] void bad_weight(const float* w, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!(w[i] >= 0.f) || std::isinf(w[i])) fail("top-p: weight ", i, " is ", w[i], " (must be finite and >= 0)");
  fail("top-p: bad weight");
}

// Bits of w[i] as an order-preserving key; -0.0 -> 0. Keys >= 0x7f800000 are inf/NaN/negative.
inline uint32_t key_of(float f) {
  const uint32_t u = bits_of(f);
  return u == 0x80000000u ? 0u : u;
}

constexpr int kB1 = 11, kB2 = 12, kB3 = 8;  // 11 + 12 + 8 = 31 bits: a level-3 bucket is one value
constexpr int kSortBelow = 256;             // boundary buckets this small are sorted instead

}  // namespace

ToppResult topp_select(const float* w, int64_t n, float p, std::vector<int32_t>& keep_idx) {
  check_args(w, n, p);
  keep_idx.clear();
  ToppResult r;
  if (n == 0) return r;

  // Level 1: mass and count per bucket of the 11 high bits (sign is 0: 2040 buckets used).
  double mass1[1 << kB1];
  uint32_t cnt1[1 << kB1];
  std::memset(mass1, 0, sizeof(mass1));
  std::memset(cnt1, 0, sizeof(cnt1));
  uint32_t bad = 0, min_pos = 0xffffffffu;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = key_of(w[i]);
    bad |= (uint32_t)(k >= 0x7f800000u);
    const uint32_t b = (k >> (31 - kB1)) & ((1u << kB1) - 1);  // masked: bad keys are reported below
    mass1[b] += w[i];
    cnt1[b] += 1;
    if (k != 0 && k < min_pos) min_pos = k;
  }
  if (bad) bad_weight(w, n);
  // The total is summed bucket by bucket, top down: the same additions as the scan below, so the
  // scan's running mass reaches exactly `total` at the last bucket and always meets p * total.
  double total = 0.0;
  for (int b = (1 << kB1) - 1; b >= 0; --b) total += mass1[b];
  r.total = total;
  if (total <= 0.0) return r;  // all zero: nothing carries mass

  uint32_t tau_key;
  if (p >= 1.f) {
    tau_key = min_pos;  // every positive weight (see header: p = 1 keeps {w > 0})
  } else {
    const double target = (double)p * total;
    double cum = 0.0;
    int b1 = (1 << kB1) - 1;
    for (; b1 > 0; --b1) {
      if (cnt1[b1] == 0) continue;
      if (cum + mass1[b1] >= target) break;
      cum += mass1[b1];
    }
    // Boundary bucket b1 (b1 = 0 only holds zeros and tiny subnormals). Gather its keys.
    // Branch-free (the test is unpredictable): every key is written, the cursor advances on a match.
    std::vector<uint32_t> keys(cnt1[b1] + 1);
    {
      size_t nk = 0;
      for (int64_t i = 0; i < n && nk < cnt1[b1]; ++i) {
        const uint32_t k = key_of(w[i]);
        keys[nk] = k;
        nk += (size_t)((k >> (31 - kB1)) == (uint32_t)b1 && k != 0);
      }
      keys.resize(nk);
    }
    if (keys.empty()) {
      tau_key = min_pos;
    } else if ((int)keys.size() <= kSortBelow) {
      std::sort(keys.begin(), keys.end(), std::greater<uint32_t>());
      tau_key = keys.back();  // rounding fallback: the whole bucket
      for (size_t j = 0; j < keys.size();) {
        size_t e = j;  // the run of ties keys[j..e)
        double run = 0.0;
        while (e < keys.size() && keys[e] == keys[j]) run += float_of(keys[e++]);
        if (cum + run >= target) {
          tau_key = keys[j];
          break;
        }
        cum += run;
        j = e;
      }
    } else {
      // Level 2 on bits [8, 20), then level 3 on bits [0, 8) of the level-2 boundary bucket.
      std::vector<double> mass2(1 << kB2, 0.0);
      std::vector<uint32_t> cnt2(1 << kB2, 0);
      for (uint32_t k : keys) {
        const uint32_t b = (k >> kB3) & ((1u << kB2) - 1);
        mass2[b] += float_of(k);
        cnt2[b] += 1;
      }
      int b2 = (1 << kB2) - 1, last2 = -1;
      for (; b2 >= 0; --b2) {
        if (cnt2[b2] == 0) continue;
        last2 = b2;
        if (cum + mass2[b2] >= target) break;
        cum += mass2[b2];
      }
      if (b2 < 0) {  // rounding: level-2 masses summed short of level 1's; keep the whole bucket
        b2 = last2;
        cum -= mass2[b2];
      }
      double mass3[1 << kB3] = {};
      uint32_t cnt3[1 << kB3] = {};
      const uint32_t hi = ((uint32_t)b1 << (31 - kB1)) | ((uint32_t)b2 << kB3);
      for (uint32_t k : keys)
        if ((k & ~((1u << kB3) - 1)) == hi) {
          mass3[k & ((1u << kB3) - 1)] += float_of(k);
          cnt3[k & ((1u << kB3) - 1)] += 1;
        }
      int b3 = (1 << kB3) - 1, last3 = -1;
      for (; b3 >= 0; --b3) {
        if (cnt3[b3] == 0) continue;
        last3 = b3;
        if (cum + mass3[b3] >= target) break;
        cum += mass3[b3];
      }
      if (b3 < 0) b3 = last3;
      tau_key = hi | (uint32_t)b3;
    }
  }

  // Keys of positive weights order like the weights; tau_key > 0, so zeros are never kept.
  // Branch-free index pass, then the kept mass over the kept indices (same additions, same order).
  keep_idx.resize(n + 1);
  int64_t nk = 0;
  for (int64_t i = 0; i < n; ++i) {
    keep_idx[nk] = (int32_t)i;
    nk += key_of(w[i]) >= tau_key;
  }
  keep_idx.resize(nk);
  double kept = 0.0;
  for (int64_t j = 0; j < nk; ++j) kept += w[keep_idx[j]];
  r.tau = float_of(tau_key);
  r.n_kept = (int64_t)keep_idx.size();
  r.mass_kept = kept;
  return r;
}

ToppResult topp_select_reference(const float* w, int64_t n, float p, std::vector<int32_t>& keep_idx) {
  check_args(w, n, p);
  keep_idx.clear();
  ToppResult r;
  for (int64_t i = 0; i < n; ++i)
    if (!(w[i] >= 0.f) || std::isinf(w[i])) bad_weight(w, n);
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); });
  double total = 0.0;
  for (int32_t i : order) total += w[i];
  r.total = total;
  if (total <= 0.0) return r;
  const double target = p >= 1.f ? total : (double)p * total;
  double cum = 0.0;
  float tau = 0.f;
  for (int64_t j = 0; j < n && w[order[j]] > 0.f; ++j) {
    cum += w[order[j]];
    tau = w[order[j]];
    if (p < 1.f && cum >= target) break;  // p = 1: every positive weight
  }
  for (int64_t i = 0; i < n; ++i)
    if (w[i] > 0.f && w[i] >= tau) {
      keep_idx.push_back((int32_t)i);
      r.mass_kept += w[i];
    }
  r.tau = tau;
  r.n_kept = (int64_t)keep_idx.size();
  return r;
}

void top_k_indices(const float* w, int64_t n, int64_t k, std::vector<int32_t>& idx) {
  k = std::clamp<int64_t>(k, 0, n);
  idx.resize(n);
  std::iota(idx.begin(), idx.end(), 0);
  auto heavier = [&](int32_t a, int32_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); };
  if (k < n) std::nth_element(idx.begin(), idx.begin() + k, idx.end(), heavier);
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
}

}  // namespace tw::attn
