// Shared pieces of the accuracy harnesses (`twilight perplexity`, `twilight needle`): the
// --compare specs, the engine set up so one prefill serves every compared configuration, budget
// summaries, and small file / JSON helpers.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "attention/policy.h"
#include "cli/args.h"
#include "engine/engine.h"

namespace tw::cli {

// The options every accuracy harness takes: model, text, where in it to start, context, threads,
// JSON output and the --compare configurations.
struct EvalOptions {
  std::string model, text_path, out_path;
  std::vector<std::string> compare;
  int64_t offset = 0, n_ctx = 0;
  int threads = 0;
};
// Registers -m, -f, --offset, -c, -t, -o and --compare; text_help / compare_help describe -f / --compare.
void add_eval_options(Args& a, EvalOptions& o, const char* text_help, const char* compare_help);

// One --compare value: a method word and/or key=value attention options, e.g. "dense",
// "quest b0=1024", "twilight p=0.95", "twilight p=1 attn-base=none". Keys are those of
// attn::set_attn_option with or without the "attn-" prefix (p, b0, base, skip-layers, gqa, ...).
struct CompareSpec {
  std::string label;     // the spec as given (whitespace normalised)
  attn::AttnConfig cfg;  // validated
};

// Parse every spec (tw::Error naming the spec and the bad part); at least one is required.
std::vector<CompareSpec> parse_compare_specs(const std::vector<std::string>& specs);

// The configuration to build the engine's policy with, so that it maintains the side structures
// whenever any compared configuration needs them (AttentionPolicy::reconfigure switches later).
attn::AttnConfig policy_config_for(const std::vector<CompareSpec>& specs);

// Error when a spec's fixed budget B0 covers a context of n tokens (it would silently run dense).
void check_budgets(const std::vector<CompareSpec>& specs, int64_t n_ctx);

// The engine for an evaluation: the model (default SmolLM2 from the project cache), context,
// threads, and a policy that keeps every side structure the compared configurations need.
EngineOptions eval_engine_options(const EvalOptions& o, const std::vector<CompareSpec>& specs);

// What can be checked before loading the model: the specs (their fixed budgets against a context of
// budget_ctx tokens), the output folder, the text (read here) and the offset into it.
struct EvalInput {
  std::vector<CompareSpec> specs;
  std::string text;
};
EvalInput check_eval_input(const EvalOptions& o, int64_t budget_ctx, const char* text_what);

// Budgets of one run, from the policy's BudgetStats, over the (layer, list) pairs that ran sparse.
struct BudgetSummary {
  int sparse_layers = 0;        // layers with at least one sparse decode step
  int64_t sparse_steps = 0;     // (layer, step) pairs that ran sparse
  int64_t dense_steps = 0;      // (layer, step) pairs that fell back to dense (skip layers, short context)
  double i0_frac = 0;           // sum |I0| / sum context, over sparse (layer, list, step)
  double i1_frac = 0;           // sum |I1| / sum context: the budget
  double est_mass = 0;          // mean estimated mass kept (Twilight)
  std::string json() const;
};
BudgetSummary summarize_budgets(const attn::AttentionPolicy& pol);

std::string read_text_file(const std::string& path, const char* what);
// Error unless path is empty or its folder exists (checked before any work).
void check_output_path(const std::string& path);
void write_file_atomic(const std::string& path, const std::string& content);
std::string json_escape(const std::string& s);
// Byte offset `off` of text moved forward to the start of the next word (after whitespace), so a
// slice never starts inside a word or a UTF-8 sequence. Returns text.size() when there is none.
size_t snap_to_word(const std::string& text, size_t off);
// Prefill progress on stderr ("\r" line), for long evaluations.
void print_progress(const char* what, int64_t done, int64_t total, double t0);
double wall_s();

}  // namespace tw::cli
