#include "attention/policy.h"

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "attention/select_ds.h"
#include "attention/selectors.h"
#include "attention/sparse_cpu.h"
#include "common/error.h"
#include "common/fp16.h"

namespace tw::attn {

const char* method_name(Method m) {
  switch (m) {
    case Method::Dense: return "dense";
    case Method::Quest: return "quest";
    case Method::Streaming: return "streaming";
    case Method::TopK: return "topk";
    case Method::Twilight: return "twilight";
    case Method::DS: return "ds";
  }
  return "?";
}
const char* base_name(Base b) {
  switch (b) {
    case Base::None: return "none";
    case Base::Quest: return "quest";
    case Base::Streaming: return "streaming";
    case Base::TopK: return "topk";
    case Base::DS: return "ds";
  }
  return "?";
}

Method parse_method(const std::string& s) {
  if (s == "dense") return Method::Dense;
  if (s == "quest") return Method::Quest;
  if (s == "streaming") return Method::Streaming;
  if (s == "topk") return Method::TopK;
  if (s == "twilight") return Method::Twilight;
  if (s == "ds") return Method::DS;
  fail("unknown attention '", s, "' (dense|quest|ds|streaming|topk|twilight)");
}
Base parse_base(const std::string& s) {
  if (s == "none") return Base::None;
  if (s == "quest") return Base::Quest;
  if (s == "streaming") return Base::Streaming;
  if (s == "topk") return Base::TopK;
  if (s == "ds") return Base::DS;
  fail("unknown base selector '", s, "' (none|quest|streaming|topk|ds)");
}

namespace {
int64_t to_int(const std::string& key, const std::string& v) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end) fail(key, ": expected an integer, got '", v, "'");
  return x;
}
}  // namespace

void set_attn_option(AttnConfig& c, const std::string& key, const std::string& v) {
  if (key == "attn") {
    c.method = parse_method(v);
  } else if (key == "attn-p") {
    char* end = nullptr;
    const float p = std::strtof(v.c_str(), &end);
    if (v.empty() || *end || !std::isfinite(p)) fail("--attn-p: expected a number, got '", v, "'");
    c.p = p;
  } else if (key == "attn-base") {
    c.base = parse_base(v);
  } else if (key == "attn-b0") {
    c.b0 = to_int("--attn-b0", v);
  } else if (key == "attn-skip-layers") {
    c.skip_layers = (int)to_int("--attn-skip-layers", v);
  } else if (key == "attn-gqa") {
    if (v == "group") c.gqa = GqaMode::Group;
    else if (v == "head") c.gqa = GqaMode::Head;
    else fail("--attn-gqa: expected group or head, got '", v, "'");
  } else if (key == "attn-min-tokens") {
    c.min_tokens = to_int("--attn-min-tokens", v);
  } else if (key == "attn-max-tokens") {
    c.max_tokens = to_int("--attn-max-tokens", v);
  } else if (key == "attn-sinks") {
    c.sinks = to_int("--attn-sinks", v);
  } else if (key == "attn-dense-below") {
    c.dense_below = to_int("--attn-dense-below", v);
  } else if (key == "attn-true-mass") {
    if (v != "0" && v != "1") fail("attn-true-mass: expected 0 or 1, got '", v, "'");
    c.true_mass = v == "1";
  } else if (key == "attn-ds-file") {
    c.ds_file = v;
  } else {
    fail("unknown attention option '", key, "'");
  }
}

void load_attn_config(const std::string& path, AttnConfig& cfg) {
  std::ifstream in(path);
  if (!in) fail("cannot read attention config '", path, "'");
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    const size_t hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    const size_t eq = line.find('=');
    auto trim = [](std::string s) {
      const size_t a = s.find_first_not_of(" \t\r"), b = s.find_last_not_of(" \t\r");
      return a == std::string::npos ? std::string() : s.substr(a, b - a + 1);
    };
    if (trim(line).empty()) continue;
    if (eq == std::string::npos) fail(path, ":", n, ": expected 'key = value'");
    try {
      set_attn_option(cfg, trim(line.substr(0, eq)), trim(line.substr(eq + 1)));
    } catch (const Error& e) {
      fail(path, ":", n, ": ", e.what());
    }
  }
}

void AttnConfig::validate() const {
  TW_CHECK(p > 0.f && p <= 1.f, "--attn-p must be in (0, 1], got ", p);
  TW_CHECK(b0 >= 0, "--attn-b0 must be >= 0 (0 = auto), got ", b0);
  TW_CHECK(skip_layers >= 0, "--attn-skip-layers must be >= 0, got ", skip_layers);
  TW_CHECK(min_tokens >= 0 && max_tokens >= 0, "attention floor/cap must be >= 0");
  TW_CHECK(max_tokens == 0 || min_tokens <= max_tokens, "attention floor ", min_tokens, " above the cap ", max_tokens);
  TW_CHECK(sinks >= 0, "--attn-sinks must be >= 0");
  TW_CHECK(dense_below >= 0, "attn-dense-below must be >= 0");
  TW_CHECK(!uses_ds() || !ds_file.empty(), "Double Sparsity (", method == Method::DS ? "--attn ds" : "--attn-base ds",
           ") needs its channel file: --attn-ds-file FILE (make one with twilight calibrate)");
}

std::string AttnConfig::describe() const {
  std::ostringstream os;
  os << method_name(method);
  if (method == Method::Twilight) os << " (p " << p << ", base " << base_name(base) << ")";
  if (method != Method::Dense) {
    os << ", B0 " << (b0 > 0 ? std::to_string(b0) : std::string("auto (n_ctx/4)")) << ", dense layers < " << skip_layers
       << ", dense below " << dense_below << " tokens, " << (gqa == GqaMode::Group ? "group" : "head") << " mode";
  }
  return os.str();
}

void BudgetStats::reset(int layers, int lists) {
  n_layers = layers;
  n_lists = lists;
  const size_t n = (size_t)layers * lists;
  steps.assign(n, 0);
  ctx.assign(n, 0);
  i0.assign(n, 0);
  i1.assign(n, 0);
  est_mass.assign(n, 0);
  true_mass.assign(n, 0);
  dense_steps.assign(layers, 0);
}

std::string BudgetStats::json(const AttnConfig& cfg) const {
  std::ostringstream os;
  os << "{\"attention\": \"" << cfg.describe() << "\", \"n_layers\": " << n_layers << ", \"n_lists\": " << n_lists
     << ", \"true_mass\": " << (cfg.true_mass ? "true" : "false") << ", \"layers\": [";
  for (int l = 0; l < n_layers; ++l) {
    os << (l ? "," : "") << "\n  {\"layer\": " << l << ", \"dense_steps\": " << dense_steps[l] << ", \"lists\": [";
    for (int i = 0; i < n_lists; ++i) {
      const size_t k = at(l, i);
      const double s = steps[k] ? (double)steps[k] : 1.0;
      os << (i ? ", " : "") << "{\"steps\": " << steps[k] << ", \"avg_ctx\": " << ctx[k] / s << ", \"avg_i0\": " << i0[k] / s
         << ", \"avg_i1\": " << i1[k] / s << ", \"avg_est_mass\": " << est_mass[k] / s;
      if (cfg.true_mass) os << ", \"avg_true_mass\": " << true_mass[k] / s;
      os << "}";
    }
    os << "]}";
  }
  os << "\n]}\n";
  return os.str();
}

AttentionPolicy::AttentionPolicy(const AttnConfig& cfg, const kv::KVShape& kv, const HeadShape& hs,
                                 const std::string& model_fingerprint)
    : cfg_(cfg), hs_(hs), n_layers_(kv.n_layers) {
  cfg_.validate();
  if (cfg_.uses_ds()) {
    DsChannels ch = read_ds_channels(cfg_.ds_file);
    check_ds_model(ch, cfg_.ds_file, kv.n_layers, kv.n_kv_heads, kv.head_dim, model_fingerprint);
    ds_ = std::make_unique<DsSide>(kv, std::move(ch));
  }
  if (config_needs_side(cfg_)) side_ = std::make_unique<KeySide>(kv);  // bounds and/or INT4 mirror
  stats_.reset(n_layers_, cfg_.gqa == GqaMode::Group ? hs.n_kv_heads : hs.n_heads);
}

bool AttentionPolicy::config_needs_side(const AttnConfig& c) {
  const bool quest = c.method == Method::Quest || (c.method == Method::Twilight && c.base == Base::Quest);
  return quest || c.method == Method::Twilight;
}

void AttentionPolicy::reconfigure(const AttnConfig& cfg) {
  cfg.validate();
  TW_CHECK(!config_needs_side(cfg) || side_, "attention policy: cannot switch to '", cfg.describe(),
           "': it needs the key side structures, which this policy (built for '", cfg_.describe(),
           "') does not maintain");
  TW_CHECK(!cfg.uses_ds() || ds_, "attention policy: cannot switch to '", cfg.describe(),
           "': it needs the Double Sparsity label cache, which this policy does not maintain");
  cfg_ = cfg;
  stats_.reset(n_layers_, cfg_.gqa == GqaMode::Group ? hs_.n_kv_heads : hs_.n_heads);
}

void AttentionPolicy::reset_stats() { stats_.reset(stats_.n_layers, stats_.n_lists); }

void AttentionPolicy::on_append(const kv::KVPool& pool, int layer, const kv::SeqPages& seq, int64_t pos) {
  if (side_) side_->append(pool, layer, seq, pos);
  if (ds_) ds_->append(pool, layer, seq, pos);
}

bool AttentionPolicy::sparse_at(int layer, int64_t n_ctx) const {
  if (cfg_.method == Method::Dense || layer < cfg_.skip_layers || n_ctx < cfg_.dense_below) return false;
  const bool has_selector = !(cfg_.method == Method::Twilight && cfg_.base == Base::None);
  // A selector whose budget covers the context selects everything: dense is the same and cheaper.
  return !(has_selector && cfg_.budget(n_ctx) >= n_ctx);
}

void AttentionPolicy::decode(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const float* q,
                             int64_t n_ctx, float* out, ThreadPool& tp) {
  if (!sparse_at(layer, n_ctx)) {
    if (cfg_.method != Method::Dense) ++stats_.dense_steps[layer];
    dense_decode(pool, seq, layer, hs_, q, n_ctx, out, tp);
    return;
  }
  const int n_lists = stats_.n_lists;
  const int64_t b0 = std::min(cfg_.budget(n_ctx), n_ctx);
  const Base level1 = cfg_.method == Method::Twilight ? cfg_.base
                      : cfg_.method == Method::Quest   ? Base::Quest
                      : cfg_.method == Method::Streaming ? Base::Streaming
                      : cfg_.method == Method::DS        ? Base::DS
                                                         : Base::TopK;
  switch (level1) {
    case Base::None: select_all(n_ctx, n_lists, cfg_.gqa, sel0_); break;
    case Base::Quest: select_quest(*side_, seq, layer, hs_, q, n_ctx, b0, cfg_.gqa, sel0_, tp); break;
    case Base::Streaming:
      select_streaming(n_ctx, std::min(cfg_.sinks, b0), b0 - std::min(cfg_.sinks, b0), n_lists, cfg_.gqa, sel0_);
      break;
    case Base::TopK: select_topk_oracle(pool, seq, layer, hs_, q, n_ctx, b0, cfg_.gqa, sel0_); break;
    case Base::DS: select_ds(*ds_, seq, layer, hs_, q, n_ctx, b0, cfg_.gqa, sel0_, &tp); break;
  }
  const Selection* final_sel = &sel0_;
  if (cfg_.method == Method::Twilight) {
    PruneOptions po;
    po.p = cfg_.p;
    po.min_tokens = cfg_.min_tokens;
    po.max_tokens = cfg_.max_tokens;
    prune_topp(*side_, seq, layer, hs_, q, sel0_, n_ctx, po, sel1_, pst_, tp);
    final_sel = &sel1_;
  }
  sparse_decode(pool, seq, layer, hs_, q, *final_sel, n_ctx, out, tp);

  // Budgets.
  for (int i = 0; i < n_lists; ++i) {
    const size_t k = stats_.at(layer, i);
    ++stats_.steps[k];
    stats_.ctx[k] += (double)n_ctx;
    stats_.i0[k] += (double)sel0_.size(i);
    stats_.i1[k] += (double)final_sel->size(i);
    if (cfg_.method == Method::Twilight) stats_.est_mass[k] += pst_[i].est_mass_kept;
  }
  if (cfg_.true_mass) record(layer, n_ctx, pool, seq, q);
}

// Debug: the exact attention mass of each query head on the attended tokens (list + current token),
// averaged over the heads a list serves.
void AttentionPolicy::record(int layer, int64_t n_ctx, const kv::KVPool& pool, const kv::SeqPages& seq, const float* q) {
  const Selection& sel = cfg_.method == Method::Twilight ? sel1_ : sel0_;
  const int d = hs_.head_dim, G = hs_.n_heads / hs_.n_kv_heads;
  std::vector<double> w(n_ctx);
  std::vector<char> kept(n_ctx);
  for (int i = 0; i < sel.n_lists; ++i) {
    std::fill(kept.begin(), kept.end(), 0);
    for (int64_t j = 0; j < sel.size(i); ++j) kept[sel.list(i)[j]] = 1;
    kept[n_ctx - 1] = 1;
    const int h0 = sel.mode == GqaMode::Group ? i * G : i, h1 = sel.mode == GqaMode::Group ? h0 + G : i + 1;
    double mass = 0;
    for (int hq = h0; hq < h1; ++hq) {
      const int kvh = hq / G;
      double mx = -INFINITY;
      for (int64_t t = 0; t < n_ctx; ++t) {
        const uint16_t* k = pool.k_page(layer, seq.pages[t / kv::kPageSize], kvh) + (t % kv::kPageSize) * d;
        double s = 0;
        for (int x = 0; x < d; ++x) s += (double)q[hq * d + x] * fp16_to_fp32(k[x]);
        w[t] = s / std::sqrt((double)d);
        mx = std::max(mx, w[t]);
      }
      double z = 0, kept_mass = 0;
      for (int64_t t = 0; t < n_ctx; ++t) {
        const double e = std::exp(w[t] - mx);
        z += e;
        if (kept[t]) kept_mass += e;
      }
      mass += kept_mass / z;
    }
    stats_.true_mass[stats_.at(layer, i)] += mass / (h1 - h0);
  }
}

}  // namespace tw::attn
