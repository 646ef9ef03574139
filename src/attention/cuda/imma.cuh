// The integer tensor-core product of both integer scorers, against the int8 query: Quest's page
// bounds (u8 codes, quest.cu) and the pruner's INT4 estimate (nibbles widened to u8, pruner.cu).
#pragma once
#include <cstdint>

namespace tw::attn::cuda {

// D += A B, mma m16n8k32: A u8 16 x 32 (row-major), B s8 32 x 8, exact int32 accumulators (so the
// order of the k dimension is free). Fragments (PTX ISA), lane = 4g + t: a0 = A[g][4t..4t+3],
// a1 = A[g+8][4t..4t+3], a2 = A[g][16+4t..16+4t+3], a3 = A[g+8][16+4t..16+4t+3]; b0 = B[4t..4t+3][g],
// b1 = B[16+4t..16+4t+3][g]; c = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].
__device__ __forceinline__ void imma16832(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

}  // namespace tw::attn::cuda
