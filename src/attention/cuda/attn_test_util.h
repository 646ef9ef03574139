// Helpers shared by the attention CUDA tests: a ragged batch of sequences in a paged pool built on
// the host (random physical pages, NaN in every unused slot) and mirrored to the device.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "attention/cuda/layout.h"
#include "common/fp16.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/cuda_test_util.h"
#include "ops/cuda/device.h"

namespace tw::attn::cuda::test {

using ::tw::cuda::DeviceBuffer;
using ::tw::cuda::test::fresh_seed;
using ::tw::cuda::test::in_test_shard;

inline const char* dtype_name(KvDtype t) { return t == KvDtype::F16 ? "f16" : "bf16"; }
inline uint16_t to_bits(KvDtype t, float x) { return t == KvDtype::F16 ? fp32_to_fp16(x) : fp32_to_bf16(x); }
inline float from_bits(KvDtype t, uint16_t h) { return t == KvDtype::F16 ? fp16_to_fp32(h) : bf16_to_fp32(h); }
inline uint16_t nan_bits(KvDtype t) { return t == KvDtype::F16 ? 0x7E00 : 0x7FC0; }

template <typename T>
DeviceBuffer to_device(const std::vector<T>& v) {
  DeviceBuffer d(std::max<size_t>(v.size() * sizeof(T), 16));
  if (!v.empty()) d.upload(v.data(), v.size() * sizeof(T));
  return d;
}
template <typename T>
std::vector<T> to_host(const DeviceBuffer& d, size_t n) {
  std::vector<T> v(n);
  if (n) d.download(v.data(), n * sizeof(T));
  return v;
}

// A batch of sequences in one layer's paged pool. Host arrays in the device layout (layout.h).
struct PagedBatch {
  KvDtype dtype = KvDtype::F16;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0, max_pages = 0;
  int64_t n_pages = 0;
  std::vector<int32_t> seq_len;     // [batch]
  std::vector<int32_t> page_table;  // [batch][max_pages], -1 past a sequence's pages
  std::vector<uint16_t> k, v;       // [n_pages][Hkv][16][d] bits
  DeviceBuffer dk, dv, dpt, dlen;

  int batch() const { return (int)seq_len.size(); }
  int group() const { return n_heads / n_kv_heads; }
  size_t row(int b, int pos, int h) const {  // element offset of token pos of sequence b, kv head h
    const int32_t phys = page_table[(size_t)b * max_pages + pos / kPageSize];
    return (((size_t)phys * n_kv_heads + h) * kPageSize + pos % kPageSize) * head_dim;
  }
  void upload() {
    dk = to_device(k);
    dv = to_device(v);
    dpt = to_device(page_table);
    dlen = to_device(seq_len);
  }
  PagedKV view() const {
    PagedKV kv;
    kv.k = dk.get();
    kv.v = dv.get();
    kv.page_table = dpt.as<int32_t>();
    kv.seq_len = dlen.as<int32_t>();
    kv.dtype = dtype;
    kv.batch = batch();
    kv.n_heads = n_heads;
    kv.n_kv_heads = n_kv_heads;
    kv.head_dim = head_dim;
    kv.max_pages = max_pages;
    kv.n_pages = n_pages;
    return kv;
  }
};

// Sequences of the given lengths on randomly permuted physical pages (plus `spare` unused pages),
// page tables `extra_pages` longer than needed; K ~ N(0, kscale^2), V ~ N(0, 1) rounded to the dtype;
// every slot no token owns holds NaN (kernels must never let it through). Not uploaded.
inline PagedBatch make_batch(std::mt19937_64& rng, KvDtype dt, int n_heads, int n_kv_heads, int d,
                             const std::vector<int>& lens, float kscale, int spare = 3, int extra_pages = 1) {
  PagedBatch pb;
  pb.dtype = dt;
  pb.n_heads = n_heads;
  pb.n_kv_heads = n_kv_heads;
  pb.head_dim = d;
  pb.seq_len.assign(lens.begin(), lens.end());
  int64_t need = 0;
  int maxp = 1;
  for (int n : lens) {
    need += (n + kPageSize - 1) / kPageSize;
    maxp = std::max(maxp, (n + kPageSize - 1) / kPageSize);
  }
  pb.max_pages = maxp + extra_pages;
  pb.n_pages = need + spare;
  std::vector<int32_t> perm(pb.n_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  pb.page_table.assign((size_t)pb.batch() * pb.max_pages, -1);
  size_t next = 0;
  for (int b = 0; b < pb.batch(); ++b)
    for (int p = 0; p < (lens[b] + kPageSize - 1) / kPageSize; ++p)
      pb.page_table[(size_t)b * pb.max_pages + p] = perm[next++];
  const size_t elems = (size_t)pb.n_pages * n_kv_heads * kPageSize * d;
  pb.k.assign(elems, nan_bits(dt));
  pb.v.assign(elems, nan_bits(dt));
  std::normal_distribution<float> N(0.f, 1.f);
  for (int b = 0; b < pb.batch(); ++b)
    for (int t = 0; t < lens[b]; ++t)
      for (int h = 0; h < n_kv_heads; ++h) {
        const size_t r = pb.row(b, t, h);
        for (int i = 0; i < d; ++i) {
          pb.k[r + i] = to_bits(dt, N(rng) * kscale);
          pb.v[r + i] = to_bits(dt, N(rng));
        }
      }
  return pb;
}

}  // namespace tw::attn::cuda::test
