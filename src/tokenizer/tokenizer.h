// Byte-level BPE tokenizer (tokenizer.ggml.model == "gpt2") read from GGUF metadata, matching
// llama.cpp's llama_tokenize / llama_token_to_piece token for token (tests compare against it).
//
// encode: split out special tokens (control tokens only when parse_special; user-defined tokens
// always, as llama.cpp does), pre-tokenize each remaining run with the regex named by
// tokenizer.ggml.pre, map bytes to GPT-2's printable code points, then merge by rank.
// Invalid UTF-8 bytes in the input become U+FFFD (as in llama.cpp), so decode(encode(x)) == x holds
// for valid UTF-8 only. encode never adds BOS; callers check add_bos().
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "gguf/gguf.h"
#include "tokenizer/chat_template.h"  // ChatMessage, apply_chat_template: part of this interface
#include "tokenizer/pretokenize.h"

namespace tw {

class Tokenizer {
 public:
  // Throws tw::Error on unsupported tokenizer.ggml.model / pre or inconsistent metadata.
  static Tokenizer from_gguf(const gguf::File& f);
  // Same, with the pre-tokenizer forced (tests run other regexes on a real vocabulary).
  static Tokenizer from_gguf(const gguf::File& f, std::string_view pre_override);

  std::vector<int32_t> encode(std::string_view text, bool parse_special) const;
  // Concatenated pieces; control tokens render as their text (llama.cpp's special=true).
  std::string decode(const std::vector<int32_t>& ids) const;
  // render_special=false drops control/unknown tokens (llama.cpp's special=false).
  std::string decode(const std::vector<int32_t>& ids, bool render_special) const;
  // Raw bytes of one token (may be a partial UTF-8 sequence). Throws on an out-of-range id.
  std::string token_to_piece(int32_t id) const { return piece(id); }
  const std::string& piece(int32_t id) const;  // same, without the copy

  int32_t bos() const { return bos_; }
  int32_t eos() const { return eos_; }
  bool add_bos() const { return add_bos_; }
  bool is_eog(int32_t id) const;
  bool is_control(int32_t id) const;  // control / unknown: not printed as text to a user
  int32_t n_vocab() const { return static_cast<int32_t>(tokens_.size()); }
  PreType pre_type() const { return pre_; }
  const std::string& token_text(int32_t id) const;  // vocabulary string (byte-encoded form)
  std::vector<int32_t> eog_ids() const;             // sorted

 private:
  // token attribute bits (llama.cpp's LLAMA_TOKEN_ATTR_*)
  enum : uint32_t {
    kAttrUndefined = 0, kAttrUnknown = 1 << 0, kAttrUnused = 1 << 1, kAttrNormal = 1 << 2,
    kAttrControl = 1 << 3, kAttrUserDefined = 1 << 4, kAttrByte = 1 << 5,
  };
  struct Merge {
    int32_t rank;
    int32_t result;  // symbol id of the merged string
  };

  Tokenizer() = default;
  void build_pieces();
  void bpe_word(std::string_view word_bytes, std::vector<int32_t>& out) const;
  void encode_text(std::string_view text, std::vector<int32_t>& out) const;
  int32_t intern(const std::string& s);  // symbol id for a merge string (vocab id or extra id)
  void check_id(int32_t id) const;

  PreType pre_ = PreType::Gpt2;
  std::vector<std::string> tokens_;           // [n_vocab] byte-encoded vocabulary strings
  std::vector<uint32_t> attr_;                // [n_vocab] kAttr* bits
  std::vector<std::string> pieces_;           // [n_vocab] decoded bytes, special text for controls
  std::unordered_map<std::string, int32_t> sym_id_;  // vocab strings + merge strings not in vocab
  std::vector<std::string> extra_syms_;       // strings of symbol ids >= n_vocab
  std::unordered_map<uint64_t, Merge> merges_;      // (left sym << 32 | right sym) -> merge
  int32_t byte_sym_[256] = {};                // initial symbol of each byte
  std::vector<int32_t> special_;              // control / user-defined / unknown ids, longest first
  std::vector<int32_t> eog_;                  // sorted end-of-generation ids
  int32_t bos_ = -1, eos_ = -1;
  bool add_bos_ = false;
};

// Streaming detokeniser: push ids one at a time; returns the text that became complete UTF-8.
// Bytes that can never complete (invalid sequences) are passed through as they are, so the
// concatenation of all push() results and flush() equals decode() of the same ids.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok) : tok_(&tok) {}
  std::string push(int32_t id);
  std::string flush();  // whatever is held back (an incomplete trailing sequence)

 private:
  const Tokenizer* tok_;
  std::string pending_;
};

}  // namespace tw
