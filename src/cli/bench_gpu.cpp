// twilight bench --gpu: the GPU attention benchmark (attention/cuda/bench_attn.h). One decode step
// of one layer per row: dense (ours), fixed-budget Quest and Twilight, per-stage times, bytes, GB/s
// against the copy bandwidth measured in the same run, and budgets. Built only with the CUDA backend;
// without it the command says so.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "common/error.h"
#if TW_HAVE_CUDA
#include "attention/cuda/bench_attn.h"
#include "ops/cuda/device.h"
#endif

namespace tw::cli {

namespace {
template <class T>
std::vector<T> parse_list(const std::string& flag, const std::string& s, bool allow_zero) {
  std::vector<T> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    std::istringstream is(item);
    T v{};
    char extra;
    if (item.empty() || !(is >> v) || (is >> extra) || v < 0 || (!allow_zero && v == 0))
      fail(flag, ": expected a comma-separated list of ", allow_zero ? "non-negative" : "positive", " numbers, got '", s, "'");
    out.push_back(v);
  }
  if (out.empty()) fail(flag, ": empty list");
  return out;
}
}  // namespace

int cmd_bench_gpu(int argc, char** argv) {
  std::string kv_dump;
  int64_t keep = 16;
  std::string batch = "1,16,64", ctx = "8192,32768,131072", ps = "0.85,0.95", b0s = "8192,0", dtype = "f16", json_path;
  int heads = 32, kv_heads = 8, head_dim = 128, reps = 10, trials = 7;
  float logit_std = 1.0f, heavy_frac = 0.002f, heavy_boost = 6.0f;
  bool gpu = false;
  Args a("bench --gpu");
  a.flag({"--gpu"}, "GPU attention benchmark (this mode)", &gpu);
  a.opt({"--batch"}, "LIST", "batch sizes (default 1,16,64)", &batch);
  a.opt({"--ctx"}, "LIST", "context lengths (default 8192,32768,131072)", &ctx);
  a.opt({"--heads"}, "N", "query heads (default 32: Llama-3.1-8B)", &heads, 1, 1024);
  a.opt({"--kv-heads"}, "N", "kv heads (default 8)", &kv_heads, 1, 1024);
  a.opt({"--head-dim"}, "N", "head dim, 64 or 128 (default 128)", &head_dim, 1, 4096);
  a.opt({"--dtype"}, "f16|bf16", "KV dtype (default f16)", &dtype);
  a.opt({"--attn-p"}, "LIST", "Twilight top-p values (default 0.85,0.95)", &ps);
  a.opt({"--attn-b0"}, "LIST", "Quest budgets B0 in tokens, 0 = ctx/4 (default 8192,0)", &b0s);
  a.opt({"--logit-std"}, "X", "synthetic input: std of the logits q.k/sqrt(d) (default 1)", &logit_std, 0.f, 100.f);
  a.opt({"--heavy-frac"}, "X", "synthetic input: fraction of heavy tokens (default 0.002)", &heavy_frac, 0.f, 1.f);
  a.opt({"--heavy-boost"}, "X", "synthetic input: logit boost of heavy tokens (default 6)", &heavy_boost, 0.f, 100.f);
  a.opt({"--kv"}, "FILE", "real-model input: a KV dump (bench --attn-dump); its shape replaces --heads/--kv-heads/--head-dim",
        &kv_dump);
  a.opt({"--keep"}, "N", "with --kv: tokens kept once when tiling past the dump (default 16)", &keep, 0, 1LL << 40);
  a.opt({"--reps"}, "N", "calls per timed block (default 10)", &reps, 1, 100000);
  a.opt({"--trials"}, "N", "timed blocks, median reported (default 7)", &trials, 1, 1000);
  a.opt({"--json"}, "FILE", "also write one JSON object per row to FILE", &json_path);
  if (!a.parse(argc, argv, 2)) return 0;
  if (dtype != "f16" && dtype != "bf16") fail("--dtype: expected f16 or bf16, got '", dtype, "'");
#if TW_HAVE_CUDA
  attn::cuda::GpuAttnBenchOptions o;
  o.batch = parse_list<int>("--batch", batch, false);
  o.ctx = parse_list<int64_t>("--ctx", ctx, false);
  o.p = parse_list<float>("--attn-p", ps, false);
  o.b0 = parse_list<int64_t>("--attn-b0", b0s, true);
  o.n_heads = heads;
  o.n_kv_heads = kv_heads;
  o.head_dim = head_dim;
  o.dtype = dtype == "f16" ? attn::cuda::KvDtype::F16 : attn::cuda::KvDtype::BF16;
  o.logit_std = logit_std;
  o.heavy_frac = heavy_frac;
  o.heavy_boost = heavy_boost;
  o.kv_dump = kv_dump;
  o.dump_keep = keep;
  o.reps = reps;
  o.trials = trials;
  if (!tw::cuda::available()) fail("bench --gpu: no CUDA device");
  std::ofstream jf;
  std::ostringstream sink;
  if (!json_path.empty()) {
    jf.open(json_path);
    if (!jf) fail("cannot write '", json_path, "'");
  }
  attn::cuda::run_gpu_attention_bench(o, std::cout, json_path.empty() ? static_cast<std::ostream&>(sink) : jf);
  return 0;
#else
  fail("bench --gpu: this build has no CUDA backend (configure with TWILIGHT_CUDA=ON where nvcc is installed)");
#endif
}

}  // namespace tw::cli
