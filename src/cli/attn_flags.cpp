#include "cli/attn_flags.h"

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "common/error.h"

namespace tw::cli {

void AttnFlags::add_to(Args& a) {
  a.opt({"--attn"}, "KIND", "decode attention: dense|quest|ds|streaming|topk|twilight (generate's default: twilight, p 0.95, base none, combine union; bench: dense)", &method);
  a.opt({"--attn-p"}, "P", "Twilight top-p mass in (0, 1] (default 0.95)", &p);
  a.opt({"--attn-base"}, "SEL", "Twilight's selector: none|quest|streaming|topk|ds (default quest; none in generate's default)", &base);
  a.opt({"--attn-b0"}, "N", "selector budget in tokens (default 0 = n_ctx/4, at least 256)", &b0);
  a.opt({"--attn-skip-layers"}, "N", "first N layers stay dense (default 2)", &skip);
  a.opt({"--attn-gqa"}, "MODE", "group (one list per kv head, default) | head", &gqa);
  a.opt({"--attn-config"}, "FILE", "attention options as 'key = value' lines (attn, attn-p, ...)", &config);
  a.flag({"--attn-true-mass"}, "debug: also measure the true attention mass kept (exact weights; slow)", &true_mass);
  a.opt({"--attn-stats"}, "FILE", "write per layer / head budgets as JSON at the end", &stats_path);
  a.opt({"--attn-ds-file"}, "FILE", "Double Sparsity channel file for ds (from twilight calibrate)", &ds_file);
}

attn::AttnConfig AttnFlags::resolve(attn::Method default_method) const {
  attn::AttnConfig c;
  c.method = default_method;
  return resolve(c);
}

attn::AttnConfig AttnFlags::resolve(const attn::AttnConfig& defaults) const {
  attn::AttnConfig c = defaults;
  if (!config.empty()) attn::load_attn_config(config, c);
  const std::pair<const char*, const std::string*> kv[] = {{"attn", &method},           {"attn-p", &p},
                                                           {"attn-base", &base},        {"attn-b0", &b0},
                                                           {"attn-skip-layers", &skip}, {"attn-gqa", &gqa},
                                                           {"attn-ds-file", &ds_file}};
  for (const auto& [key, val] : kv)
    if (!val->empty()) attn::set_attn_option(c, key, *val);
  if (true_mass) c.true_mass = true;
  c.validate();
  return c;
}

void print_budgets(const attn::AttentionPolicy& pol) {
  const attn::BudgetStats& s = pol.stats();
  const attn::AttnConfig& c = pol.config();
  if (c.method == attn::Method::Dense) return;
  int64_t sparse_steps = 0;
  for (int64_t x : s.steps) sparse_steps += x;
  if (sparse_steps == 0) {
    std::fprintf(stderr, "[twilight] attention %s: every decode step ran dense (context below %lld tokens or budget "
                 "covering it)\n", c.describe().c_str(), (long long)c.dense_below);
    return;
  }
  std::fprintf(stderr, "[twilight] attention budgets (%s), averages over decode steps, per layer over %s:\n",
               c.describe().c_str(), c.gqa == attn::GqaMode::Group ? "kv heads" : "query heads");
  std::fprintf(stderr, "  layer | steps | avg ctx | |I0| %% ctx | |I1| %% ctx | |I1| tokens (min..max head) | est mass%s\n",
               c.true_mass ? " | true mass" : "");
  double tot_ctx = 0, tot_i1 = 0;
  for (int l = 0; l < s.n_layers; ++l) {
    int64_t steps = 0;
    double ctx = 0, i0 = 0, i1 = 0, em = 0, tm = 0, mn = 1e300, mx = 0;
    for (int i = 0; i < s.n_lists; ++i) {
      const size_t k = s.at(l, i);
      if (!s.steps[k]) continue;
      steps = s.steps[k];
      ctx += s.ctx[k] / steps;
      i0 += s.i0[k] / steps;
      i1 += s.i1[k] / steps;
      em += s.est_mass[k] / steps;
      tm += s.true_mass[k] / steps;
      mn = std::min(mn, s.i1[k] / steps);
      mx = std::max(mx, s.i1[k] / steps);
    }
    if (!steps) {
      std::fprintf(stderr, "  %5d | dense (%lld steps)\n", l, (long long)s.dense_steps[l]);
      continue;
    }
    const double n = s.n_lists;
    tot_ctx += ctx / n;
    tot_i1 += i1 / n;
    std::fprintf(stderr, "  %5d | %5lld | %7.0f | %9.1f%% | %9.2f%% | %8.0f (%.0f..%.0f) | ", l, (long long)steps, ctx / n,
                 100 * i0 / ctx, 100 * i1 / ctx, i1 / n, mn, mx);
    if (c.method == attn::Method::Twilight)
      std::fprintf(stderr, "%.3f", em / n);
    else
      std::fprintf(stderr, "  -  ");
    if (c.true_mass) std::fprintf(stderr, " | %.3f", tm / n);
    std::fputc('\n', stderr);
  }
  if (tot_ctx > 0)
    std::fprintf(stderr, "  sparse layers attend %.2f%% of the context on average\n", 100 * tot_i1 / tot_ctx);
}

void write_budgets_json(const attn::AttentionPolicy& pol, const std::string& path) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream o(tmp);
    if (!o) fail("cannot write '", tmp, "'");
    o << pol.stats().json(pol.config());
    if (!o) fail("error writing '", tmp, "'");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) fail("cannot rename '", tmp, "' to '", path, "': ", ec.message());
}

}  // namespace tw::cli
