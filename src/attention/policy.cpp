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
float to_float(const std::string& key, const std::string& v) {
  char* end = nullptr;
  const float x = std::strtof(v.c_str(), &end);
  if (v.empty() || *end || !std::isfinite(x)) fail(key, ": expected a number, got '", v, "'");
  return x;
}
}  // namespace

void set_attn_option(AttnConfig& c, const std::string& key, const std::string& v) {
  if (key == "attn") {
    c.method = parse_method(v);
  } else if (key == "attn-p") {
    c.p = to_float("--attn-p", v);
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
  } else if (key == "attn-combine") {
    if (v == "mean") c.combine = GroupCombine::Mean;
    else if (v == "union") c.combine = GroupCombine::Union;
    else fail("attn-combine: expected mean or union, got '", v, "'");
  } else if (key == "attn-guard") {
    if (v == "off") c.guard = Guard::Off;
    else if (v == "report") c.guard = Guard::Report;
    else if (v == "widen") c.guard = Guard::Widen;
    else if (v == "all") c.guard = Guard::All;
    else if (v == "dense") c.guard = Guard::Dense;
    else fail("attn-guard: expected off|report|widen|all|dense, got '", v, "'");
  } else if (key == "attn-guard-frac") {
    c.guard_frac = to_float("attn-guard-frac", v);
  } else if (key == "attn-widen-max") {
    c.widen_max = to_float("attn-widen-max", v);
  } else if (key == "attn-margin") {
    c.margin = to_float("attn-margin", v);
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
  TW_CHECK(guard_frac >= 0.f && guard_frac <= 1.f, "attn-guard-frac must be in [0, 1], got ", guard_frac);
  TW_CHECK(widen_max > 0.f && widen_max <= 1.f, "attn-widen-max must be in (0, 1], got ", widen_max);
  TW_CHECK(margin >= 0.f, "attn-margin must be >= 0, got ", margin);
}

std::string AttnConfig::describe() const {
  std::ostringstream os;
  os << method_name(method);
  if (method == Method::Twilight) {
    os << " (p " << p << ", base " << base_name(base);
    if (gqa == GqaMode::Group && combine != GroupCombine::Mean) os << ", combine " << combine_name(combine);
    if (guard != Guard::Off) os << ", guard " << guard_name(guard) << " at " << guard_frac << " (1 - p)";
    if (guard == Guard::Widen) os << ", widen max " << widen_max;
    if (margin > 0.f) os << ", margin " << margin;
    os << ")";
  }
  if (method != Method::Dense) {
    if (!(method == Method::Twilight && base == Base::None))  // no selector: no B0
      os << ", B0 " << (b0 > 0 ? std::to_string(b0) : std::string("auto (n_ctx/4)"));
    os << ", dense layers < " << skip_layers
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
  est_mass_min.assign(n, 0);
  bound0.assign(n, 0);
  bound.assign(n, 0);
  guard_acts.assign(n, 0);
  added.assign(n, 0);
  true_mass.assign(n, 0);
  true_min.assign(n, 0);
  true_i0.assign(n, 0);
  loss_outside.assign(n, 0);
  loss_allowed.assign(n, 0);
  loss_group.assign(n, 0);
  loss_estimate.assign(n, 0);
  bound_exact.assign(n, 0);
  bound_violations.assign(n, 0);
  bound_slack.assign(n, 0);
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
         << ", \"avg_i1\": " << i1[k] / s << ", \"avg_est_mass\": " << est_mass[k] / s
         << ", \"avg_est_mass_min\": " << est_mass_min[k] / s;
      if (cfg.method == Method::Twilight && cfg.guard != Guard::Off)
        os << ", \"avg_bound0\": " << bound0[k] / s << ", \"avg_bound\": " << bound[k] / s
           << ", \"guard_acts\": " << guard_acts[k] << ", \"avg_added\": " << added[k] / s;
      if (cfg.true_mass)
        os << ", \"avg_true_mass\": " << true_mass[k] / s << ", \"avg_true_min\": " << true_min[k] / s
           << ", \"avg_true_i0\": " << true_i0[k] / s << ", \"avg_loss_outside\": " << loss_outside[k] / s
           << ", \"avg_loss_allowed\": " << loss_allowed[k] / s << ", \"avg_loss_group\": " << loss_group[k] / s
           << ", \"avg_loss_estimate\": " << loss_estimate[k] / s << ", \"avg_bound_exact\": " << bound_exact[k] / s
           << ", \"bound_violations\": " << bound_violations[k] << ", \"avg_bound_slack\": " << bound_slack[k] / s;
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
    ds_file_ = cfg_.ds_file;
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
  TW_CHECK(!cfg.uses_ds() || cfg.ds_file == ds_file_, "attention policy: cannot switch to ds with channel file '",
           cfg.ds_file, "': the label cache was built from '", ds_file_, "'");
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
  const int64_t n_pages = (n_ctx + kv::kPageSize - 1) / kv::kPageSize;
  // Per-query-head page bounds, for the guard (and the debug mode's exact bound). Base None proposes
  // the whole context: nothing lies outside I0.
  const bool guard = cfg_.method == Method::Twilight && cfg_.guard != Guard::Off && level1 != Base::None;
  if (guard || (cfg_.true_mass && side_)) {
    page_bounds_.resize((size_t)hs_.n_heads * n_pages);
    quest_page_upper_bounds(*side_, seq, layer, hs_, q, n_ctx, page_bounds_.data(), &tp);
  }
  if (cfg_.method == Method::Twilight) {
    PruneOptions po;
    po.p = cfg_.p;
    po.min_tokens = cfg_.min_tokens;
    po.max_tokens = cfg_.max_tokens;
    po.combine = cfg_.combine;
    po.guard = guard ? cfg_.guard : Guard::Off;
    po.guard_frac = cfg_.guard_frac;
    po.widen_max = cfg_.widen_max;
    po.margin = cfg_.margin;
    const PageBounds pb = guard ? PageBounds{page_bounds_.data(), n_pages} : PageBounds{};
    prune_topp(*side_, seq, layer, hs_, q, sel0_, n_ctx, po, pb, sel1_, pst_, tp);
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
    if (cfg_.method == Method::Twilight) {
      const PruneStats& ps = pst_[i];
      stats_.est_mass[k] += ps.est_mass_kept;
      stats_.est_mass_min[k] += ps.est_mass_min;
      stats_.bound0[k] += ps.outside_bound0;
      stats_.bound[k] += ps.outside_bound;
      stats_.guard_acts[k] += ps.action != 0;
      stats_.added[k] += (double)ps.n_added;
    }
  }
  if (cfg_.true_mass) record(layer, n_ctx, pool, seq, q, tp);
}

// Debug: exact weights of every query head over the whole context, and the split of the mass lost
// into its causes (policy.h, BudgetStats). Slow (double precision, scalar): analysis only.
void AttentionPolicy::record(int layer, int64_t n_ctx, const kv::KVPool& pool, const kv::SeqPages& seq, const float* q,
                             ThreadPool& tp) {
  const Selection& sel = cfg_.method == Method::Twilight ? sel1_ : sel0_;
  const int d = hs_.head_dim, G = hs_.n_heads / hs_.n_kv_heads;
  const int64_t n_pages = (n_ctx + kv::kPageSize - 1) / kv::kPageSize;
  const bool twilight = cfg_.method == Method::Twilight;
  // Without side structures (streaming / top-k alone) there is no estimate or bound to judge: those
  // parts are reported as 0 (Eh = Eg = 1, bound 1).
  const bool side = side_ != nullptr;
  const Int4Keys k4 = side ? int4_keys(*side_) : Int4Keys{};
  tp.parallel_for(sel.n_lists, [&](int64_t b, int64_t e, int) {
    std::vector<double> w(n_ctx);
    std::vector<float> zx, ze;
    std::vector<char> kept(n_ctx), in0(n_ctx);
    std::vector<int32_t> t0;
    for (int64_t li = b; li < e; ++li) {
      const int i = (int)li;
      std::fill(kept.begin(), kept.end(), 0);
      std::fill(in0.begin(), in0.end(), 0);
      for (int64_t j = 0; j < sel.size(i); ++j) kept[sel.list(i)[j]] = 1;
      kept[n_ctx - 1] = 1;
      for (int64_t j = 0; j < sel0_.size(i); ++j) in0[sel0_.list(i)[j]] = 1;
      in0[n_ctx - 1] = 1;
      t0.clear();
      for (int64_t t = 0; t < n_ctx; ++t)
        if (in0[t]) t0.push_back((int32_t)t);
      const int64_t m0 = (int64_t)t0.size();
      const int h0 = sel.mode == GqaMode::Group ? i * G : i, h1 = sel.mode == GqaMode::Group ? h0 + G : i + 1;
      const size_t k = stats_.at(layer, i);
      const double eg = twilight ? pst_[i].est_mass_kept : 1.0;
      double slack = 0, mass = 0, mass_min = INFINITY, mass_i0 = 0, l_out = 0, l_allowed = 0, l_group = 0, l_est = 0, bnd = 0;
      for (int hq = h0; hq < h1; ++hq) {
        const int kvh = hq / G;
        double mx = -INFINITY;
        for (int64_t t = 0; t < n_ctx; ++t) {
          const uint16_t* kp = pool.k_page(layer, seq.pages[t / kv::kPageSize], kvh) + (t % kv::kPageSize) * d;
          double s = 0;
          for (int x = 0; x < d; ++x) s += (double)q[hq * d + x] * fp16_to_fp32(kp[x]);
          w[t] = s / std::sqrt((double)d);
          mx = std::max(mx, w[t]);
        }
        // The exact bound on the mass outside I0' (z exact), before w becomes the weights.
        zx.resize(m0);
        for (int64_t j = 0; j < m0; ++j) zx[j] = (float)w[t0[j]];
        const float* uh = side ? page_bounds_.data() + (size_t)hq * n_pages : nullptr;
        const double be = side ? outside_bound(zx.data(), t0.data(), m0, uh, n_ctx, 1.f / std::sqrt((float)d)) : 1.0;
        double slack_sum = 0;
        for (int64_t lp = 0; lp < n_pages && side; ++lp) {
          double best = -INFINITY;
          for (int64_t t = lp * kv::kPageSize; t < std::min<int64_t>(n_ctx, (lp + 1) * kv::kPageSize); ++t)
            best = std::max(best, w[t]);
          slack_sum += uh[lp] / std::sqrt((double)d) - best;
        }
        slack += slack_sum / n_pages / (h1 - h0);
        double z = 0;
        for (int64_t t = 0; t < n_ctx; ++t) z += (w[t] = std::exp(w[t] - mx));
        double w1 = 0, w0 = 0, w10 = 0;
        for (int64_t t = 0; t < n_ctx; ++t) {
          w[t] /= z;
          if (kept[t]) w1 += w[t];
          if (in0[t]) w0 += w[t];
          if (kept[t] && in0[t]) w10 += w[t];
        }
        // The head's own INT4 estimate over I0', and its weight of I1.
        double eh = 1.0;
        if (side) {
          ze.resize(m0);
          estimate_scores(k4, seq, layer, kvh, d, q + (size_t)hq * d, 1, t0.data(), m0, ze.data());
          double emx = -INFINITY, es = 0, e1 = 0;
          for (int64_t j = 0; j < m0; ++j) emx = std::max(emx, (double)ze[j]);
          for (int64_t j = 0; j < m0; ++j) {
            const double x = std::exp((double)ze[j] - emx);
            es += x;
            if (kept[t0[j]]) e1 += x;
          }
          eh = e1 / es;
        }
        const double cond = w0 > 0 ? w10 / w0 : 0.0;
        mass += w1;
        mass_min = std::min(mass_min, w1);
        mass_i0 += w0;
        l_out += 1 - w0;
        l_allowed += w0 * (1 - eg);
        l_group += w0 * (eg - eh);
        l_est += w0 * (eh - cond);
        bnd = std::max(bnd, be);
        if (be < 1 - w0 - 1e-6) ++stats_.bound_violations[k];
      }
      const double nh = h1 - h0;
      stats_.true_mass[k] += mass / nh;
      stats_.true_min[k] += mass_min;
      stats_.true_i0[k] += mass_i0 / nh;
      stats_.loss_outside[k] += l_out / nh;
      stats_.loss_allowed[k] += l_allowed / nh;
      stats_.loss_group[k] += l_group / nh;
      stats_.loss_estimate[k] += l_est / nh;
      stats_.bound_exact[k] += bnd;
      stats_.bound_slack[k] += slack;
    }
  });
}

}  // namespace tw::attn
