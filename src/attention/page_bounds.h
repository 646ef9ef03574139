// Quest page bounds in 8 bits: the one definition the CPU (key_side.cpp, selectors.cpp) and the GPU
// (cuda/kv_append.cu, cuda/quest.cu) share. Host and device code (nvcc compiles it too).
//
// Per (page, kv head), from the exact element-wise min / max of the page's K, mn[d] <= mx[d]:
//   lo = min_i mn_i, hi = max_i mx_i, s = (hi - lo) / 255 (raised by ulps until fma(s, 255, lo) >= hi),
//   cmin_i = the largest code c with fma(s, c, lo) <= mn_i   (floor((mn_i - lo) / s), then checked)
//   cmax_i = the smallest code c with fma(s, c, lo) >= mx_i  (ceil((mx_i - lo) / s), then checked)
// so the decoded bounds lo + s c bracket the exact ones (conservative). Stored per (page, kv head):
// codes [2][d] bytes (cmin row, then cmax row) and param [2] floats {lo, s}: 2d + 8 bytes, about half
// of fp16 min / max (4d).
//
// The page score, in integers: the query is quantised per head like the pruner's (int8, scale
// sq = amax / 127, q8 = clamp(rint(q * 127 / amax), -127, 127)), and with q~ = sq * q8,
//   u_p = sum_i max(q~_i (lo + s cmax_i), q~_i (lo + s cmin_i))
//       = sq * (lo * sum_i q8_i + s * dot),   dot = sum_i (q8+_i cmax_i + q8-_i cmin_i)
// (q8+ = max(q8, 0), q8- = min(q8, 0)): dot is an exact int32 (u8 x s8: VNNI vpdpbusd on the CPU,
// tensor-core mma on the GPU) and the rest the same three float operations (page_bound_score), so the
// CPU and the GPU compute bit-identical scores. u_p bounds q~.k over the page (q~ within sq / 2 of q per
// channel; quest_page_upper_bounds adds that slack where a bound of q.k itself is needed).
// The step s is set by the page-head's widest channel: on Qwen2.5-Coder-1.5B keys (8k tokens of Emma,
// layers 2/9/18/27) it is ~3% of a typical channel's page range, and the attention mass Quest keeps at
// B0 = n/8 is 0.768 / 0.926 / 0.931 / 0.600 with fp16 bounds, 0.767 / 0.925 / 0.930 / 0.600 with these,
// 0.768 / 0.924 / 0.930 / 0.601 with these and the int8 query (docs/ACCURACY.md).
// Non-finite input (an inf or NaN key): lo = s = NaN and codes 0, so the score is NaN, which the
// selectors rank as +inf (such a page cannot be ruled out). s = 0 (a constant page): every code 0.
#pragma once
#include <math.h>  // fmaf, floorf, ceilf, nextafterf: the same names in host and device code

#include <cstdint>

#if defined(__CUDACC__)
#define TW_HD __host__ __device__ __forceinline__
#else
#define TW_HD inline
#endif

namespace tw::attn {

constexpr int kBoundLevels = 255;  // codes 0 .. 255

// The step of a finite range [lo, hi]: (hi - lo) / 255, raised by ulps until fma(s, 255, lo) >= hi.
TW_HD float page_bound_step(float lo, float hi) {
  float s = (hi - lo) / (float)kBoundLevels;
  while (fmaf(s, (float)kBoundLevels, lo) < hi) s = nextafterf(s, INFINITY);
  return s;
}

// One channel's codes: a = the largest c with fma(s, c, lo) <= mn, b = the smallest c with
// fma(s, c, lo) >= mx (both 0 when s = 0).
TW_HD void page_bound_codes(float mn, float mx, float lo, float s, int& a, int& b) {
  a = 0, b = 0;
  if (!(s > 0.f)) return;
  a = (int)floorf((mn - lo) / s);
  b = (int)ceilf((mx - lo) / s);
  a = a < 0 ? 0 : a > kBoundLevels ? kBoundLevels : a;
  b = b < 0 ? 0 : b > kBoundLevels ? kBoundLevels : b;
  while (a > 0 && fmaf(s, (float)a, lo) > mn) --a;
  while (b < kBoundLevels && fmaf(s, (float)b, lo) < mx) ++b;
}

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC diagnostic push  // GCC cannot see that callers fill mn / mx [0, d) before the call (d >= 1)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// mn, mx: [d] exact bounds (floats holding fp16 / bf16 values), d >= 1. codes: [2][d]; param: {lo, s}.
TW_HD void quantize_page_bounds(const float* mn, const float* mx, int d, uint8_t* codes, float* param) {
  float lo = mn[0], hi = mx[0];
  bool finite = true;
  for (int i = 0; i < d; ++i) {
    lo = mn[i] < lo ? mn[i] : lo;
    hi = mx[i] > hi ? mx[i] : hi;
    finite = finite && mn[i] - mn[i] == 0.f && mx[i] - mx[i] == 0.f;  // false for inf and NaN
  }
  if (!finite) {
    for (int i = 0; i < 2 * d; ++i) codes[i] = 0;
    param[0] = param[1] = NAN;
    return;
  }
  const float s = page_bound_step(lo, hi);
  param[0] = lo;
  param[1] = s;
  for (int i = 0; i < d; ++i) {
    int a, b;
    page_bound_codes(mn[i], mx[i], lo, s, a, b);
    codes[i] = (uint8_t)a;
    codes[d + i] = (uint8_t)b;
  }
}
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC diagnostic pop
#endif

// The query of the page score (above), one head: q [d] -> q8 [d], sq = amax / 127, q8sum = sum q8.
TW_HD void quantize_quest_query(const float* q, int d, int8_t* q8, float& sq, int& q8sum) {
  float amax = 0.f;
  for (int i = 0; i < d; ++i) amax = fmaxf(amax, fabsf(q[i]));
  sq = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  q8sum = 0;
  for (int i = 0; i < d; ++i) {
    const float r = fminf(fmaxf(rintf(q[i] * inv), -127.f), 127.f);
    q8[i] = (int8_t)r;
    q8sum += q8[i];
  }
}

// u_p from the page's {lo, s}, the query's sq and q8sum and the exact integer dot.
TW_HD float page_bound_score(float lo, float s, float sq, int q8sum, int dot) {
  return sq * fmaf(s, (float)dot, lo * (float)q8sum);
}

}  // namespace tw::attn
