// The engine: a model, its tokenizer, one sequence's KV cache and the generation loop
// (chunked prefill with progress, sampled decode, stop at end-of-generation, streamed text).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/threadpool.h"
#include "engine/sampler.h"
#include "kv/kv_cache.h"
#include "model/model.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace tw {

struct EngineOptions {
  std::string model_path;      // GGUF file
  int64_t n_ctx = 0;           // context (KV capacity) in tokens; 0 = the model's training context
  int threads = 0;             // 0 = all hardware threads
  int64_t prefill_chunk = 256; // tokens per prefill forward call
  attn::AttnConfig attn;       // decode attention (dense by default here; the CLI picks Twilight)
};

struct GenStats {
  int64_t n_prompt = 0;       // prompt tokens evaluated in this call
  int64_t n_generated = 0;    // tokens sampled
  double prefill_s = 0;       // wall time of the prefill
  double decode_s = 0;        // wall time of the decode steps
  std::string stop;           // "eog" | "length" | "context"
};

class Engine {
 public:
  explicit Engine(const EngineOptions& opt);

  const Model& model() const { return *model_; }
  const Tokenizer& tokenizer() const { return tok_; }
  int64_t n_ctx() const { return n_ctx_; }
  int64_t n_past() const { return seq_.n_tokens; }
  const std::vector<int32_t>& history() const { return history_; }
  size_t kv_bytes_used() const;   // bytes of K/V held for the current sequence
  size_t kv_bytes_total() const;  // capacity
  int threads() const { return tp_.size(); }
  ThreadPool& pool() { return tp_; }
  const attn::AttentionPolicy& attention() const { return *policy_; }
  attn::AttentionPolicy& attention() { return *policy_; }

  // Forget the sequence.
  void reset();
  // Drop cached tokens from position n on (keeps the common prefix of a conversation).
  void truncate(int64_t n);

  // Evaluate tokens after the cached ones, in chunks; logits() then holds the last token's logits.
  // progress(done, total) is called after every chunk. Throws tw::Error when the context would overflow.
  void eval(const std::vector<int32_t>& tokens, const std::function<void(int64_t, int64_t)>& progress = {});
  const float* logits() const { return logits_.data(); }

  // Evaluate prompt (reusing the longest cached prefix), then sample up to n_predict tokens.
  // on_text receives decoded text as soon as it forms complete UTF-8; returning false stops.
  GenStats generate(const std::vector<int32_t>& prompt, int n_predict, const SamplerParams& sp,
                    const std::function<bool(const std::string&)>& on_text,
                    const std::function<void(int64_t, int64_t)>& progress = {});

 private:
  std::unique_ptr<Model> model_;
  Tokenizer tok_;
  int64_t n_ctx_ = 0;
  int64_t chunk_ = 256;
  ThreadPool tp_;
  std::unique_ptr<kv::KVPool> kv_;
  std::unique_ptr<attn::AttentionPolicy> policy_;
  kv::SeqPages seq_;
  std::vector<int32_t> history_;  // tokens whose K/V are cached
  std::vector<float> logits_;     // (n_vocab)
};

}  // namespace tw
