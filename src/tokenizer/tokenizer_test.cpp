// Tokenizer tests against llama.cpp's reference output (tests/fixtures/tokenizer/*.json, made by
// scripts/make_tokenizer_fixtures.py from the real SmolLM2 / Qwen2.5 GGUF files), plus a naive BPE
// reference for the merge loop, hand-built vocabularies for error paths, and a speed check.
#include "tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "common/error.h"
#include "common/paths.h"
#include "tokenizer/unicode.h"

using nlohmann::json;

namespace tw {
namespace {

std::string b64decode(const std::string& in) {
  static const std::string chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    if (c == '=') break;
    const size_t v = chars.find(c);
    if (v == std::string::npos) throw std::runtime_error("bad base64");
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return out;
}

json load_fixture(const std::string& name) {
  const std::string path = std::string(TW_SOURCE_DIR) + "/tests/fixtures/tokenizer/" + name;
  std::ifstream f(path);
  if (!f) throw Error("missing fixture " + path + " (run scripts/make_tokenizer_fixtures.py)");
  return json::parse(f);
}

// Strict UTF-8 check (no overlong forms, surrogates or truncation).
bool valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = p[i];
    size_t n = c < 0x80 ? 1 : (c >= 0xC2 && c < 0xE0) ? 2 : (c >= 0xE0 && c < 0xF0) ? 3 : (c >= 0xF0 && c < 0xF5) ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
    for (size_t k = 1; k < n; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
      return false;
    i += n;
  }
  return true;
}

std::string show(const std::string& s) {
  std::ostringstream os;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      os << c;
    } else {
      os << "\\x" << std::hex << int(c) << std::dec;
    }
  }
  return os.str();
}

std::string show(const std::vector<int32_t>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
  os << "]";
  return os.str();
}

struct Loaded {
  gguf::File file;
  Tokenizer tok;
};

// One mapped GGUF + tokenizer per model for the whole test binary (loading takes ~0.3 s).
const Loaded& model(const char* file_name) {
  static std::map<std::string, std::unique_ptr<Loaded>> cache;
  auto& slot = cache[file_name];
  if (!slot) {
    gguf::File f = gguf::File::open(require_model(file_name));
    Tokenizer t = Tokenizer::from_gguf(f);
    slot = std::make_unique<Loaded>(Loaded{std::move(f), std::move(t)});
  }
  return *slot;
}

// Compare every fixture text, both parse_special modes.
void check_encode(const Tokenizer& tok, const json& fx) {
  int checked = 0, failures = 0;
  for (const json& c : fx["texts"]) {
    const std::string text = b64decode(c["text"]);
    for (bool special : {true, false}) {
      const auto want = c[special ? "special" : "plain"].get<std::vector<int32_t>>();
      const auto got = tok.encode(text, special);
      ++checked;
      if (got != want && ++failures <= 10)
        ADD_FAILURE() << fx["model"] << " special=" << special << " text '" << show(text).substr(0, 200)
                      << "'\n  want " << show(want) << "\n  got  " << show(got);
    }
  }
  EXPECT_EQ(failures, 0) << "of " << checked;
  EXPECT_GT(checked, 300);
}

TEST(Tokenizer, SmolLM2MatchesLlamaCpp) {
  const json fx = load_fixture("smollm2.json");
  const Tokenizer& tok = model(kSmolLM2File).tok;
  EXPECT_EQ(tok.pre_type(), PreType::SmolLM);
  check_encode(tok, fx);
}

TEST(Tokenizer, Qwen25MatchesLlamaCpp) {
  const json fx = load_fixture("qwen25.json");
  const Tokenizer& tok = model(kQwen15File).tok;
  EXPECT_EQ(tok.pre_type(), PreType::Qwen2);
  check_encode(tok, fx);
}

// The gpt-2 and llama-bpe pre-tokenizers, run by llama.cpp on a copy of the SmolLM2 vocabulary
// whose tokenizer.ggml.pre was rewritten.
TEST(Tokenizer, Gpt2PreMatchesLlamaCpp) {
  const json fx = load_fixture("gpt2.json");
  const Tokenizer tok = Tokenizer::from_gguf(model(kSmolLM2File).file, "gpt-2");
  EXPECT_EQ(tok.pre_type(), PreType::Gpt2);
  check_encode(tok, fx);
}

TEST(Tokenizer, LlamaBpePreMatchesLlamaCpp) {
  const json fx = load_fixture("llama_bpe.json");
  const Tokenizer tok = Tokenizer::from_gguf(model(kSmolLM2File).file, "llama-bpe");
  EXPECT_EQ(tok.pre_type(), PreType::Llama3);
  check_encode(tok, fx);
}

void check_meta(const Tokenizer& tok, const json& fx) {
  EXPECT_EQ(tok.n_vocab(), fx["n_vocab"].get<int32_t>());
  EXPECT_EQ(tok.bos(), fx["bos"].get<int32_t>());
  EXPECT_EQ(tok.eos(), fx["eos"].get<int32_t>());
  const auto eog = fx["eog"].get<std::vector<int32_t>>();
  EXPECT_EQ(tok.eog_ids(), eog);
  for (int32_t id = 0; id < tok.n_vocab(); ++id) {
    const bool want = std::binary_search(eog.begin(), eog.end(), id);
    ASSERT_EQ(tok.is_eog(id), want) << "id " << id;
  }
  EXPECT_FALSE(tok.is_eog(-1));
  EXPECT_FALSE(tok.is_eog(tok.n_vocab()));
  int n = 0;
  for (const auto& [id, p] : fx["pieces"].items()) {
    ASSERT_EQ(tok.token_to_piece(std::stoi(id)), b64decode(p.get<std::string>())) << "id " << id;
    ++n;
  }
  EXPECT_GT(n, 900);
}

TEST(Tokenizer, SmolLM2MetadataAndPieces) {
  const Tokenizer& tok = model(kSmolLM2File).tok;
  check_meta(tok, load_fixture("smollm2.json"));
  EXPECT_FALSE(tok.add_bos());
}

TEST(Tokenizer, Qwen25MetadataAndPieces) {
  const Tokenizer& tok = model(kQwen15File).tok;
  check_meta(tok, load_fixture("qwen25.json"));
  EXPECT_FALSE(tok.add_bos());
  EXPECT_TRUE(tok.is_eog(tok.eos()));
}

// decode(encode(x)) == x for valid UTF-8, with and without special-token parsing. Otherwise the
// text comes back as llama.cpp reads it: invalid bytes as U+FFFD, overlong forms and surrogates
// decoded and re-encoded.
std::string llama_normalized(std::string_view s) {
  std::string out;
  for (uint32_t cp : unicode::decode_utf8(s)) unicode::append_utf8(out, cp);
  return out;
}

void check_roundtrip(const Tokenizer& tok, const json& fx) {
  int valid = 0, invalid = 0;
  for (const json& c : fx["texts"]) {
    const std::string text = b64decode(c["text"]);
    for (bool special : {true, false}) {
      const std::string back = tok.decode(tok.encode(text, special));
      ASSERT_EQ(back, llama_normalized(text)) << show(text);
      if (valid_utf8(text)) {
        ASSERT_EQ(back, text) << show(text);
        ++valid;
      } else {  // e.g. "a\xffb" -> "a\uFFFDb"; a lone surrogate passes through, as in llama.cpp
        ++invalid;
      }
    }
  }
  EXPECT_GT(valid, 300);
  EXPECT_EQ(invalid, 16);  // the 8 invalid-UTF-8 fixture texts, twice
}

TEST(Tokenizer, RoundTrip) {
  check_roundtrip(model(kSmolLM2File).tok, load_fixture("smollm2.json"));
  check_roundtrip(model(kQwen15File).tok, load_fixture("qwen25.json"));
}

TEST(Tokenizer, DecodeWithoutSpecial) {
  const Tokenizer& tok = model(kQwen15File).tok;
  const auto ids = tok.encode("<|im_start|>user\nhi<|im_end|>", true);
  ASSERT_EQ(ids.front(), 151644);
  EXPECT_TRUE(tok.is_control(ids.front()));
  EXPECT_EQ(tok.decode(ids, false), "user\nhi");
  EXPECT_EQ(tok.decode(ids, true), "<|im_start|>user\nhi<|im_end|>");
  EXPECT_THROW(tok.decode({tok.n_vocab()}), Error);
  EXPECT_THROW(tok.token_to_piece(-1), Error);
}

// Streaming: concatenated chunks equal decode(), and no chunk ends inside a UTF-8 character.
void check_stream(const Tokenizer& tok, const json& fx) {
  int split_chars = 0;
  for (const json& c : fx["texts"]) {
    const std::string text = b64decode(c["text"]);
    const auto ids = tok.encode(text, true);
    StreamDecoder sd(tok);
    std::string all;
    for (int32_t id : ids) {
      const std::string chunk = sd.push(id);
      if (valid_utf8(text)) {
        ASSERT_TRUE(valid_utf8(chunk)) << show(text) << " chunk " << show(chunk);
      }
      const std::string& piece = tok.token_to_piece(id);
      if (!piece.empty() && !valid_utf8(piece)) ++split_chars;
      all += chunk;
    }
    all += sd.flush();
    ASSERT_EQ(all, tok.decode(ids)) << show(text);
  }
  // The fixtures contain CJK / emoji that byte-level BPE splits inside a character.
  EXPECT_GT(split_chars, 5);
}

TEST(StreamDecoder, MultiByteAcrossTokens) {
  check_stream(model(kSmolLM2File).tok, load_fixture("smollm2.json"));
  check_stream(model(kQwen15File).tok, load_fixture("qwen25.json"));
  // An emoji split into single-byte tokens comes out whole, once, on its last byte.
  const Tokenizer& tok = model(kSmolLM2File).tok;
  const std::string emoji = "\xF0\x9F\x98\x80";
  std::vector<int32_t> ids;
  for (unsigned char b : emoji) {  // the single-byte token of b (encode would read b as U+FFFD)
    std::string sym;
    unicode::append_utf8(sym, unicode::byte_to_cpt(b));
    int32_t id = -1;
    for (int32_t i = 0; i < tok.n_vocab() && id < 0; ++i)
      if (tok.token_text(i) == sym) id = i;
    ASSERT_GE(id, 0);
    ASSERT_EQ(tok.token_to_piece(id), std::string(1, static_cast<char>(b)));
    ids.push_back(id);
  }
  StreamDecoder sd(tok);
  EXPECT_EQ(sd.push(ids[0]), "");
  EXPECT_EQ(sd.push(ids[1]), "");
  EXPECT_EQ(sd.push(ids[2]), "");
  EXPECT_EQ(sd.push(ids[3]), emoji);
  EXPECT_EQ(sd.flush(), "");
  // A truncated sequence is held back until flush; a stray continuation byte passes through.
  StreamDecoder sd2(tok);
  EXPECT_EQ(sd2.push(ids[0]), "");
  EXPECT_EQ(sd2.push(tok.encode("a", false)[0]), "\xF0" "a");
  EXPECT_EQ(sd2.push(ids[1]), "\x9F");
  EXPECT_EQ(sd2.push(ids[0]), "");
  EXPECT_EQ(sd2.flush(), "\xF0");
}

// ---- the merge loop against a naive reference ---------------------------------------------------

// Naive byte-level BPE: repeatedly merge the adjacent pair with the lowest rank (leftmost on ties).
std::vector<int32_t> naive_bpe(const std::string& word, const std::map<std::pair<std::string, std::string>, int>& ranks,
                               const std::map<std::string, int32_t>& vocab) {
  std::vector<std::string> syms;
  for (unsigned char b : word) {
    std::string s;
    unicode::append_utf8(s, unicode::byte_to_cpt(b));
    syms.push_back(s);
  }
  for (;;) {
    int best = -1, best_rank = 0;
    for (size_t i = 0; i + 1 < syms.size(); ++i) {
      auto it = ranks.find({syms[i], syms[i + 1]});
      if (it != ranks.end() && (best < 0 || it->second < best_rank)) {
        best = static_cast<int>(i);
        best_rank = it->second;
      }
    }
    if (best < 0) break;
    syms[best] += syms[best + 1];
    syms.erase(syms.begin() + best + 1);
  }
  std::vector<int32_t> ids;
  for (const auto& s : syms) ids.push_back(vocab.at(s));
  return ids;
}

TEST(Tokenizer, MergeLoopMatchesNaiveBpe) {
  const Loaded& m = model(kSmolLM2File);
  std::map<std::pair<std::string, std::string>, int> ranks;
  const auto& merges = m.file.get_array("tokenizer.ggml.merges", gguf::ValueType::STRING).strs;
  for (size_t r = 0; r < merges.size(); ++r) {
    const size_t sp = merges[r].find(' ', 1);
    ranks.emplace(std::make_pair(merges[r].substr(0, sp), merges[r].substr(sp + 1)), static_cast<int>(r));
  }
  std::map<std::string, int32_t> vocab;
  for (int32_t i = 0; i < m.tok.n_vocab(); ++i) vocab[m.tok.token_text(i)] = i;
  // Letter runs are single pre-tokenizer words, so encode() runs exactly one merge loop.
  std::mt19937 rng(7);
  const std::string letters = "abcdefghijklmnopqrstuvwxyzeeeaaatthhnnss";
  for (int iter = 0; iter < 1500; ++iter) {
    const int len = iter < 1490 ? 1 + static_cast<int>(rng() % 24) : 300 + static_cast<int>(rng() % 300);
    std::string w;
    for (int i = 0; i < len; ++i) w.push_back(letters[rng() % letters.size()]);
    if (rng() % 3 == 0) w[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(w[0])));
    ASSERT_EQ(m.tok.encode(w, false), naive_bpe(w, ranks, vocab)) << w;
  }
}

// ---- pre-tokenizer spot checks (full coverage is the fixture comparison) ------------------------

std::vector<std::string> split(PreType t, const std::string& s) {
  const auto cpts = unicode::decode_utf8(s);
  std::vector<std::string> out;
  size_t pos = 0;
  for (uint32_t len : pretokenize(t, cpts)) {
    std::string w;
    for (size_t i = pos; i < pos + len; ++i) unicode::append_utf8(w, cpts[i]);
    out.push_back(w);
    pos += len;
  }
  EXPECT_EQ(pos, cpts.size());
  return out;
}

TEST(Pretokenize, SpotChecks) {
  using V = std::vector<std::string>;
  EXPECT_EQ(split(PreType::SmolLM, "x 123"), (V{"x", " ", "1", "2", "3"}));
  EXPECT_EQ(split(PreType::Gpt2, "x 123  a"), (V{"x", " 123", " ", " a"}));
  EXPECT_EQ(split(PreType::Qwen2, "I'LL 42"), (V{"I", "'LL", " ", "4", "2"}));
  EXPECT_EQ(split(PreType::Llama3, "12345"), (V{"123", "45"}));
  EXPECT_EQ(split(PreType::Gpt2, "I'LL"), (V{"I", "'", "LL"}));
  EXPECT_EQ(split(PreType::Qwen2, "a \n\n b"), (V{"a", " \n\n", " b"}));
  EXPECT_EQ(split(PreType::Qwen2, "x)\n\ny"), (V{"x", ")\n\n", "y"}));
  EXPECT_EQ(split(PreType::Qwen2, "end   "), (V{"end", "   "}));
  EXPECT_EQ(split(PreType::Qwen2, ""), V{});
  EXPECT_THROW(pre_type_from_name("deepseek-llm"), Error);
}

// ---- error paths on hand-built GGUF files ---------------------------------------------------------

struct GgufBuilder {
  std::string buf;
  uint64_t n_kv = 0;
  void u32(uint32_t v) { buf.append(reinterpret_cast<const char*>(&v), 4); }
  void u64(uint64_t v) { buf.append(reinterpret_cast<const char*>(&v), 8); }
  void str(const std::string& s) {
    u64(s.size());
    buf += s;
  }
  void kv_str(const std::string& k, const std::string& v) {
    str(k);
    u32(8);
    str(v);
    ++n_kv;
  }
  void kv_strs(const std::string& k, const std::vector<std::string>& v) {
    str(k);
    u32(9);
    u32(8);
    u64(v.size());
    for (const auto& s : v) str(s);
    ++n_kv;
  }
  void kv_i32s(const std::string& k, const std::vector<int32_t>& v) {
    str(k);
    u32(9);
    u32(5);
    u64(v.size());
    for (int32_t x : v) u32(static_cast<uint32_t>(x));
    ++n_kv;
  }
  std::string bytes() const {
    std::string h = "GGUF";
    uint32_t ver = 3;
    uint64_t nt = 0;
    h.append(reinterpret_cast<const char*>(&ver), 4);
    h.append(reinterpret_cast<const char*>(&nt), 8);
    h.append(reinterpret_cast<const char*>(&n_kv), 8);
    return h + buf;
  }
};

// A toy vocabulary: the 256 byte symbols, "ab", "abc", "<|x|>"; merges "a b", "ab c".
GgufBuilder toy(const std::string& model, const std::string& pre, bool dup = false) {
  std::vector<std::string> toks;
  for (int b = 0; b < 256; ++b) {
    std::string s;
    unicode::append_utf8(s, unicode::byte_to_cpt(static_cast<uint8_t>(b)));
    toks.push_back(s);
  }
  toks.push_back("ab");
  toks.push_back(dup ? "ab" : "abc");
  toks.push_back("<|x|>");
  std::vector<int32_t> types(toks.size(), 1);
  types.back() = 3;
  GgufBuilder g;
  g.kv_str("tokenizer.ggml.model", model);
  if (!pre.empty()) g.kv_str("tokenizer.ggml.pre", pre);
  g.kv_strs("tokenizer.ggml.tokens", toks);
  g.kv_i32s("tokenizer.ggml.token_type", types);
  g.kv_strs("tokenizer.ggml.merges", {"a b", "ab c"});
  return g;
}

TEST(Tokenizer, ToyVocabulary) {
  const std::string bytes = toy("gpt2", "qwen2").bytes();
  gguf::File f = gguf::File::parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  const Tokenizer tok = Tokenizer::from_gguf(f);
  EXPECT_EQ(tok.n_vocab(), 259);
  EXPECT_EQ(tok.encode("abc", false), (std::vector<int32_t>{257}));
  EXPECT_EQ(tok.encode("abab", false), (std::vector<int32_t>{256, 256}));
  EXPECT_EQ(tok.encode("cab", false), (std::vector<int32_t>{'c', 256}));
  EXPECT_EQ(tok.encode("a<|x|>b", true), (std::vector<int32_t>{'a', 258, 'b'}));
  EXPECT_EQ(tok.encode("a<|x|>b", false).size(), 7u);
  EXPECT_EQ(tok.decode(tok.encode("a\xff", false)), "a\xEF\xBF\xBD");
  // A 4-byte form above U+10FFFF: llama.cpp aborts ("invalid codepoint"); we read 4 bad bytes.
  EXPECT_EQ(tok.decode(tok.encode("\xF5\x80\x80\x80", false)), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_FALSE(tok.is_eog(258));
  EXPECT_EQ(tok.bos(), 11);  // llama.cpp's BPE default when the metadata has none
}

TEST(Tokenizer, RejectsUnsupported) {
  for (const auto& [model_name, pre, dup, what] :
       std::vector<std::tuple<std::string, std::string, bool, std::string>>{
           {"llama", "qwen2", false, "tokenizer.ggml.model"},
           {"gpt2", "", false, "tokenizer.ggml.pre"},
           {"gpt2", "falcon", false, "falcon"},
           {"gpt2", "qwen2", true, "duplicate token"}}) {
    const std::string bytes = toy(model_name, pre, dup).bytes();
    gguf::File f = gguf::File::parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
    try {
      (void)Tokenizer::from_gguf(f);
      ADD_FAILURE() << "accepted " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  }
}

// ---- speed ----------------------------------------------------------------------------------------

TEST(Tokenizer, EncodeSpeed) {
  const json fx = load_fixture("smollm2.json");
  std::string doc;
  while (doc.size() < 100000) {
    for (const json& c : fx["texts"]) {
      const std::string t = b64decode(c["text"]);
      if (valid_utf8(t)) doc += t + "\n";
    }
  }
  for (const char* file : {kSmolLM2File, kQwen15File}) {
    const Tokenizer& tok = model(file).tok;
    const auto t0 = std::chrono::steady_clock::now();
    const auto ids = tok.encode(doc, true);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[ speed    ] %s: %zu bytes -> %zu tokens in %.1f ms (%.2f M tokens/s)\n", file, doc.size(), ids.size(),
                s * 1e3, ids.size() / s / 1e6);
    EXPECT_EQ(tok.decode(ids), doc);
#if defined(__SANITIZE_ADDRESS__)
    EXPECT_LT(s, 20.0);
#else
    EXPECT_LT(s, 1.0);
#endif
  }
}

// Degenerate inputs: one huge pre-tokenizer word (a heap merge over 100k symbols) or 100k pieces.
TEST(Tokenizer, EncodeSpeedDegenerate) {
  const std::string cjk = "\xE6\x97\xA5";
  std::string cjk_run;
  while (cjk_run.size() < 100000) cjk_run += cjk;
  for (const std::string& doc : {std::string(100000, ' '), std::string(100000, 'a'), std::string(100000, '7'),
                                 std::string(100000, '\n'), std::string(100000, '!'), cjk_run}) {
    for (const char* file : {kSmolLM2File, kQwen15File}) {
      const Tokenizer& tok = model(file).tok;
      const auto t0 = std::chrono::steady_clock::now();
      const auto ids = tok.encode(doc, false);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_EQ(tok.decode(ids), doc);
#if defined(__SANITIZE_ADDRESS__)
      EXPECT_LT(s, 20.0) << file << " '" << show(doc.substr(0, 3)) << "'";
#else
      EXPECT_LT(s, 1.0) << file << " '" << show(doc.substr(0, 3)) << "'";
#endif
    }
  }
}

}  // namespace
}  // namespace tw
