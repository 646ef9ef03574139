// Device-side data of Twilight's decode step (TWILIGHT.md sections 1, 2 and 5), shared by every
// attention kernel in this folder. Host-visible plain structs of device pointers; no ownership.
//
// The layout is the CPU cache's (kv/kv_cache.h, attention/key_side.h), so a CPU reference reads the
// same bytes: one layer at a time, physical pages of kPageSize = 16 tokens of ONE kv head.
//
//   K, V pools      [n_pages][Hkv][16][d]         fp16 or bf16 (KvDtype)
//   page_table      [batch][max_pages]            int32 logical page -> physical page
//   seq_len         [batch]                       int32 tokens stored (the current token included)
//   bcode           [n_pages][Hkv][2][d]          uint8 Quest bound codes, min row then max row, and
//   bparam          [n_pages][Hkv][2]             float {lo, s}: the 8-bit page bounds of page_bounds.h
//                                                 (the CPU's definition), decoded as lo + s * code
//   k4              [n_pages][Hkv][16][d/2]       uint8, element 2i low nibble, 2i+1 high nibble
//   k4_scale/zero   [n_pages][Hkv][16]            float (the CPU mirror's definition, key_side.h)
//   q               [batch][H][d]                 float, post-RoPE
//   out             [batch][H][d]                 float
//
// Token lists (the selector's I0 and the pruner's I1): one list per (sequence, kv head), fixed
// capacity so a decode step has fixed shapes and can be captured in a CUDA graph:
//   count  [batch][Hkv]                int32 tokens in the list
//   tokens [batch][Hkv][capacity]      int32 token positions in [0, seq_len), ascending, unique
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tw::attn::cuda {

constexpr int kPageSize = 16;
constexpr int kMaxGroup = 8;  // query heads per kv head supported by the kernels (real models: 3, 6, 7)

// Row of token t (of kv head h) in the per-row arrays ([n_pages][Hkv][16][...]: K, V, k4, k4_scale /
// zero) given its physical page; -1 for a page outside the pool.
constexpr int kv_row(int32_t phys, int64_t n_pages, int n_kv_heads, int h, int32_t t) {
  return (phys >= 0 && phys < n_pages) ? (phys * n_kv_heads + h) * kPageSize + t % kPageSize : -1;
}

enum class KvDtype { F16, BF16 };

struct PagedKV {
  const void* k = nullptr;          // [n_pages][Hkv][16][d]
  const void* v = nullptr;          // [n_pages][Hkv][16][d]
  const int32_t* page_table = nullptr;  // [batch][max_pages]
  const int32_t* seq_len = nullptr;     // [batch]
  KvDtype dtype = KvDtype::F16;
  int batch = 0;
  int n_heads = 0;      // H (query heads)
  int n_kv_heads = 0;   // Hkv; H % Hkv == 0, H / Hkv <= kMaxGroup
  int head_dim = 0;     // 64 or 128
  int max_pages = 0;    // row stride of page_table
  int64_t n_pages = 0;  // physical pages in the pool
};

struct KeySideDev {
  uint8_t* bcode = nullptr;    // [n_pages][Hkv][2][d]
  float* bparam = nullptr;     // [n_pages][Hkv][2]
  uint8_t* k4 = nullptr;       // [n_pages][Hkv][16][d/2]
  float* k4_scale = nullptr;   // [n_pages][Hkv][16]
  float* k4_zero = nullptr;    // [n_pages][Hkv][16]
};

struct TokenLists {
  int32_t* count = nullptr;    // [batch][Hkv]
  int32_t* tokens = nullptr;   // [batch][Hkv][capacity]
  int capacity = 0;
};

// Candidate lists of whole pages, the Quest select's output for the pruner (16x fewer entries to write
// and read than the tokens): a list's tokens are its pages' tokens below seq_len, in order, so token j
// is pages[j / 16] * 16 + j % 16 for j < count (every page but the last full; a partial page can only
// be the sequence's last).
//   count [batch][Hkv]                int32 tokens in the list
//   pages [batch][Hkv][capacity]      int32 logical page ids, ascending, unique
struct PageLists {
  int32_t* count = nullptr;    // [batch][Hkv]
  int32_t* pages = nullptr;    // [batch][Hkv][capacity]
  int capacity = 0;            // pages per list
};

// Multiprocessors of the current device (queried once): the planners size their grids by it.
int sm_count();

// A benchmark tuning knob: the integer value of environment variable `name`, 0 when unset. Read once
// per call site (callers keep it in a static); the default plans never depend on it.
int bench_knob(const char* name);

// The launch of a cluster kernel (Quest select, pruner): `grid` blocks of `threads`, in clusters of
// `cluster` blocks along x. `attr` receives the cluster dimension; the returned config points at it, so
// it must outlive the config.
cudaLaunchConfig_t cluster_launch(dim3 grid, int threads, int cluster, size_t smem, cudaStream_t stream,
                                  cudaLaunchAttribute& attr);

// Validates a configuration before any launch: head_dim 64/128, dtype, 1 <= H/Hkv <= kMaxGroup,
// H % Hkv == 0, non-null pointers. Throws tw::Error naming the bad value (never a silent slow path).
void check_config(const PagedKV& kv);

}  // namespace tw::attn::cuda
