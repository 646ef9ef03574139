#include "attention/cuda/bench_attn.h"

#include <cuda_runtime_api.h>

#include <cuda_fp16.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "attention/cuda/dense_decode.h"
#include "attention/cuda/kv_append.h"
#include "attention/cuda/pruner.h"
#include "attention/cuda/quest.h"
#include "attention/cuda/sparse_decode.h"
#include "common/error.h"
#include "common/fp16.h"
#include "kv/kv_dump.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/device.h"

namespace tw::attn::cuda {

namespace {

using ::tw::cuda::DeviceBuffer;

__device__ __forceinline__ uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
__device__ __forceinline__ float uniform01(uint64_t h) { return ((h >> 40) + 0.5f) * (1.0f / 16777216.0f); }
__device__ __forceinline__ float normal(uint64_t seed, uint64_t idx) {  // Box-Muller, one value per index
  const uint64_t h = mix64(seed ^ mix64(idx));
  const float u1 = uniform01(h), u2 = uniform01(mix64(h));
  return sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}

// K/V of tokens [t0, t0 + n) of every (sequence, kv head): k = N(0, I) + c * u_g for heavy tokens
// (token 0, the sink, is always heavy), v = N(0, I). kbuf / vbuf: [n][batch][Hkv][d]; pos: [n][batch].
__global__ void gen_tokens(float* __restrict__ kbuf, float* __restrict__ vbuf, int32_t* __restrict__ pos,
                           const float* __restrict__ u, int64_t t0, int n, int batch, int hkv, int d, uint64_t seed,
                           float heavy_frac, float c) {
  const int64_t total = (int64_t)n * batch * hkv * d;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int i = (int)(e % d);
    const int64_t bh = (e / d) % ((int64_t)batch * hkv);
    const int64_t j = e / ((int64_t)d * batch * hkv);
    const int64_t t = t0 + j;
    const uint64_t tok = ((uint64_t)t * batch * hkv + bh);
    const bool heavy = t == 0 || uniform01(mix64(seed * 3 + tok)) < heavy_frac;
    kbuf[e] = normal(seed * 5 + 1, (uint64_t)e + (uint64_t)t0 * batch * hkv * d) + (heavy ? c * u[bh * d + i] : 0.f);
    vbuf[e] = normal(seed * 7 + 2, (uint64_t)e + (uint64_t)t0 * batch * hkv * d);
    if (i == 0 && bh % hkv == 0) pos[j * batch + bh / hkv] = (int32_t)t;
  }
}

// Real-model tokens: K/V of context position t from the dump's position tiled_source(t) (kv_dump.h),
// the same for every sequence of the batch (each sequence still has its own pages). dk / dv:
// [n_tok][Hkv][d] fp16 bits of one dumped layer.
__global__ void gather_tokens(float* __restrict__ kbuf, float* __restrict__ vbuf, int32_t* __restrict__ pos,
                              const __half* __restrict__ dk, const __half* __restrict__ dv, int64_t n_tok, int64_t keep,
                              int64_t t0, int n, int batch, int hkv, int d) {
  const int64_t total = (int64_t)n * batch * hkv * d;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int i = (int)(e % d);
    const int64_t bh = (e / d) % ((int64_t)batch * hkv);
    const int64_t j = e / ((int64_t)d * batch * hkv);
    const int64_t t = t0 + j;
    const int64_t src = t < n_tok ? t : keep + (t - n_tok) % (n_tok - keep);
    const int64_t off = (src * hkv + bh % hkv) * d + i;
    kbuf[e] = __half2float(dk[off]);
    vbuf[e] = __half2float(dv[off]);
    if (i == 0 && bh % hkv == 0) pos[j * batch + bh / hkv] = (int32_t)t;
  }
}

struct Set {  // one "layer": its own pools, side structures, page table, query and lists
  DeviceBuffer k, v, bcode, bparam, k4, k4s, k4z, pt, len, q, out, i0c, i0t, i0pc, i0pp, i1c, i1t, mass;
  PagedKV kv;
  KeySideDev side;
  TokenLists i0, i1;  // I0 as tokens (fixed-budget Quest's attention), I1
  PageLists i0p;      // I0 as pages (Twilight's pruner input)
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// After a measurement that kept the GPU busy for more than kSettleAfter, a pause of kSettle before the
// next one. A long full-bandwidth measurement (the dense decode at 64 x 128k: ~0.6 s at ~700 W) takes
// the H200 to its power cap, and the driver then holds the SM clock down (1380-1965 MHz, throttle
// reason "SW power cap", nvidia-smi at 50 ms) for ~0.5 s after the load ends; what was timed in that
// window paid for it: the first Twilight row after the dense and Quest timings at 64 x 128k 536 /
// 745 us (p 0.85 / 0.95 timed first) against 523 / 696 timed later in the same call. Bandwidth-bound
// kernels barely notice the clock; the latency-bound stages (the pruner's phases) do. The anchors'
// scripts settle the same way (gpu_anchor_util.py).
constexpr auto kSettleAfter = std::chrono::milliseconds(100);
constexpr auto kSettle = std::chrono::milliseconds(1000);
void settle_after(std::chrono::steady_clock::time_point start) {
  if (std::chrono::steady_clock::now() - start > kSettleAfter) std::this_thread::sleep_for(kSettle);
}

// Median over `trials` blocks of `reps` calls of f(set index), rotating over n sets; seconds per call.
// Warm-up: calls for at least 20 ms first. Whichever path ran first after a size's buffers were filled
// came out 5-12% slow at batch 1 with a shorter warm-up (H200, DenseDecodeCudaBench: 1 x 128k dense
// 144.9 us timed first, 129.0 timed third).
template <class F>
double time_calls(F&& f, int n, int reps, int trials, cudaStream_t st) {
  const auto w0 = std::chrono::steady_clock::now();
  int w = 0;
  do {
    for (int i = 0; i < std::max(std::min(n, 3), reps); ++i) f(w++ % n);
    TW_CUDA_CHECK(cudaStreamSynchronize(st));
  } while (std::chrono::steady_clock::now() - w0 < std::chrono::milliseconds(20));
  cudaEvent_t a, b;
  TW_CUDA_CHECK(cudaEventCreate(&a));
  TW_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> t;
  int k = 0;
  for (int r = 0; r < trials; ++r) {
    TW_CUDA_CHECK(cudaEventRecord(a, st));
    for (int i = 0; i < reps; ++i) f(k++ % n);
    TW_CUDA_CHECK(cudaEventRecord(b, st));
    TW_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    TW_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1e-3 / reps);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  settle_after(w0);
  return median(t);
}

// f(set) captured once per set into a CUDA graph, then timed as graph replays (time_calls): every
// measured path (dense, fixed-budget Quest, the Twilight step) and the Python anchors are timed this
// way, so no path pays launch costs another does not.
template <class F>
double time_graphs(F&& f, int n, int reps, int trials, cudaStream_t st) {
  struct Exec {
    cudaGraph_t g = nullptr;
    cudaGraphExec_t e = nullptr;
    ~Exec() {
      if (e) cudaGraphExecDestroy(e);
      if (g) cudaGraphDestroy(g);
    }
  };
  std::vector<Exec> ex(n);
  for (int i = 0; i < n; ++i) {
    TW_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    f(i);
    TW_CUDA_CHECK(cudaStreamEndCapture(st, &ex[i].g));
    TW_CUDA_CHECK(cudaGraphInstantiate(&ex[i].e, ex[i].g, 0));
  }
  return time_calls([&](int i) { TW_CUDA_CHECK(cudaGraphLaunch(ex[i].e, st)); }, n, reps, trials, st);
}

double copy_bandwidth(cudaStream_t st) {
  const size_t n = size_t(2) << 30;
  DeviceBuffer a(n), b(n);
  TW_CUDA_CHECK(cudaMemsetAsync(a.get(), 1, n, st));
  const double t = time_calls([&](int) { TW_CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), n, cudaMemcpyDeviceToDevice, st)); },
                              1, 5, 9, st);
  return 2.0 * n / t;
}

std::string fmt(double x, int prec = 1) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, x);
  return buf;
}

}  // namespace

void run_gpu_attention_bench(const GpuAttnBenchOptions& o, std::ostream& table, std::ostream& js) {
  TW_CHECK(!o.batch.empty() && !o.ctx.empty() && !o.p.empty() && !o.b0.empty(), "gpu bench: empty size list");
  for (float p : o.p) TW_CHECK(p > 0.f && p <= 1.f, "gpu bench: p must be in (0, 1], got ", p);
  TW_CHECK(o.reps > 0 && o.trials > 0, "gpu bench: reps and trials must be positive");
  kv::KVDump dump;
  std::string input = o.input_name;
  int H = o.n_heads, Hkv = o.n_kv_heads, d = o.head_dim;
  if (!o.kv_dump.empty()) {
    TW_CHECK(o.dtype == KvDtype::F16, "gpu bench: a KV dump holds fp16 K/V; bf16 needs synthetic input");
    dump = kv::read_kv_dump(o.kv_dump);
    H = dump.info.n_heads;
    Hkv = dump.info.n_kv_heads;
    d = dump.info.head_dim;
    TW_CHECK(o.dump_keep >= 0 && o.dump_keep < dump.info.n_tokens, "gpu bench: dump_keep ", o.dump_keep,
             " must be below the dump's ", dump.info.n_tokens, " tokens");
    input = "real KV dump of " + dump.info.model_name + " (" + std::to_string(dump.info.n_tokens) + " tokens, " +
            std::to_string(dump.info.layers.size()) + " layers; " + dump.info.desc + ")";
  }
  const int G = H / std::max(Hkv, 1);
  {  // configuration errors before any allocation
    PagedKV probe;
    probe.k = probe.v = reinterpret_cast<const void*>(uintptr_t(256));
    probe.page_table = probe.seq_len = reinterpret_cast<const int32_t*>(uintptr_t(256));
    probe.dtype = o.dtype;
    probe.batch = 1;
    probe.n_heads = H;
    probe.n_kv_heads = Hkv;
    probe.head_dim = d;
    probe.max_pages = 1;
    probe.n_pages = 1;
    check_config(probe);
  }
  const ::tw::cuda::DeviceInfo dev = ::tw::cuda::device_info();
  cudaStream_t st;
  TW_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const double copy_bw = copy_bandwidth(st);
  js << "{\"kind\":\"device\",\"gpu\":\"" << dev.name << "\",\"sm\":" << dev.sm_count << ",\"copy_GBps\":" << copy_bw / 1e9
     << ",\"heads\":" << H << ",\"kv_heads\":" << Hkv << ",\"head_dim\":" << d << ",\"dtype\":\""
     << (o.dtype == KvDtype::F16 ? "f16" : "bf16") << "\",\"input\":\"" << (o.kv_dump.empty() ? input : "real") << "\"}\n";
  table << "GPU: " << ::tw::cuda::describe(dev) << "; copy bandwidth (read + write) " << fmt(copy_bw / 1e9, 0)
        << " GB/s, measured in this run\n"
        << "shape: H " << H << ", Hkv " << Hkv << ", d " << d << ", " << (o.dtype == KvDtype::F16 ? "fp16" : "bf16")
        << " KV; input: " << input;
  if (o.kv_dump.empty()) table << " (logit std " << o.logit_std << ", heavy " << o.heavy_frac << " at +" << o.heavy_boost << ")";
  table << "\n\n"
        << "| batch | ctx | p | B0 | dense us | dense GB/s (% copy) | Quest us | Twilight us (graph) | select | prune | attend "
           "| I1 avg (% ctx) | est mass | x dense | x Quest |\n"
        << "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
  const size_t esz = 2;  // fp16 / bf16
  std::vector<DeviceBuffer> dump_k, dump_v;  // per dumped layer [n_tok][Hkv][d] fp16
  for (size_t i = 0; i < dump.k.size(); ++i) {
    dump_k.emplace_back(dump.k[i].size() * 2);
    dump_k.back().upload(dump.k[i].data(), dump.k[i].size() * 2);
    dump_v.emplace_back(dump.v[i].size() * 2);
    dump_v.back().upload(dump.v[i].data(), dump.v[i].size() * 2);
  }

  for (int B : o.batch) {
    for (int64_t L : o.ctx) {
      const int max_pages = (int)((L + kPageSize - 1) / kPageSize);
      const int64_t n_pages = (int64_t)B * max_pages;
      const double kv_bytes = 2.0 * B * Hkv * (double)L * d * esz;
      const size_t pool_b = (size_t)n_pages * Hkv * kPageSize * d * esz;
      const size_t bcode_b = (size_t)n_pages * Hkv * 2 * d, bparam_b = (size_t)n_pages * Hkv * 2 * sizeof(float);
      const size_t k4_b = (size_t)n_pages * Hkv * kPageSize * (d / 2);
      const size_t sz_b = (size_t)n_pages * Hkv * kPageSize * sizeof(float);
      int64_t b0_max = 0;
      for (int64_t b0 : o.b0) b0_max = std::max(b0_max, b0 > 0 ? b0 : L / 4);
      PagedKV shape;  // the sets' shape (pointers filled per set)
      shape.dtype = o.dtype;
      shape.batch = B;
      shape.n_heads = H;
      shape.n_kv_heads = Hkv;
      shape.head_dim = d;
      shape.max_pages = max_pages;
      shape.n_pages = n_pages;
      const int cap0 = (int)quest_list_capacity(shape, std::min<int64_t>(b0_max, L));
      const int cap1 = cap0 + 1;
      const size_t lists_b = (size_t)B * Hkv * (cap0 + cap1 + 2) * sizeof(int32_t);
      const size_t per_set = 2 * pool_b + bcode_b + bparam_b + k4_b + 2 * sz_b + lists_b + (size_t)B * max_pages * 4;
      int n_sets = (int)std::max<double>(2, std::ceil(o.min_rotation_bytes / kv_bytes));
      if (kv_bytes > 4 * 60e6) n_sets = std::min(n_sets, 2);
      while (n_sets > 1 && (double)n_sets * per_set > o.max_mem_bytes) --n_sets;
      if ((double)n_sets * per_set > o.max_mem_bytes || (n_sets == 1 && kv_bytes < 4 * 60e6)) {
        js << "{\"kind\":\"row\",\"batch\":" << B << ",\"ctx\":" << L << ",\"skipped\":\"does not fit\"}\n";
        table << "| " << B << " | " << L << " | - | - | does not fit in " << fmt(o.max_mem_bytes / 1e9, 0) << " GB |\n";
        continue;
      }

      // ---- build the sets through the real append path ------------------------------------------
      std::mt19937_64 rng(o.seed * 1000003 + B * 131 + L);
      std::vector<std::unique_ptr<Set>> sets;
      const int chunk = (int)std::max<int64_t>(1, std::min<int64_t>(256, (int64_t)(64 << 20) / ((int64_t)B * Hkv * d * 4)));
      DeviceBuffer kbuf((size_t)chunk * B * Hkv * d * 4), vbuf((size_t)chunk * B * Hkv * d * 4),
          posbuf((size_t)chunk * B * 4), ubuf((size_t)B * Hkv * d * 4);
      for (int s = 0; s < n_sets; ++s) {
        auto S = std::make_unique<Set>();
        S->k = DeviceBuffer(pool_b);
        S->v = DeviceBuffer(pool_b);
        S->bcode = DeviceBuffer(bcode_b);
        S->bparam = DeviceBuffer(bparam_b);
        S->k4 = DeviceBuffer(k4_b);
        S->k4s = DeviceBuffer(sz_b);
        S->k4z = DeviceBuffer(sz_b);
        std::vector<int32_t> perm(n_pages);
        std::iota(perm.begin(), perm.end(), 0);
        // Each sequence's pages scattered over the pool; TW_BENCH_SEQUENTIAL_PAGES=1 keeps them in order
        // (an experiment: how much of the dense read rate the scatter costs).
        static const int sequential = bench_knob("TW_BENCH_SEQUENTIAL_PAGES");
        if (sequential <= 0) std::shuffle(perm.begin(), perm.end(), rng);
        S->pt = DeviceBuffer(perm.size() * 4);
        S->pt.upload(perm.data(), perm.size() * 4);
        std::vector<int32_t> len(B, (int32_t)L);
        S->len = DeviceBuffer((size_t)B * 4);
        S->len.upload(len.data(), len.size() * 4);
        // Queries: per kv head a direction u_g, per query head q = normalize(u_g + 0.5 n) * std * sqrt(d).
        std::normal_distribution<float> nd;
        std::vector<float> u((size_t)B * Hkv * d), q((size_t)B * H * d);
        for (size_t bh = 0; bh < (size_t)B * Hkv; ++bh) {
          double n2 = 0;
          for (int i = 0; i < d; ++i) n2 += std::pow(u[bh * d + i] = nd(rng), 2);
          for (int i = 0; i < d; ++i) u[bh * d + i] = (float)(u[bh * d + i] / std::sqrt(n2));
        }
        for (int b = 0; b < B; ++b)
          for (int h = 0; h < H; ++h) {
            float* qr = &q[((size_t)b * H + h) * d];
            const float* ug = &u[((size_t)b * Hkv + h / G) * d];
            double n2 = 0;
            for (int i = 0; i < d; ++i) n2 += std::pow(qr[i] = ug[i] + 0.5f * nd(rng) / std::sqrt((float)d), 2);
            const double sc = o.logit_std * std::sqrt((double)d) / std::sqrt(n2);
            for (int i = 0; i < d; ++i) qr[i] = (float)(qr[i] * sc);
          }
        const int dl = dump_k.empty() ? 0 : s % (int)dump_k.size();  // dumped layer replayed by this set
        if (!dump_k.empty())
          for (int b = 0; b < B; ++b) std::memcpy(&q[(size_t)b * H * d], dump.query(0, dl), (size_t)H * d * 4);
        S->q = DeviceBuffer(q.size() * 4);
        S->q.upload(q.data(), q.size() * 4);
        ubuf.upload(u.data(), u.size() * 4);
        S->out = DeviceBuffer((size_t)B * H * d * 4);
        S->kv = shape;
        S->kv.k = S->k.get();
        S->kv.v = S->v.get();
        S->kv.page_table = S->pt.as<int32_t>();
        S->kv.seq_len = S->len.as<int32_t>();
        S->side = KeySideDev{S->bcode.as<uint8_t>(), S->bparam.as<float>(), S->k4.as<uint8_t>(), S->k4s.as<float>(), S->k4z.as<float>()};
        const float c = o.heavy_boost / std::max(o.logit_std, 1e-3f);
        for (int64_t t0 = 0; t0 < L; t0 += chunk) {
          const int n = (int)std::min<int64_t>(chunk, L - t0);
          if (dump_k.empty())
            gen_tokens<<<4 * dev.sm_count, 256, 0, st>>>(kbuf.as<float>(), vbuf.as<float>(), posbuf.as<int32_t>(),
                                                         ubuf.as<float>(), t0, n, B, Hkv, d, o.seed * 7919 + s, o.heavy_frac, c);
          else
            gather_tokens<<<4 * dev.sm_count, 256, 0, st>>>(kbuf.as<float>(), vbuf.as<float>(), posbuf.as<int32_t>(),
                                                            dump_k[dl].as<__half>(), dump_v[dl].as<__half>(),
                                                            dump.info.n_tokens, o.dump_keep, t0, n, B, Hkv, d);
          TW_CUDA_CHECK_LAUNCH();
          for (int j = 0; j < n; ++j)
            kv_append(S->kv, S->side, kbuf.as<float>() + (size_t)j * B * Hkv * d, vbuf.as<float>() + (size_t)j * B * Hkv * d,
                      posbuf.as<int32_t>() + (size_t)j * B, st);
        }
        S->i0c = DeviceBuffer((size_t)B * Hkv * 4);
        S->i1c = DeviceBuffer((size_t)B * Hkv * 4);
        S->i0t = DeviceBuffer((size_t)B * Hkv * cap0 * 4);
        S->i0pc = DeviceBuffer((size_t)B * Hkv * 4);
        S->i0pp = DeviceBuffer((size_t)B * Hkv * (cap0 / kPageSize) * 4);
        S->i1t = DeviceBuffer((size_t)B * Hkv * cap1 * 4);
        S->mass = DeviceBuffer((size_t)B * Hkv * 4);
        S->i0 = TokenLists{S->i0c.as<int32_t>(), S->i0t.as<int32_t>(), cap0};
        S->i0p = PageLists{S->i0pc.as<int32_t>(), S->i0pp.as<int32_t>(), cap0 / kPageSize};
        S->i1 = TokenLists{S->i1c.as<int32_t>(), S->i1t.as<int32_t>(), cap1};
        sets.push_back(std::move(S));
      }
      TW_CUDA_CHECK(cudaStreamSynchronize(st));

      // ---- dense (ours), once per size -------------------------------------------------------------
      const PagedKV& kv0 = sets[0]->kv;  // the shape queries validate pointers too: use a built set
      const DenseDecodePlan dplan = plan_dense_decode(kv0, L, dev.sm_count);
      const size_t dws_b = dense_decode_workspace_bytes(kv0, dplan);
      const size_t sws_b = sparse_decode_workspace_bytes(kv0, cap1);
      DeviceBuffer dws(std::max<size_t>(dws_b, 16)), sws(std::max<size_t>(sws_b, 16));
      auto dense = [&](int i) { dense_decode(sets[i]->kv, dplan, sets[i]->q.as<float>(), sets[i]->out.as<float>(), dws.get(), dws_b, st); };
      // TW_BENCH_STEP_ONLY (a profiling aid): only the Twilight step's graph runs, so a profiler's first
      // kernels are one step's (select, prune, attend, combine); every other time reads 0.
      static const bool step_only = bench_knob("TW_BENCH_STEP_ONLY") > 0;
      const double t_dense = step_only ? 0.0 : time_graphs(dense, n_sets, o.reps, o.trials, st);

      std::vector<int64_t> b0s;  // resolved budgets, each once (8192 and L/4 coincide at L = 32k)
      for (int64_t b0_opt : o.b0) {
        const int64_t b = std::min<int64_t>(b0_opt > 0 ? b0_opt : L / 4, L);
        if (std::find(b0s.begin(), b0s.end(), b) == b0s.end()) b0s.push_back(b);
      }
      for (const int64_t b0 : b0s) {
        // Lists sized for this B0 (the pruner's launch shape follows the I0 capacity, so lists sized
        // for a larger budget would time idle blocks); the buffers hold the largest.
        const int c0 = (int)quest_list_capacity(kv0, b0);
        for (auto& S : sets) {
          S->i0.capacity = c0;
          S->i0p.capacity = c0 / kPageSize;
          S->i1.capacity = c0 + 1;
        }
        auto select = [&](int i) {
          quest_select(sets[i]->kv, sets[i]->side, sets[i]->q.as<float>(), b0, L, sets[i]->i0, st);
        };
        auto attend0 = [&](int i) {
          sparse_decode(sets[i]->kv, sets[i]->q.as<float>(), sets[i]->i0, sets[i]->out.as<float>(), sws.get(), sws_b, st);
        };
        // Twilight's select writes I0 as whole pages for the pruner (TW_BENCH_TOKEN_I0=1, an A/B aid: as
        // tokens, the form fixed-budget Quest's attention reads).
        static const bool token_i0 = bench_knob("TW_BENCH_TOKEN_I0") > 0;
        auto select_tw = [&](int i) {
          if (token_i0)
            select(i);
          else
            quest_select_pages(sets[i]->kv, sets[i]->side, sets[i]->q.as<float>(), b0, L, sets[i]->i0p, st);
        };
        const double t_sel = step_only ? 0.0 : time_calls(select, n_sets, o.reps, o.trials, st);
        const double t_sel_tw = step_only ? 0.0 : time_calls(select_tw, n_sets, o.reps, o.trials, st);
        if (!step_only)
          for (int i = 0; i < n_sets; ++i) select(i), select_tw(i);  // every set's I0 for the stages below
        const double t_att0 = step_only ? 0.0 : time_calls(attend0, n_sets, o.reps, o.trials, st);
        // Fixed-budget Quest as one step (select + sparse attention over I0), graph-replayed like Twilight's.
        const double t_quest =
            step_only ? 0.0 : time_graphs([&](int i) { select(i), attend0(i); }, n_sets, o.reps, o.trials, st);
        std::vector<int32_t> n0((size_t)B * Hkv);
        sets[0]->i0c.download(n0.data(), n0.size() * 4);
        const double i0_avg = std::accumulate(n0.begin(), n0.end(), 0.0) / n0.size();

        for (float p : o.p) {
          std::ostringstream row;
          row << "{\"kind\":\"row\",\"batch\":" << B << ",\"ctx\":" << L << ",\"p\":" << p << ",\"b0\":" << b0
              << ",\"kv_sets\":" << n_sets << ",\"dense_splits\":" << dplan.n_splits << ",\"dense_us\":" << t_dense * 1e6
              << ",\"dense_GBps\":" << kv_bytes / t_dense / 1e9 << ",\"quest_select_us\":" << t_sel * 1e6
              << ",\"quest_attend_us\":" << t_att0 * 1e6 << ",\"quest_graph_us\":" << t_quest * 1e6
              << ",\"twilight_select_us\":" << t_sel_tw * 1e6 << ",\"i0_pages\":" << (token_i0 ? 0 : 1)
              << ",\"i0_avg\":" << i0_avg;
          PruneParams prm;
          prm.p = p;
          try {
            prune_plan(kv0, c0, prm);
          } catch (const Error& e) {
            js << row.str() << ",\"twilight_error\":\"" << e.what() << "\"}\n";
            table << "| " << B << " | " << L << " | " << p << " | " << b0 << " | " << fmt(t_dense * 1e6) << " | "
                  << fmt(kv_bytes / t_dense / 1e9, 0) << " (" << fmt(100 * kv_bytes / t_dense / copy_bw, 0) << "%) | "
                  << fmt(t_quest * 1e6) << " | pruner: " << e.what() << " |\n";
            continue;
          }
          auto prune = [&](int i) {
            if (token_i0)
              prune_topp(sets[i]->kv, sets[i]->side, sets[i]->q.as<float>(), sets[i]->i0, prm, sets[i]->i1,
                         sets[i]->mass.as<float>(), st);
            else
              prune_topp(sets[i]->kv, sets[i]->side, sets[i]->q.as<float>(), sets[i]->i0p, prm, sets[i]->i1,
                         sets[i]->mass.as<float>(), st);
          };
          auto attend1 = [&](int i) {
            sparse_decode(sets[i]->kv, sets[i]->q.as<float>(), sets[i]->i1, sets[i]->out.as<float>(), sws.get(), sws_b, st);
          };
          const double t_prune = step_only ? 0.0 : time_calls(prune, n_sets, o.reps, o.trials, st);
          if (!step_only)
            for (int i = 0; i < n_sets; ++i) prune(i);
          const double t_att1 = step_only ? 0.0 : time_calls(attend1, n_sets, o.reps, o.trials, st);
          // The whole step, captured once per set and replayed: no host work between the stages.
          const double t_step =
              time_graphs([&](int i) { select_tw(i), prune(i), attend1(i); }, n_sets, o.reps, o.trials, st);
          // Budgets of every set's last step.
          double i1_sum = 0, mass_sum = 0;
          int64_t i1_min = INT64_MAX, i1_max = 0, n_lists = 0;
          for (int i = 0; i < n_sets; ++i) {
            std::vector<int32_t> c1((size_t)B * Hkv);
            std::vector<float> m((size_t)B * Hkv);
            sets[i]->i1c.download(c1.data(), c1.size() * 4);
            sets[i]->mass.download(m.data(), m.size() * 4);
            for (size_t j = 0; j < c1.size(); ++j) {
              i1_sum += c1[j];
              mass_sum += m[j];
              i1_min = std::min<int64_t>(i1_min, c1[j]);
              i1_max = std::max<int64_t>(i1_max, c1[j]);
              ++n_lists;
            }
          }
          const double i1_avg = i1_sum / n_lists;
          const double lists = (double)B * Hkv;
          // 8-bit bound codes + {lo, s}; none when B0 covers the context (every token listed, no scores)
          const double by_sel = b0 >= L ? 0.0 : lists * max_pages * (2.0 * d + 8);
          // codes + scale/zero + the I0 entry (a page id per 16 candidates; a token each with token I0)
          const double by_prune = lists * i0_avg * (d / 2.0 + 8 + (token_i0 ? 4.0 : 4.0 / kPageSize));
          const double by_att = lists * i1_avg * (2.0 * d * esz + 4);
          row << ",\"prune_us\":" << t_prune * 1e6 << ",\"attend_us\":" << t_att1 * 1e6
              << ",\"twilight_sum_us\":" << (t_sel_tw + t_prune + t_att1) * 1e6 << ",\"twilight_graph_us\":" << t_step * 1e6
              << ",\"i1_avg\":" << i1_avg << ",\"i1_min\":" << i1_min << ",\"i1_max\":" << i1_max
              << ",\"est_mass_avg\":" << mass_sum / n_lists << ",\"bytes_select\":" << by_sel
              << ",\"bytes_prune\":" << by_prune << ",\"bytes_attend\":" << by_att
              << ",\"select_GBps\":" << by_sel / t_sel_tw / 1e9 << ",\"prune_GBps\":" << by_prune / t_prune / 1e9
              << ",\"attend_GBps\":" << by_att / t_att1 / 1e9 << ",\"speedup_vs_dense\":" << t_dense / t_step
              << ",\"speedup_vs_quest\":" << t_quest / t_step << "}";
          js << row.str() << "\n";
          table << "| " << B << " | " << L << " | " << p << " | " << b0 << " | " << fmt(t_dense * 1e6) << " | "
                << fmt(kv_bytes / t_dense / 1e9, 0) << " (" << fmt(100 * kv_bytes / t_dense / copy_bw, 0) << "%) | "
                << fmt(t_quest * 1e6) << " | " << fmt(t_step * 1e6) << " | " << fmt(t_sel_tw * 1e6) << " | "
                << fmt(t_prune * 1e6) << " | " << fmt(t_att1 * 1e6) << " | " << fmt(i1_avg, 0) << " ("
                << fmt(100 * i1_avg / L, 2) << "%) | " << fmt(mass_sum / n_lists, 3) << " | " << fmt(t_dense / t_step, 2)
                << " | " << fmt(t_quest / t_step, 2) << " |\n";
          table.flush();
          js.flush();
        }
      }
    }
  }
  cudaStreamDestroy(st);
}

}  // namespace tw::attn::cuda
