// Exact top-p (nucleus) selection on a vector of non-negative weights: the prune step of Twilight
// (TWILIGHT.md section 1.4). Keeps I = {i : w_i >= tau} with tau the LARGEST value such that
// sum_{w_i >= tau} w_i >= p * sum(w): the smallest prefix of the weights sorted descending whose mass
// reaches p, ties at tau kept together (so |I| exceeds the minimal count only through ties).
//
// Definitions (the edge cases, fixed here so every backend agrees):
//  - The target is p times the TRUE sum of w (accumulated in double), not p: a softmax that sums to
//    1 +- 1e-6 is pruned as if normalised, and no epsilon ever drops mass below the target.
//  - Zero weights carry no mass and are never kept, also at p = 1 (p = 1 keeps exactly {w_i > 0}).
//    All-zero or empty input gives an empty set.
//  - p must be in (0, 1]; negative, NaN or infinite weights are errors (tw::Error). -0.0 counts as 0.
//  - Should double rounding ever leave the running mass a hair below the target at the end of the
//    search, everything positive in the boundary bucket is kept (mass is never lost to rounding).
//
// Algorithm (O(n), no sort, no bisection): non-negative floats order like their bit patterns, so the
// threshold is found by a radix select on the bits with mass histograms: 11 high bits over the
// whole array (one pass), then the next 12 and the last 8 bits over the boundary bucket only. After
// the third level a bucket holds one float value, so tau is exact. Small boundary buckets are sorted
// instead. A final pass writes the kept indices in ascending order.
#pragma once
#include <cstdint>
#include <vector>

namespace tw::attn {

struct ToppResult {
  float tau = 0.f;          // threshold (0 when nothing is kept)
  int64_t n_kept = 0;       // |I|
  double mass_kept = 0.0;   // sum_{i in I} w_i
  double total = 0.0;       // sum_i w_i
};

// Fills keep_idx (cleared first) with I in ascending index order. n < 2^31.
ToppResult topp_select(const float* w, int64_t n, float p, std::vector<int32_t>& keep_idx);

// Same contract by a full descending sort (test reference, O(n log n)).
ToppResult topp_select_reference(const float* w, int64_t n, float p, std::vector<int32_t>& keep_idx);

// The k heaviest indices (ties broken by lower index), ascending index order, k clamped to [0, n].
// Used for the pruner's floor and cap. O(n) expected (nth_element).
void top_k_indices(const float* w, int64_t n, int64_t k, std::vector<int32_t>& idx);

}  // namespace tw::attn
