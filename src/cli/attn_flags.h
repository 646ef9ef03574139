// The attention flag family shared by every subcommand that runs the model:
//   --attn dense|quest|ds|streaming|topk|twilight  --attn-p P  --attn-base none|quest|streaming|topk|ds
//   --attn-b0 N  --attn-skip-layers N  --attn-gqa group|head  --attn-config FILE  --attn-true-mass
//   --attn-stats FILE (budgets as JSON at the end)  --attn-ds-file FILE (Double Sparsity channels)
// The config file is applied first, then the flags given on the command line override it.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "attention/policy.h"
#include "cli/args.h"

namespace tw::cli {

struct AttnFlags {
  std::string method, p, base, b0, skip, gqa, config, stats_path, ds_file;
  bool true_mass = false;

  void add_to(Args& a);
  // Build the config: the defaults, then the file, then the flags; validated.
  attn::AttnConfig resolve(const attn::AttnConfig& defaults) const;
  attn::AttnConfig resolve(attn::Method default_method) const;  // AttnConfig{} with this method
};

// Budget summary table (stderr) for a finished run.
void print_budgets(const attn::AttentionPolicy& pol);
// Write the budgets JSON to path (atomically: temp file + rename, so no partial file on error).
void write_budgets_json(const attn::AttentionPolicy& pol, const std::string& path);

}  // namespace tw::cli
