// The read bandwidth of scattered chunks on this GPU: the ceiling for the side-structure reads of
// the Twilight step (Quest bounds: 256 B per page-head at d 128; INT4 keys: 1 KB; K or V rows of a
// page: 4 KB), by plain loads and by the copy engine, and the Quest select's load shape against whole
// rows. Benchmarks (DISABLED_, run with --gtest_also_run_disabled_tests), not tests.
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

// The same random chunks fetched by the copy engine (cp.async.bulk, 1-D) into shared memory: stages of
// 4 KiB (4096 / S chunks each) complete on one mbarrier apiece; warp 0 refills a stage (a chunk per
// lane) once the block has read it. Whether bulk copies read scattered chunks faster than the loads of
// the kernels (the untried lever of docs/CUDA.md).
constexpr int kBulkStages = 8, kStageBytes = 4096, kBulkThreads = 128;
__global__ void __launch_bounds__(kBulkThreads) bulk_gather_kernel(const uint8_t* __restrict__ base,
                                                                    const int32_t* __restrict__ idx, int n_chunks,
                                                                    int S, uint32_t* __restrict__ sink) {
  extern __shared__ __align__(128) uint8_t buf[];  // [kBulkStages][kStageBytes]
  __shared__ __align__(8) unsigned long long bar[kBulkStages];
  const int per_stage = kStageBytes / S;  // <= 16: S >= 256
  const int n_groups = n_chunks / per_stage;  // groups of per_stage chunks = one stage's fill
  auto bar_addr = [&](int st) { return (uint32_t)__cvta_generic_to_shared(&bar[st]); };
  const int lane = threadIdx.x & 31;
  // Warp 0 fills stages, one chunk per lane (per_stage <= 16); a group's indices are loaded a stage
  // ahead of its issue, so the refill does not wait on them.
  auto chunk_of = [&](int grp) { return grp < n_groups && lane < per_stage ? idx[(int64_t)grp * per_stage + lane] : 0; };
  auto issue = [&](int st, int chunk) {
    if (lane == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar_addr(st)), "r"(kStageBytes)
                   : "memory");
    __syncwarp();
    if (lane < per_stage) {
      const uint8_t* src = base + (int64_t)chunk * S;
      const uint32_t dst = (uint32_t)__cvta_generic_to_shared(buf + st * kStageBytes + lane * S);
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(dst), "l"(src), "r"(S), "r"(bar_addr(st)) : "memory");
    }
  };
  if (threadIdx.x == 0) {
    for (int st = 0; st < kBulkStages; ++st)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar_addr(st)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  uint32_t x = 0;
  int k = 0;  // this block's k-th group: blockIdx.x + k * gridDim.x
  if (threadIdx.x < 32)
    for (int st = 0; st < kBulkStages; ++st)
      if (blockIdx.x + st * gridDim.x < n_groups) issue(st, chunk_of(blockIdx.x + st * gridDim.x));
  for (int grp = blockIdx.x; grp < n_groups; grp += gridDim.x, ++k) {
    const int next = grp + kBulkStages * gridDim.x;
    const int next_chunk = threadIdx.x < 32 ? chunk_of(next) : 0;
    const int st = k % kBulkStages;
    const uint32_t parity = (k / kBulkStages) & 1;
    uint32_t done = 0;
    while (!done)
      asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                   : "=r"(done) : "r"(bar_addr(st)), "r"(parity) : "memory");
    const uint4 v = reinterpret_cast<const uint4*>(buf + st * kStageBytes)[threadIdx.x];  // 2 KiB of the 4 read back
    x ^= v.x ^ v.y ^ v.z ^ v.w;
    __syncthreads();  // every thread is done with the stage
    if (threadIdx.x < 32 && next < n_groups) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      issue(st, next_chunk);
    }
  }
  if (x == 0x12345678u) sink[0] = x;
}

// The benchmarks' memory: a 4 GiB pool (1 GiB read per call: never L2-resident) and a sink.
struct Pool {
  static constexpr size_t kBytes = size_t(4) << 30, kRead = size_t(1) << 30;
  tw::cuda::DeviceBuffer buf{kBytes}, sink{64};
  int sms = 0;
  Pool() {
    TW_CUDA_CHECK(cudaMemset(buf.get(), 1, kBytes));
    TW_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  }
  const uint8_t* base() const { return static_cast<const uint8_t*>(buf.get()); }
  uint32_t* out() const { return static_cast<uint32_t*>(sink.get()); }
};

// Median time of 7 calls in ms (after one warm-up call).
template <class F>
float median_ms(F&& call) {
  cudaEvent_t e0, e1;
  TW_CUDA_CHECK(cudaEventCreate(&e0));
  TW_CUDA_CHECK(cudaEventCreate(&e1));
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
  TW_CUDA_CHECK(cudaEventDestroy(e0));
  TW_CUDA_CHECK(cudaEventDestroy(e1));
  std::sort(t.begin(), t.end());
  return t[3];
}

// The first n entries of v, on the device.
tw::cuda::DeviceBuffer upload_prefix(const std::vector<int32_t>& v, int64_t n) {
  tw::cuda::DeviceBuffer d((size_t)n * 4);
  TW_CUDA_CHECK(cudaMemcpy(d.get(), v.data(), (size_t)n * 4, cudaMemcpyHostToDevice));
  return d;
}

// n distinct random chunk indices of a pool of pool_n chunks (a random permutation's prefix), on the device.
tw::cuda::DeviceBuffer random_chunks(int64_t pool_n, int64_t n, std::mt19937& rng) {
  std::vector<int32_t> all(pool_n);
  std::iota(all.begin(), all.end(), 0);
  for (int64_t i = 0; i < n; ++i) std::swap(all[i], all[i + (int64_t)(rng() % (pool_n - i))]);
  return upload_prefix(all, n);
}

TEST(GatherCudaBench, DISABLED_RandomChunks) {
  const Pool P;
  const size_t pool = Pool::kBytes, read = Pool::kRead;
  std::mt19937 rng(7);
  for (int S : {64, 128, 256, 512, 1024, 2048, 4096, 8192}) {
    const int64_t n_chunks = (int64_t)(read / S);
    const tw::cuda::DeviceBuffer didx = random_chunks((int64_t)(pool / S), n_chunks, rng);
    int log_vpc = 0;
    while ((16 << log_vpc) < S) ++log_vpc;
    const int n_vec = (int)(n_chunks << log_vpc);
    for (int blocks_per_sm : {4, 8}) {
      const float ms = median_ms([&] {
        gather_kernel<8><<<P.sms * blocks_per_sm, 256>>>(reinterpret_cast<const uint4*>(P.base()),
                                                         static_cast<const int32_t*>(didx.get()), n_vec, log_vpc,
                                                         P.out());
      });
      std::printf("BENCH gather: chunks of %5d B, %d blocks of 256 per SM: %.1f us per GiB, %.0f GB/s (median of 7)\n",
                  S, blocks_per_sm, ms * 1e3, (double)read / (ms * 1e-3) / 1e9);
    }
  }
}

TEST(GatherCudaBench, DISABLED_RowPiecesVsLines) {
  const Pool P;
  const size_t pool = Pool::kBytes, read = Pool::kRead;
  const int n_rows = (int)(read / 256);
  std::mt19937 rng(11);
  const tw::cuda::DeviceBuffer didx = random_chunks((int64_t)(pool / 256), n_rows, rng);
  for (int blocks_per_sm : {2, 4}) {
    for (int pieces = 1; pieces >= 0; --pieces) {
      const float ms = median_ms([&] {
        auto* k = pieces ? row_gather_kernel<true> : row_gather_kernel<false>;
        k<<<P.sms * blocks_per_sm, 256>>>(P.base(), static_cast<const int32_t*>(didx.get()), n_rows, P.out());
      });
      std::printf("BENCH row gather: 256-B rows as %s, %d blocks of 256 per SM: %.0f GB/s (median of 7)\n",
                  pieces ? "8 x 64-B pieces per load" : "2 whole rows per load", blocks_per_sm,
                  (double)read / (ms * 1e-3) / 1e9);
    }
  }
}

TEST(GatherCudaBench, DISABLED_BulkCopies) {
  const Pool P;
  const size_t pool = Pool::kBytes, read = Pool::kRead;
  const size_t smem = size_t(kBulkStages) * kStageBytes;
  TW_CUDA_CHECK(cudaFuncSetAttribute(bulk_gather_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  std::mt19937 rng(13);
  for (int S : {256, 1024, 4096}) {
    const int64_t n_chunks = (int64_t)(read / S);
    const tw::cuda::DeviceBuffer didx = random_chunks((int64_t)(pool / S), n_chunks, rng);
    for (int blocks_per_sm : {2, 4, 6}) {
      const float ms = median_ms([&] {
        bulk_gather_kernel<<<P.sms * blocks_per_sm, kBulkThreads, smem>>>(
            P.base(), static_cast<const int32_t*>(didx.get()), (int)n_chunks, S, P.out());
      });
      std::printf("BENCH bulk gather: chunks of %4d B by cp.async.bulk, %d stages of 4 KiB, %d blocks of %d per SM: "
                  "%.0f GB/s (median of 7)\n",
                  S, kBulkStages, blocks_per_sm, kBulkThreads, (double)read / (ms * 1e-3) / 1e9);
    }
  }
}

// Is cuDNN's edge over a paged decode (4.5-4.7 TB/s against our 4.3-4.5 at batch >= 16) the contiguity
// of its K / V, or the way it reads? The same kernels on the same 1 GiB of 4-KiB chunks (a page's K or
// V for one kv head) in three orders: random distinct chunks (our pages); in address order, every
// block's k-th chunk k blocks of chunks further (the whole grid sweeps one window, like a copy
// kernel); and in per-block runs, each block streaming its own contiguous range (like a decode kernel
// whose blocks each read one (sequence, kv head) of contiguous [B, Hkv, L, d] tensors).
TEST(GatherCudaBench, DISABLED_InOrderVsScattered) {
  const Pool P;
  const size_t pool = Pool::kBytes, read = Pool::kRead;
  const size_t smem = size_t(kBulkStages) * kStageBytes;
  TW_CUDA_CHECK(cudaFuncSetAttribute(bulk_gather_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  std::mt19937 rng(17);
  constexpr int S = 4096;  // one block of 256 threads reads one chunk per load round in both kernels
  const int64_t n_chunks = (int64_t)(read / S);
  const int n_vec = (int)(n_chunks << 8);  // 256 vectors of 16 B per chunk
  const tw::cuda::DeviceBuffer drand = random_chunks((int64_t)(pool / S), n_chunks, rng);
  // The chunk indices of an order for a grid of n_blocks: position c is read by block c % n_blocks as its
  // (c / n_blocks)-th chunk, in both kernels.
  auto indices = [&](char order, int n_blocks) {
    std::vector<int32_t> v(n_chunks);
    const int64_t per = n_chunks / n_blocks;
    for (int64_t c = 0; c < n_chunks; ++c)
      v[c] = order == 'b' && c < per * n_blocks ? (int32_t)((c % n_blocks) * per + c / n_blocks) : (int32_t)c;
    return upload_prefix(v, n_chunks);
  };
  // ~100 ms of reads first: without it the first order measured read ~12% slower than the same order
  // measured again later in the process (H200, clocks still ramping up from idle).
  for (int i = 0; i < 400; ++i)
    gather_kernel<8><<<P.sms * 8, 256>>>(reinterpret_cast<const uint4*>(P.base()), drand.as<int32_t>(), n_vec, 8,
                                         P.out());
  TW_CUDA_CHECK(cudaDeviceSynchronize());
  for (const char* how : {"random       ", "address order", "block runs   "}) {
    // blocks per SM: 4 and 8 of 256 threads (plain loads), then 6 of kBulkThreads (bulk copies)
    for (int blocks_per_sm : {4, 8, 6}) {
      const bool bulk = blocks_per_sm == 6;
      const int nb = P.sms * blocks_per_sm;
      const tw::cuda::DeviceBuffer didx = how[0] == 'r' ? tw::cuda::DeviceBuffer(16) : indices(how[0], nb);
      const int32_t* idx = how[0] == 'r' ? drand.as<int32_t>() : didx.as<int32_t>();
      const float ms = median_ms([&] {
        if (bulk)
          bulk_gather_kernel<<<nb, kBulkThreads, smem>>>(P.base(), idx, (int)n_chunks, S, P.out());
        else
          gather_kernel<8><<<nb, 256>>>(reinterpret_cast<const uint4*>(P.base()), idx, n_vec, 8, P.out());
      });
      std::printf("BENCH %s: 4-KiB chunks, %s, %d blocks of %d per SM: %.0f GB/s (median of 7)\n", how,
                  bulk ? "cp.async.bulk" : "plain loads", blocks_per_sm, bulk ? kBulkThreads : 256,
                  (double)read / (ms * 1e-3) / 1e9);
    }
  }
}

}  // namespace
