// fp16 -> fp32 conversion of rows in bulk, shared by the attention kernels that gather pages of the
// fp16 cache (sparse attention, the ds label scorer): AVX-512 / F16C conversions (GCC 12 does not
// vectorise a _Float16 loop; done scalar, the conversion was over half of the sparse attention time),
// the bit-exact scalar conversion otherwise. All levels give identical results.
#pragma once
#include <cstdint>

#include "ops/cpu/matmul.h"  // ops::Simd, ops::active_simd

namespace tw::attn {

using Fp16CvtFn = void (*)(const uint16_t* src, float* dst, int n);

// The conversion for a SIMD level (AVX512: 16 at a time; AVX2: 8 at a time when the CPU has F16C,
// else scalar; Scalar: scalar).
Fp16CvtFn fp16_cvt_for(ops::Simd level);
// For ops::active_simd() (TWILIGHT_SIMD=scalar pins the portable path). Pick once, outside loops.
inline Fp16CvtFn pick_fp16_cvt() { return fp16_cvt_for(ops::active_simd()); }

}  // namespace tw::attn
