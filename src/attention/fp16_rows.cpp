#include "attention/fp16_rows.h"

#include <immintrin.h>

#include "common/fp16.h"

namespace tw::attn {

namespace {

// GCC 12 warns about the intrinsics' own _mm512_undefined_* placeholders (a known false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) void cvt_avx512(const uint16_t* src, float* dst, int n) {
  int i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = fp16_to_fp32(src[i]);
}
#pragma GCC diagnostic pop

__attribute__((target("avx2,f16c"))) void cvt_f16c(const uint16_t* src, float* dst, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = fp16_to_fp32(src[i]);
}

void cvt_scalar(const uint16_t* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = fp16_to_fp32(src[i]);
}

}  // namespace

Fp16CvtFn fp16_cvt_for(ops::Simd level) {
  if (level == ops::Simd::AVX512 && ops::simd_supported(ops::Simd::AVX512)) return cvt_avx512;
  if (level == ops::Simd::AVX2 && __builtin_cpu_supports("f16c")) return cvt_f16c;
  return cvt_scalar;
}

}  // namespace tw::attn
