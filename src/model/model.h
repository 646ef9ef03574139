// The transformer: configuration read from GGUF metadata, weights as views into the mmapped file,
// and the forward pass (chunked prefill and single-token decode) for the Llama and Qwen2
// architectures. The layer reads top to bottom as a list of named ops.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "attention/dense_cpu.h"
#include "attention/policy.h"
#include "common/threadpool.h"
#include "gguf/gguf.h"
#include "kv/kv_cache.h"
#include "ops/cpu/elementwise.h"
#include "ops/cpu/matmul.h"

namespace tw {

struct ModelConfig {
  std::string arch;          // "llama" | "qwen2"
  std::string name;          // general.name
  int n_layers = 0;
  int n_embd = 0;            // model width
  int n_ff = 0;              // feed-forward width
  int n_heads = 0;           // query heads H
  int n_kv_heads = 0;        // key/value heads Hkv (GQA: H / Hkv query heads per kv head)
  int head_dim = 0;          // d = n_embd / n_heads
  int n_vocab = 0;
  int64_t n_ctx_train = 0;   // context length the model was trained for
  float rms_eps = 1e-5f;
  ops::Rope rope;            // style per architecture (llama: interleaved pairs; qwen2: NeoX halves)
  bool qkv_bias = false;     // qwen2
  bool tied_output = false;  // output.weight absent: logits use token_embd

  static ModelConfig from_gguf(const gguf::File& f);  // throws tw::Error for unsupported models
};

struct LayerWeights {
  std::vector<float> attn_norm;     // (n_embd)
  ops::QMatrix wq, wk, wv, wo;      // (H*d, n_embd), (Hkv*d, n_embd), (Hkv*d, n_embd), (n_embd, H*d)
  std::vector<float> bq, bk, bv;    // (H*d), (Hkv*d), (Hkv*d): qwen2 only
  std::vector<float> ffn_norm;      // (n_embd)
  ops::QMatrix w_gate, w_up, w_down;  // (n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff)
};

struct Weights {
  ops::QMatrix tok_embd;            // (n_vocab, n_embd)
  std::vector<float> output_norm;   // (n_embd)
  ops::QMatrix output;              // (n_vocab, n_embd); = tok_embd when tied
  std::vector<LayerWeights> layers;
};

// Scratch for one forward call of up to max_batch tokens.
struct RunState {
  int64_t max_batch = 0;
  std::vector<float> x;       // (max_batch, n_embd) residual stream
  std::vector<float> xn;      // (max_batch, n_embd) normalised input of a block
  std::vector<float> q;       // (max_batch, H*d)
  std::vector<float> k, v;    // (max_batch, Hkv*d)
  std::vector<float> att;     // (max_batch, H*d) attention output
  std::vector<float> proj;    // (max_batch, n_embd)
  std::vector<float> gate;    // (max_batch, n_ff)
  std::vector<float> up;      // (max_batch, n_ff)
  std::vector<float> logits;  // (max_batch, n_vocab) or (1, n_vocab)
};

class Model {
 public:
  // Load (mmap) a GGUF model; validates architecture, shapes and tensor types.
  static std::unique_ptr<Model> load(const std::string& path);

  const ModelConfig& config() const { return cfg_; }
  const gguf::File& file() const { return file_; }
  const Weights& weights() const { return w_; }

  // Bytes of weights read by one decode step (all matrices + embedding row), for GB/s figures.
  size_t weight_bytes() const;

  // A KV pool sized for n_ctx tokens of one sequence.
  kv::KVPool make_kv(int64_t n_ctx) const;

  // Run tokens[0..n) at positions pos0.. (pos0 == seq.n_tokens) through the model, appending their
  // K/V to the cache and advancing seq.n_tokens. Writes logits of the last token to logits_out
  // (n_vocab floats), or of every token when all_logits (n * n_vocab floats). n == 1 is a decode
  // step (matrix-vector products); n > 1 a prefill chunk (matrix-matrix products).
  // With a policy, its side structures are updated on every append and decode steps run the
  // policy's attention (dense, selector or Twilight); prefill stays dense. Without one: dense.
  void forward(const int32_t* tokens, int64_t n, kv::KVPool& pool, kv::SeqPages& seq, float* logits_out,
               ThreadPool& tp, bool all_logits = false, attn::AttentionPolicy* policy = nullptr);

  attn::HeadShape head_shape() const { return {cfg_.n_heads, cfg_.n_kv_heads, cfg_.head_dim}; }

  // Identity of the weights for per-model files (Double Sparsity channels): 16 hex digits of FNV-1a
  // 64 over the architecture, every tensor's name / type / shape and the first MiB of
  // blk.0.attn_k.weight's data (so two fine-tunes of one shape differ). Computed once at load.
  const std::string& fingerprint() const { return fingerprint_; }

  // Optional observer of the attention inputs (calibration, KV dumps for the attention benchmarks): called in every forward, once per
  // layer, with the post-RoPE q [n][H*d] and k [n][Hkv*d] (fp32, before the fp16 cache) of the
  // tokens at positions pos0 .. pos0+n-1. Empty function = none.
  using QKObserver = std::function<void(int layer, int64_t pos0, int64_t n, const float* q, const float* k)>;
  void set_qk_observer(QKObserver f) { qk_observer_ = std::move(f); }

 private:
  explicit Model(gguf::File f) : file_(std::move(f)) {}
  void ensure_state(int64_t n);
  gguf::File file_;
  ModelConfig cfg_;
  Weights w_;
  RunState rs_;
  std::string fingerprint_;
  QKObserver qk_observer_;
};

}  // namespace tw
