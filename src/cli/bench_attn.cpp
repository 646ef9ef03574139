// twilight bench --attn-dump: prefill real text, save the KV cache and the next tokens' real
// post-RoPE queries (kv/kv_dump.h) to ~/.cache/twilight/kv/ (never into the repo).
//
// twilight bench --attention: decode attention time per layer on that real KV cache, for dense vs
// Quest at fixed budgets vs Twilight (top-p over Quest), with the stage breakdown
// (select / estimate / prune / attend), budgets |I0| |I1|, bytes read per stage and GB/s against the
// machine's read bandwidth measured in the same run.
//  - KV: a dump (--kv) or a prefill of a text file (--text). Contexts longer than the dump are filled
//    by tiling its KV (kv::tiled_source: the first --tile-keep tokens, the attention sinks, are not
//    repeated); such rows are labelled "tiled".
//  - Queries: the dump's real queries (tokens right after the dumped context), --steps of them.
//  - Total: AttentionPolicy::decode (the engine's decode path; its side structures filled through
//    on_append, the normal append path) on every layer >= --skip-layers. Loop order repetition >
//    step > layer, so each call finds its layer's KV cold (20+ layers of KV exceed the L3).
//  - Breakdown: the policy's stages called one by one on the same inputs (select_quest,
//    estimate_scores, prune_topp, sparse_decode / dense_decode). prune_topp runs the INT4 estimate
//    itself: "prune" = prune_topp time minus the time of the estimate alone (estimate_scores over
//    the same candidates, one kv head per thread as prune_topp splits them, timed in a separate pass
//    over the layers so both see equally cold data): softmax + top-p + building the lists.
//  - Bytes (TWILIGHT.md section 2 with the CPU layout): dense and attend read 2*d*2 B per (token,
//    kv head) (K and V fp16; group mode reads a kv head's rows once for its G query heads); select
//    (Quest) 2*d*2 B per (page, kv head) (fp16 min and max); estimate d/2 + 8 B per (candidate, kv
//    head) (INT4 codes + fp32 scale and zero); prune touches only the estimate's weights (in cache,
//    0 B counted).
//  - Times: per layer (one decode query, all heads of the layer), mean over steps x layers within a
//    repetition, median over repetitions (one warm-up repetition first).
#include "cli/bench_attn.h"

#include <immintrin.h>
#include <sys/stat.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "attention/dense_cpu.h"
#include "attention/policy.h"
#include "attention/pruner.h"
#include "attention/selectors.h"
#include "attention/sparse_cpu.h"
#include "cli/args.h"
#include "common/error.h"
#include "common/paths.h"
#include "kv/kv_dump.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace tw::cli {

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// CPU time of the whole process (all threads): on a loaded machine it excludes the time the threads
// were preempted, which wall time does not.
double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

int64_t parse_pos_int(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || x <= 0) fail(flag, ": expected a positive integer, got '", v, "'");
  return x;
}

std::vector<int64_t> parse_ints(const std::string& flag, const std::string& s) {
  std::vector<int64_t> out;
  for (const std::string& it : split(s)) out.push_back(parse_pos_int(flag, it));
  if (out.empty()) fail(flag, ": empty list");
  return out;
}

// A budget: a token count ("1024") or a fraction of the context ("n/8").
struct BudgetSpec {
  std::string text;
  int64_t fixed = 0, div = 0;
  int64_t at(int64_t n) const { return fixed ? fixed : std::max<int64_t>(1, n / div); }
};
BudgetSpec parse_budget(const std::string& flag, const std::string& s) {
  BudgetSpec b;
  b.text = s;
  if (s.rfind("n/", 0) == 0)
    b.div = parse_pos_int(flag, s.substr(2));
  else
    b.fixed = parse_pos_int(flag, s);
  return b;
}

std::string basename_of(const std::string& p) {
  const size_t slash = p.find_last_of('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}
std::string stem_of(const std::string& p) {
  std::string b = basename_of(p);
  const size_t dot = b.find_last_of('.');
  return dot == std::string::npos || dot == 0 ? b : b.substr(0, dot);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read text file '", path, "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail("error reading text file '", path, "'");
  return ss.str();
}

// Prefill the first n_ctx + n_steps tokens of a text file (BOS first when the model adds one) with
// dense attention, in chunks of 512 as `generate` does, and capture: K/V of all of them for the
// chosen layers, and the post-RoPE queries of the last n_steps tokens (teacher-forced decode queries).
kv::KVDump prefill_dump(Model& m, const std::string& text_path, int64_t n_ctx, int n_steps, const std::vector<int>& layers,
                        ThreadPool& tp) {
  const ModelConfig& c = m.config();
  const int64_t need = n_ctx + n_steps;
  TW_CHECK(need <= c.n_ctx_train, "-c ", n_ctx, " + --steps ", n_steps, " exceeds the model's trained context of ",
           c.n_ctx_train, " tokens");
  for (size_t i = 0; i < layers.size(); ++i)
    TW_CHECK(layers[i] >= 0 && layers[i] < c.n_layers && (i == 0 || layers[i] > layers[i - 1]),
             "--layers: expected ascending layer ids in [0, ", c.n_layers, ")");
  const Tokenizer tok = Tokenizer::from_gguf(m.file());
  std::vector<int32_t> toks;
  if (tok.add_bos()) toks.push_back(tok.bos());
  {
    const std::string text = read_text(text_path);
    const std::vector<int32_t> body = tok.encode(text, false);
    toks.insert(toks.end(), body.begin(), body.end());
  }
  TW_CHECK((int64_t)toks.size() >= need, "text '", text_path, "' has ", toks.size(), " tokens, the dump needs ", need,
           " (-c ", n_ctx, " + --steps ", n_steps, ")");
  toks.resize(need);

  kv::KVDump d;
  kv::KVDumpInfo& in = d.info;
  in.arch = c.arch;
  in.model_name = c.name;
  in.n_layers = c.n_layers;
  in.n_heads = c.n_heads;
  in.n_kv_heads = c.n_kv_heads;
  in.head_dim = c.head_dim;
  in.n_tokens = need;
  in.q_pos0 = n_ctx;
  in.n_steps = n_steps;
  in.layers = layers;
  in.desc = cat("prefill of the first ", need, " tokens of ", basename_of(text_path), tok.add_bos() ? " (BOS first)" : "",
                ", dense attention, chunks of 512; queries: tokens ", n_ctx, " .. ", need - 1, " (teacher-forced)");
  in.validate();
  const size_t qrow = (size_t)c.n_heads * c.head_dim;
  d.q.assign((size_t)n_steps * layers.size() * qrow, 0.f);
  std::vector<int> slot(c.n_layers, -1);
  for (size_t i = 0; i < layers.size(); ++i) slot[layers[i]] = (int)i;

  kv::KVPool pool = m.make_kv(need);
  kv::SeqPages seq;
  struct TapOff {  // the tap points at locals: always removed, also on error
    Model& m;
    ~TapOff() { m.set_qk_observer(nullptr); }
  } tap_off{m};
  m.set_qk_observer([&](int l, int64_t pos0, int64_t n, const float* q, const float*) {
    if (slot[l] < 0) return;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t s = pos0 + r - n_ctx;
      if (s >= 0 && s < n_steps)
        std::memcpy(d.q.data() + ((size_t)s * layers.size() + slot[l]) * qrow, q + r * qrow, qrow * sizeof(float));
    }
  });
  std::vector<float> logits(c.n_vocab);
  const int64_t chunk = 512;
  const double t0 = now();
  for (int64_t i = 0; i < need; i += chunk) {
    const int64_t n = std::min<int64_t>(chunk, need - i);
    m.forward(toks.data() + i, n, pool, seq, logits.data(), tp);
    const double el = now() - t0;
    std::fprintf(stderr, "\r[twilight] prefill %lld / %lld tokens, %.0f s, %.1f t/s   ", (long long)(i + n), (long long)need,
                 el, (i + n) / el);
    std::fflush(stderr);
  }
  std::fputc('\n', stderr);

  const int hd = c.head_dim, hkv = c.n_kv_heads;
  for (size_t i = 0; i < layers.size(); ++i) {
    d.k.emplace_back((size_t)need * hkv * hd);
    d.v.emplace_back((size_t)need * hkv * hd);
    for (int64_t t = 0; t < need; ++t)
      for (int h = 0; h < hkv; ++h) {
        const int32_t phys = seq.pages[t / kv::kPageSize];
        const size_t off = (size_t)(t % kv::kPageSize) * hd;
        std::memcpy(d.k.back().data() + d.row_off(t, h), pool.k_page(layers[i], phys, h) + off, hd * 2);
        std::memcpy(d.v.back().data() + d.row_off(t, h), pool.v_page(layers[i], phys, h) + off, hd * 2);
      }
  }
  return d;
}

std::vector<int> all_layers(int n) {
  std::vector<int> v(n);
  for (int i = 0; i < n; ++i) v[i] = i;
  return v;
}

// ---- memory bandwidth: streaming read of a buffer far larger than the caches ----
__attribute__((target("avx2"))) uint64_t read_sum_avx2(const uint8_t* p, size_t n) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    a = _mm256_add_epi64(a, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_add_epi64(b, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    c = _mm256_add_epi64(c, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    d = _mm256_add_epi64(d, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) uint64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
  uint64_t s = t[0] + t[1] + t[2] + t[3];
  for (; i < n; ++i) s += p[i];
  return s;
}
uint64_t read_sum(const uint8_t* p, size_t n) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return read_sum_avx2(p, n);
  uint64_t s = 0;
  for (size_t i = 0; i < n; ++i) s += p[i];
  return s;
}

struct Bandwidth {
  double read_all = 0, read_one = 0;  // GB/s, median
  size_t bytes = 0;
  int reps = 0;
};
Bandwidth measure_bandwidth(ThreadPool& tp, size_t bytes, int reps) {
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  bytes &= ~(size_t)4095;
  std::unique_ptr<uint8_t, Free> buf(static_cast<uint8_t*>(std::aligned_alloc(4096, bytes)));
  TW_CHECK(buf, "cannot allocate ", bytes, " bytes for the bandwidth measurement");
  for (size_t i = 0; i < bytes; i += 64) buf.get()[i] = (uint8_t)i;  // touch every page
  volatile uint64_t sink = 0;
  std::vector<double> all, one;
  const int nt = tp.size();
  for (int r = 0; r < reps; ++r) {
    double t0 = now();
    std::vector<uint64_t> part(nt);
    tp.parallel_for(nt, [&](int64_t b, int64_t e, int) {
      for (int64_t k = b; k < e; ++k) {
        const size_t lo = bytes / nt * k & ~(size_t)127, hi = k + 1 == nt ? bytes : bytes / nt * (k + 1) & ~(size_t)127;
        part[k] = read_sum(buf.get() + lo, hi - lo);
      }
    });
    all.push_back(bytes / (now() - t0) / 1e9);
    for (uint64_t x : part) sink = sink + x;
    t0 = now();
    sink = sink + read_sum(buf.get(), bytes);
    one.push_back(bytes / (now() - t0) / 1e9);
  }
  return {median(all), median(one), bytes, reps};
}

struct MethodSpec {
  std::string label;
  attn::Method method = attn::Method::Dense;
  BudgetSpec b0;
  float p = 0.f;
};

struct Result {
  int64_t ctx = 0;
  std::string kv_src, label;
  attn::Method method = attn::Method::Dense;
  int64_t b0 = 0;
  float p = 0.f;
  bool ran_dense = false;           // the policy fell back to dense (budget covering the context)
  std::vector<double> samples_us;   // per-layer time, one per repetition
  std::vector<double> cpu_samples_us;  // per-layer process CPU time (all threads, spinning included)
  double us = 0, cpu_us = 0, sel = 0, est = 0, prune = 0, att = 0;  // medians, µs per layer
  double i0 = 0, i1 = 0, est_mass = 0;                   // per list (kv head), averaged
  double b_sel = 0, b_est = 0, b_att = 0;                // bytes per layer call (all kv heads)
  double build_s = 0;               // side-structure build time
  double bytes() const { return b_sel + b_est + b_att; }
};

std::string fmt(double x, int prec) {
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", prec, x);
  return b;
}

double gbps(double bytes, double us) { return us > 0 ? bytes / (us * 1e-6) / 1e9 : 0; }

}  // namespace

int cmd_bench_attn_dump(int argc, char** argv) {
  std::string model, text, out, layers_s;
  int64_t n_ctx = 8192;
  int steps = 4, threads = 0;
  bool dump_flag = false;
  Args a("bench --attn-dump");
  a.flag({"--attn-dump"}, "write a KV dump of a real prefill (this mode)", &dump_flag);
  a.opt({"-m", "--model"}, "FILE", "GGUF model (default: Qwen2.5-Coder-1.5B-Instruct Q4_K_M)", &model);
  a.opt({"-f", "--file"}, "TEXT", "text file to prefill (e.g. ~/.cache/twilight/data/austen/emma.txt)", &text);
  a.opt({"-c", "--ctx-size"}, "N", "context tokens to dump (default 8192); the queries' tokens come on top", &n_ctx, 16,
        1 << 22);
  a.opt({"--steps"}, "S", "decode queries to capture: tokens N .. N+S-1 (default 4)", &steps, 1, 256);
  a.opt({"--layers"}, "a,b,c", "layers to dump (default: all)", &layers_s);
  a.opt({"-o", "--out"}, "FILE", "output (default: <cache>/kv/<model>-<text>-<N>.kv)", &out);
  a.opt({"-t", "--threads"}, "N", "threads (default: all cores)", &threads, 1, 1024);
  if (!a.parse(argc, argv, 2)) return 0;
  TW_CHECK(!text.empty(), "--attn-dump needs a text file (-f FILE)");
  const std::string path = model.empty() ? require_model(kQwen15File) : model;
  std::unique_ptr<Model> m = Model::load(path);
  const ModelConfig& c = m->config();
  std::vector<int> layers;
  if (layers_s.empty())
    layers = all_layers(c.n_layers);
  else
    for (const std::string& s : split(layers_s)) {
      char* end = nullptr;
      const long v = std::strtol(s.c_str(), &end, 10);
      TW_CHECK(!s.empty() && !*end && v >= 0 && v < c.n_layers, "--layers: '", s, "' is not a layer id in [0, ",
               c.n_layers, ")");
      layers.push_back((int)v);
    }
  TW_CHECK(std::is_sorted(layers.begin(), layers.end()) && std::adjacent_find(layers.begin(), layers.end()) == layers.end(),
           "--layers: ids must be ascending and unique");
  if (out.empty()) {
    const std::string dir = cache_dir() + "/kv";
    ::mkdir(cache_dir().c_str(), 0755);
    ::mkdir(dir.c_str(), 0755);
    out = dir + "/" + stem_of(path) + "-" + stem_of(text) + "-" + std::to_string(n_ctx) + ".kv";
  }
  ThreadPool tp(threads > 0 ? threads : default_threads());
  std::fprintf(stderr, "[twilight] %s: prefill of %lld + %d tokens of %s, %zu layers -> %s\n", c.name.c_str(),
               (long long)n_ctx, steps, text.c_str(), layers.size(), out.c_str());
  const double t0 = now();
  const kv::KVDump d = prefill_dump(*m, text, n_ctx, steps, layers, tp);
  write_kv_dump(out, d);
  std::fprintf(stderr, "[twilight] wrote %s (%.1f MiB, %.0f s): %s\n", out.c_str(),
               (double)(d.info.payload_bytes()) / 1048576.0, now() - t0, d.info.desc.c_str());
  return 0;
}

int cmd_bench_attention(int argc, char** argv) {
  std::string model, kv_path, text, ctx_s = "4096,8192,16384,32768", quest_s = "1024,n/8", p_s = "0.95,0.85",
                                  tw_b0_s = "n/4", out = "md";
  int64_t text_ctx = 8192, tile_keep = 64;
  int steps = 0, threads = 0, reps = 5, skip = 2, bw_mib = 512;
  bool flag = false;
  Args a("bench --attention");
  a.flag({"--attention"}, "decode attention benchmark (this mode)", &flag);
  a.opt({"-m", "--model"}, "FILE", "GGUF model: checked against the dump's fingerprint; with --text, the model to prefill "
        "(default Qwen2.5-Coder-1.5B-Instruct Q4_K_M)", &model);
  a.opt({"--kv"}, "FILE", "KV dump (twilight bench --attn-dump)", &kv_path);
  a.opt({"--text"}, "FILE", "or: prefill this text now (-c tokens, not saved)", &text);
  a.opt({"-c", "--ctx-size"}, "N", "with --text: tokens to prefill (default 8192)", &text_ctx, 16, 1 << 22);
  a.opt({"--ctx"}, "N[,N]", "contexts to bench (default 4096,8192,16384,32768; beyond the dump: tiled)", &ctx_s);
  a.opt({"--quest-b0"}, "B[,B]", "Quest fixed budgets: tokens or n/K (default 1024,n/8; 'none' = no Quest rows)", &quest_s);
  a.opt({"--p"}, "P[,P]", "Twilight top-p values (default 0.95,0.85; 'none' = no Twilight rows)", &p_s);
  a.opt({"--twilight-b0"}, "B[,B]", "Twilight's Quest budgets B0: tokens or n/K (default n/4)", &tw_b0_s);
  a.opt({"--skip-layers"}, "N", "time layers >= N only (the policy's dense layers; default 2)", &skip, 0, 1 << 20);
  a.opt({"--steps"}, "S", "queries per layer (default: all in the dump)", &steps, 1, 1 << 20);
  a.opt({"--tile-keep"}, "N", "tiling past the dump repeats tokens [N, n_tokens) (default 64: sinks kept once)", &tile_keep,
        0, 1 << 22);
  a.opt({"-r", "--repetitions"}, "N", "repetitions (default 5; one warm-up on top)", &reps, 1, 1000);
  a.opt({"--bw-mib"}, "N", "buffer for the memory bandwidth measurement, MiB (default 512; far above the L3)", &bw_mib, 1,
        1 << 16);
  a.opt({"-t", "--threads"}, "N", "threads (default: all cores)", &threads, 1, 1024);
  a.opt({"-o", "--output"}, "md|json", "output format (default md)", &out);
  if (!a.parse(argc, argv, 2)) return 0;
  TW_CHECK(out == "md" || out == "json", "-o must be md or json, got '", out, "'");
  TW_CHECK(kv_path.empty() != text.empty(), "give exactly one of --kv FILE or --text FILE");
  const std::vector<int64_t> ctxs = parse_ints("--ctx", ctx_s);
  std::vector<MethodSpec> methods{{"dense", attn::Method::Dense, {}, 0.f}};
  if (quest_s != "none")
    for (const std::string& s : split(quest_s)) {
      const BudgetSpec b = parse_budget("--quest-b0", s);
      methods.push_back({"quest B0=" + b.text, attn::Method::Quest, b, 0.f});
    }
  std::vector<BudgetSpec> tw_b0s;
  for (const std::string& s : split(tw_b0_s)) tw_b0s.push_back(parse_budget("--twilight-b0", s));
  TW_CHECK(!tw_b0s.empty(), "--twilight-b0: empty list");
  if (p_s != "none")
    for (const BudgetSpec& tw_b0 : tw_b0s)
      for (const std::string& s : split(p_s)) {
        char* end = nullptr;
        const float p = std::strtof(s.c_str(), &end);
        TW_CHECK(!s.empty() && !*end && p > 0.f && p <= 1.f, "--p: expected values in (0, 1], got '", s, "'");
        methods.push_back({"twilight p=" + s + " B0=" + tw_b0.text, attn::Method::Twilight, tw_b0, p});
      }

  ThreadPool tp(threads > 0 ? threads : default_threads());
  std::unique_ptr<Model> m;
  if (!model.empty() || !text.empty()) m = Model::load(model.empty() ? require_model(kQwen15File) : model);
  kv::KVDump dump;
  std::string kv_desc;
  if (!kv_path.empty()) {
    dump = kv::read_kv_dump(kv_path);
    if (m) {
      const ModelConfig& c = m->config();
      dump.info.check_model(c.arch, c.name, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim);
    }
    kv_desc = basename_of(kv_path) + ": " + dump.info.desc;
  } else {
    dump = prefill_dump(*m, text, text_ctx, steps > 0 ? steps : 4, all_layers(m->config().n_layers), tp);
    kv_desc = dump.info.desc + " (not saved)";
  }
  const kv::KVDumpInfo& in = dump.info;
  TW_CHECK(in.n_steps > 0, "the KV dump holds no queries");
  if (steps == 0) steps = in.n_steps;
  TW_CHECK(steps <= in.n_steps, "--steps ", steps, ": the dump holds ", in.n_steps, " queries");
  const int64_t max_ctx = *std::max_element(ctxs.begin(), ctxs.end());
  TW_CHECK(max_ctx <= in.n_tokens || tile_keep < in.n_tokens, "--tile-keep ", tile_keep, " must be below the dump's ",
           in.n_tokens, " tokens");
  std::vector<int> timed;  // dumped-layer indices (= pool layers) with model layer >= skip
  for (size_t i = 0; i < in.layers.size(); ++i)
    if (in.layers[i] >= skip) timed.push_back((int)i);
  TW_CHECK(!timed.empty(), "no dumped layer >= --skip-layers ", skip);
  const attn::HeadShape hs{in.n_heads, in.n_kv_heads, in.head_dim};
  const int d = in.head_dim, hkv = in.n_kv_heads, G = in.n_heads / in.n_kv_heads;

  std::fprintf(stderr, "[twilight] measuring memory read bandwidth (%d MiB, median of 7)\n", bw_mib);
  const Bandwidth bw = measure_bandwidth(tp, (size_t)bw_mib << 20, 7);

  // One pool for the longest context; shorter contexts use its prefix (identical K/V).
  kv::KVShape shape{(int)in.layers.size(), hkv, d, (max_ctx + kv::kPageSize - 1) / kv::kPageSize};
  kv::KVPool pool(shape);
  kv::SeqPages seq;
  std::fprintf(stderr, "[twilight] filling the KV pool: %lld tokens x %zu layers%s\n", (long long)max_ctx, in.layers.size(),
               max_ctx > in.n_tokens ? " (tiled past the dump)" : "");
  kv::fill_pool_from_dump(dump, pool, seq, max_ctx, tile_keep);

  std::vector<Result> results;
  std::vector<float> outv((size_t)in.n_heads * d);
  std::vector<std::vector<float>> z(hkv);
  attn::Selection sel0, sel1;
  std::vector<attn::PruneStats> pst;
  for (int64_t ctx : ctxs) {
    const std::string src = ctx <= in.n_tokens ? "real" : cat("tiled from ", in.n_tokens);
    for (const MethodSpec& ms : methods) {
      Result r;
      r.ctx = ctx;
      r.kv_src = src;
      r.label = ms.label;
      r.method = ms.method;
      r.p = ms.p;
      attn::AttnConfig cfg;
      cfg.method = ms.method;
      cfg.base = attn::Base::Quest;
      if (ms.method == attn::Method::Twilight) cfg.p = ms.p;
      cfg.skip_layers = 0;  // layers are chosen here (timed); the policy sees pool layer ids
      cfg.dense_below = 0;
      cfg.gqa = attn::GqaMode::Group;
      if (ms.method != attn::Method::Dense) cfg.b0 = r.b0 = std::min(ms.b0.at(ctx), ctx);
      attn::AttentionPolicy pol(cfg, pool.shape(), hs);
      r.ran_dense = ms.method != attn::Method::Dense && !pol.sparse_at(0, ctx);
      const bool sparse_run = ms.method != attn::Method::Dense && !r.ran_dense;
      const double tb = now();
      if (pol.needs_side())
        for (int li : timed)
          for (int64_t t = 0; t < ctx; ++t) pol.on_append(pool, li, seq, t);
      r.build_s = now() - tb;
      std::fprintf(stderr, "[twilight] ctx %lld (%s): %s%s\n", (long long)ctx, src.c_str(), ms.label.c_str(),
                   r.ran_dense ? " (budget covers the context: runs dense)" : "");
      const double calls = (double)steps * timed.size();
      // Total: the policy's decode.
      for (int rep = -1; rep < reps; ++rep) {
        double tot = 0;
        const double c0 = cpu_now();
        for (int s = 0; s < steps; ++s)
          for (int li : timed) {
            const double t0 = now();
            pol.decode(pool, seq, li, dump.query(s, li), ctx, outv.data(), tp);
            tot += now() - t0;
          }
        if (rep >= 0) {
          r.samples_us.push_back(tot / calls * 1e6);
          r.cpu_samples_us.push_back((cpu_now() - c0) / calls * 1e6);
        }
      }
      r.us = median(r.samples_us);
      r.cpu_us = median(r.cpu_samples_us);
      // Budgets (the policy's own accounting, over every call above).
      if (sparse_run) {
        const attn::BudgetStats& st = pol.stats();
        double n = 0;
        for (int li : timed)
          for (int i = 0; i < st.n_lists; ++i) {
            const size_t k = st.at(li, i);
            if (!st.steps[k]) continue;
            r.i0 += st.i0[k] / st.steps[k];
            r.i1 += st.i1[k] / st.steps[k];
            r.est_mass += st.est_mass[k] / st.steps[k];
            n += 1;
          }
        if (n > 0) {
          r.i0 /= n;
          r.i1 /= n;
          r.est_mass /= n;
        }
      } else {
        r.i0 = r.i1 = (double)ctx;
      }
      // Breakdown: the same stages one by one.
      std::vector<double> v_sel, v_est, v_pr, v_att;
      double b_sel = 0, b_est = 0, b_att = 0;
      attn::PruneOptions po;
      po.p = cfg.p;
      const bool sparse = sparse_run;
      for (int rep = -1; rep < reps; ++rep) {
        double t_sel = 0, t_est = 0, t_pr = 0, t_att = 0;
        for (int s = 0; s < steps; ++s)
          for (int li : timed) {
            const float* q = dump.query(s, li);
            if (!sparse) {
              const double t0 = now();
              attn::dense_decode(pool, seq, li, hs, q, ctx, outv.data(), tp);
              t_att += now() - t0;
              if (rep == 0) b_att += (double)ctx * hkv * 2 * d * 2;
              continue;
            }
            const attn::KeySide& ks = *pol.side();
            double t0 = now();
            attn::select_quest(ks, seq, li, hs, q, ctx, cfg.b0, cfg.gqa, sel0, tp);
            double t1 = now();
            t_sel += t1 - t0;
            const attn::Selection* fin = &sel0;
            if (ms.method == attn::Method::Twilight) {
              t0 = now();
              attn::prune_topp(ks, seq, li, hs, q, sel0, ctx, po, sel1, pst, tp);
              t_pr += now() - t0;
              fin = &sel1;
            }
            t0 = now();
            attn::sparse_decode(pool, seq, li, hs, q, *fin, ctx, outv.data(), tp);
            t_att += now() - t0;
            if (rep == 0) {
              b_sel += (double)((ctx + kv::kPageSize - 1) / kv::kPageSize) * hkv * (2 * d + 8);  // 8-bit min / max codes + {lo, s}
              for (int h = 0; h < fin->n_lists; ++h) {
                const int64_t m = fin->size(h);
                const bool has_cur = m > 0 && fin->list(h)[m - 1] == ctx - 1;
                b_att += (double)(m + (has_cur ? 0 : 1)) * 2 * d * 2;
                if (ms.method == attn::Method::Twilight) b_est += (double)sel0.size(h) * (d / 2 + 8);
              }
            }
          }
        // The INT4 estimate alone, in its own pass (the same stream of layers, so its data is as cold
        // as inside prune_topp above; timed after the pass above, it does not warm prune_topp's).
        if (sparse && ms.method == attn::Method::Twilight)
          for (int s = 0; s < steps; ++s)
            for (int li : timed) {
              const float* q = dump.query(s, li);
              const attn::KeySide& ks = *pol.side();
              attn::select_quest(ks, seq, li, hs, q, ctx, cfg.b0, cfg.gqa, sel0, tp);
              const attn::Int4Keys keys = attn::int4_keys(ks);
              const double t0 = now();
              tp.parallel_for(hkv, [&](int64_t b, int64_t e, int) {
                for (int64_t h = b; h < e; ++h) {
                  z[h].resize((size_t)G * sel0.size((int)h));
                  attn::estimate_scores(keys, seq, li, (int)h, d, q + (size_t)h * G * d, G, sel0.list((int)h),
                                        sel0.size((int)h), z[h].data());
                }
              });
              t_est += now() - t0;
            }
        if (rep >= 0) {
          v_sel.push_back(t_sel / calls * 1e6);
          v_est.push_back(t_est / calls * 1e6);
          v_pr.push_back(t_pr / calls * 1e6);
          v_att.push_back(t_att / calls * 1e6);
        }
      }
      r.sel = median(v_sel);
      r.est = median(v_est);
      r.prune = std::max(0.0, median(v_pr) - r.est);
      r.att = median(v_att);
      r.b_sel = b_sel / calls;
      r.b_est = b_est / calls;
      r.b_att = b_att / calls;
      results.push_back(std::move(r));
    }
  }

  // ---- report ----
  auto dense_us = [&](int64_t ctx) {
    for (const Result& r : results)
      if (r.ctx == ctx && r.method == attn::Method::Dense) return r.us;
    return 0.0;
  };
  const std::string mname = m ? m->config().name : in.model_name;
  if (out == "json") {
    std::printf("{\"model\": \"%s\", \"arch\": \"%s\", \"n_layers\": %d, \"n_heads\": %d, \"n_kv_heads\": %d, \"head_dim\": %d, "
                "\"backend\": \"cpu\", \"threads\": %d, \"reps\": %d, \"steps\": %d, \"skip_layers\": %d, \"layers_timed\": %zu, "
                "\"kv\": \"%s\", \"kv_tokens\": %lld, \"tile_keep\": %lld, \"mem_read_gbps\": %.2f, \"mem_read_gbps_1t\": %.2f, "
                "\"rows\": [\n",
                mname.c_str(), in.arch.c_str(), in.n_layers, in.n_heads, in.n_kv_heads, in.head_dim, tp.size(), reps, steps,
                skip, timed.size(), kv_desc.c_str(), (long long)in.n_tokens, (long long)tile_keep, bw.read_all, bw.read_one);
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      const double du = dense_us(r.ctx);
      std::printf("  {\"ctx\": %lld, \"kv_source\": \"%s\", \"method\": \"%s\", \"b0\": %lld, \"p\": %.3f, \"ran_dense\": %s, "
                  "\"us_per_layer\": %.2f, \"cpu_us_per_layer\": %.2f, \"speedup_vs_dense\": %.3f, \"samples_us\": [",
                  (long long)r.ctx, r.kv_src.c_str(), r.label.c_str(), (long long)r.b0, r.p, r.ran_dense ? "true" : "false",
                  r.us, r.cpu_us, r.us > 0 ? du / r.us : 0.0);
      for (size_t k = 0; k < r.samples_us.size(); ++k) std::printf("%s%.2f", k ? ", " : "", r.samples_us[k]);
      std::printf("], \"select_us\": %.2f, \"estimate_us\": %.2f, \"prune_us\": %.2f, \"attend_us\": %.2f, "
                  "\"avg_i0\": %.1f, \"avg_i1\": %.1f, \"avg_est_mass\": %.4f, \"bytes_select\": %.0f, \"bytes_estimate\": %.0f, "
                  "\"bytes_attend\": %.0f, \"gbps\": %.2f, \"gbps_select\": %.2f, \"gbps_estimate\": %.2f, \"gbps_attend\": %.2f, "
                  "\"side_build_s\": %.2f}%s\n",
                  r.sel, r.est, r.prune, r.att, r.i0, r.i1, r.est_mass, r.b_sel, r.b_est, r.b_att, gbps(r.bytes(), r.us),
                  gbps(r.b_sel, r.sel), gbps(r.b_est, r.est), gbps(r.b_att, r.att), r.build_s,
                  i + 1 < results.size() ? "," : "");
    }
    std::printf("]}\n");
    return 0;
  }
  std::printf("decode attention: %s (%s, %d layers, %d/%d heads, d %d), cpu, %d threads, %d reps (median), %d queries x %zu "
              "layers (>= %d) per rep\n",
              mname.c_str(), in.arch.c_str(), in.n_layers, in.n_heads, in.n_kv_heads, in.head_dim, tp.size(), reps, steps,
              timed.size(), skip);
  std::printf("KV: %s\n", kv_desc.c_str());
  std::printf("memory read bandwidth (same run, %zu MiB, median of %d): %.1f GB/s with %d threads, %.1f GB/s with 1\n\n",
              bw.bytes >> 20, bw.reps, bw.read_all, tp.size(), bw.read_one);
  std::printf("| ctx | KV | method | \\|I0\\| | \\|I1\\| (%% ctx) | est. mass | µs / layer | cpu µs | vs dense | select | estimate | "
              "prune | attend | MiB / layer | GB/s | %% of bw |\n"
              "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const Result& r : results) {
    const double du = dense_us(r.ctx);
    const bool tw = r.method == attn::Method::Twilight;
    std::printf("| %lld | %s | %s%s | %.0f | %.0f (%.2f%%) | %s | %.1f | %.1f | %.2fx | %s | %s | %s | %.1f | %.2f | %.1f | %.0f%% |\n",
                (long long)r.ctx, r.kv_src.c_str(), r.label.c_str(), r.ran_dense ? " (ran dense)" : "", r.i0, r.i1,
                100.0 * r.i1 / r.ctx, tw ? fmt(r.est_mass, 3).c_str() : "-", r.us, r.cpu_us,
                r.us > 0 ? du / r.us : 0.0, r.method == attn::Method::Dense ? "-" : fmt(r.sel, 1).c_str(),
                tw ? fmt(r.est, 1).c_str() : "-",
                tw ? fmt(r.prune, 1).c_str() : "-", r.att, r.bytes() / 1048576.0,
                gbps(r.bytes(), r.us), 100.0 * gbps(r.bytes(), r.us) / bw.read_all);
  }
  std::printf("\nper stage: MiB read per layer call and GB/s (bytes / stage time)\n\n"
              "| ctx | method | select MiB | select GB/s | estimate MiB | estimate GB/s | attend MiB | attend GB/s |\n"
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const Result& r : results)
    std::printf("| %lld | %s | %.3f | %.1f | %.3f | %.1f | %.3f | %.1f |\n", (long long)r.ctx, r.label.c_str(), r.b_sel / 1048576.0,
                gbps(r.b_sel, r.sel), r.b_est / 1048576.0, gbps(r.b_est, r.est), r.b_att / 1048576.0, gbps(r.b_att, r.att));
  return 0;
}

}  // namespace tw::cli
