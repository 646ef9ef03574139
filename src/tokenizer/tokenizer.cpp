#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <queue>

#include "common/error.h"
#include "tokenizer/unicode.h"

namespace tw {

namespace {

// Token texts llama.cpp treats as end-of-generation (llama-vocab.cpp, special_eog_ids); they are
// also forced to CONTROL, which makes them splittable as special tokens.
constexpr std::string_view kEogTexts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", "[e~[",
};
// Fill-in-the-middle texts llama.cpp auto-detects (and forces to CONTROL) when the metadata does
// not name them; pad / repo / file-separator ones are end-of-generation too.
constexpr std::string_view kFimPre[] = {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>",
                                        "<PRE>", "\xe2\x96\x81<PRE>", "<|code_prefix|>", "<|prefix|>"};
constexpr std::string_view kFimSuf[] = {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81hole\xef\xbd\x9c>",
                                        "<SUF>", "\xe2\x96\x81<SUF>", "<|code_suffix|>", "<|suffix|>"};
constexpr std::string_view kFimMid[] = {"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>",
                                        "<MID>", "\xe2\x96\x81<MID>", "<|code_middle|>", "<|middle|>"};
constexpr std::string_view kFimPad[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"};
constexpr std::string_view kFimRep[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"};
constexpr std::string_view kFimSep[] = {"<|file_sep|>"};
constexpr std::string_view kEotTexts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
    "_<EOT>", "[EOT]", "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", "<end_of_utterance>",
};

template <size_t N>
bool in_list(const std::string_view (&list)[N], std::string_view s) {
  return std::find(std::begin(list), std::end(list), s) != std::end(list);
}

// GGUF token types (llama.cpp LLAMA_TOKEN_TYPE_*).
enum TokenType : int64_t { kTypeUndefined = 0, kTypeNormal = 1, kTypeUnknown = 2, kTypeControl = 3,
                           kTypeUserDefined = 4, kTypeUnused = 5, kTypeByte = 6 };

}  // namespace

Tokenizer Tokenizer::from_gguf(const gguf::File& f) { return from_gguf(f, {}); }

Tokenizer Tokenizer::from_gguf(const gguf::File& f, std::string_view pre_override) {
  const std::string model = f.get_str_or("tokenizer.ggml.model", "");
  TW_CHECK(model == "gpt2", f.path(), ": unsupported tokenizer.ggml.model '", model,
           "' (only byte-level BPE 'gpt2' is implemented)");
  std::string pre = pre_override.empty() ? f.get_str_or("tokenizer.ggml.pre", "") : std::string(pre_override);
  TW_CHECK(!pre.empty(), f.path(), ": tokenizer.ggml.pre is missing (llama.cpp would fall back to a "
           "degraded default pre-tokenizer; re-convert the model)");

  Tokenizer t;
  t.pre_ = pre_type_from_name(pre);

  const gguf::Value& toks = f.get_array("tokenizer.ggml.tokens", gguf::ValueType::STRING);
  const size_t n = toks.strs.size();
  TW_CHECK(n > 0 && n < (size_t(1) << 31), f.path(), ": tokenizer.ggml.tokens has ", n, " entries");
  t.tokens_ = toks.strs;
  t.attr_.assign(n, kAttrNormal);
  if (f.find("tokenizer.ggml.token_type")) {
    const gguf::Value& types = f.get_array("tokenizer.ggml.token_type", gguf::ValueType::I64);
    TW_CHECK(types.ints.size() >= n, f.path(), ": tokenizer.ggml.token_type has ", types.ints.size(),
             " entries for ", n, " tokens");
    for (size_t i = 0; i < n; ++i) {
      switch (types.ints[i]) {
        case kTypeNormal: t.attr_[i] = kAttrNormal; break;
        case kTypeUnknown: t.attr_[i] = kAttrUnknown; break;
        case kTypeControl: t.attr_[i] = kAttrControl; break;
        case kTypeUserDefined: t.attr_[i] = kAttrUserDefined; break;
        case kTypeUnused: t.attr_[i] = kAttrUnused; break;
        case kTypeByte: t.attr_[i] = kAttrByte; break;
        default: t.attr_[i] = kAttrUndefined; break;
      }
    }
  }
  t.sym_id_.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) {
    if (t.tokens_[i].empty()) t.tokens_[i] = cat("[EMPTY_", i, "]");  // as llama.cpp
    auto [it, fresh] = t.sym_id_.emplace(t.tokens_[i], static_cast<int32_t>(i));
    TW_CHECK(fresh, f.path(), ": duplicate token in vocabulary: '", t.tokens_[i], "' has ids ", it->second, " and ", i);
  }

  // Merges "left right" in rank order. A merge whose parts or result are not vocabulary strings
  // still applies (llama.cpp merges strings); such strings get symbol ids past the vocabulary.
  const gguf::Value& merges = f.get_array("tokenizer.ggml.merges", gguf::ValueType::STRING);
  t.merges_.reserve(merges.strs.size() * 2);
  for (size_t r = 0; r < merges.strs.size(); ++r) {
    const std::string& m = merges.strs[r];
    const size_t sp = m.find(' ', 1);
    if (sp == std::string::npos) continue;  // llama.cpp records it as ("", ""), which never matches
    const std::string a = m.substr(0, sp), b = m.substr(sp + 1);
    const int32_t ia = t.intern(a), ib = t.intern(b), iab = t.intern(a + b);
    const uint64_t key = (uint64_t(uint32_t(ia)) << 32) | uint32_t(ib);
    t.merges_.emplace(key, Merge{static_cast<int32_t>(r), iab});  // first rank wins, as emplace in llama.cpp
  }
  for (int b = 0; b < 256; ++b) {
    std::string s;
    unicode::append_utf8(s, unicode::byte_to_cpt(static_cast<uint8_t>(b)));
    t.byte_sym_[b] = t.intern(s);
  }

  // Special ids. llama.cpp's BPE defaults are 11; ids outside the vocabulary are disabled.
  auto id_or = [&](const char* key, int64_t def) -> int32_t {
    const int64_t v = f.get_int_or(key, def);
    return (v >= 0 && v < static_cast<int64_t>(n)) ? static_cast<int32_t>(v) : -1;
  };
  t.bos_ = id_or("tokenizer.ggml.bos_token_id", 11);
  t.eos_ = id_or("tokenizer.ggml.eos_token_id", 11);
  const int32_t eot_meta = id_or("tokenizer.ggml.eot_token_id", -1);
  const int32_t eom = id_or("tokenizer.ggml.eom_token_id", -1);
  t.add_bos_ = f.get_bool_or("tokenizer.ggml.add_bos_token", t.pre_ == PreType::Llama3);
  TW_CHECK(!t.add_bos_ || t.bos_ >= 0, f.path(), ": tokenizer.ggml.add_bos_token is true but there is no BOS token");

  // Auto-detection by text (llama-vocab.cpp): the first match of each list becomes that special
  // token and is forced to CONTROL. llama.cpp walks a hash map; we take the lowest id.
  auto detect = [&](int32_t from_meta, auto& list) -> int32_t {
    if (from_meta >= 0) return from_meta;
    for (size_t i = 0; i < n; ++i) {
      if (in_list(list, t.tokens_[i])) {
        t.attr_[i] |= kAttrControl;
        return static_cast<int32_t>(i);
      }
    }
    return -1;
  };
  const int32_t eot = detect(eot_meta, kEotTexts);
  detect(id_or("tokenizer.ggml.fim_pre_token_id", id_or("tokenizer.ggml.prefix_token_id", -1)), kFimPre);
  detect(id_or("tokenizer.ggml.fim_suf_token_id", id_or("tokenizer.ggml.suffix_token_id", -1)), kFimSuf);
  detect(id_or("tokenizer.ggml.fim_mid_token_id", id_or("tokenizer.ggml.middle_token_id", -1)), kFimMid);
  const int32_t fim_pad = detect(id_or("tokenizer.ggml.fim_pad_token_id", -1), kFimPad);
  const int32_t fim_rep = detect(id_or("tokenizer.ggml.fim_rep_token_id", -1), kFimRep);
  const int32_t fim_sep = detect(id_or("tokenizer.ggml.fim_sep_token_id", -1), kFimSep);

  std::vector<int32_t> eog;
  for (int32_t id : {fim_pad, fim_rep, fim_sep, t.eos_, eot, eom})
    if (id >= 0) eog.push_back(id);
  for (size_t i = 0; i < n; ++i) {
    if (in_list(kEogTexts, t.tokens_[i])) {
      eog.push_back(static_cast<int32_t>(i));
      t.attr_[i] |= kAttrControl;
    }
  }
  std::sort(eog.begin(), eog.end());
  eog.erase(std::unique(eog.begin(), eog.end()), eog.end());
  // llama.cpp workarounds: harmony / solar-open "<|end|>" and gemma4 "</s>" are not EOG.
  auto has = [&](std::string_view s) {
    return std::any_of(eog.begin(), eog.end(), [&](int32_t id) { return t.tokens_[id] == s; });
  };
  if (((has("<|return|>") && (has("<|call|>") || has("<|calls|>"))) || (has("<|calls|>") && has("<|flush|>"))) &&
      has("<|end|>")) {
    auto it = std::find_if(eog.begin(), eog.end(), [&](int32_t id) { return t.tokens_[id] == "<|end|>"; });
    t.attr_[*it] = kAttrUserDefined;
    eog.erase(it);
  }
  if (has("<|tool_response>") && has("</s>")) {
    auto it = std::find_if(eog.begin(), eog.end(), [&](int32_t id) { return t.tokens_[id] == "</s>"; });
    t.attr_[*it] = kAttrNormal;
    eog.erase(it);
  }
  t.eog_ = std::move(eog);

  // Special tokens split out of raw text, longest first (ties by id; llama.cpp's sort is unstable).
  for (size_t i = 0; i < n; ++i)
    if (t.attr_[i] & (kAttrControl | kAttrUserDefined | kAttrUnknown)) t.special_.push_back(static_cast<int32_t>(i));
  std::stable_sort(t.special_.begin(), t.special_.end(),
                   [&](int32_t a, int32_t b) { return t.tokens_[a].size() > t.tokens_[b].size(); });

  t.build_pieces();
  return t;
}

int32_t Tokenizer::intern(const std::string& s) {
  auto it = sym_id_.find(s);
  if (it != sym_id_.end()) return it->second;
  const int32_t id = static_cast<int32_t>(tokens_.size() + extra_syms_.size());
  extra_syms_.push_back(s);
  sym_id_.emplace(s, id);
  return id;
}

// llama.cpp's token_to_piece(special=true) for every token, computed once.
void Tokenizer::build_pieces() {
  pieces_.resize(tokens_.size());
  for (size_t i = 0; i < tokens_.size(); ++i) {
    const std::string& text = tokens_[i];
    std::string& out = pieces_[i];
    const uint32_t a = attr_[i];
    if (a & (kAttrUnknown | kAttrControl | kAttrUserDefined)) {
      out = text;
    } else if (a & kAttrNormal) {
      for (uint32_t cp : unicode::decode_utf8(text)) {
        const int b = unicode::cpt_to_byte(cp);
        if (b >= 0) {
          out.push_back(static_cast<char>(b));
        } else {  // not a byte image: llama.cpp's llama_decode_text marker
          std::string u;
          unicode::append_utf8(u, cp);
          out += "[UNK_BYTE_0x";
          static const char* hex = "0123456789abcdef";
          for (unsigned char c : u) {
            out.push_back(hex[c >> 4]);
            out.push_back(hex[c & 15]);
          }
          out += text + "]";
        }
      }
    } else if ((a & kAttrByte) && text.size() >= 5) {  // "<0xXX>"
      out.push_back(static_cast<char>(std::strtol(text.substr(3, 2).c_str(), nullptr, 16)));
    }  // unused / undefined tokens print nothing
  }
}

void Tokenizer::check_id(int32_t id) const {
  TW_CHECK(id >= 0 && id < n_vocab(), "token id ", id, " out of range [0, ", n_vocab(), ")");
}

const std::string& Tokenizer::piece(int32_t id) const {
  check_id(id);
  return pieces_[id];
}

const std::string& Tokenizer::token_text(int32_t id) const {
  check_id(id);
  return tokens_[id];
}

bool Tokenizer::is_eog(int32_t id) const { return std::binary_search(eog_.begin(), eog_.end(), id); }

bool Tokenizer::is_control(int32_t id) const {
  return id >= 0 && id < n_vocab() && (attr_[id] & (kAttrControl | kAttrUnknown));
}

std::vector<int32_t> Tokenizer::eog_ids() const { return eog_; }

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const { return decode(ids, true); }

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool render_special) const {
  std::string out;
  for (int32_t id : ids) {
    check_id(id);
    if (!render_special && (attr_[id] & (kAttrControl | kAttrUnknown))) continue;
    out += pieces_[id];
  }
  return out;
}

// Byte-pair merging of one pre-tokenized word (raw bytes), lowest rank first, leftmost on ties —
// the order of llama.cpp's llm_tokenizer_bpe_session work queue.
void Tokenizer::bpe_word(std::string_view word, std::vector<int32_t>& out) const {
  const size_t n = word.size();
  if (n == 0) return;
  const int32_t nv = n_vocab();
  auto emit = [&](int32_t sym) {
    if (sym < nv) {
      out.push_back(sym);
      return;
    }
    // Symbol not in the vocabulary: llama.cpp emits the tokens of its single bytes that exist.
    for (char c : extra_syms_[sym - nv]) {
      auto it = sym_id_.find(std::string(1, c));
      if (it != sym_id_.end() && it->second < nv) out.push_back(it->second);
    }
  };
  if (n == 1) {
    emit(byte_sym_[static_cast<uint8_t>(word[0])]);
    return;
  }
  struct Sym {
    int32_t id, prev, next;
  };
  struct Cand {
    int32_t rank, left, right, lid, rid, result;
  };
  struct Later {  // priority_queue keeps the "largest" on top: invert (rank, left)
    bool operator()(const Cand& a, const Cand& b) const {
      return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
    }
  };
  std::vector<Sym> sym(n);
  for (size_t i = 0; i < n; ++i)
    sym[i] = {byte_sym_[static_cast<uint8_t>(word[i])], static_cast<int32_t>(i) - 1,
              i + 1 < n ? static_cast<int32_t>(i + 1) : -1};
  std::vector<Cand> storage;
  storage.reserve(n * 2);
  std::priority_queue<Cand, std::vector<Cand>, Later> queue(Later{}, std::move(storage));
  auto try_pair = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    auto it = merges_.find((uint64_t(uint32_t(sym[l].id)) << 32) | uint32_t(sym[r].id));
    if (it == merges_.end()) return;
    queue.push(Cand{it->second.rank, l, r, sym[l].id, sym[r].id, it->second.result});
  };
  for (size_t i = 1; i < n; ++i) try_pair(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));
  while (!queue.empty()) {
    const Cand c = queue.top();
    queue.pop();
    Sym& l = sym[c.left];
    Sym& r = sym[c.right];
    // Stale entry: a side was merged away (id -1) or changed since the pair was queued.
    if (l.id != c.lid || r.id != c.rid || l.next != c.right) continue;
    l.id = c.result;
    l.next = r.next;
    if (r.next >= 0) sym[r.next].prev = c.left;
    r.id = -1;
    try_pair(l.prev, c.left);
    try_pair(c.left, l.next);
  }
  for (int32_t i = 0; i >= 0; i = sym[i].next) emit(sym[i].id);
}

void Tokenizer::encode_text(std::string_view text, std::vector<int32_t>& out) const {
  const std::vector<uint32_t> cpts = unicode::decode_utf8(text);
  const std::vector<uint32_t> lens = pretokenize(pre_, cpts);
  std::string word;
  size_t pos = 0;
  for (uint32_t len : lens) {
    word.clear();
    for (size_t i = pos; i < pos + len; ++i) unicode::append_utf8(word, cpts[i]);
    pos += len;
    if (pre_ == PreType::Llama3) {  // llama.cpp's ignore_merges: a word that is a token stays whole
      std::string enc;
      for (unsigned char b : word) unicode::append_utf8(enc, unicode::byte_to_cpt(b));
      auto it = sym_id_.find(enc);
      if (it != sym_id_.end() && it->second < n_vocab()) {
        out.push_back(it->second);
        continue;
      }
    }
    bpe_word(word, out);
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  std::vector<int32_t> out;
  if (text.empty()) return out;
  // Fragments: raw text [off, off+len) or a special token (len == 0, token >= 0). As llama.cpp's
  // tokenizer_st_partition: each special token, longest first, splits every raw fragment at all of
  // its occurrences.
  struct Frag {
    size_t off, len;
    int32_t token;
  };
  std::vector<Frag> frags{{0, text.size(), -1}}, next;
  for (int32_t sid : special_) {
    if (!parse_special && (attr_[sid] & (kAttrControl | kAttrUnknown))) continue;
    const std::string& st = tokens_[sid];
    next.clear();
    for (const Frag& fr : frags) {
      if (fr.token >= 0) {
        next.push_back(fr);
        continue;
      }
      const std::string_view raw = text.substr(fr.off, fr.len);
      size_t start = 0;
      for (size_t m; (m = raw.find(st, start)) != std::string_view::npos; start = m + st.size()) {
        if (m > start) next.push_back({fr.off + start, m - start, -1});
        next.push_back({0, 0, sid});
      }
      if (start < raw.size()) next.push_back({fr.off + start, raw.size() - start, -1});
    }
    frags.swap(next);
  }
  for (const Frag& fr : frags) {
    if (fr.token >= 0) {
      out.push_back(fr.token);
    } else {
      encode_text(text.substr(fr.off, fr.len), out);
    }
  }
  return out;
}

// ---- StreamDecoder -------------------------------------------------------------------------------

std::string StreamDecoder::push(int32_t id) {
  pending_ += tok_->piece(id);
  // Hold back a trailing lead byte followed by fewer continuation bytes than it announces; all
  // else (complete characters, and bytes that can never form one) goes out now.
  const size_t n = pending_.size();
  size_t keep = 0;
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const auto c = static_cast<uint8_t>(pending_[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back
    const size_t need = c >= 0xF0 && c < 0xF8 ? 4 : c >= 0xE0 && c < 0xF0 ? 3 : c >= 0xC0 && c < 0xE0 ? 2 : 1;
    if (need > back) keep = back;
    break;
  }
  std::string out = pending_.substr(0, n - keep);
  pending_.erase(0, n - keep);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace tw
