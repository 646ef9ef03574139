#include "attention/cuda/layout.h"

#include <cstdint>
#include <cstdlib>

#include "common/error.h"
#include "ops/cuda/cuda_check.h"

namespace tw::attn::cuda {

int sm_count() {
  static const int n = [] {
    int dev = 0, v = 0;
    TW_CUDA_CHECK(cudaGetDevice(&dev));
    TW_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    return v;
  }();
  return n;
}

int bench_knob(const char* name) {
  const char* s = std::getenv(name);
  return s ? std::atoi(s) : 0;
}

cudaLaunchConfig_t cluster_launch(dim3 grid, int threads, int cluster, size_t smem, cudaStream_t stream,
                                  cudaLaunchAttribute& attr) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr = cudaLaunchAttribute{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

void check_config(const PagedKV& kv) {
  TW_CHECK(kv.dtype == KvDtype::F16 || kv.dtype == KvDtype::BF16, "attention config: KV dtype ",
           static_cast<int>(kv.dtype), " unsupported (fp16 or bf16)");
  TW_CHECK(kv.head_dim == 64 || kv.head_dim == 128, "attention config: head_dim ", kv.head_dim,
           " unsupported (64 or 128)");
  TW_CHECK(kv.n_kv_heads > 0 && kv.n_heads > 0 && kv.n_heads % kv.n_kv_heads == 0, "attention config: ",
           kv.n_heads, " query heads not a positive multiple of ", kv.n_kv_heads, " kv heads");
  const int group = kv.n_heads / kv.n_kv_heads;
  TW_CHECK(group >= 1 && group <= kMaxGroup, "attention config: GQA group ", group, " (", kv.n_heads, " / ",
           kv.n_kv_heads, " heads) unsupported (1 to ", kMaxGroup, ")");
  TW_CHECK(kv.batch > 0, "attention config: batch must be positive, got ", kv.batch);
  TW_CHECK(kv.max_pages > 0, "attention config: max_pages must be positive, got ", kv.max_pages);
  TW_CHECK(kv.n_pages > 0 && kv.n_pages <= INT32_MAX, "attention config: n_pages ", kv.n_pages, " out of range");
  TW_CHECK(kv.k != nullptr && kv.v != nullptr, "attention config: null K or V pool");
  TW_CHECK(kv.page_table != nullptr, "attention config: null page table");
  TW_CHECK(kv.seq_len != nullptr, "attention config: null seq_len");
  // Kernels read K/V with 16-byte vector loads.
  TW_CHECK(reinterpret_cast<uintptr_t>(kv.k) % 16 == 0 && reinterpret_cast<uintptr_t>(kv.v) % 16 == 0,
           "attention config: K / V pools must be 16-byte aligned");
}

}  // namespace tw::attn::cuda
