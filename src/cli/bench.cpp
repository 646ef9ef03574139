// twilight bench: llama-bench style rows. pp<N>: prompt processing of N tokens from an empty
// cache; tg<N> [@ d<D>]: N single-token decode steps after D cached tokens (the depth fill is not
// timed). Each row is repeated -r times; reported as mean t/s +- sample standard deviation.
// `bench --attention` and `bench --attn-dump` are the decode-attention modes (bench_attn.h).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cli/args.h"
#include "cli/attn_flags.h"
#include "cli/bench_attn.h"
#include "cli/commands.h"
#include "common/error.h"
#include "common/paths.h"
#include "model/model.h"

namespace tw::cli {

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::vector<int64_t> parse_list(const std::string& name, const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end || v < 0) fail(name, ": expected a comma-separated list of non-negative integers, got '", s, "'");
    out.push_back(v);
  }
  if (out.empty()) fail(name, ": empty list");
  return out;
}

struct Row {
  std::string test;
  int64_t n_tokens, depth;
  std::vector<double> tps;  // tokens per second, one per repetition
  double mean() const {
    double s = 0;
    for (double x : tps) s += x;
    return s / tps.size();
  }
  double sd() const {
    if (tps.size() < 2) return 0;
    const double m = mean();
    double s = 0;
    for (double x : tps) s += (x - m) * (x - m);
    return std::sqrt(s / (tps.size() - 1));
  }
};

}  // namespace

int cmd_bench(int argc, char** argv) {
  // Attention modes have their own options (bench_attn.cpp).
  for (int i = 2; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--attention")) return cmd_bench_attention(argc, argv);
    if (!std::strcmp(argv[i], "--attn-dump")) return cmd_bench_attn_dump(argc, argv);
  }
  std::string model, pp_s = "512", tg_s = "128", depth_s = "0", out = "md";
  int threads = 0, reps = 5;
  Args a("bench");
  a.opt({"-m", "--model"}, "FILE", "GGUF model (default: SmolLM2-135M-Instruct)", &model);
  a.opt({"-p", "--n-prompt"}, "N[,N]", "prompt-processing sizes (default 512; 0 = none)", &pp_s);
  a.opt({"-n", "--n-gen"}, "N[,N]", "decode lengths (default 128; 0 = none)", &tg_s);
  a.opt({"-d", "--n-depth"}, "D[,D]", "cached tokens before each test (default 0)", &depth_s);
  a.opt({"-r", "--repetitions"}, "N", "repetitions per row (default 5)", &reps, 1, 1000);
  a.opt({"-t", "--threads"}, "N", "threads (default: all cores)", &threads, 1, 1024);
  a.opt({"-o", "--output"}, "md|json", "output format (default md)", &out);
  AttnFlags af;
  af.add_to(a);
  if (!a.parse(argc, argv, 2)) return 0;
  TW_CHECK(out == "md" || out == "json", "-o must be md or json, got '", out, "'");
  const std::vector<int64_t> pps = parse_list("-p", pp_s), tgs = parse_list("-n", tg_s), depths = parse_list("-d", depth_s);
  const attn::AttnConfig acfg = af.resolve(attn::Method::Dense);  // bench's baseline is dense

  const std::string path = model.empty() ? require_model(kSmolLM2File) : model;
  std::unique_ptr<Model> m = Model::load(path);
  const ModelConfig& c = m->config();
  ThreadPool tp(threads > 0 ? threads : default_threads());
  int64_t max_ctx = 0;
  for (int64_t d : depths) max_ctx = std::max(max_ctx, d + std::max(*std::max_element(pps.begin(), pps.end()),
                                                                   *std::max_element(tgs.begin(), tgs.end())));
  TW_CHECK(max_ctx <= c.n_ctx_train, "depth + test size ", max_ctx, " exceeds the model's context ", c.n_ctx_train);
  kv::KVPool pool = m->make_kv(std::max<int64_t>(max_ctx, kv::kPageSize));
  attn::AttentionPolicy policy(acfg, pool.shape(), m->head_shape(), m->fingerprint());
  std::vector<float> logits(c.n_vocab);
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> tok(0, c.n_vocab - 1);
  auto random_tokens = [&](int64_t n) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = tok(rng);
    return t;
  };
  const int64_t chunk = 512;
  auto fill = [&](kv::SeqPages& seq, const std::vector<int32_t>& t) {
    for (int64_t i = 0; i < (int64_t)t.size(); i += chunk)
      m->forward(t.data() + i, std::min<int64_t>(chunk, (int64_t)t.size() - i), pool, seq, logits.data(), tp, false, &policy);
  };

  std::vector<Row> rows;
  for (int64_t d : depths) {
    for (int64_t n : pps) {
      if (n == 0) continue;
      Row r{"pp" + std::to_string(n) + (d ? " @ d" + std::to_string(d) : ""), n, d, {}};
      for (int rep = -1; rep < reps; ++rep) {  // rep -1: warm-up
        kv::SeqPages seq;
        fill(seq, random_tokens(d));
        const std::vector<int32_t> t = random_tokens(n);
        const double t0 = now();
        fill(seq, t);
        const double dt = now() - t0;
        if (rep >= 0) r.tps.push_back(n / dt);
        pool.release(seq);
      }
      rows.push_back(r);
    }
    for (int64_t n : tgs) {
      if (n == 0) continue;
      Row r{"tg" + std::to_string(n) + (d ? " @ d" + std::to_string(d) : ""), n, d, {}};
      for (int rep = -1; rep < reps; ++rep) {
        kv::SeqPages seq;
        fill(seq, random_tokens(d));
        const std::vector<int32_t> t = random_tokens(n);
        const double t0 = now();
        for (int64_t i = 0; i < n; ++i) m->forward(&t[i], 1, pool, seq, logits.data(), tp, false, &policy);
        const double dt = now() - t0;
        if (rep >= 0) r.tps.push_back(n / dt);
        pool.release(seq);
      }
      rows.push_back(r);
    }
  }

  const double size_mib = m->weight_bytes() / 1048576.0;
  if (out == "json") {
    std::printf("[\n");
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::printf("  {\"model\": \"%s\", \"arch\": \"%s\", \"size_mib\": %.1f, \"backend\": \"cpu\", \"attention\": \"%s\", \"threads\": %d, "
                  "\"test\": \"%s\", \"n_tokens\": %lld, \"depth\": %lld, \"avg_ts\": %.3f, \"stddev_ts\": %.3f, \"samples_ts\": [",
                  c.name.c_str(), c.arch.c_str(), size_mib, acfg.describe().c_str(), tp.size(), r.test.c_str(), (long long)r.n_tokens,
                  (long long)r.depth, r.mean(), r.sd());
      for (size_t k = 0; k < r.tps.size(); ++k) std::printf("%s%.3f", k ? ", " : "", r.tps[k]);
      std::printf("]}%s\n", i + 1 < rows.size() ? "," : "");
    }
    std::printf("]\n");
  } else {
    std::printf("attention: %s\n\n", acfg.describe().c_str());
    std::printf("| model | size | backend | threads | test | t/s |\n| --- | ---: | --- | ---: | ---: | ---: |\n");
    for (const Row& r : rows)
      std::printf("| %s | %.1f MiB | cpu | %d | %s | %.2f ± %.2f |\n", c.name.c_str(), size_mib, tp.size(), r.test.c_str(),
                  r.mean(), r.sd());
  }
  if (acfg.method != attn::Method::Dense) print_budgets(policy);
  if (!af.stats_path.empty()) write_budgets_json(policy, af.stats_path);
  return 0;
}

}  // namespace tw::cli
