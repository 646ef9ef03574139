// twilight calibrate: the Double Sparsity channel file of a model. A real prefill over a text;
// a Model::QKObserver collects the post-RoPE q and k of every layer into DsCalibration (mean
// |q_c * k_c| per (layer, kv head, channel), the statistic of Double Sparsity's offline calibration);
// the r largest channels per (layer, kv head) are written with the model's identity.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "attention/ds_side.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "common/error.h"
#include "common/paths.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace tw::cli {

int cmd_calibrate(int argc, char** argv) {
  std::string model, text_file, out;
  int64_t n_tokens = 2048;
  int r = 0, threads = 0;
  Args a("calibrate");
  a.opt({"-m", "--model"}, "FILE", "GGUF model (default: SmolLM2-135M-Instruct from the project cache)", &model);
  a.opt({"-f", "--file"}, "FILE", "calibration text (plain text; its first N tokens are used)", &text_file);
  a.opt({"-c", "--tokens"}, "N", "calibration tokens (default 2048; fewer when the text is shorter)", &n_tokens, 16,
        1 << 20);
  a.opt({"-o", "--output"}, "FILE", "channel file to write", &out);
  a.opt({"--ds-channels"}, "R", "channels per (layer, kv head) (default head_dim / 4: 16 at d 64, 32 at d 128)", &r, 1,
        attn::kDsMaxR);
  a.opt({"-t", "--threads"}, "N", "threads (default: all cores)", &threads, 1, 1024);
  if (!a.parse(argc, argv, 2)) return 0;
  TW_CHECK(!text_file.empty(), "calibrate needs a text: -f FILE");
  TW_CHECK(!out.empty(), "calibrate needs an output file: -o FILE");
  std::string text;
  {
    std::ifstream in(text_file, std::ios::binary);
    if (!in) fail("cannot read calibration text '", text_file, "'");
    std::ostringstream ss;
    ss << in.rdbuf();
    text = ss.str();
  }

  const std::string path = model.empty() ? require_model(kSmolLM2File) : model;
  std::unique_ptr<Model> m = Model::load(path);
  const ModelConfig& c = m->config();
  if (r == 0) r = attn::ds_default_r(c.head_dim);
  TW_CHECK(r <= c.head_dim, "--ds-channels ", r, " exceeds the head dim ", c.head_dim);
  const Tokenizer tok = Tokenizer::from_gguf(m->file());
  std::vector<int32_t> toks;
  if (tok.add_bos()) toks.push_back(tok.bos());
  const std::vector<int32_t> body = tok.encode(text, false);
  toks.insert(toks.end(), body.begin(), body.end());
  TW_CHECK((int64_t)toks.size() >= 16, "calibration text '", text_file, "' has only ", toks.size(),
           " tokens; at least 16 are needed (a few thousand are better)");
  if ((int64_t)toks.size() > n_tokens) toks.resize(n_tokens);
  TW_CHECK((int64_t)toks.size() <= c.n_ctx_train, "-c ", toks.size(), " exceeds the model's trained context ",
           c.n_ctx_train);
  const int64_t n = (int64_t)toks.size();
  std::fprintf(stderr, "[twilight] calibrate %s (%s): %d layers, %d heads / %d kv heads, d %d; %lld tokens of %s, r = %d\n",
               c.name.c_str(), c.arch.c_str(), c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, (long long)n,
               text_file.c_str(), r);

  attn::DsCalibration cal(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim);
  m->set_qk_observer([&cal](int layer, int64_t, int64_t k, const float* q, const float* kk) { cal.add(layer, k, q, kk); });
  ThreadPool tp(threads > 0 ? threads : default_threads());
  kv::KVPool pool = m->make_kv(n);
  kv::SeqPages seq;
  std::vector<float> logits(c.n_vocab);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < n; i += 256) {
    const int64_t k = std::min<int64_t>(256, n - i);
    m->forward(toks.data() + i, k, pool, seq, logits.data(), tp);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  attn::DsChannels ch = cal.channels(r);
  ch.arch = c.arch;
  ch.name = c.name;
  ch.fingerprint = m->fingerprint();
  attn::write_ds_channels(out, ch);
  std::fprintf(stderr, "[twilight] prefill %lld tokens in %.2f s (%.1f t/s); wrote %s (%d x %d lists of %d channels, fingerprint %s)\n",
               (long long)n, s, n / s, out.c_str(), c.n_layers, c.n_kv_heads, r, ch.fingerprint.c_str());
  // How concentrated the statistic is: share of the total |q*k| mass in the r channels (averaged).
  double share = 0;
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_kv_heads; ++h) {
      const double* sum = cal.sum(l, h);
      double tot = 0, top = 0;
      for (int i = 0; i < c.head_dim; ++i) tot += sum[i];
      for (int i = 0; i < r; ++i) top += sum[ch.at(l, h)[i]];
      share += tot > 0 ? top / tot : 0;
    }
  std::fprintf(stderr, "[twilight] the %d heavy channels hold %.1f%% of the mean |q_c k_c| mass (average over layers and kv heads)\n",
               r, 100 * share / ((double)c.n_layers * c.n_kv_heads));
  return 0;
}

}  // namespace tw::cli
