// twilight perplexity: perplexity and KL(dense || sparse) of decode-mode sparse attention over a
// long text, for several attention configurations sharing ONE dense prefill.
//
// Tokens t_0 .. t_{N+M-1} from the text (BOS first when the model adds one). t_0 .. t_{N-2} are
// prefilled densely once; then for each configuration the cache is truncated back to N-1 tokens and
// t_{N-1} .. t_{N+M-2} are fed one per decode step (teacher forcing) with that configuration's
// attention, so every one of the M scored tokens t_N .. t_{N+M-1} is predicted by a decode step at
// a context of N .. N+M-1 tokens. Dense runs first and is the reference for KL and top-1 agreement.
// The side structures (Quest bounds, INT4 mirror) are maintained from the first prefill token on
// (AttentionPolicy::reconfigure keeps them), and re-appending after a truncation rewrites them
// exactly (KeySide::append recomputes a page's bounds from slot 0; key_side_test checks it).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/eval_common.h"
#include "common/error.h"
#include "engine/engine.h"

namespace tw::cli {

namespace {

// log-softmax in double of n logits into out.
void log_softmax(const float* x, int n, std::vector<double>& out) {
  out.resize(n);
  double mx = -INFINITY;
  for (int i = 0; i < n; ++i) mx = std::max(mx, (double)x[i]);
  double z = 0;
  for (int i = 0; i < n; ++i) z += std::exp((double)x[i] - mx);
  const double lz = mx + std::log(z);
  for (int i = 0; i < n; ++i) out[i] = (double)x[i] - lz;
}

struct RunResult {
  std::string label, attention;
  double nll_sum = 0, kl_sum = 0, kl_max = 0;
  int64_t top1_agree = 0, n = 0;
  double decode_s = 0;
  BudgetSummary budget;
  double ppl() const { return std::exp(nll_sum / (double)n); }
};

}  // namespace

int cmd_perplexity(int argc, char** argv) {
  EvalOptions o;
  int64_t prefix = 0, score = 256;
  Args a("perplexity");
  add_eval_options(a, o, "the text (UTF-8), e.g. ~/.cache/twilight/data/austen/all.txt",
                   "attention configuration to score, repeatable: \"dense\", \"quest b0=1024\", "
                   "\"twilight p=0.95 base=quest\" (keys of --attn-*, with or without 'attn-')");
  a.opt({"--prefix"}, "N", "context tokens before the scored ones (prefilled densely once; required)", &prefix, 2, 1 << 22);
  a.opt({"--score"}, "M", "tokens scored in decode mode after the prefix (default 256)", &score, 1, 1 << 20);
  if (!a.parse(argc, argv, 2)) return 0;
  TW_CHECK(a.given("--prefix"), "--prefix N is required");
  const EvalInput in = check_eval_input(o, prefix, "text");  // everything checkable before the model loads
  const std::vector<CompareSpec>& specs = in.specs;
  const std::string& text = in.text;

  const EngineOptions eo = eval_engine_options(o, specs);
  Engine e(eo);
  const ModelConfig& mc = e.model().config();
  TW_CHECK(prefix + score - 1 <= e.n_ctx(), "--prefix ", prefix, " + --score ", score, " needs ", prefix + score - 1,
           " cached tokens, more than the context of ", e.n_ctx(), " tokens (model trained for ", mc.n_ctx_train,
           "; -c sets the context)");

  // Tokenise enough of the text (a slice growing until it holds N + M tokens or the text ends).
  const size_t start = snap_to_word(text, (size_t)o.offset);
  const int64_t need = prefix + score;
  std::vector<int32_t> toks;
  for (size_t len = (size_t)need * 8 + 4096;; len *= 2) {
    const size_t end = start + len >= text.size() ? text.size() : snap_to_word(text, start + len);
    toks.clear();
    if (e.tokenizer().add_bos()) toks.push_back(e.tokenizer().bos());
    const std::vector<int32_t> body = e.tokenizer().encode(std::string_view(text).substr(start, end - start), false);
    toks.insert(toks.end(), body.begin(), body.end());
    if ((int64_t)toks.size() > need || end == text.size()) break;
  }
  TW_CHECK((int64_t)toks.size() >= need, "the text from offset ", start, " has ", toks.size(),
           " tokens, fewer than --prefix ", prefix, " + --score ", score);
  toks.resize(need);

  std::fprintf(stderr, "[twilight] %s: prefix %lld tokens (prefill %lld, dense), %lld scored in decode mode, %zu "
               "configurations + the dense reference, %d threads\n", mc.name.c_str(), (long long)prefix,
               (long long)prefix - 1, (long long)score, specs.size(), e.threads());
  attn::AttnConfig dense;
  e.attention().reconfigure(dense);  // a one-token last prefill chunk would otherwise run a sparse step
  double t0 = wall_s();
  e.eval(std::vector<int32_t>(toks.begin(), toks.begin() + prefix - 1),
         [&](int64_t d, int64_t t) { print_progress("prefill", d, t, t0); });
  const double prefill_s = wall_s() - t0;

  const int V = mc.n_vocab;
  std::vector<float> ref_lp((size_t)score * V);  // dense log-probs per scored position
  std::vector<int32_t> ref_top1(score);
  std::vector<double> lp;
  std::vector<CompareSpec> runs;
  runs.push_back({"dense (reference)", dense});
  runs.insert(runs.end(), specs.begin(), specs.end());
  std::vector<RunResult> res;
  for (size_t r = 0; r < runs.size(); ++r) {
    e.truncate(prefix - 1);
    e.attention().reconfigure(runs[r].cfg);
    RunResult rr;
    rr.label = runs[r].label;
    rr.attention = runs[r].cfg.describe();
    t0 = wall_s();
    for (int64_t i = 0; i < score; ++i) {
      e.eval({toks[prefix - 1 + i]});
      log_softmax(e.logits(), V, lp);
      const int32_t target = toks[prefix + i];
      rr.nll_sum -= lp[target];
      const int32_t top1 = (int32_t)(std::max_element(lp.begin(), lp.end()) - lp.begin());
      float* ref = ref_lp.data() + (size_t)i * V;
      if (r == 0) {
        for (int v = 0; v < V; ++v) ref[v] = (float)lp[v];
        ref_top1[i] = top1;
      } else {
        double kl = 0;  // KL(dense || this) = sum_v p_d (log p_d - log p)
        for (int v = 0; v < V; ++v) kl += std::exp((double)ref[v]) * ((double)ref[v] - lp[v]);
        kl = std::max(kl, 0.0);  // float rounding of the stored reference can give -1e-9
        rr.kl_sum += kl;
        rr.kl_max = std::max(rr.kl_max, kl);
      }
      rr.top1_agree += top1 == ref_top1[i];
      ++rr.n;
      if ((i + 1) % 32 == 0 || i + 1 == score) print_progress(rr.label.c_str(), i + 1, score, t0);
    }
    rr.decode_s = wall_s() - t0;
    rr.budget = summarize_budgets(e.attention());
    res.push_back(rr);
  }

  // Table.
  const double ppl0 = res[0].ppl();
  std::printf("\n%s, %s: prefix %lld tokens, %lld scored (contexts %lld..%lld), offset %lld\n", mc.name.c_str(),
              o.text_path.c_str(), (long long)prefix, (long long)score, (long long)prefix, (long long)(prefix + score - 1),
              (long long)start);
  // A markdown table (pasted into docs/ACCURACY.md as it is).
  std::printf("| %-32s | %9s | %8s | %9s | %8s | %7s | %7s | %7s | %6s |\n", "config", "ppl", "d ppl", "mean KL",
              "top-1 =", "I1 % ctx", "I0 % ctx", "est mass", "t/s");
  std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const RunResult& r : res) {
    const bool sparse = r.budget.sparse_steps > 0;
    char i1[16] = "-", i0[16] = "-", em[16] = "-";
    if (sparse) {
      std::snprintf(i1, sizeof i1, "%.2f", 100 * r.budget.i1_frac);
      std::snprintf(i0, sizeof i0, "%.1f", 100 * r.budget.i0_frac);
      if (r.budget.est_mass > 0) std::snprintf(em, sizeof em, "%.3f", r.budget.est_mass);
    }
    std::printf("| %-32s | %9.4f | %+7.3f%% | %9.2e | %7.2f%% | %7s | %7s | %7s | %6.1f |\n", r.label.c_str(), r.ppl(),
                100 * (r.ppl() / ppl0 - 1), r.kl_sum / r.n, 100.0 * r.top1_agree / r.n, i1, i0, em, r.n / r.decode_s);
  }
  std::printf("\n(top-1 =: argmax equal to dense's; I1 %% ctx: tokens attended / context over the sparse layers; "
              "mass: Twilight's estimated mass kept; prefill %.1f s)\n", prefill_s);

  if (!o.out_path.empty()) {
    std::ostringstream js;
    js.precision(9);
    js << "{\"model\": \"" << json_escape(mc.name) << "\", \"model_file\": \"" << json_escape(eo.model_path)
       << "\", \"text\": \"" << json_escape(o.text_path) << "\", \"offset\": " << start << ", \"prefix\": " << prefix
       << ", \"score\": " << score << ", \"threads\": " << e.threads() << ", \"prefill_s\": " << prefill_s
       << ", \"runs\": [";
    for (size_t r = 0; r < res.size(); ++r) {
      const RunResult& x = res[r];
      js << (r ? "," : "") << "\n  {\"label\": \"" << json_escape(x.label) << "\", \"attention\": \""
         << json_escape(x.attention) << "\", \"reference\": " << (r == 0 ? "true" : "false") << ", \"ppl\": " << x.ppl()
         << ", \"nll_mean\": " << x.nll_sum / x.n << ", \"kl_mean\": " << x.kl_sum / x.n << ", \"kl_max\": " << x.kl_max
         << ", \"top1_agree\": " << (double)x.top1_agree / x.n << ", \"decode_s\": " << x.decode_s
         << ", \"budget\": " << x.budget.json() << "}";
    }
    js << "\n]}\n";
    write_file_atomic(o.out_path, js.str());
  }
  return 0;
}

}  // namespace tw::cli
