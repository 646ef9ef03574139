// The per-layer decode attention policy: configuration -> which attention each decode step runs
// (dense, a fixed-budget selector, or Twilight = selector + top-p pruner + sparse attention), the
// side structures it needs kept up to date on every append, and the budgets it records.
// Prefill stays dense (as published); only decode steps are sparse.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attention/dense_cpu.h"
#include "attention/ds_side.h"
#include "attention/key_side.h"
#include "attention/pruner.h"
#include "attention/sparse_types.h"
#include "common/threadpool.h"
#include "kv/kv_cache.h"

namespace tw::attn {

enum class Method { Dense, Quest, Streaming, TopK, Twilight, DS };
enum class Base { None, Quest, Streaming, TopK, DS };

const char* method_name(Method m);
const char* base_name(Base b);
Method parse_method(const std::string& s);  // dense|quest|ds|streaming|topk|twilight; tw::Error otherwise
Base parse_base(const std::string& s);      // none|quest|streaming|topk|ds

struct AttnConfig {
  Method method = Method::Dense;
  Base base = Base::Quest;         // Twilight's level 1
  float p = 0.95f;                 // Twilight's top-p, in (0, 1]
  int64_t b0 = 0;                  // selector budget in tokens; 0 = auto: max(256, n_ctx / 4)
  int skip_layers = 2;             // layers [0, skip_layers) stay dense
  GqaMode gqa = GqaMode::Group;
  int64_t min_tokens = 0;          // pruner floor (0 = none)
  int64_t max_tokens = 0;          // pruner cap (0 = none)
  int64_t sinks = 4;               // StreamingLLM sinks
  int64_t dense_below = 1024;      // contexts shorter than this stay dense (sparsity does not pay)
  bool true_mass = false;          // debug: also compute the true attention mass kept (exact weights)
  std::string ds_file;             // Double Sparsity channel file (twilight calibrate); needed by ds
  // Twilight's honesty about the mass it keeps (pruner.h, TWILIGHT.md 4.5):
  GroupCombine combine = GroupCombine::Mean;  // group mode: average the heads' weights, or unite their top-p sets
  Guard guard = Guard::Off;        // bound on the mass outside I0 (Quest page bounds) and what to do about it
  float guard_frac = 1.f;          // the guard acts when a head's bound > guard_frac * (1 - p)
  float widen_max = 0.5f;          // Widen: beyond this fraction of the context take all of it as I0
  float margin = 0.f;              // estimate-error margin of the pruner (pruner.h), 0 = off

  void validate() const;           // tw::Error naming the bad value
  std::string describe() const;    // one line for logs
  int64_t budget(int64_t n_ctx) const { return b0 > 0 ? b0 : std::max<int64_t>(256, n_ctx / 4); }
  bool uses_ds() const { return method == Method::DS || (method == Method::Twilight && base == Base::DS); }
};

// Read "key = value" lines (# comments) into cfg; keys: attn, attn-p, attn-base, attn-b0,
// attn-skip-layers, attn-gqa (group|head), attn-min-tokens, attn-max-tokens, attn-sinks,
// attn-dense-below, attn-true-mass (0|1), attn-ds-file, attn-combine (mean|union), attn-guard
// (off|report|widen|all|dense), attn-guard-frac, attn-widen-max, attn-margin. Unknown keys and bad values
// are errors naming file and line.
void load_attn_config(const std::string& path, AttnConfig& cfg);
// Apply one key/value (the CLI flags and the config file share this).
void set_attn_option(AttnConfig& cfg, const std::string& key, const std::string& value);

// Budgets per (layer, list): list = kv head (Group mode) or query head (Head mode). Sums over the
// decode steps that ran sparse at that layer; averages are sum / steps.
struct BudgetStats {
  int n_layers = 0, n_lists = 0;
  std::vector<int64_t> steps;       // (n_layers * n_lists)
  std::vector<double> ctx;          // sum of n_ctx
  std::vector<double> i0;           // sum of |I0| (selector output; = n_ctx without selector)
  std::vector<double> i1;           // sum of |I1| (tokens attended)
  std::vector<double> est_mass;     // sum of estimated mass kept (Twilight)
  std::vector<double> est_mass_min; // sum of the estimated mass kept by the list's least-served head
  // Guard (Twilight with a guard): bound U / (S + U) on the mass outside I0, max over the list's heads.
  std::vector<double> bound0;       // sum of the bound for the selector's I0
  std::vector<double> bound;        // sum of the bound for the final I0 (after widening)
  std::vector<int64_t> guard_acts;  // steps where the guard widened I0 / took all / went dense
  std::vector<double> added;        // sum of candidates the guard added
  // Debug (true_mass): exact weights W over the whole context, per query head, averaged over the
  // list's heads unless said otherwise. I0' = the selector's I0 plus the current token.
  std::vector<double> true_mass;    // sum of W(I1), the true mass kept
  std::vector<double> true_min;     // sum of min over the list's heads of W(I1)
  std::vector<double> true_i0;      // sum of W(I0')
  // The loss 1 - W(I1) split into four parts that add up (per head, when I1 is inside I0'):
  //   outside   1 - W(I0')                      mass the selector never proposed       (cause a)
  //   allowed   W(I0') (1 - Eg)                 what top-p gives up by design (Eg = list's est. mass)
  //   group     W(I0') (Eg - Eh)                the head's estimated mass below the group's (cause c)
  //   estimate  W(I0') (Eh - W(I1)/W(I0'))      INT4 estimate vs truth inside I0'       (cause b)
  // with Eh = the head's own INT4-estimated weight of I1, normalised over I0'.
  std::vector<double> loss_outside, loss_allowed, loss_group, loss_estimate;
  std::vector<double> bound_exact;  // sum of the guard bound with exact z over I0' (max over heads)
  std::vector<int64_t> bound_violations;  // heads where that bound < 1 - W(I0') (must stay 0)
  std::vector<double> bound_slack;  // sum of the mean over pages of u_p / sqrt(d) - the page's best score (nats)
  std::vector<int64_t> dense_steps; // (n_layers) decode steps that ran dense at this layer
  size_t at(int l, int i) const { return (size_t)l * n_lists + i; }
  void reset(int layers, int lists);
  std::string json(const AttnConfig& cfg) const;
};

class AttentionPolicy {
 public:
  // With ds, reads cfg.ds_file and checks it was calibrated for this model (shape, and the
  // fingerprint when model_fingerprint is given: Model::fingerprint()); tw::Error otherwise.
  AttentionPolicy(const AttnConfig& cfg, const kv::KVShape& kv, const HeadShape& hs,
                  const std::string& model_fingerprint = {});

  const AttnConfig& config() const { return cfg_; }
  bool needs_side() const { return side_ != nullptr; }
  // Whether a policy with this configuration keeps side structures (Quest bounds / INT4 mirror).
  static bool config_needs_side(const AttnConfig& cfg);
  // Switch to another configuration, KEEPING the side structures (they describe the cache, not the
  // configuration): evaluation harnesses prefill once and compare configurations over the same
  // cache. Budget stats are reset. tw::Error when cfg needs side structures that this policy does
  // not keep (construct it with a configuration that needs them: they are maintained from the
  // first append on, whatever the current method).
  void reconfigure(const AttnConfig& cfg);
  const KeySide* side() const { return side_.get(); }
  // Keep the side structures current: call after pool.write(layer, seq, pos, ...), prefill and decode.
  void on_append(const kv::KVPool& pool, int layer, const kv::SeqPages& seq, int64_t pos);
  // One decode step of one layer: q [H][d] (post-RoPE) over tokens [0, n_ctx); out [H][d].
  void decode(const kv::KVPool& pool, const kv::SeqPages& seq, int layer, const float* q, int64_t n_ctx, float* out,
              ThreadPool& tp);
  // True when this layer at this context runs sparse under the policy.
  bool sparse_at(int layer, int64_t n_ctx) const;

  const BudgetStats& stats() const { return stats_; }
  void reset_stats();

 private:
  void record(int layer, int64_t n_ctx, const kv::KVPool& pool, const kv::SeqPages& seq, const float* q,
              ThreadPool& tp);
  AttnConfig cfg_;
  HeadShape hs_;
  int n_layers_;
  std::unique_ptr<KeySide> side_;
  std::unique_ptr<DsSide> ds_;  // Double Sparsity label cache (ds only)
  std::string ds_file_;          // the channel file ds_ was built from (reconfigure must name the same)
  Selection sel0_, sel1_;
  std::vector<PruneStats> pst_;
  std::vector<float> page_bounds_;  // [H][n_pages] Quest bounds per query head (guard, debug)
  BudgetStats stats_;
};

}  // namespace tw::attn
