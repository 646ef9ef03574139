#include "attention/cuda/kv_append.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "attention/key_side.h"  // kInt4MinScale: the CPU mirror's definition
#include "common/error.h"
#include "ops/cuda/cuda_check.h"

namespace tw::attn::cuda {

namespace {

// One block per (kv head, sequence), one thread per head dim.
template <typename T, int D>
__global__ void __launch_bounds__(D) kv_append_kernel(T* __restrict__ kpool, T* __restrict__ vpool,
                                                      const int32_t* __restrict__ page_table,
                                                      const int32_t* __restrict__ seq_len,
                                                      const int32_t* __restrict__ positions, int max_pages,
                                                      int64_t n_pages, const float* __restrict__ k_new,
                                                      const float* __restrict__ v_new, T* __restrict__ kmin,
                                                      T* __restrict__ kmax, uint8_t* __restrict__ k4,
                                                      float* __restrict__ k4_scale, float* __restrict__ k4_zero) {
  const int h = blockIdx.x, b = blockIdx.y, i = threadIdx.x, hkv = gridDim.x;
  const int pos = positions ? positions[b] : seq_len[b] - 1;
  if (pos < 0 || pos >= max_pages * kPageSize) return;
  const int phys = page_table[(int64_t)b * max_pages + pos / kPageSize];
  if (phys < 0 || phys >= n_pages) return;
  const int slot = pos % kPageSize;
  const int64_t head = (int64_t)phys * hkv + h;  // (physical page, kv head)
  T* kp = kpool + head * kPageSize * D;
  const int64_t src = ((int64_t)b * hkv + h) * D + i;
  const T kt = T(k_new[src]);  // round to nearest even, like the CPU's fp32_to_fp16
  kp[slot * D + i] = kt;
  vpool[head * kPageSize * D + slot * D + i] = T(v_new[src]);
  if (kmin == nullptr) return;

  // Bounds over slots 0..slot: the new value from the register, the earlier slots from the page.
  const float kf = float(kt);
  float mn = kf, mx = kf;
  for (int j = 0; j < slot; ++j) {
    const float x = float(kp[j * D + i]);
    mn = x < mn ? x : mn;
    mx = x > mx ? x : mx;
  }
  kmin[head * D + i] = T(mn);  // exact: a min of T values is a T value
  kmax[head * D + i] = T(mx);

  // INT4 row of the new token: min / max over the head dim.
  constexpr int kWarps = D / 32;
  __shared__ float s_mn[kWarps], s_mx[kWarps];
  float a = kf, c = kf;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a = fminf(a, __shfl_xor_sync(0xffffffffu, a, o));
    c = fmaxf(c, __shfl_xor_sync(0xffffffffu, c, o));
  }
  if ((i & 31) == 0) {
    s_mn[i >> 5] = a;
    s_mx[i >> 5] = c;
  }
  __syncthreads();
  float zero = s_mn[0], top = s_mx[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    zero = fminf(zero, s_mn[w]);
    top = fmaxf(top, s_mx[w]);
  }
  // IEEE division (no fast-math in this build), the CPU's exact arithmetic.
  const float scale = fmaxf((top - zero) / 15.f, kInt4MinScale);
  const int code = (int)fminf(fmaxf(floorf((kf - zero) / scale + 0.5f), 0.f), 15.f);
  const int hi = __shfl_down_sync(0xffffffffu, code, 1);
  if ((i & 1) == 0) k4[(head * kPageSize + slot) * (D / 2) + i / 2] = (uint8_t)(code | (hi << 4));
  if (i == 0) {
    k4_scale[head * kPageSize + slot] = scale;
    k4_zero[head * kPageSize + slot] = zero;
  }
}

template <typename T, int D>
void launch(const PagedKV& kv, const KeySideDev& s, const float* k_new, const float* v_new, const int32_t* positions,
            cudaStream_t stream) {
  // The pools are caller-owned device memory; PagedKV holds them const for the attention readers.
  kv_append_kernel<T, D><<<dim3(kv.n_kv_heads, kv.batch), D, 0, stream>>>(
      static_cast<T*>(const_cast<void*>(kv.k)), static_cast<T*>(const_cast<void*>(kv.v)), kv.page_table, kv.seq_len,
      positions, kv.max_pages, kv.n_pages, k_new, v_new, static_cast<T*>(s.kmin), static_cast<T*>(s.kmax), s.k4,
      s.k4_scale, s.k4_zero);
  TW_CUDA_CHECK_LAUNCH();
}

}  // namespace

void kv_append(const PagedKV& kv, const KeySideDev& side, const float* k_new, const float* v_new,
               const int32_t* positions, cudaStream_t stream) {
  check_config(kv);
  TW_CHECK(k_new != nullptr && v_new != nullptr, "kv_append: null new K or V");
  const int set = (side.kmin != nullptr) + (side.kmax != nullptr) + (side.k4 != nullptr) +
                  (side.k4_scale != nullptr) + (side.k4_zero != nullptr);
  TW_CHECK(set == 0 || set == 5, "kv_append: key side must have all five pointers or none (", set, " of 5 set)");
  const bool bf = kv.dtype == KvDtype::BF16;
  if (kv.head_dim == 64)
    bf ? launch<__nv_bfloat16, 64>(kv, side, k_new, v_new, positions, stream)
       : launch<__half, 64>(kv, side, k_new, v_new, positions, stream);
  else
    bf ? launch<__nv_bfloat16, 128>(kv, side, k_new, v_new, positions, stream)
       : launch<__half, 128>(kv, side, k_new, v_new, positions, stream);
}

}  // namespace tw::attn::cuda
