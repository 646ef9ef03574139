// Test inputs for the Twilight CUDA kernels (pruner, sparse attention, the captured step): a batch of
// sequences of different lengths in the CPU paged cache (kv::KVPool + attn::KeySide, the layout of
// layout.h), uploaded to the device as fp16 or bf16, plus candidate lists and CPU references.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "attention/cuda/layout.h"
#include "attention/dense_cpu.h"
#include "attention/key_side.h"
#include "attention/sparse_types.h"
#include "common/fp16.h"
#include "kv/kv_cache.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/cuda_test_util.h"
#include "ops/cuda/device.h"

namespace tw::attn::cuda::ptest {

using ::tw::cuda::DeviceBuffer;

struct BatchSpec {
  int n_heads = 32, n_kv_heads = 8, head_dim = 128;
  KvDtype dtype = KvDtype::F16;
  std::vector<int> seq_len;      // tokens per sequence (current token included)
  float kscale = 1.5f;           // K ~ N(0, kscale^2): larger = more peaked attention
  // Optional generators of K and V rows (seq, pos, kv head, d floats out); replace the random ones.
  std::function<void(int, int, int, float*)> key_fn, value_fn;
  std::vector<float> query;  // [batch][H][d]: the queries when given, else random
};

// The batch on the host (CPU cache + side structures) and on the device (layout.h arrays).
struct Batch {
  BatchSpec spec;
  int batch = 0, max_pages = 0;
  int64_t n_pages = 0;
  std::unique_ptr<kv::KVPool> pool;
  std::unique_ptr<KeySide> side;
  std::vector<kv::SeqPages> seqs;
  std::vector<float> q;  // [batch][H][d]
  DeviceBuffer d_k, d_v, d_pt, d_len, d_k4, d_k4s, d_k4z, d_q, d_bcode, d_bparam;
  PagedKV kv;
  KeySideDev ks;

  int G() const { return spec.n_heads / spec.n_kv_heads; }
  HeadShape hs() const { return HeadShape{spec.n_heads, spec.n_kv_heads, spec.head_dim}; }
};

inline float round_bf16(float f) { return bf16_to_fp32(fp32_to_bf16(f)); }

inline std::unique_ptr<Batch> make_batch(const BatchSpec& spec, std::mt19937_64& rng) {
  auto B = std::make_unique<Batch>();
  B->spec = spec;
  B->batch = (int)spec.seq_len.size();
  const int Hkv = spec.n_kv_heads, d = spec.head_dim;
  int64_t pages = 0;
  for (int L : spec.seq_len) {
    const int p = (L + kPageSize - 1) / kPageSize;
    pages += p;
    B->max_pages = std::max(B->max_pages, p);
  }
  B->max_pages = std::max(B->max_pages, 1);
  B->n_pages = pages + 3;  // a few never-used pages
  kv::KVShape shape{1, Hkv, d, B->n_pages};
  B->pool = std::make_unique<kv::KVPool>(shape);
  B->side = std::make_unique<KeySide>(shape);
  B->seqs.resize(B->batch);
  // Pages handed out round-robin so sequences interleave in the pool.
  for (int round = 0; round < B->max_pages; ++round)
    for (int s = 0; s < B->batch; ++s)
      if (round * kPageSize < spec.seq_len[s])
        B->pool->reserve(B->seqs[s], std::min<int64_t>((int64_t)(round + 1) * kPageSize, spec.seq_len[s]));
  std::normal_distribution<float> N(0.f, 1.f);
  const bool bf = spec.dtype == KvDtype::BF16;
  std::vector<float> k((size_t)Hkv * d), v(k.size());
  for (int s = 0; s < B->batch; ++s) {
    for (int t = 0; t < spec.seq_len[s]; ++t) {
      for (int h = 0; h < Hkv; ++h) {
        if (spec.key_fn)
          spec.key_fn(s, t, h, k.data() + (size_t)h * d);
        else
          for (int i = 0; i < d; ++i) k[(size_t)h * d + i] = N(rng) * spec.kscale;
      }
      if (spec.value_fn)
        for (int h = 0; h < Hkv; ++h) spec.value_fn(s, t, h, v.data() + (size_t)h * d);
      else
        for (auto& x : v) x = N(rng);
      if (bf) {  // bf16 values are exact in fp16: the CPU cache then holds exactly the device's values
        for (auto& x : k) x = round_bf16(x);
        for (auto& x : v) x = round_bf16(x);
      }
      B->pool->write(0, B->seqs[s], t, k.data(), v.data());
      B->side->append(*B->pool, 0, B->seqs[s], t);
    }
    B->seqs[s].n_tokens = spec.seq_len[s];
  }
  const size_t n_q = (size_t)B->batch * spec.n_heads * d;
  TW_CHECK(spec.query.empty() || spec.query.size() == n_q, "test batch: ", spec.query.size(), " query values, need ", n_q);
  B->q = spec.query.empty() ? ::tw::cuda::test::random_normal(rng, n_q) : spec.query;

  // Upload. Pool arrays are [n_pages][Hkv][16][d] per layer, contiguous from page 0 (kv_cache.h).
  const size_t n_elem = (size_t)B->n_pages * Hkv * kPageSize * d;
  std::vector<uint16_t> kb(B->pool->k_page(0, 0, 0), B->pool->k_page(0, 0, 0) + n_elem);
  std::vector<uint16_t> vb(B->pool->v_page(0, 0, 0), B->pool->v_page(0, 0, 0) + n_elem);
  if (bf) {
    for (auto& x : kb) x = fp32_to_bf16(fp16_to_fp32(x));
    for (auto& x : vb) x = fp32_to_bf16(fp16_to_fp32(x));
  }
  B->d_k = DeviceBuffer(n_elem * 2);
  B->d_v = DeviceBuffer(n_elem * 2);
  B->d_k.upload(kb.data(), n_elem * 2);
  B->d_v.upload(vb.data(), n_elem * 2);
  std::vector<int32_t> pt((size_t)B->batch * B->max_pages, -1), len(B->batch);
  for (int s = 0; s < B->batch; ++s) {
    for (size_t i = 0; i < B->seqs[s].pages.size(); ++i) pt[(size_t)s * B->max_pages + i] = B->seqs[s].pages[i];
    len[s] = spec.seq_len[s];
  }
  B->d_pt = DeviceBuffer(pt.size() * 4);
  B->d_pt.upload(pt.data(), pt.size() * 4);
  B->d_len = DeviceBuffer(len.size() * 4);
  B->d_len.upload(len.data(), len.size() * 4);
  const size_t n_rows = (size_t)B->n_pages * Hkv * kPageSize;
  B->d_k4 = DeviceBuffer(n_rows * d / 2);
  B->d_k4.upload(B->side->k4(0, 0, 0), n_rows * d / 2);
  B->d_k4s = DeviceBuffer(n_rows * 4);
  B->d_k4s.upload(B->side->k4_scale(0, 0, 0), n_rows * 4);
  B->d_k4z = DeviceBuffer(n_rows * 4);
  B->d_k4z.upload(B->side->k4_zero(0, 0, 0), n_rows * 4);
  // Quest bounds: the CPU key side's 8-bit codes and params as they are (dtype-independent).
  const size_t n_heads_pages = (size_t)B->n_pages * Hkv;
  B->d_bcode = DeviceBuffer(n_heads_pages * 2 * d);
  B->d_bcode.upload(B->side->bound_codes(0, 0, 0), n_heads_pages * 2 * d);
  B->d_bparam = DeviceBuffer(n_heads_pages * 2 * 4);
  B->d_bparam.upload(B->side->bound_param(0, 0, 0), n_heads_pages * 2 * 4);
  B->ks.bcode = B->d_bcode.as<uint8_t>();
  B->ks.bparam = B->d_bparam.as<float>();
  B->d_q = DeviceBuffer(B->q.size() * 4);
  B->d_q.upload(B->q.data(), B->q.size() * 4);

  PagedKV& kv = B->kv;
  kv.k = B->d_k.get();
  kv.v = B->d_v.get();
  kv.page_table = B->d_pt.as<int32_t>();
  kv.seq_len = B->d_len.as<int32_t>();
  kv.dtype = spec.dtype;
  kv.batch = B->batch;
  kv.n_heads = spec.n_heads;
  kv.n_kv_heads = Hkv;
  kv.head_dim = d;
  kv.max_pages = B->max_pages;
  kv.n_pages = B->n_pages;
  B->ks.k4 = B->d_k4.as<uint8_t>();
  B->ks.k4_scale = B->d_k4s.as<float>();
  B->ks.k4_zero = B->d_k4z.as<float>();
  return B;
}

// Host copy of fixed-capacity token lists: lists[b * Hkv + h].
struct HostLists {
  int capacity = 0;
  std::vector<std::vector<int32_t>> lists;
};

// Device buffers for a TokenLists of `n_lists` lists.
struct DevLists {
  DeviceBuffer count, tokens;
  TokenLists tl;
  DevLists(int n_lists, int capacity) : count((size_t)n_lists * 4), tokens((size_t)n_lists * capacity * 4) {
    tl.count = count.as<int32_t>();
    tl.tokens = tokens.as<int32_t>();
    tl.capacity = capacity;
  }
  void upload(const HostLists& h) {
    std::vector<int32_t> c(h.lists.size()), t(h.lists.size() * (size_t)tl.capacity, -7);
    for (size_t i = 0; i < h.lists.size(); ++i) {
      TW_CHECK((int)h.lists[i].size() <= tl.capacity, "test list over capacity");
      c[i] = (int32_t)h.lists[i].size();
      std::copy(h.lists[i].begin(), h.lists[i].end(), t.begin() + i * tl.capacity);
    }
    count.upload(c.data(), c.size() * 4);
    tokens.upload(t.data(), t.size() * 4);
  }
  void poison() {
    TW_CUDA_CHECK(cudaMemset(count.get(), 0xAB, count.size()));
    TW_CUDA_CHECK(cudaMemset(tokens.get(), 0xAB, tokens.size()));
  }
  // Reads back; checks counts within capacity.
  HostLists download(int n_lists) const {
    std::vector<int32_t> c(n_lists), t((size_t)n_lists * tl.capacity);
    count.download(c.data(), c.size() * 4);
    tokens.download(t.data(), t.size() * 4);
    HostLists h;
    h.capacity = tl.capacity;
    h.lists.resize(n_lists);
    for (int i = 0; i < n_lists; ++i) {
      EXPECT_TRUE(c[i] >= 0 && c[i] <= tl.capacity) << "list " << i << " count " << c[i];
      const int n = std::clamp(c[i], 0, tl.capacity);
      h.lists[i].assign(t.begin() + (size_t)i * tl.capacity, t.begin() + (size_t)i * tl.capacity + n);
    }
    return h;
  }
};

// Candidate generators (positions ascending, unique, in [0, L)).
enum class ListKind { QuestLike, Random, All, NoCurrent };
inline std::vector<int32_t> make_candidates(ListKind kind, int L, int cap, std::mt19937_64& rng) {
  std::vector<int32_t> out;
  if (L <= 0) return out;
  const int n_pages = (L + kPageSize - 1) / kPageSize;
  if (kind == ListKind::All) {
    for (int t = 0; t < std::min(L, cap); ++t) out.push_back(t);
    return out;
  }
  if (kind == ListKind::QuestLike) {  // whole pages: first, last, and random others up to cap
    std::vector<int> pages(n_pages);
    for (int i = 0; i < n_pages; ++i) pages[i] = i;
    std::shuffle(pages.begin() + std::min(1, n_pages), pages.end() - (n_pages > 1 ? 1 : 0), rng);
    std::vector<int> take;
    int tokens = 0;
    auto page_len = [&](int p) { return std::min(kPageSize, L - p * kPageSize); };
    if (n_pages > 1) take.push_back(n_pages - 1), tokens += page_len(n_pages - 1);
    for (int i = 0; i < n_pages - (n_pages > 1 ? 1 : 0) && tokens + page_len(pages[i]) <= cap; ++i)
      take.push_back(pages[i]), tokens += page_len(pages[i]);
    std::sort(take.begin(), take.end());
    for (int p : take)
      for (int t = p * kPageSize; t < std::min(L, (p + 1) * kPageSize); ++t) out.push_back(t);
    return out;
  }
  std::uniform_real_distribution<double> U(0.0, 1.0);
  const double keep = std::min(1.0, (double)cap / L) * U(rng);
  for (int t = 0; t < L - (kind == ListKind::NoCurrent ? 1 : 0) && (int)out.size() < cap; ++t)
    if (U(rng) < keep) out.push_back(t);
  return out;
}

// Selection (Group mode) of sequence s from host lists.
inline Selection selection_of(const HostLists& h, int s, int Hkv) {
  Selection sel;
  sel.clear(GqaMode::Group, Hkv);
  for (int k = 0; k < Hkv; ++k) {
    const auto& l = h.lists[(size_t)s * Hkv + k];
    sel.push_list(l.data(), (int64_t)l.size());
  }
  return sel;
}

// ---- benchmark timing ----
// A benchmark's size knob: bench_knob(name) when set to a positive value, else `dflt`.
inline int bench_size(const char* name, int dflt) {
  const int v = bench_knob(name);
  return v > 0 ? v : dflt;
}

inline double median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median time of one call of fn (microseconds) from CUDA-graph replays of kPerGraph calls: no host
// work or launch gaps in the numbers (the step runs as a graph). Also the median of direct calls.
template <class Fn>
inline std::pair<double, double> time_us(Fn fn) {
  constexpr int kPerGraph = 10;
  cudaStream_t s;
  TW_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  TW_CUDA_CHECK(cudaEventCreate(&e0));
  TW_CUDA_CHECK(cudaEventCreate(&e1));
  // Warm-up for >= 20 ms of calls (attributes and module load first): with one call, the first case of
  // a process read 1-3 us slower than the same work timed after it (H200, the pruner at 128 lists).
  for (float ms = 0.f; ms < 20.f;) {
    TW_CUDA_CHECK(cudaEventRecord(e0, s));
    for (int i = 0; i < 10; ++i) fn(s);
    TW_CUDA_CHECK(cudaEventRecord(e1, s));
    TW_CUDA_CHECK(cudaEventSynchronize(e1));
    float t;
    TW_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    ms += t;
  }
  std::vector<float> direct, graph;
  for (int r = 0; r < 13; ++r) {
    TW_CUDA_CHECK(cudaEventRecord(e0, s));
    fn(s);
    TW_CUDA_CHECK(cudaEventRecord(e1, s));
    TW_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms;
    TW_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 3) direct.push_back(ms * 1e3f);
  }
  cudaGraph_t g;
  TW_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < kPerGraph; ++i) fn(s);
  TW_CUDA_CHECK(cudaStreamEndCapture(s, &g));
  cudaGraphExec_t x;
  TW_CUDA_CHECK(cudaGraphInstantiate(&x, g, 0));
  for (int r = 0; r < 13; ++r) {
    TW_CUDA_CHECK(cudaEventRecord(e0, s));
    TW_CUDA_CHECK(cudaGraphLaunch(x, s));
    TW_CUDA_CHECK(cudaEventRecord(e1, s));
    TW_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms;
    TW_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 3) graph.push_back(ms * 1e3f / kPerGraph);
  }
  TW_CUDA_CHECK(cudaGraphExecDestroy(x));
  TW_CUDA_CHECK(cudaGraphDestroy(g));
  TW_CUDA_CHECK(cudaEventDestroy(e0));
  TW_CUDA_CHECK(cudaEventDestroy(e1));
  TW_CUDA_CHECK(cudaStreamDestroy(s));
  return {median(graph), median(direct)};
}

}  // namespace tw::attn::cuda::ptest
