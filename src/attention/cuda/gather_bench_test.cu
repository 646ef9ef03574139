// The read bandwidth of scattered chunks on this GPU: the ceiling for the side-structure reads of
// the Twilight step (Quest bounds: 256 B per page-head at d 128; INT4 keys: 1 KB; K or V rows of a
// page: 4 KB). A benchmark (DISABLED_, run with --gtest_also_run_disabled_tests), not a test.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "ops/cuda/cuda_check.h"
#include "ops/cuda/device.h"

namespace {

// Reads n_chunks chunks of S = 16 << log_vpc bytes at byte offsets idx[c] * S, 16 bytes per lane, U loads in
// flight per thread (32-bit index arithmetic: 64-bit divisions made it issue-bound); a per-thread XOR keeps the loads.
template <int U>
__global__ void gather_kernel(const uint4* __restrict__ base, const int32_t* __restrict__ idx, int n_vec,
                              int log_vpc, uint32_t* __restrict__ sink) {
  const int stride = gridDim.x * blockDim.x;
  uint32_t x = 0;
  for (int v0 = blockIdx.x * blockDim.x + threadIdx.x; v0 < n_vec; v0 += stride * U) {
    uint4 r[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = v0 + u * stride;
      if (v < n_vec) {
        const int c = v >> log_vpc, w = v & ((1 << log_vpc) - 1);
        r[u] = __ldg(base + ((int64_t)idx[c] << log_vpc) + w);
      } else {
        r[u] = uint4{0, 0, 0, 0};
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) x ^= r[u].x ^ r[u].y ^ r[u].z ^ r[u].w;
  }
  if (x == 0x12345678u) sink[0] = x;  // practically never: the loads must not be dead
}


// Rows of 256 B at random places, read by warps in 32-row rounds the two ways a kernel can lay its
// lanes: `pieces` as the Quest select's tensor-core fragments want them (lane (g, t) takes bytes
// 64 i + 16 t of rows g and g + 8 of each 16-row tile: each load instruction 8 rows x 64 B), or
// `lines` (16 lanes per row, each load instruction 2 whole rows). Same bytes, same loads in flight.
template <bool kPieces>
__global__ void row_gather_kernel(const uint8_t* __restrict__ base, const int32_t* __restrict__ idx, int n_rows,
                                  uint32_t* __restrict__ sink) {
  const int lane = threadIdx.x & 31, warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int n_warps = gridDim.x * blockDim.x / 32;
  uint32_t x = 0;
  for (int r0 = warp * 32; r0 < n_rows; r0 += n_warps * 32) {
    const int my = idx[r0 + lane];
    uint4 v[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      int row, off;
      if (kPieces) {  // k = (tile u, row half, slab i)
        const int u = k >> 3, hf = (k >> 2) & 1, i = k & 3;
        row = 16 * u + 8 * hf + (lane >> 2), off = 64 * i + 16 * (lane & 3);
      } else {
        row = 2 * k + (lane >> 4), off = 16 * (lane & 15);
      }
      const int phys = __shfl_sync(0xffffffffu, my, row);
      v[k] = __ldg(reinterpret_cast<const uint4*>(base + (int64_t)phys * 256 + off));
    }
#pragma unroll
    for (int k = 0; k < 16; ++k) x ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
  }
  if (x == 0x12345678u) sink[0] = x;
}

TEST(GatherCudaBench, DISABLED_RandomChunks) {
  const size_t pool = size_t(4) << 30;  // 4 GiB pool, 1 GiB read per call: never L2-resident
  const size_t read = size_t(1) << 30;
  tw::cuda::DeviceBuffer buf(pool), sink(64);
  TW_CUDA_CHECK(cudaMemset(buf.get(), 1, pool));
  int sms = 0;
  TW_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::mt19937 rng(7);
  cudaEvent_t e0, e1;
  TW_CUDA_CHECK(cudaEventCreate(&e0));
  TW_CUDA_CHECK(cudaEventCreate(&e1));
  for (int S : {64, 128, 256, 512, 1024, 2048, 4096, 8192}) {
    const int64_t n_chunks = (int64_t)(read / S), pool_chunks = (int64_t)(pool / S);
    // Distinct random chunks of the pool (a random permutation's prefix), in random order.
    std::vector<int32_t> all(pool_chunks);
    std::iota(all.begin(), all.end(), 0);
    for (int64_t i = 0; i < n_chunks; ++i) std::swap(all[i], all[i + (int64_t)(rng() % (pool_chunks - i))]);
    tw::cuda::DeviceBuffer didx(n_chunks * 4);
    TW_CUDA_CHECK(cudaMemcpy(didx.get(), all.data(), n_chunks * 4, cudaMemcpyHostToDevice));
    int log_vpc = 0;
    while ((16 << log_vpc) < S) ++log_vpc;
    const int n_vec = (int)(n_chunks << log_vpc);
    for (int blocks_per_sm : {4, 8}) {
      const int grid = sms * blocks_per_sm;
      auto call = [&] {
        gather_kernel<8><<<grid, 256>>>(static_cast<const uint4*>(buf.get()), static_cast<const int32_t*>(didx.get()),
                                        n_vec, log_vpc, static_cast<uint32_t*>(sink.get()));
      };
      call();
      TW_CUDA_CHECK(cudaDeviceSynchronize());
      std::vector<float> t;
      for (int r = 0; r < 7; ++r) {
        TW_CUDA_CHECK(cudaEventRecord(e0));
        call();
        TW_CUDA_CHECK(cudaEventRecord(e1));
        TW_CUDA_CHECK(cudaEventSynchronize(e1));
        float ms = 0.f;
        TW_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        t.push_back(ms);
      }
      std::sort(t.begin(), t.end());
      std::printf("BENCH gather: chunks of %5d B, %d blocks of 256 per SM: %.1f us per GiB, %.0f GB/s (median of 7)\n",
                  S, blocks_per_sm, t[3] * 1e3, (double)read / (t[3] * 1e-3) / 1e9);
    }
  }
  TW_CUDA_CHECK(cudaEventDestroy(e0));
  TW_CUDA_CHECK(cudaEventDestroy(e1));
}

TEST(GatherCudaBench, DISABLED_RowPiecesVsLines) {
  const size_t pool = size_t(4) << 30, read = size_t(1) << 30;
  const int n_rows = (int)(read / 256);
  tw::cuda::DeviceBuffer buf(pool), sink(64);
  TW_CUDA_CHECK(cudaMemset(buf.get(), 1, pool));
  int sms = 0;
  TW_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::mt19937 rng(11);
  const int64_t pool_rows = (int64_t)(pool / 256);
  std::vector<int32_t> all(pool_rows);
  std::iota(all.begin(), all.end(), 0);
  for (int64_t i = 0; i < n_rows; ++i) std::swap(all[i], all[i + (int64_t)(rng() % (pool_rows - i))]);
  tw::cuda::DeviceBuffer didx((size_t)n_rows * 4);
  TW_CUDA_CHECK(cudaMemcpy(didx.get(), all.data(), (size_t)n_rows * 4, cudaMemcpyHostToDevice));
  cudaEvent_t e0, e1;
  TW_CUDA_CHECK(cudaEventCreate(&e0));
  TW_CUDA_CHECK(cudaEventCreate(&e1));
  for (int blocks_per_sm : {2, 4}) {
    for (int pieces = 1; pieces >= 0; --pieces) {
      auto call = [&] {
        auto* k = pieces ? row_gather_kernel<true> : row_gather_kernel<false>;
        k<<<sms * blocks_per_sm, 256>>>(static_cast<const uint8_t*>(buf.get()), static_cast<const int32_t*>(didx.get()),
                                        n_rows, static_cast<uint32_t*>(sink.get()));
      };
      call();
      TW_CUDA_CHECK(cudaDeviceSynchronize());
      std::vector<float> t;
      for (int r = 0; r < 7; ++r) {
        TW_CUDA_CHECK(cudaEventRecord(e0));
        call();
        TW_CUDA_CHECK(cudaEventRecord(e1));
        TW_CUDA_CHECK(cudaEventSynchronize(e1));
        float ms = 0.f;
        TW_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        t.push_back(ms);
      }
      std::sort(t.begin(), t.end());
      std::printf("BENCH row gather: 256-B rows as %s, %d blocks of 256 per SM: %.0f GB/s (median of 7)\n",
                  pieces ? "8 x 64-B pieces per load" : "2 whole rows per load", blocks_per_sm,
                  (double)read / (t[3] * 1e-3) / 1e9);
    }
  }
  TW_CUDA_CHECK(cudaEventDestroy(e0));
  TW_CUDA_CHECK(cudaEventDestroy(e1));
}

}  // namespace
