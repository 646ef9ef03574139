// twilight needle: needle-in-a-haystack retrieval under several attention configurations that share
// ONE dense prefill.
//
// The haystack is the text (from --offset) cut at a sentence end so that the whole chat prompt
// (template + haystack + needle + question) has at most --length tokens; the needle sentence
// "The special magic number of <city> is <7 digits>." is inserted at the sentence boundary nearest
// to --depth x the haystack's length (in bytes). City and number come from --seed. The prompt minus
// its last token is prefilled densely once; for each configuration the cache is truncated back, the
// last prompt token is fed as a decode step with that configuration's attention (so the first
// answer token already depends on it: stricter than a dense-prefill-then-sparse-decode split) and up
// to --max-new tokens are decoded greedily. Correct = a run of digits in the answer is the number.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <random>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/eval_common.h"
#include "common/error.h"
#include "engine/engine.h"
#include "tokenizer/chat_template.h"

namespace tw::cli {

namespace {

const char* const kCities[] = {"Lisbon",   "Nairobi",  "Osaka",    "Toronto",  "Krakow",  "Valparaiso", "Tbilisi",
                               "Reykjavik", "Hanoi",   "Marseille", "Cordoba", "Bergen",  "Adelaide",   "Cusco",
                               "Tallinn",  "Kampala",  "Seville",  "Winnipeg", "Ljubljana", "Mombasa",  "Porto",
                               "Dundee",   "Quito",    "Trieste",  "Yerevan",  "Halifax", "Bruges",     "Cebu"};

// Byte positions just after each sentence end (".!?" plus closing quotes, then whitespace) in
// text[0, n); position 0 (the start) is included. Common abbreviations are not sentence ends.
std::vector<size_t> sentence_ends(const std::string& text) {
  std::vector<size_t> b{0};
  const size_t n = text.size();
  auto space = [](char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; };
  for (size_t i = 0; i < n; ++i) {
    if (text[i] != '.' && text[i] != '!' && text[i] != '?') continue;
    size_t j = i + 1;
    while (j < n && (text[j] == '"' || text[j] == '\'' || text[j] == ')')) ++j;
    if (j < n && !space(text[j])) continue;
    if (text[i] == '.') {
      size_t w = i;
      while (w > 0 && std::isalpha((unsigned char)text[w - 1])) --w;
      const std::string word = text.substr(w, i - w);
      if (word == "Mr" || word == "Mrs" || word == "Dr" || word == "St" || word == "Messrs") continue;
    }
    b.push_back(j);
  }
  return b;
}

// Some maximal run of digits in the answer (thousands commas inside it dropped) is the number.
// Runs are not concatenated: "802926. The answer is 1" does not contain 8029261.
bool answer_has_number(const std::string& answer, const std::string& number) {
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  std::string run;
  for (size_t i = 0; i <= answer.size(); ++i) {
    const char c = i < answer.size() ? answer[i] : ' ';
    if (digit(c)) {
      run += c;
    } else if (c == ',' && !run.empty() && i + 1 < answer.size() && digit(answer[i + 1])) {
      continue;  // 8,029,261
    } else {
      if (run == number) return true;
      run.clear();
    }
  }
  return false;
}

}  // namespace

int cmd_needle(int argc, char** argv) {
  EvalOptions o;
  int64_t length = 0, max_new = 24;
  float depth = 0.5f;
  uint64_t seed = 1;
  Args a("needle");
  add_eval_options(a, o, "haystack text (UTF-8), e.g. ~/.cache/twilight/data/austen/all.txt",
                   "attention configuration, repeatable: \"dense\", \"quest b0=1024\", \"twilight p=0.95\" "
                   "(keys of --attn-*, with or without 'attn-')");
  a.opt({"--length"}, "N", "prompt length in tokens, template and question included (required)", &length, 64, 1 << 22);
  a.opt({"--depth"}, "D", "needle position as a fraction of the haystack, 0 = start, 1 = end (default 0.5)", &depth,
        0.f, 1.f);
  a.opt({"--seed"}, "N", "picks the city and the 7-digit number (default 1)", &seed);
  a.opt({"--max-new"}, "N", "tokens to decode greedily per configuration (default 24)", &max_new, 1, 4096);
  if (!a.parse(argc, argv, 2)) return 0;
  TW_CHECK(a.given("--length"), "--length N is required");
  const EvalInput in = check_eval_input(o, length, "haystack");
  const std::vector<CompareSpec>& specs = in.specs;
  const std::string& text = in.text;

  const EngineOptions eo = eval_engine_options(o, specs);
  Engine e(eo);
  const ModelConfig& mc = e.model().config();
  TW_CHECK(length + max_new <= e.n_ctx(), "--length ", length, " + --max-new ", max_new,
           " is more than the context of ", e.n_ctx(), " tokens (model trained for ", mc.n_ctx_train,
           "; -c sets the context)");

  std::mt19937_64 rng(seed);
  const std::string city = kCities[rng() % (sizeof kCities / sizeof kCities[0])];
  const std::string number = std::to_string(1000000 + rng() % 9000000);
  const std::string needle = "The special magic number of " + city + " is " + number + ".";
  const std::string question = "What is the special magic number of " + city + "? Answer with the number only.";

  // The prompt for a haystack of text[start, start + hay_len), needle at the boundary nearest depth.
  const size_t start = snap_to_word(text, (size_t)o.offset);
  std::string slice;
  std::vector<size_t> ends;
  size_t needle_at = 0;
  auto build = [&](size_t k) {  // haystack = the first k sentences of the slice
    const size_t hay_len = ends[k];
    const double want = depth * (double)hay_len;
    size_t best = 0;
    for (size_t i = 0; i <= k; ++i)
      if (std::abs((double)ends[i] - want) < std::abs((double)ends[best] - want)) best = i;
    needle_at = ends[best];
    std::string hay = slice.substr(0, hay_len);
    hay.insert(needle_at, needle_at == 0 ? needle + " " : " " + needle);
    const std::vector<ChatMessage> msgs{
        {"user", "Read the text below and answer the question after it.\n\n" + hay + "\n\n" + question}};
    return e.tokenizer().encode(apply_chat_template(e.model().file(), msgs, true), true);
  };
  // Grow the slice until its whole length overflows the target, then binary-search the number of
  // sentences: the largest k whose prompt fits.
  std::vector<int32_t> toks;
  for (size_t len = (size_t)length * 6 + 4096;; len *= 2) {
    slice = text.substr(start, std::min(len, text.size() - start));
    ends = sentence_ends(slice);
    if ((int64_t)build(ends.size() - 1).size() > length) break;
    TW_CHECK(start + len < text.size(), "the text from offset ", start, " is too short for a ", length,
             "-token haystack");
  }
  TW_CHECK((int64_t)build(0).size() <= length, "--length ", length,
           " is too small for the chat template, the needle and the question (", build(0).size(), " tokens)");
  size_t lo = 0, hi = ends.size() - 1;  // build(lo) fits, build(hi) does not
  while (hi - lo > 1) {
    const size_t mid = (lo + hi) / 2;
    ((int64_t)build(mid).size() <= length ? lo : hi) = mid;
  }
  toks = build(lo);
  const size_t hay_len = ends[lo];
  const double depth_actual = hay_len ? (double)needle_at / (double)hay_len : 0.0;
  const int64_t n = (int64_t)toks.size();

  std::fprintf(stderr, "[twilight] %s: needle '%s' at depth %.3f of a %zu-byte haystack, prompt %lld tokens, %zu "
               "configurations, %d threads\n", mc.name.c_str(), needle.c_str(), depth_actual, hay_len, (long long)n,
               specs.size(), e.threads());
  attn::AttnConfig dense;
  e.attention().reconfigure(dense);  // the prefill (a one-token last chunk would be a decode step)
  double t0 = wall_s();
  e.eval(std::vector<int32_t>(toks.begin(), toks.end() - 1), [&](int64_t d, int64_t t) { print_progress("prefill", d, t, t0); });
  const double prefill_s = wall_s() - t0;

  const int V = mc.n_vocab;
  std::ostringstream js;
  js.precision(9);
  js << "{\"model\": \"" << json_escape(mc.name) << "\", \"model_file\": \"" << json_escape(eo.model_path)
     << "\", \"text\": \"" << json_escape(o.text_path) << "\", \"offset\": " << start << ", \"length\": " << length
     << ", \"n_prompt\": " << n << ", \"depth\": " << depth << ", \"depth_actual\": " << depth_actual
     << ", \"seed\": " << seed << ", \"city\": \"" << city << "\", \"number\": \"" << number
     << "\", \"threads\": " << e.threads() << ", \"prefill_s\": " << prefill_s << ", \"runs\": [";
  std::printf("%s: prompt %lld tokens, needle at depth %.3f, number %s\n", mc.name.c_str(), (long long)n, depth_actual,
              number.c_str());
  std::printf("%-34s | %-7s | %8s | %s\n", "config", "correct", "I1 % ctx", "answer");
  for (size_t r = 0; r < specs.size(); ++r) {
    e.truncate(n - 1);
    e.attention().reconfigure(specs[r].cfg);
    std::vector<int32_t> out;
    t0 = wall_s();
    e.eval({toks[n - 1]});
    for (int64_t i = 0; i < max_new; ++i) {
      const float* lg = e.logits();
      const int32_t id = (int32_t)(std::max_element(lg, lg + V) - lg);
      if (e.tokenizer().is_eog(id)) break;
      out.push_back(id);
      if (i + 1 < max_new) e.eval({id});
    }
    const double dec_s = wall_s() - t0;
    const std::string answer = e.tokenizer().decode(out);
    const bool ok = answer_has_number(answer, number);
    const BudgetSummary b = summarize_budgets(e.attention());
    std::string shown = answer;
    std::replace(shown.begin(), shown.end(), '\n', ' ');
    char i1[16] = "-";
    if (b.sparse_steps > 0) std::snprintf(i1, sizeof i1, "%.2f", 100 * b.i1_frac);
    std::printf("%-34s | %-7s | %8s | %s\n", specs[r].label.c_str(), ok ? "yes" : "no", i1, shown.c_str());
    js << (r ? "," : "") << "\n  {\"label\": \"" << json_escape(specs[r].label) << "\", \"attention\": \""
       << json_escape(specs[r].cfg.describe()) << "\", \"answer\": \"" << json_escape(answer)
       << "\", \"correct\": " << (ok ? "true" : "false") << ", \"n_generated\": " << out.size()
       << ", \"decode_s\": " << dec_s << ", \"budget\": " << b.json() << "}";
  }
  js << "\n]}\n";
  std::fflush(stdout);
  if (!o.out_path.empty()) write_file_atomic(o.out_path, js.str());
  return 0;
}

}  // namespace tw::cli
