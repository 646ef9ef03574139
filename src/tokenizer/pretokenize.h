// Pre-tokenizers: split a run of code points into the "words" BPE merges within, exactly as
// llama.cpp's unicode_regex_split does for the supported tokenizer.ggml.pre values. Hand-written
// matchers (std::regex has no \p{L}); each one documents the regex it implements.
#pragma once
#include <cstdint>
#include <string_view>
#include <vector>

namespace tw {

enum class PreType {
  Gpt2,     // "gpt-2": 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  SmolLM,   // "smollm" (also starcoder, refact): \p{N} split first, then the GPT-2 regex per piece
  Qwen2,    // "qwen2": llama3-style regex with single digits \p{N}
  Llama3,   // "llama-bpe" / "llama3": llama3 regex with \p{N}{1,3}
};

// Maps tokenizer.ggml.pre to a PreType; throws tw::Error for names we do not implement.
PreType pre_type_from_name(std::string_view name);
const char* pre_type_name(PreType t);

// Split cpts into pieces; returns the length (in code points) of each piece, in order, summing to
// cpts.size(). Empty input gives no pieces.
std::vector<uint32_t> pretokenize(PreType type, const std::vector<uint32_t>& cpts);

}  // namespace tw
