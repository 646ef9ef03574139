// Row kernels for the avx512 level: AVX-512 F/BW/VL/DQ + VNNI (Ice Lake / Zen 4 and later).
// The code is quant_dot_kernels.h; this file only sets the target ISA around it.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ops/cpu/quant_dot.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
// GCC 12 flags the deliberately undefined upper halves inside its own AVX-512 intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define TW_VNNI 1
#include "ops/cpu/quant_dot_kernels.h"
#undef TW_VNNI
#pragma GCC diagnostic pop
#pragma GCC pop_options
#define TW_HAVE_KERNELS 1
#endif

namespace tw::ops::detail {

RowKernel avx512_kernel(gguf::Type wt) {
#if TW_HAVE_KERNELS
  switch (wt) {
    case gguf::Type::Q4_0: return row_q4_0;
    case gguf::Type::Q4_1: return row_q4_1;
    case gguf::Type::Q5_0: return row_q5_0;
    case gguf::Type::Q5_1: return row_q5_1;
    case gguf::Type::Q8_0: return row_q8_0;
    case gguf::Type::Q4_K: return row_q4_K;
    case gguf::Type::Q5_K: return row_q5_K;
    case gguf::Type::Q6_K: return row_q6_K;
    case gguf::Type::F32: return row_f32;
    case gguf::Type::F16: return row_f16;
    case gguf::Type::BF16: return row_bf16;
    default: return nullptr;
  }
#else
  (void)wt;
  return nullptr;
#endif
}

Interleaved8 avx512_interleaved8(gguf::Type wt) {
  Interleaved8 r;
#if TW_HAVE_KERNELS
  switch (wt) {
    case gguf::Type::Q4_K: r.packed_bytes = q4k8_bytes; r.repack = q4k8_repack; r.kernel = q4k8_kernel; break;
    case gguf::Type::Q6_K: r.packed_bytes = q6k8_bytes; r.repack = q6k8_repack; r.kernel = q6k8_kernel; break;
    case gguf::Type::Q4_0: r.packed_bytes = p32_bytes<W32::Q4_0>; r.repack = p32_repack<W32::Q4_0>; r.kernel = p32_kernel<W32::Q4_0>; break;
    case gguf::Type::Q4_1: r.packed_bytes = p32_bytes<W32::Q4_1>; r.repack = p32_repack<W32::Q4_1>; r.kernel = p32_kernel<W32::Q4_1>; break;
    case gguf::Type::Q5_0: r.packed_bytes = p32_bytes<W32::Q5_0>; r.repack = p32_repack<W32::Q5_0>; r.kernel = p32_kernel<W32::Q5_0>; break;
    case gguf::Type::Q5_1: r.packed_bytes = p32_bytes<W32::Q5_1>; r.repack = p32_repack<W32::Q5_1>; r.kernel = p32_kernel<W32::Q5_1>; break;
    case gguf::Type::Q8_0: r.packed_bytes = p32_bytes<W32::Q8_0>; r.repack = p32_repack<W32::Q8_0>; r.kernel = p32_kernel<W32::Q8_0>; break;
    default: break;
  }
#else
  (void)wt;
#endif
  return r;
}

}  // namespace tw::ops::detail
