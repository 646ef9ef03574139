// Code point helpers for the byte-level BPE tokenizer: UTF-8 decoding with llama.cpp's exact
// error behaviour, code point classes (letter / number / whitespace) from a generated range table,
// and the GPT-2 byte <-> printable-character mapping.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tw::unicode {

inline constexpr uint32_t kReplacement = 0xFFFD;

// Class bits of one code point (see scripts/gen_unicode_tables.py).
enum : uint8_t { kLetter = 1, kNumber = 2, kSpace = 4 };
uint8_t cpt_class(uint32_t cp);
inline bool is_letter(uint32_t cp) { return cpt_class(cp) & kLetter; }
inline bool is_number(uint32_t cp) { return cpt_class(cp) & kNumber; }
inline bool is_space(uint32_t cp) { return cpt_class(cp) & kSpace; }

// Decode UTF-8 the way llama.cpp does (unicode_cpts_from_utf8): a byte that does not start a
// well-formed sequence (stray continuation byte, truncated sequence, 0xF8..0xFF) becomes U+FFFD and
// decoding resumes at the next byte. Like llama.cpp, overlong forms and surrogates are accepted as
// decoded; unlike it, a 4-byte form above U+10FFFF is treated as invalid (llama.cpp throws later).
std::vector<uint32_t> decode_utf8(std::string_view s);
// Append the UTF-8 encoding of cp (cp <= 0x10FFFF; surrogates are encoded as-is).
void append_utf8(std::string& out, uint32_t cp);
// Length of the UTF-8 sequence a lead byte announces (1 for continuation / invalid bytes),
// as llama.cpp's unicode_len_utf8.
int utf8_len(uint8_t lead);

// GPT-2 byte-level mapping: each byte 0..255 maps to one printable code point.
uint32_t byte_to_cpt(uint8_t b);
// Inverse; returns -1 when cp is not the image of a byte.
int cpt_to_byte(uint32_t cp);

}  // namespace tw::unicode
