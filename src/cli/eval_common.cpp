#include "cli/eval_common.h"

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/error.h"
#include "common/paths.h"

namespace tw::cli {

std::vector<CompareSpec> parse_compare_specs(const std::vector<std::string>& specs) {
  TW_CHECK(!specs.empty(), "give at least one --compare SPEC (e.g. --compare dense --compare \"twilight p=0.95\")");
  std::vector<CompareSpec> out;
  for (const std::string& spec : specs) {
    std::istringstream is(spec);
    std::vector<std::string> words;
    for (std::string w; is >> w;) words.push_back(w);
    TW_CHECK(!words.empty(), "--compare: empty spec");
    CompareSpec cs;
    for (size_t i = 0; i < words.size(); ++i) cs.label += (i ? " " : "") + words[i];
    try {
      for (size_t i = 0; i < words.size(); ++i) {
        const size_t eq = words[i].find('=');
        if (eq == std::string::npos) {
          if (i != 0) fail("'", words[i], "' is not key=value (only the first word may be the method)");
          attn::set_attn_option(cs.cfg, "attn", words[i]);
          continue;
        }
        std::string key = words[i].substr(0, eq);
        const std::string value = words[i].substr(eq + 1);
        if (key.empty() || value.empty()) fail("'", words[i], "' is not key=value");
        if (key.rfind("attn", 0) != 0) key = "attn-" + key;
        attn::set_attn_option(cs.cfg, key, value);
      }
      cs.cfg.validate();
    } catch (const Error& e) {
      fail("--compare \"", spec, "\": ", e.what());
    }
    out.push_back(std::move(cs));
  }
  return out;
}

attn::AttnConfig policy_config_for(const std::vector<CompareSpec>& specs) {
  // Double Sparsity: its label cache comes from one channel file, so every ds spec must name the same;
  // Twilight over ds maintains both the label cache and the key side structures (Quest bounds, INT4).
  const CompareSpec* ds = nullptr;
  for (const CompareSpec& s : specs) {
    if (!s.cfg.uses_ds()) continue;
    TW_CHECK(!ds || ds->cfg.ds_file == s.cfg.ds_file, "--compare: every ds configuration must use the same ds-file ('",
             ds ? ds->cfg.ds_file : "", "' vs '", s.cfg.ds_file, "')");
    ds = &s;
  }
  if (ds) {
    attn::AttnConfig c = ds->cfg;
    c.method = attn::Method::Twilight;
    c.base = attn::Base::DS;
    return c;
  }
  for (const CompareSpec& s : specs)
    if (attn::AttentionPolicy::config_needs_side(s.cfg)) return s.cfg;
  return attn::AttnConfig{};  // dense: nothing to maintain
}

void check_budgets(const std::vector<CompareSpec>& specs, int64_t n_ctx) {
  for (const CompareSpec& s : specs) {
    if (s.cfg.method == attn::Method::Dense || s.cfg.b0 == 0) continue;
    const bool selector = !(s.cfg.method == attn::Method::Twilight && s.cfg.base == attn::Base::None);
    TW_CHECK(!selector || s.cfg.b0 < n_ctx, "--compare \"", s.label, "\": budget b0=", s.cfg.b0,
             " covers the whole context of ", n_ctx, " tokens (it would run dense)");
  }
}

BudgetSummary summarize_budgets(const attn::AttentionPolicy& pol) {
  const attn::BudgetStats& s = pol.stats();
  BudgetSummary b;
  double ctx = 0, i0 = 0, i1 = 0, em = 0;
  int64_t lists = 0;
  for (int l = 0; l < s.n_layers; ++l) {
    b.dense_steps += s.dense_steps[l];
    bool any = false;
    for (int i = 0; i < s.n_lists; ++i) {
      const size_t k = s.at(l, i);
      if (!s.steps[k]) continue;
      any = true;
      ctx += s.ctx[k];
      i0 += s.i0[k];
      i1 += s.i1[k];
      em += s.est_mass[k] / s.steps[k];
      ++lists;
    }
    if (any) {
      ++b.sparse_layers;
      b.sparse_steps += s.steps[s.at(l, 0)];
    }
  }
  if (ctx > 0) {
    b.i0_frac = i0 / ctx;
    b.i1_frac = i1 / ctx;
    b.est_mass = em / (double)lists;
  }
  return b;
}

std::string BudgetSummary::json() const {
  std::ostringstream os;
  os << "{\"sparse_layers\": " << sparse_layers << ", \"sparse_layer_steps\": " << sparse_steps
     << ", \"dense_layer_steps\": " << dense_steps << ", \"i0_frac\": " << i0_frac << ", \"i1_frac\": " << i1_frac
     << ", \"est_mass\": " << est_mass << "}";
  return os.str();
}

std::string read_text_file(const std::string& path, const char* what) {
  TW_CHECK(!path.empty(), "no ", what, " file given (-f FILE)");
  std::error_code ec;
  TW_CHECK(std::filesystem::is_regular_file(path, ec), "cannot read ", what, " file '", path, "' (not a file)");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read ", what, " file '", path, "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail("error reading ", what, " file '", path, "'");
  return ss.str();
}

void check_output_path(const std::string& path) {
  if (path.empty()) return;
  const std::filesystem::path dir = std::filesystem::absolute(path).parent_path();
  std::error_code ec;
  TW_CHECK(std::filesystem::is_directory(dir, ec), "-o ", path, ": folder '", dir.string(), "' does not exist");
  TW_CHECK(!std::filesystem::is_directory(path, ec), "-o ", path, ": is a folder");
}

void write_file_atomic(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream o(tmp, std::ios::binary);
    if (!o) fail("cannot write '", tmp, "'");
    o << content;
    if (!o) fail("error writing '", tmp, "'");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) fail("cannot rename '", tmp, "' to '", path, "': ", ec.message());
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = (unsigned char)s[i];
    if (c < 0x80) {
      if (c == '"' || c == '\\') {
        o += '\\';
        o += (char)c;
      } else if (c < 0x20) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\u%04x", c);
        o += buf;
      } else {
        o += (char)c;
      }
      ++i;
      continue;
    }
    // Copy a well-formed UTF-8 sequence; a broken one (a generation cut mid-character) -> U+FFFD.
    const int len = c >= 0xF0 && c < 0xF8 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 0;
    bool ok = len > 0 && i + len <= s.size();
    for (int k = 1; ok && k < len; ++k) ok = ((unsigned char)s[i + k] & 0xC0) == 0x80;
    if (ok) {
      o.append(s, i, len);
      i += len;
    } else {
      o += "\\ufffd";
      ++i;
    }
  }
  return o;
}

size_t snap_to_word(const std::string& text, size_t off) {
  if (off == 0 || off >= text.size()) return std::min(off, text.size());
  auto space = [](char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; };
  if (space(text[off - 1]) && !space(text[off])) return off;
  while (off < text.size() && !space(text[off])) ++off;
  while (off < text.size() && space(text[off])) ++off;
  return off;
}

double wall_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void print_progress(const char* what, int64_t done, int64_t total, double t0) {
  const double el = wall_s() - t0;
  std::fprintf(stderr, "\r[twilight] %s %lld/%lld tokens, %.1f t/s   ", what, (long long)done, (long long)total,
               el > 0 ? done / el : 0.0);
  if (done == total) std::fputc('\n', stderr);
  std::fflush(stderr);
}

void add_eval_options(Args& a, EvalOptions& o, const char* text_help, const char* compare_help) {
  a.opt({"-m", "--model"}, "FILE", "GGUF model (default: SmolLM2-135M-Instruct from the project cache)", &o.model);
  a.opt({"-f", "--file"}, "FILE", text_help, &o.text_path);
  a.opt({"--offset"}, "CHARS", "start this many bytes into the text (moved on to the next word)", &o.offset, 0,
        (int64_t)1 << 40);
  a.opt({"-c", "--ctx-size"}, "N", "context size in tokens (default: the model's training context)", &o.n_ctx, 0,
        1 << 22);
  a.opt({"-t", "--threads"}, "N", "threads (default: all cores)", &o.threads, 1, 1024);
  a.opt({"-o", "--output"}, "FILE", "write the results as JSON", &o.out_path);
  a.opt({"--compare"}, "SPEC", compare_help, &o.compare);
}

EvalInput check_eval_input(const EvalOptions& o, int64_t budget_ctx, const char* text_what) {
  EvalInput in;
  in.specs = parse_compare_specs(o.compare);
  check_budgets(in.specs, budget_ctx);
  check_output_path(o.out_path);
  in.text = read_text_file(o.text_path, text_what);
  TW_CHECK(o.offset < (int64_t)in.text.size(), "--offset ", o.offset, " is beyond the text (", in.text.size(),
           " bytes)");
  return in;
}

EngineOptions eval_engine_options(const EvalOptions& o, const std::vector<CompareSpec>& specs) {
  EngineOptions eo;
  eo.model_path = o.model.empty() ? require_model(kSmolLM2File) : o.model;
  eo.n_ctx = o.n_ctx;
  eo.threads = o.threads;
  eo.attn = policy_config_for(specs);
  return eo;
}

}  // namespace tw::cli
