// Micro-benchmark of the CPU weight products on real tensors of Qwen2.5-Coder-1.5B (Q4_K_M):
//   matvec GB/s  = weight bytes / time (decode), on layer 0's ffn_up (Q4_K) / ffn_down (Q6_K), and
//                  on all layers' ffn_up in turn (228 MB: each weight comes from DRAM, like decode)
//   matmul GFLOP/s = 2 * rows * cols * n / time (prefill), n = 64 / 256 / 512
// for every SIMD level the CPU has, 1 and 2 threads.
// Usage: ops_bench [model.gguf] [--quick] [--synthetic] [--only TENSOR N THREADS SIMD REPS]
//   --synthetic: random weights of the same shapes and types (no model file needed; speed does
//                not depend on the values)
//   --only:      one matvec (N=1) / matmul configuration, repeated (for perf stat / perf record)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/paths.h"
#include "gguf/gguf.h"
#include "ops/cpu/matmul.h"

using namespace tw;
using Clock = std::chrono::steady_clock;

static double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Best of `reps` timings of fn (best = least disturbed by other load on the machine).
template <typename F>
static double best_time(int reps, F&& fn) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    fn();
    best = std::min(best, seconds_since(t0));
  }
  return best;
}

// Stand-in for the model's tensors: same names, shapes and types, random valid blocks.
struct Synthetic {
  std::vector<std::vector<uint8_t>> store;
  std::vector<gguf::TensorInfo> infos;
  Synthetic() {
    std::mt19937 rng(5);
    auto add = [&](const std::string& name, gguf::Type t, int64_t cols, int64_t rows) {
      const size_t rb = gguf::row_bytes(t, cols);
      store.emplace_back(rb * rows);
      auto& d = store.back();
      for (auto& b : d) b = static_cast<uint8_t>(rng());
      const int bb = gguf::type_traits(t).block_bytes;
      const int f16_at = t == gguf::Type::Q6_K ? 208 : 0;  // keep the fp16 scales finite and small
      const bool two = t == gguf::Type::Q4_K || t == gguf::Type::Q4_1;  // d and dmin / m
      for (size_t o = 0; o + bb <= d.size(); o += bb) {
        d[o + f16_at] = 0x00; d[o + f16_at + 1] = 0x20;
        if (two) { d[o + 2] = 0x00; d[o + 3] = 0x20; }
      }
      gguf::TensorInfo ti;
      ti.name = name; ti.type = t; ti.ne = {cols, rows}; ti.data = d.data(); ti.nbytes = d.size();
      infos.push_back(ti);
    };
    for (int l = 0; l < 28; ++l) add("blk." + std::to_string(l) + ".ffn_up.weight", gguf::Type::Q4_K, 1536, 8960);
    add("blk.0.ffn_down.weight", gguf::Type::Q6_K, 8960, 1536);
    add("blk.0.attn_q.weight", gguf::Type::Q4_K, 1536, 1536);
    // The other models' main types: Qwen2.5-0.5B ffn_up (Q5_0) / attn (Q8_0), SmolLM2 ffn_up (Q4_1).
    add("q05.ffn_up.Q5_0", gguf::Type::Q5_0, 896, 4864);
    add("q05.attn_q.Q8_0", gguf::Type::Q8_0, 896, 896);
    add("smol.ffn_up.Q4_1", gguf::Type::Q4_1, 576, 1536);
  }
  const gguf::TensorInfo* find_tensor(const std::string& n) const {
    for (const auto& t : infos) if (t.name == n) return &t;
    return nullptr;
  }
  const gguf::TensorInfo& tensor(const std::string& n) const {
    const auto* t = find_tensor(n);
    if (!t) fail("no tensor ", n);
    return *t;
  }
};

template <typename Source>
static int run(const Source& f, const std::string& path, bool quick);

int main(int argc, char** argv) {
  try {
    std::string path;
    bool quick = false, synthetic = false;
    for (int i = 1; i < argc; ++i) {
      if (std::strcmp(argv[i], "--quick") == 0) {
        quick = true;
      } else if (std::strcmp(argv[i], "--synthetic") == 0) {
        synthetic = true;
      } else if (std::strcmp(argv[i], "--only") == 0 && i + 5 < argc) {
        const Synthetic syn;
        const ops::QMatrix W = ops::as_matrix(syn.tensor(argv[i + 1]));
        const int64_t n = std::atol(argv[i + 2]);
        ThreadPool pool(std::atoi(argv[i + 3]));
        const ops::Simd s = ops::parse_simd(argv[i + 4]);
        const int reps = std::atoi(argv[i + 5]);
        std::vector<float> X(n * W.cols, 0.5f), Y(n * W.rows);
        const double t = best_time(reps, [&] { ops::matmul(W, X.data(), n, Y.data(), pool, s); });
        std::printf("%s n=%ld: best %.3f ms, %.1f GFLOP/s, %.2f GB/s\n", argv[i + 1], (long)n, t * 1e3,
                    2.0 * W.rows * W.cols * n / t / 1e9, (double)W.row_bytes * W.rows / t / 1e9);
        return 0;
      } else {
        path = argv[i];
      }
    }
    if (synthetic) return run(Synthetic(), "synthetic", quick);
    if (path.empty()) path = require_model(kQwen15File);
    return run(gguf::File::open(path), path, quick);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ops_bench: %s\n", e.what());
    return 1;
  }
}

template <typename Source>
static int run(const Source& f, const std::string& path, bool quick) {
  {
    const int reps = quick ? 3 : 10;
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> X(512 * 8960);
    for (auto& v : X) v = normal(rng);
    std::vector<float> Y(512 * 8960);

    std::vector<ops::Simd> levels;
    for (ops::Simd s : {ops::Simd::Scalar, ops::Simd::AVX2, ops::Simd::AVX512})
      if (ops::simd_supported(s)) levels.push_back(s);

    std::printf("model %s\n\n== matvec (decode): GB/s of weights ==\n", path.c_str());
    for (const char* name : {"blk.0.ffn_up.weight", "blk.0.ffn_down.weight"}) {
      const ops::QMatrix W = ops::as_matrix(f.tensor(name));
      const double bytes = static_cast<double>(W.row_bytes) * W.rows;
      for (ops::Simd s : levels) {
        for (int th : {1, 2}) {
          ThreadPool pool(th);
          // Best single call: the machine is shared, the minimum is the least disturbed run.
          const double t = best_time(s == ops::Simd::Scalar ? 3 : reps * 10, [&] { ops::matvec(W, X.data(), Y.data(), pool, s); });
          std::printf("%-24s %-5s %5ldx%-5ld %-7s threads=%d  %8.1f us  %6.2f GB/s\n", name,
                      gguf::type_traits(W.type).name, (long)W.rows, (long)W.cols, ops::simd_name(s), th, t * 1e6, bytes / t / 1e9);
        }
      }
    }
    // All layers' ffn_up one after another: 28 x 7.7 MB, more than L3, so the weights stream from DRAM.
    {
      std::vector<ops::QMatrix> ws;
      double bytes = 0;
      for (int l = 0;; ++l) {
        const gguf::TensorInfo* ti = f.find_tensor(std::string("blk.") + std::to_string(l) + ".ffn_up.weight");
        if (!ti) break;
        ws.push_back(ops::as_matrix(*ti));
        bytes += static_cast<double>(ws.back().row_bytes) * ws.back().rows;
      }
      for (ops::Simd s : levels) {
        if (s == ops::Simd::Scalar) continue;
        for (int th : {1, 2}) {
          ThreadPool pool(th);
          const double t = best_time(reps, [&] { for (const auto& W : ws) ops::matvec(W, X.data(), Y.data(), pool, s); });
          std::printf("all %zu ffn_up (%.0f MB)      %-7s threads=%d  %8.1f us  %6.2f GB/s\n", ws.size(), bytes / 1e6,
                      ops::simd_name(s), th, t * 1e6, bytes / t / 1e9);
        }
      }
    }

    std::printf("\n== matmul (prefill): GFLOP/s ==\n");
    for (const char* name : {"blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight", "q05.ffn_up.Q5_0",
                             "q05.attn_q.Q8_0", "smol.ffn_up.Q4_1"}) {
      if (!f.find_tensor(name)) continue;  // the extra types exist only in --synthetic
      const ops::QMatrix W = ops::as_matrix(f.tensor(name));
      for (ops::Simd s : levels) {
        if (s == ops::Simd::Scalar) continue;
        for (int64_t n : {64, 256, 512}) {
          for (int th : {1, 2}) {
            ThreadPool pool(th);
            const double t = best_time(quick ? 2 : 3, [&] { ops::matmul(W, X.data(), n, Y.data(), pool, s); });
            const double flop = 2.0 * W.rows * W.cols * n;
            std::printf("%-22s %-5s %5ldx%-5ld %-7s n=%-4ld threads=%d  %8.2f ms  %7.1f GFLOP/s\n", name,
                        gguf::type_traits(W.type).name, (long)W.rows, (long)W.cols, ops::simd_name(s), (long)n, th,
                        t * 1e3, flop / t / 1e9);
          }
        }
      }
    }
    return 0;
  }
}
