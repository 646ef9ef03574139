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

}  // namespace
