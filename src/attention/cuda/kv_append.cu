#include "attention/cuda/kv_append.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "attention/key_side.h"  // kInt4MinScale: the CPU mirror's definition
#include "attention/page_bounds.h"
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
                                                      const float* __restrict__ v_new, uint8_t* __restrict__ bcode,
                                                      float* __restrict__ bparam, uint8_t* __restrict__ k4,
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
  if (bcode == nullptr) return;

  // Bounds over slots 0..slot: the new value from the register, the earlier slots from the page.
  const float kf = float(kt);
  float mn = kf, mx = kf;
  for (int j = 0; j < slot; ++j) {
    const float x = float(kp[j * D + i]);
    mn = x < mn ? x : mn;
    mx = x > mx ? x : mx;
  }

  // One block reduction for both: the page's bound range (lo, hi, all finite) and the new token's
  // INT4 range (zero, top) over the head dim.
  constexpr int kWarps = D / 32;
  __shared__ float s_red[4][kWarps];
  __shared__ int s_fin[kWarps];
  float lo = mn, hi = mx, a = kf, c = kf;
  int fin = (mn - mn == 0.f && mx - mx == 0.f) ? 1 : 0;  // false for inf and NaN
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    a = fminf(a, __shfl_xor_sync(0xffffffffu, a, o));
    c = fmaxf(c, __shfl_xor_sync(0xffffffffu, c, o));
    fin &= __shfl_xor_sync(0xffffffffu, fin, o);
  }
  if ((i & 31) == 0) {
    s_red[0][i >> 5] = lo, s_red[1][i >> 5] = hi, s_red[2][i >> 5] = a, s_red[3][i >> 5] = c;
    s_fin[i >> 5] = fin;
  }
  __syncthreads();
  lo = s_red[0][0], hi = s_red[1][0];
  float zero = s_red[2][0], top = s_red[3][0];
  fin = s_fin[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    lo = fminf(lo, s_red[0][w]), hi = fmaxf(hi, s_red[1][w]);
    zero = fminf(zero, s_red[2][w]), top = fmaxf(top, s_red[3][w]);
    fin &= s_fin[w];
  }
  // 8-bit page bounds (page_bounds.h, the CPU's quantize_page_bounds channel by channel; fminf / fmaxf
  // differ from its comparisons only on NaN, which sets fin = 0 either way).
  {
    int ca = 0, cb = 0;
    float s = NAN, l = NAN;
    if (fin) {
      s = page_bound_step(lo, hi);
      l = lo;
      page_bound_codes(mn, mx, lo, s, ca, cb);
    }
    bcode[head * 2 * D + i] = (uint8_t)ca;
    bcode[head * 2 * D + D + i] = (uint8_t)cb;
    if (i == 0) bparam[head * 2] = l, bparam[head * 2 + 1] = s;
  }
  // IEEE division (no fast-math in this build), the CPU's exact arithmetic.
  const float scale = fmaxf((top - zero) / 15.f, kInt4MinScale);
  const int code = (int)fminf(fmaxf(floorf((kf - zero) / scale + 0.5f), 0.f), 15.f);
  const int code_odd = __shfl_down_sync(0xffffffffu, code, 1);
  if ((i & 1) == 0) k4[(head * kPageSize + slot) * (D / 2) + i / 2] = (uint8_t)(code | (code_odd << 4));
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
      positions, kv.max_pages, kv.n_pages, k_new, v_new, s.bcode, s.bparam, s.k4,
      s.k4_scale, s.k4_zero);
  TW_CUDA_CHECK_LAUNCH();
}

}  // namespace

void kv_append(const PagedKV& kv, const KeySideDev& side, const float* k_new, const float* v_new,
               const int32_t* positions, cudaStream_t stream) {
  check_config(kv);
  TW_CHECK(k_new != nullptr && v_new != nullptr, "kv_append: null new K or V");
  const int set = (side.bcode != nullptr) + (side.bparam != nullptr) + (side.k4 != nullptr) +
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
