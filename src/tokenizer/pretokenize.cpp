#include "tokenizer/pretokenize.h"

#include "common/error.h"
#include "tokenizer/unicode.h"

namespace tw {

namespace {

using unicode::kLetter;
using unicode::kNumber;
using unicode::kSpace;
constexpr uint8_t kInRange = 8;  // set for every position inside the piece: "is a code point at all"

// Emits piece lengths while a matcher walks [ini, end). Mirrors llama.cpp's _add_token.
struct Emitter {
  std::vector<uint32_t>& out;
  size_t prev;
  void add(size_t end) {
    if (end > prev) out.push_back(static_cast<uint32_t>(end - prev));
    prev = end;
  }
};

// GPT-2 regex  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// on cpts[ini, end), as llama.cpp's unicode_regex_split_custom_gpt2 (contractions case-sensitive).
void split_gpt2(const uint32_t* c, size_t ini, size_t end, std::vector<uint32_t>& out) {
  auto cls = [&](size_t p) -> uint8_t { return p < end ? (unicode::cpt_class(c[p]) | kInRange) : 0; };
  auto cpt = [&](size_t p) -> uint32_t { return p < end ? c[p] : 0xFFFFFFFFu; };
  Emitter em{out, ini};
  size_t pos = ini;
  while (pos < end) {
    const uint32_t cp = c[pos];
    const uint8_t f = cls(pos);
    if (cp == '\'' && pos + 1 < end) {
      const uint32_t n1 = cpt(pos + 1);
      if (n1 == 's' || n1 == 't' || n1 == 'm' || n1 == 'd') {
        pos += 2;
        em.add(pos);
        continue;
      }
      if (pos + 2 < end) {
        const uint32_t n2 = cpt(pos + 2);
        if ((n1 == 'r' && n2 == 'e') || (n1 == 'v' && n2 == 'e') || (n1 == 'l' && n2 == 'l')) {
          pos += 3;
          em.add(pos);
          continue;
        }
      }
    }
    const uint8_t f2 = cp == ' ' ? cls(pos + 1) : f;
    if (f2 & kLetter) {  // <space>?\p{L}+
      pos += (cp == ' ');
      while (cls(pos) & kLetter) ++pos;
      em.add(pos);
      continue;
    }
    if (f2 & kNumber) {  // <space>?\p{N}+
      pos += (cp == ' ');
      while (cls(pos) & kNumber) ++pos;
      em.add(pos);
      continue;
    }
    auto other = [](uint8_t fl) { return (fl & kInRange) && !(fl & (kSpace | kLetter | kNumber)); };
    if (other(f2)) {  // <space>?[^\s\p{L}\p{N}]+
      pos += (cp == ' ');
      while (other(cls(pos))) ++pos;
      em.add(pos);
      continue;
    }
    size_t nws = 0;
    while (cls(pos + nws) & kSpace) ++nws;
    if (nws > 1 && pos + nws < end) {  // \s+(?!\S): leave the last space to the next word
      pos += nws - 1;
      em.add(pos);
      continue;
    }
    if (nws > 0) {  // \s+
      pos += nws;
      em.add(pos);
      continue;
    }
    em.add(++pos);  // no alternative matched (not reachable: every code point has a class)
  }
}

// The llama3 family regex
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,D}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//   \s*[\r\n]+|\s+(?!\S)|\s+
// with D = max_digits (3 for llama3, 1 for qwen2). llama.cpp runs qwen2's through std::regex on a
// category-collapsed string and llama3's through a custom matcher; both reduce to this leftmost-
// first matcher (ASCII \s is " \t\n\v\f\r" in both, non-ASCII whitespace comes from the table).
void split_llama3(const uint32_t* c, size_t ini, size_t end, int max_digits, std::vector<uint32_t>& out) {
  auto cls = [&](size_t p) -> uint8_t { return p < end ? (unicode::cpt_class(c[p]) | kInRange) : 0; };
  auto cpt = [&](size_t p) -> uint32_t { return p < end ? c[p] : 0xFFFFFFFFu; };
  auto lower = [](uint32_t x) { return (x >= 'A' && x <= 'Z') ? x + 32 : x; };
  auto other = [](uint8_t fl) { return (fl & kInRange) && !(fl & (kSpace | kLetter | kNumber)); };
  Emitter em{out, ini};
  size_t pos = ini;
  while (pos < end) {
    const uint32_t cp = c[pos];
    const uint8_t f = cls(pos);
    if (cp == '\'' && pos + 1 < end) {  // contractions, case-insensitive
      const uint32_t n1 = lower(cpt(pos + 1));
      if (n1 == 's' || n1 == 't' || n1 == 'm' || n1 == 'd') {
        pos += 2;
        em.add(pos);
        continue;
      }
      if (pos + 2 < end) {
        const uint32_t n2 = lower(cpt(pos + 2));
        if ((n1 == 'r' && n2 == 'e') || (n1 == 'v' && n2 == 'e') || (n1 == 'l' && n2 == 'l')) {
          pos += 3;
          em.add(pos);
          continue;
        }
      }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (!(cp == '\r' || cp == '\n' || (f & kNumber)) && ((f & kLetter) || (cls(pos + 1) & kLetter))) {
      ++pos;
      while (cls(pos) & kLetter) ++pos;
      em.add(pos);
      continue;
    }
    if (f & kNumber) {  // \p{N}{1,D}
      size_t start = pos;
      while (cls(pos) & kNumber) {
        ++pos;
        if (pos - start >= static_cast<size_t>(max_digits)) {
          em.add(pos);
          start = pos;
        }
      }
      em.add(pos);
      continue;
    }
    const uint8_t f2 = cp == ' ' ? cls(pos + 1) : f;
    if (other(f2)) {  // <space>?[^\s\p{L}\p{N}]+[\r\n]*
      pos += (cp == ' ');
      while (other(cls(pos))) ++pos;
      while (cpt(pos) == '\r' || cpt(pos) == '\n') ++pos;
      em.add(pos);
      continue;
    }
    size_t nws = 0;
    size_t last_nl_end = 0;
    while (cls(pos + nws) & kSpace) {
      const uint32_t w = cpt(pos + nws);
      if (w == '\r' || w == '\n') last_nl_end = pos + nws + 1;
      ++nws;
    }
    if (last_nl_end > 0) {  // \s*[\r\n]+ : greedy \s* backs off to the last newline of the run
      pos = last_nl_end;
      em.add(pos);
      continue;
    }
    if (nws > 1 && pos + nws < end) {  // \s+(?!\S)
      pos += nws - 1;
      em.add(pos);
      continue;
    }
    if (nws > 0) {  // \s+
      pos += nws;
      em.add(pos);
      continue;
    }
    em.add(++pos);  // not reachable: every code point matches some alternative
  }
}

}  // namespace

PreType pre_type_from_name(std::string_view name) {
  if (name == "smollm" || name == "starcoder" || name == "refact") return PreType::SmolLM;
  if (name == "qwen2" || name == "deepseek-r1-qwen") return PreType::Qwen2;
  if (name == "llama3" || name == "llama-v3" || name == "llama-bpe") return PreType::Llama3;
  if (name == "gpt-2" || name == "gpt2") return PreType::Gpt2;
  fail("unsupported tokenizer.ggml.pre '", name, "' (supported: smollm, starcoder, refact, qwen2, ",
       "deepseek-r1-qwen, llama-bpe, llama3, gpt-2)");
}

const char* pre_type_name(PreType t) {
  switch (t) {
    case PreType::Gpt2: return "gpt-2";
    case PreType::SmolLM: return "smollm";
    case PreType::Qwen2: return "qwen2";
    case PreType::Llama3: return "llama-bpe";
  }
  return "?";
}

std::vector<uint32_t> pretokenize(PreType type, const std::vector<uint32_t>& cpts) {
  std::vector<uint32_t> out;
  const uint32_t* c = cpts.data();
  const size_t n = cpts.size();
  switch (type) {
    case PreType::Gpt2:
      split_gpt2(c, 0, n, out);
      break;
    case PreType::SmolLM: {
      // Stage 1 (\p{N}): every number code point is its own piece; stage 2 runs GPT-2 on the rest.
      size_t start = 0;
      for (size_t i = 0; i < n; ++i) {
        if (unicode::is_number(c[i])) {
          split_gpt2(c, start, i, out);
          out.push_back(1);
          start = i + 1;
        }
      }
      split_gpt2(c, start, n, out);
      break;
    }
    case PreType::Qwen2:
      split_llama3(c, 0, n, 1, out);
      break;
    case PreType::Llama3:
      split_llama3(c, 0, n, 3, out);
      break;
  }
  return out;
}

}  // namespace tw
