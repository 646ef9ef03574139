#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "common/error.h"

namespace tw {

namespace {

std::vector<float> load_vector(const gguf::File& f, const std::string& name, int64_t n) {
  const gguf::TensorInfo& t = f.tensor(name);
  TW_CHECK(t.nelements() == n, f.path(), ": tensor '", name, "' has ", t.nelements(), " elements, expected ", n);
  std::vector<float> out(n);
  gguf::dequantize_row(t.type, t.data, out.data(), n);
  return out;
}

ops::QMatrix load_matrix(const gguf::File& f, const std::string& name, int64_t rows, int64_t cols) {
  const gguf::TensorInfo& t = f.tensor(name);
  TW_CHECK(t.ne.size() == 2 && t.ne[0] == cols && t.ne[1] == rows, f.path(), ": tensor '", name, "' has shape [",
           t.ne[0], ", ", t.ne.size() > 1 ? t.ne[1] : 1, "], expected [", cols, ", ", rows, "]");
  return ops::as_matrix(t);
}

// FNV-1a 64 (fingerprints, not security).
struct Fnv1a {
  uint64_t h = 1469598103934665603ull;
  void add(const void* p, size_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
  void add(const std::string& s) { add(s.data(), s.size() + 1); }  // with the NUL: "ab"+"c" != "a"+"bc"
  template <class T> void add_pod(T x) { add(&x, sizeof x); }
};

std::string weights_fingerprint(const gguf::File& f, const std::string& arch) {
  Fnv1a h;
  h.add(arch);
  h.add_pod((uint64_t)f.tensors().size());
  for (const gguf::TensorInfo& t : f.tensors()) {
    h.add(t.name);
    h.add_pod((uint32_t)t.type);
    for (int64_t x : t.ne) h.add_pod(x);
  }
  const gguf::TensorInfo& k = f.tensor("blk.0.attn_k.weight");
  h.add(k.data, std::min<size_t>(k.nbytes, 1 << 20));
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)h.h);
  return buf;
}

}  // namespace

ModelConfig ModelConfig::from_gguf(const gguf::File& f) {
  ModelConfig c;
  c.arch = f.get_str("general.architecture");
  if (c.arch != "llama" && c.arch != "qwen2")
    fail(f.path(), ": unsupported architecture '", c.arch, "' (twilight supports llama and qwen2)");
  const std::string p = c.arch + ".";
  c.name = f.get_str_or("general.name", c.arch);
  c.n_layers = (int)f.get_int(p + "block_count");
  c.n_embd = (int)f.get_int(p + "embedding_length");
  c.n_ff = (int)f.get_int(p + "feed_forward_length");
  c.n_heads = (int)f.get_int(p + "attention.head_count");
  c.n_kv_heads = (int)f.get_int_or(p + "attention.head_count_kv", c.n_heads);
  c.n_ctx_train = f.get_int(p + "context_length");
  c.rms_eps = (float)f.get_float(p + "attention.layer_norm_rms_epsilon");
  TW_CHECK(c.n_layers > 0 && c.n_layers <= 1024 && c.n_embd > 0 && c.n_ff > 0 && c.n_heads > 0 && c.n_kv_heads > 0,
           f.path(), ": implausible model dimensions");
  TW_CHECK(c.n_embd % c.n_heads == 0, f.path(), ": embedding_length ", c.n_embd, " not divisible by head_count ", c.n_heads);
  TW_CHECK(c.n_heads % c.n_kv_heads == 0, f.path(), ": head_count ", c.n_heads, " not a multiple of head_count_kv ", c.n_kv_heads);
  c.head_dim = (int)f.get_int_or(p + "attention.key_length", c.n_embd / c.n_heads);
  TW_CHECK(c.head_dim == c.n_embd / c.n_heads && c.head_dim % 2 == 0, f.path(), ": unsupported head dim ", c.head_dim);
  const gguf::TensorInfo& emb = f.tensor("token_embd.weight");
  TW_CHECK(emb.ne.size() == 2 && emb.ne[0] == c.n_embd, f.path(), ": token_embd.weight has the wrong shape");
  c.n_vocab = (int)emb.ne[1];

  c.rope.style = c.arch == "qwen2" ? ops::RopeStyle::NeoX : ops::RopeStyle::Interleaved;
  c.rope.head_dim = c.head_dim;
  c.rope.rot_dim = (int)f.get_int_or(p + "rope.dimension_count", c.head_dim);
  TW_CHECK(c.rope.rot_dim > 0 && c.rope.rot_dim <= c.head_dim && c.rope.rot_dim % 2 == 0, f.path(), ": bad rope.dimension_count");
  c.rope.freq_base = (float)f.get_float_or(p + "rope.freq_base", 10000.0);
  const std::string scaling = f.get_str_or(p + "rope.scaling.type", "none");
  if (scaling == "linear") {
    c.rope.freq_scale = 1.0f / (float)f.get_float(p + "rope.scaling.factor");
  } else if (scaling != "none") {
    fail(f.path(), ": rope scaling '", scaling, "' is not supported");
  }
  c.qkv_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.tied_output = f.find_tensor("output.weight") == nullptr;
  return c;
}

std::unique_ptr<Model> Model::load(const std::string& path) {
  std::unique_ptr<Model> m(new Model(gguf::File::open(path)));
  const gguf::File& f = m->file_;
  ModelConfig& c = m->cfg_ = ModelConfig::from_gguf(f);
  const int64_t qd = (int64_t)c.n_heads * c.head_dim, kvd = (int64_t)c.n_kv_heads * c.head_dim;
  Weights& w = m->w_;
  w.tok_embd = load_matrix(f, "token_embd.weight", c.n_vocab, c.n_embd);
  w.output_norm = load_vector(f, "output_norm.weight", c.n_embd);
  w.output = c.tied_output ? w.tok_embd : load_matrix(f, "output.weight", c.n_vocab, c.n_embd);
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    LayerWeights& L = w.layers[l];
    L.attn_norm = load_vector(f, b + "attn_norm.weight", c.n_embd);
    L.wq = load_matrix(f, b + "attn_q.weight", qd, c.n_embd);
    L.wk = load_matrix(f, b + "attn_k.weight", kvd, c.n_embd);
    L.wv = load_matrix(f, b + "attn_v.weight", kvd, c.n_embd);
    L.wo = load_matrix(f, b + "attn_output.weight", c.n_embd, qd);
    if (c.qkv_bias) {
      L.bq = load_vector(f, b + "attn_q.bias", qd);
      L.bk = load_vector(f, b + "attn_k.bias", kvd);
      L.bv = load_vector(f, b + "attn_v.bias", kvd);
    }
    L.ffn_norm = load_vector(f, b + "ffn_norm.weight", c.n_embd);
    L.w_gate = load_matrix(f, b + "ffn_gate.weight", c.n_ff, c.n_embd);
    L.w_up = load_matrix(f, b + "ffn_up.weight", c.n_ff, c.n_embd);
    L.w_down = load_matrix(f, b + "ffn_down.weight", c.n_embd, c.n_ff);
  }
  m->fingerprint_ = weights_fingerprint(f, c.arch);
  return m;
}

size_t Model::weight_bytes() const {
  auto mb = [](const ops::QMatrix& m) { return (size_t)m.rows * m.row_bytes; };
  size_t n = mb(w_.output) + w_.tok_embd.row_bytes;
  for (const LayerWeights& L : w_.layers)
    n += mb(L.wq) + mb(L.wk) + mb(L.wv) + mb(L.wo) + mb(L.w_gate) + mb(L.w_up) + mb(L.w_down);
  return n;
}

kv::KVPool Model::make_kv(int64_t n_ctx) const {
  kv::KVShape s;
  s.n_layers = cfg_.n_layers;
  s.n_kv_heads = cfg_.n_kv_heads;
  s.head_dim = cfg_.head_dim;
  s.n_pages = (n_ctx + kv::kPageSize - 1) / kv::kPageSize;
  return kv::KVPool(s);
}

void Model::ensure_state(int64_t n) {
  if (rs_.max_batch >= n) return;
  const ModelConfig& c = cfg_;
  const int64_t qd = (int64_t)c.n_heads * c.head_dim, kvd = (int64_t)c.n_kv_heads * c.head_dim;
  rs_.max_batch = n;
  rs_.x.resize(n * c.n_embd);
  rs_.xn.resize(n * c.n_embd);
  rs_.q.resize(n * qd);
  rs_.k.resize(n * kvd);
  rs_.v.resize(n * kvd);
  rs_.att.resize(n * qd);
  rs_.proj.resize(n * c.n_embd);
  rs_.gate.resize(n * c.n_ff);
  rs_.up.resize(n * c.n_ff);
}

namespace {
// Y = X · W^T for n rows of X: matrix-vector for a single token, blocked GEMM otherwise.
void linear(const ops::QMatrix& W, const float* X, int64_t n, float* Y, ThreadPool& tp) {
  if (n == 1)
    ops::matvec(W, X, Y, tp);
  else
    ops::matmul(W, X, n, Y, tp);
}
void add_bias(float* y, const std::vector<float>& b, int64_t n) {
  if (b.empty()) return;
  const int64_t m = (int64_t)b.size();
  for (int64_t i = 0; i < n; ++i) ops::add(y + i * m, b.data(), m);
}
}  // namespace

void Model::forward(const int32_t* tokens, int64_t n, kv::KVPool& pool, kv::SeqPages& seq, float* logits_out,
                    ThreadPool& tp, bool all_logits, attn::AttentionPolicy* policy) {
  const ModelConfig& c = cfg_;
  TW_CHECK(n > 0, "forward: no tokens");
  const int64_t pos0 = seq.n_tokens;
  for (int64_t i = 0; i < n; ++i)
    TW_CHECK(tokens[i] >= 0 && tokens[i] < c.n_vocab, "forward: token id ", tokens[i], " out of range [0, ", c.n_vocab, ")");
  pool.reserve(seq, pos0 + n);
  ensure_state(n);
  RunState& s = rs_;
  const int64_t E = c.n_embd, qd = (int64_t)c.n_heads * c.head_dim, kvd = (int64_t)c.n_kv_heads * c.head_dim;
  const attn::HeadShape hs{c.n_heads, c.n_kv_heads, c.head_dim};

  for (int64_t i = 0; i < n; ++i) ops::get_row(w_.tok_embd, tokens[i], s.x.data() + i * E);

  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w_.layers[l];
    // --- attention block
    for (int64_t i = 0; i < n; ++i) ops::rmsnorm(&s.xn[i * E], &s.x[i * E], L.attn_norm.data(), E, c.rms_eps);
    linear(L.wq, s.xn.data(), n, s.q.data(), tp);
    linear(L.wk, s.xn.data(), n, s.k.data(), tp);
    linear(L.wv, s.xn.data(), n, s.v.data(), tp);
    add_bias(s.q.data(), L.bq, n);
    add_bias(s.k.data(), L.bk, n);
    add_bias(s.v.data(), L.bv, n);
    for (int64_t i = 0; i < n; ++i) {
      ops::rope_apply(c.rope, &s.q[i * qd], c.n_heads, pos0 + i);
      ops::rope_apply(c.rope, &s.k[i * kvd], c.n_kv_heads, pos0 + i);
      pool.write(l, seq, pos0 + i, &s.k[i * kvd], &s.v[i * kvd]);
      if (policy) policy->on_append(pool, l, seq, pos0 + i);
    }
    if (qk_observer_) qk_observer_(l, pos0, n, s.q.data(), s.k.data());
    if (n == 1 && policy)
      policy->decode(pool, seq, l, s.q.data(), pos0 + 1, s.att.data(), tp);
    else if (n == 1)
      attn::dense_decode(pool, seq, l, hs, s.q.data(), pos0 + 1, s.att.data(), tp);
    else
      attn::dense_prefill(pool, seq, l, hs, s.q.data(), n, pos0, s.att.data(), tp);
    linear(L.wo, s.att.data(), n, s.proj.data(), tp);
    ops::add(s.x.data(), s.proj.data(), n * E);
    // --- feed-forward block (SwiGLU)
    for (int64_t i = 0; i < n; ++i) ops::rmsnorm(&s.xn[i * E], &s.x[i * E], L.ffn_norm.data(), E, c.rms_eps);
    linear(L.w_gate, s.xn.data(), n, s.gate.data(), tp);
    linear(L.w_up, s.xn.data(), n, s.up.data(), tp);
    ops::silu_mul(s.gate.data(), s.up.data(), n * c.n_ff);
    linear(L.w_down, s.gate.data(), n, s.proj.data(), tp);
    ops::add(s.x.data(), s.proj.data(), n * E);
  }
  seq.n_tokens = pos0 + n;

  // --- output head: only the rows whose logits are wanted
  const int64_t first = all_logits ? 0 : n - 1, rows = n - first;
  for (int64_t i = first; i < n; ++i) ops::rmsnorm(&s.xn[i * E], &s.x[i * E], w_.output_norm.data(), E, c.rms_eps);
  linear(w_.output, &s.xn[first * E], rows, logits_out, tp);
}

}  // namespace tw
