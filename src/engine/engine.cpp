#include "engine/engine.h"

#include <algorithm>
#include <chrono>

#include "common/error.h"

namespace tw {

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

Engine::Engine(const EngineOptions& opt)
    : model_(Model::load(opt.model_path)),
      tok_(Tokenizer::from_gguf(model_->file())),
      tp_(opt.threads > 0 ? opt.threads : default_threads()) {
  const ModelConfig& c = model_->config();
  TW_CHECK(opt.n_ctx >= 0, "context size must be positive, got ", opt.n_ctx);
  TW_CHECK(opt.prefill_chunk > 0, "prefill chunk must be positive");
  n_ctx_ = opt.n_ctx == 0 ? c.n_ctx_train : opt.n_ctx;
  TW_CHECK(n_ctx_ >= kv::kPageSize && n_ctx_ <= (int64_t)1 << 22, "context size ", n_ctx_, " out of range [",
           kv::kPageSize, ", 4194304]");
  chunk_ = opt.prefill_chunk;
  kv_ = std::make_unique<kv::KVPool>(model_->make_kv(n_ctx_));
  policy_ = std::make_unique<attn::AttentionPolicy>(opt.attn, kv_->shape(), model_->head_shape(), model_->fingerprint());
  logits_.resize(c.n_vocab);
}

size_t Engine::kv_bytes_used() const {
  const kv::KVShape& s = kv_->shape();
  return 2 * (size_t)s.n_layers * s.n_kv_heads * s.head_dim * sizeof(uint16_t) * (size_t)seq_.n_tokens;
}
size_t Engine::kv_bytes_total() const { return kv_->bytes(); }

void Engine::reset() {
  kv_->release(seq_);
  history_.clear();
}

void Engine::truncate(int64_t n) {
  TW_CHECK(n >= 0 && n <= seq_.n_tokens, "truncate: bad position");
  // Pages stay reserved; positions >= n are simply overwritten by the next eval.
  seq_.n_tokens = n;
  history_.resize(n);
}

void Engine::eval(const std::vector<int32_t>& tokens, const std::function<void(int64_t, int64_t)>& progress) {
  if (tokens.empty()) return;
  if (seq_.n_tokens + (int64_t)tokens.size() > n_ctx_)
    fail("prompt of ", seq_.n_tokens + (int64_t)tokens.size(), " tokens does not fit the context of ", n_ctx_,
         " tokens (use -c to enlarge it; the model was trained for ", model_->config().n_ctx_train, ")");
  const int64_t total = (int64_t)tokens.size();
  for (int64_t i = 0; i < total; i += chunk_) {
    const int64_t n = std::min(chunk_, total - i);
    model_->forward(tokens.data() + i, n, *kv_, seq_, logits_.data(), tp_, false, policy_.get());
    history_.insert(history_.end(), tokens.begin() + i, tokens.begin() + i + n);
    if (progress) progress(i + n, total);
  }
}

GenStats Engine::generate(const std::vector<int32_t>& prompt, int n_predict, const SamplerParams& sp,
                          const std::function<bool(const std::string&)>& on_text,
                          const std::function<void(int64_t, int64_t)>& progress) {
  TW_CHECK(!prompt.empty(), "empty prompt");
  TW_CHECK(n_predict >= 0, "-n must be >= 0, got ", n_predict);
  if ((int64_t)prompt.size() > n_ctx_)
    fail("prompt of ", prompt.size(), " tokens is longer than the context of ", n_ctx_, " tokens (use -c)");
  Sampler sampler(sp, model_->config().n_vocab);
  GenStats st;
  // Reuse the cached prefix (chat turns); at least the last prompt token is re-evaluated for logits.
  size_t common = 0;
  while (common < history_.size() && common < prompt.size() && history_[common] == prompt[common]) ++common;
  common = std::min(common, prompt.size() - 1);
  truncate((int64_t)common);
  const std::vector<int32_t> rest(prompt.begin() + common, prompt.end());
  double t0 = now_s();
  eval(rest, progress);
  st.n_prompt = (int64_t)rest.size();
  st.prefill_s = now_s() - t0;

  StreamDecoder dec(tok_);
  st.stop = "length";
  t0 = now_s();
  for (int i = 0; i < n_predict; ++i) {
    const int32_t id = sampler.sample(logits_.data());
    if (tok_.is_eog(id)) {
      st.stop = "eog";
      break;
    }
    ++st.n_generated;
    const std::string text = dec.push(id);
    if (!text.empty() && on_text && !on_text(text)) {
      st.stop = "stopped";
      break;
    }
    if (seq_.n_tokens >= n_ctx_) {
      st.stop = "context";
      break;
    }
    model_->forward(&id, 1, *kv_, seq_, logits_.data(), tp_, false, policy_.get());
    history_.push_back(id);
  }
  const std::string tail = dec.flush();
  if (!tail.empty() && on_text) on_text(tail);
  st.decode_s = now_s() - t0;
  return st;
}

}  // namespace tw
