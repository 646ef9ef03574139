// twilight generate: prompt -> streamed text, with prefill progress and a closing summary.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "cli/args.h"
#include "cli/attn_flags.h"
#include "cli/commands.h"
#include "common/error.h"
#include "common/paths.h"
#include "engine/engine.h"

namespace tw::cli {

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read prompt file '", path, "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail("error reading prompt file '", path, "'");
  return ss.str();
}

// Progress bar on stderr for long prefills (only when stderr is a terminal or the prompt is long).
struct Progress {
  double t0 = 0;
  bool show = false;
  void operator()(int64_t done, int64_t total) const {
    if (!show) return;
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count() - t0;
    const int w = 30, fill = (int)(w * done / std::max<int64_t>(total, 1));
    std::fprintf(stderr, "\rprefill [%.*s%*s] %lld/%lld tokens  %.1f t/s ", fill, "==============================", w - fill,
                 "", (long long)done, (long long)total, el > 0 ? done / el : 0.0);
    if (done == total) std::fputc('\n', stderr);
    std::fflush(stderr);
  }
};

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

void summary(const Engine& e, const GenStats& st, const std::string& stats_path) {
  const double pp = st.prefill_s > 0 ? st.n_prompt / st.prefill_s : 0, tg = st.decode_s > 0 ? st.n_generated / st.decode_s : 0;
  std::fprintf(stderr,
               "\n\n[twilight] prompt %lld tokens in %.2f s (%.1f t/s) | generated %lld tokens in %.2f s (%.2f t/s) | stop: %s\n"
               "[twilight] context %lld / %lld tokens | KV cache %.1f MiB used of %.1f MiB (fp16, %d layers x %d kv heads x d %d) | "
               "attention: %s | threads %d\n",
               (long long)st.n_prompt, st.prefill_s, pp, (long long)st.n_generated, st.decode_s, tg, st.stop.c_str(),
               (long long)e.n_past(), (long long)e.n_ctx(), e.kv_bytes_used() / 1048576.0, e.kv_bytes_total() / 1048576.0,
               e.model().config().n_layers, e.model().config().n_kv_heads, e.model().config().head_dim,
               e.attention().config().describe().c_str(), e.threads());
  print_budgets(e.attention());
  if (!stats_path.empty()) write_budgets_json(e.attention(), stats_path);
}

}  // namespace

int cmd_generate(int argc, char** argv) {
  std::string model, prompt, prompt_file, system;
  int64_t n_predict = 128, n_ctx = 0;
  int threads = 0;
  bool chat = false;
  SamplerParams sp;
  Args a("generate");
  a.opt({"-m", "--model"}, "FILE", "GGUF model (default: SmolLM2-135M-Instruct from the project cache)", &model);
  a.opt({"-p", "--prompt"}, "TEXT", "prompt", &prompt);
  a.opt({"-f", "--file"}, "FILE", "read the prompt from a file", &prompt_file);
  a.opt({"-n", "--n-predict"}, "N", "tokens to generate (default 128)", &n_predict, 0, 1 << 24);
  a.opt({"-c", "--ctx-size"}, "N", "context size in tokens (default: the model's training context)", &n_ctx, 0, 1 << 22);
  a.opt({"-t", "--threads"}, "N", "threads (default: all cores)", &threads, 1, 1024);
  a.opt({"--temp"}, "T", "temperature; 0 = greedy (default 0.8)", &sp.temp, 0.f, 100.f);
  a.opt({"--top-k"}, "K", "top-k, 0 = off (default 40)", &sp.top_k, 0, 1 << 24);
  a.opt({"--top-p"}, "P", "top-p in (0, 1], 1 = off (default 0.95)", &sp.top_p, 0.f, 1.f);
  a.opt({"--min-p"}, "P", "min-p in [0, 1], 0 = off (default 0.05)", &sp.min_p, 0.f, 1.f);
  a.opt({"-s", "--seed"}, "N", "random seed", &sp.seed);
  a.flag({"--chat", "-cnv"}, "chat mode: apply the model's chat template; interactive when no prompt is given", &chat);
  a.opt({"--system"}, "TEXT", "system message in chat mode (default: the template's)", &system);
  AttnFlags af;
  af.add_to(a);
  if (!a.parse(argc, argv, 2)) return 0;
  sp.validate();
  TW_CHECK(prompt.empty() || prompt_file.empty(), "give either -p or -f, not both");
  if (!prompt_file.empty()) prompt = read_file(prompt_file);
  const bool interactive = chat && prompt.empty();
  TW_CHECK(!prompt.empty() || interactive, "no prompt: use -p TEXT, -f FILE, or --chat for an interactive chat");
  if (interactive) TW_CHECK(isatty(0) || !std::cin.eof(), "interactive chat needs input on stdin");

  EngineOptions eo;
  eo.model_path = model.empty() ? require_model(kSmolLM2File) : model;
  eo.n_ctx = n_ctx;
  eo.threads = threads;
  // Default decode attention (docs/ACCURACY.md, "Guardrail and true mass"): Twilight at p = 0.95
  // with the INT4 estimate over every token (no level-1 selector: Quest's candidates at B0 = n/4 left
  // 5-13% of the true mass out) and the union of the group's per-head top-p sets (every head keeps p
  // of its own mass); within the noise floor of dense perplexity. Contexts under attn-dense-below
  // (1024) decode dense. Resolved before loading, so bad attention options fail fast.
  attn::AttnConfig def;
  def.method = attn::Method::Twilight;
  def.base = attn::Base::None;
  def.combine = attn::GroupCombine::Union;
  eo.attn = af.resolve(def);
  std::fprintf(stderr, "[twilight] loading %s\n", eo.model_path.c_str());
  Engine e(eo);
  const ModelConfig& c = e.model().config();
  std::fprintf(stderr, "[twilight] %s (%s): %d layers, %d heads / %d kv heads, d %d, vocab %d, context %lld (trained %lld)\n",
               c.name.c_str(), c.arch.c_str(), c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.n_vocab,
               (long long)e.n_ctx(), (long long)c.n_ctx_train);

  auto emit = [](const std::string& s) {
    std::fwrite(s.data(), 1, s.size(), stdout);
    std::fflush(stdout);
    return true;
  };

  if (!chat) {
    std::vector<int32_t> toks;
    if (e.tokenizer().add_bos()) toks.push_back(e.tokenizer().bos());
    const std::vector<int32_t> body = e.tokenizer().encode(prompt, false);
    toks.insert(toks.end(), body.begin(), body.end());
    if ((int64_t)toks.size() > e.n_ctx())  // before echoing anything: no partial output on error
      fail("prompt of ", toks.size(), " tokens is longer than the context of ", e.n_ctx(), " tokens (use -c)");
    Progress pr{now(), toks.size() >= 512 || isatty(2)};
    std::fwrite(prompt.data(), 1, prompt.size(), stdout);
    const GenStats st = e.generate(toks, (int)n_predict, sp, emit, std::ref(pr));
    summary(e, st, af.stats_path);
    return 0;
  }

  std::vector<ChatMessage> msgs;
  if (!system.empty()) msgs.push_back({"system", system});
  auto turn = [&](const std::string& user) {
    msgs.push_back({"user", user});
    const std::string text = apply_chat_template(e.model().file(), msgs, true);
    const std::vector<int32_t> toks = e.tokenizer().encode(text, true);
    Progress pr{now(), toks.size() >= 512 || isatty(2)};
    std::string reply;
    const GenStats st = e.generate(toks, (int)n_predict, sp, [&](const std::string& s) {
      reply += s;
      return emit(s);
    }, std::ref(pr));
    msgs.push_back({"assistant", reply});
    return st;
  };
  if (!interactive) {
    summary(e, turn(prompt), af.stats_path);
    return 0;
  }
  std::fprintf(stderr, "[twilight] chat: type a message and press Enter; an empty line or Ctrl-D ends.\n");
  GenStats last;
  for (;;) {
    std::fputs("\n> ", stdout);
    std::fflush(stdout);
    std::string line;
    if (!std::getline(std::cin, line) || line.empty()) break;
    last = turn(line);
  }
  summary(e, last, af.stats_path);
  return 0;
}

}  // namespace tw::cli
