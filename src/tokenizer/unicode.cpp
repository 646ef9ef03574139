#include "tokenizer/unicode.h"

#include <algorithm>
#include <array>

namespace tw::unicode {

namespace {

struct Range {
  uint32_t first;
  uint8_t cls;
};

constexpr Range kRanges[] = {
#include "tokenizer/unicode_tables.inc"
};

// Flat lookup for the Basic Multilingual Plane (64 KiB, built once); binary search above it.
struct BmpTable {
  std::array<uint8_t, 0x10000> cls{};
  BmpTable() {
    const size_t n = sizeof(kRanges) / sizeof(kRanges[0]);
    for (size_t i = 0; i < n; ++i) {
      const uint32_t lo = kRanges[i].first;
      const uint32_t hi = i + 1 < n ? kRanges[i + 1].first : 0x110000;
      for (uint32_t cp = lo; cp < hi && cp < 0x10000; ++cp) cls[cp] = kRanges[i].cls;
    }
  }
};

const BmpTable& bmp() {
  static const BmpTable t;
  return t;
}

struct ByteMap {
  std::array<uint32_t, 256> to_cpt{};
  std::array<int16_t, 324> to_byte{};  // images are < 256 + 68
  ByteMap() {
    to_byte.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cpt[b] = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      to_byte[to_cpt[b]] = static_cast<int16_t>(b);
    }
  }
};

const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

}  // namespace

uint8_t cpt_class(uint32_t cp) {
  if (cp < 0x10000) return bmp().cls[cp];
  if (cp >= 0x110000) return 0;
  const Range* end = kRanges + sizeof(kRanges) / sizeof(kRanges[0]);
  const Range* it = std::upper_bound(kRanges, end, cp, [](uint32_t v, const Range& r) { return v < r.first; });
  return (it - 1)->cls;  // kRanges[0].first == 0, so it > kRanges
}

int utf8_len(uint8_t lead) {
  static constexpr int kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLen[lead >> 4];
}

std::vector<uint32_t> decode_utf8(std::string_view s) {
  std::vector<uint32_t> out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  auto cont = [&](size_t i) { return i < n && (p[i] & 0xC0) == 0x80; };
  size_t i = 0;
  while (i < n) {
    const uint8_t b = p[i];
    if (b < 0x80) {
      out.push_back(b);
      i += 1;
    } else if ((b & 0xE0) == 0xC0 && cont(i + 1)) {
      out.push_back((uint32_t(b & 0x1F) << 6) | (p[i + 1] & 0x3F));
      i += 2;
    } else if ((b & 0xF0) == 0xE0 && cont(i + 1) && cont(i + 2)) {
      out.push_back((uint32_t(b & 0x0F) << 12) | (uint32_t(p[i + 1] & 0x3F) << 6) | (p[i + 2] & 0x3F));
      i += 3;
    } else if ((b & 0xF8) == 0xF0 && cont(i + 1) && cont(i + 2) && cont(i + 3) &&
               ((uint32_t(b & 0x07) << 18) | (uint32_t(p[i + 1] & 0x3F) << 12)) <= 0x10FFFF) {
      out.push_back((uint32_t(b & 0x07) << 18) | (uint32_t(p[i + 1] & 0x3F) << 12) |
                    (uint32_t(p[i + 2] & 0x3F) << 6) | (p[i + 3] & 0x3F));
      i += 4;
    } else {
      out.push_back(kReplacement);
      i += 1;
    }
  }
  return out;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | ((cp >> 18) & 0x07)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

uint32_t byte_to_cpt(uint8_t b) { return byte_map().to_cpt[b]; }

int cpt_to_byte(uint32_t cp) { return cp < byte_map().to_byte.size() ? byte_map().to_byte[cp] : -1; }

}  // namespace tw::unicode
