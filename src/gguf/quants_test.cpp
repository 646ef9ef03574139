// dequantize_row against gguf-py (gguf.quants.dequantize), bit for bit.
// Fixtures: scripts/make_quant_fixtures.py -> tests/fixtures/quants/.
// Exact equality is the right bar: both sides do the same float32 operations in the same order
// (fp16->f32 is exact, then at most one multiply and one add/subtract per element, each rounded
// to float32; no FMA since the baseline x86-64 target has none), so any difference is a bug.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fp16.h"
#include "common/paths.h"
#include "gguf/gguf.h"
#include "gguf/quants.h"

namespace tw::gguf {
namespace {

std::string fixture(const std::string& name) { return std::string(TW_SOURCE_DIR) + "/tests/fixtures/quants/" + name; }

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read fixture " + path + " (run scripts/make_quant_fixtures.py)");
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

uint64_t fnv1a64(const void* p, size_t n) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 0x100000001B3ull;
  return h;
}

struct Case {
  Type type;
  const char* name;
};
const Case kCases[] = {{Type::F32, "F32"},   {Type::F16, "F16"},   {Type::BF16, "BF16"}, {Type::Q4_0, "Q4_0"},
                       {Type::Q4_1, "Q4_1"}, {Type::Q5_0, "Q5_0"}, {Type::Q5_1, "Q5_1"}, {Type::Q8_0, "Q8_0"},
                       {Type::Q4_K, "Q4_K"}, {Type::Q5_K, "Q5_K"}, {Type::Q6_K, "Q6_K"}};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class RandomBlocks : public ::testing::TestWithParam<Case> {};

TEST_P(RandomBlocks, BitExactVsGgufPy) {
  const Case c = GetParam();
  const std::vector<uint8_t> raw = read_bytes(fixture(std::string(c.name) + ".bin"));
  const std::vector<uint8_t> refb = read_bytes(fixture(std::string(c.name) + ".f32"));
  const TypeTraits tr = type_traits(c.type);
  ASSERT_EQ(raw.size() % tr.block_bytes, 0u);
  const int64_t n = static_cast<int64_t>(raw.size() / tr.block_bytes) * tr.block_elems;
  ASSERT_EQ(refb.size(), static_cast<size_t>(n) * 4);
  ASSERT_GT(n, 0);
  std::vector<float> ref(n), out(n, -12345.f);
  std::memcpy(ref.data(), refb.data(), refb.size());
  // Whole buffer at once, and block by block from an odd address (rows in a file need not be aligned).
  dequantize_row(c.type, raw.data(), out.data(), n);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (bits(out[i]) != bits(ref[i]) && bad++ < 5)
      ADD_FAILURE() << c.name << " element " << i << ": got " << out[i] << " (0x" << std::hex << bits(out[i])
                    << "), gguf-py " << ref[i] << " (0x" << bits(ref[i]) << ")" << std::dec;
  }
  EXPECT_EQ(bad, 0);
  std::vector<uint8_t> shifted(raw.size() + 1);
  std::memcpy(shifted.data() + 1, raw.data(), raw.size());
  std::vector<float> out2(n);
  for (int64_t b = 0; b < n / tr.block_elems; ++b)
    dequantize_row(c.type, shifted.data() + 1 + b * tr.block_bytes, out2.data() + b * tr.block_elems, tr.block_elems);
  EXPECT_EQ(std::memcmp(out.data(), out2.data(), n * 4), 0) << c.name << ": block-wise unaligned result differs";
}

INSTANTIATE_TEST_SUITE_P(Types, RandomBlocks, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

// Hand-computed values: independent of gguf-py, pins the layouts as documented in quants.h.
TEST(Dequantize, HandBuiltBlocks) {
  {  // Q4_0: x = (q - 8) * d; low nibbles are elements 0..15, high nibbles 16..31
    block_q4_0 b{};
    b.d = fp32_to_fp16(0.5f);
    for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>((j & 0xF) | ((15 - j) << 4));
    float y[32];
    dequantize_row(Type::Q4_0, &b, y, 32);
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(y[j], (j - 8) * 0.5f);
      EXPECT_EQ(y[j + 16], (15 - j - 8) * 0.5f);
    }
  }
  {  // Q5_0: bit j of qh is the 5th bit of element j
    block_q5_0 b{};
    b.d = fp32_to_fp16(1.0f);
    const uint32_t qh = 0x80000001u;  // elements 0 and 31 get +16
    std::memcpy(b.qh, &qh, 4);
    float y[32];
    dequantize_row(Type::Q5_0, &b, y, 32);
    for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], (j == 0 || j == 31) ? 0.f : -16.f) << j;
  }
  {  // Q8_0: signed bytes
    block_q8_0 b{};
    b.d = fp32_to_fp16(2.0f);
    for (int j = 0; j < 32; ++j) b.qs[j] = static_cast<int8_t>(j * 8 - 128);
    float y[32];
    dequantize_row(Type::Q8_0, &b, y, 32);
    for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], (j * 8 - 128) * 2.0f);
  }
  {  // Q4_K: sub-block 5's scale/min are split: low 4 bits in bytes 9, top 2 bits in bytes 1 / 5
    block_q4_K b{};
    b.d = fp32_to_fp16(1.0f);
    b.dmin = fp32_to_fp16(1.0f);
    b.scales[9] = 0x21;          // scale 5 low = 1, min 5 low = 2
    b.scales[1] = 0x40;          // scale 5 high bits = 1 -> scale 17
    b.scales[5] = 0x80;          // min 5 high bits = 2 -> min 34
    for (int l = 0; l < 32; ++l) b.qs[64 + l] = 0x30;  // sub-block 5 = high nibbles of bytes 64..95 -> q = 3
    float y[256];
    dequantize_row(Type::Q4_K, &b, y, 256);
    for (int i = 160; i < 192; ++i) EXPECT_EQ(y[i], 17.f * 3 - 34.f) << i;
    for (int i = 128; i < 160; ++i) EXPECT_EQ(y[i], 0.f) << i;  // sub-block 4: scale 0 (byte 0/4/8 zero)
  }
  {  // Q6_K: element 0 = ql[0] low nibble | (qh[0] & 3) << 4, minus 32, times d * scales[0]
    block_q6_K b{};
    b.d = fp32_to_fp16(0.25f);
    b.ql[0] = 0x05;
    b.qh[0] = 0x02;
    b.scales[0] = -3;
    for (int i = 1; i < 16; ++i) b.scales[i] = 1;
    float y[256];
    dequantize_row(Type::Q6_K, &b, y, 256);
    EXPECT_EQ(y[0], 0.25f * -3 * ((0x05 | (2 << 4)) - 32));
    EXPECT_EQ(y[64], 0.25f * 1 * ((0 | (0 << 4)) - 32));  // ql[0] high nibble 0, qh bits 4..5 zero
  }
}

TEST(Dequantize, RejectsBadInput) {
  std::vector<uint8_t> buf(1024);
  std::vector<float> out(1024);
  EXPECT_THROW(dequantize_row(Type::Q4_0, buf.data(), out.data(), 33), Error);
  EXPECT_THROW(dequantize_row(Type::Q4_K, buf.data(), out.data(), 32), Error);
  EXPECT_THROW(dequantize_row(Type::Q4_0, buf.data(), out.data(), -32), Error);
  for (Type t : {Type::Q8_1, Type::Q2_K, Type::Q3_K, Type::Q8_K})
    EXPECT_THROW(dequantize_row(t, buf.data(), out.data(), 256), Error) << type_traits(t).name;
  EXPECT_THROW(dequantize_row(static_cast<Type>(99), buf.data(), out.data(), 256), Error);
  try {
    dequantize_row(Type::Q2_K, buf.data(), out.data(), 256);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Q2_K"), std::string::npos) << e.what();
  }
  dequantize_row(Type::Q4_0, nullptr, nullptr, 0);  // empty row: nothing touched
}

// Rows of real model tensors, every type present in the three models, against gguf-py hashes.
TEST(Dequantize, RealModelRowsMatchGgufPy) {
  std::ifstream in(fixture("models.txt"));
  ASSERT_TRUE(in) << "missing tests/fixtures/quants/models.txt (run scripts/make_quant_fixtures.py)";
  std::map<std::string, File> files;
  std::map<std::string, int> per_type;
  std::string line;
  int checked = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ss(line);
    std::string model, tensor, type, hash;
    int64_t row = 0, ne0 = 0;
    double sum = 0;
    ASSERT_TRUE(ss >> model >> tensor >> type >> row >> ne0 >> hash >> sum) << "bad fixture line: " << line;
    auto it = files.find(model);
    if (it == files.end()) it = files.emplace(model, File::open(require_model(model))).first;
    const TensorInfo& t = it->second.tensor(tensor);
    ASSERT_STREQ(type_traits(t.type).name, type.c_str()) << tensor;
    ASSERT_EQ(t.cols(), ne0) << tensor;
    ASSERT_LT(row, t.rows()) << tensor;
    std::vector<float> y(ne0);
    dequantize_row(t.type, t.row(row), y.data(), ne0);
    double s = 0;
    for (float v : y) s += v;
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(fnv1a64(y.data(), y.size() * 4)));
    EXPECT_EQ(std::string(hex), hash) << model << " " << tensor << " row " << row << " (" << type << "): sum " << s
                                      << " vs gguf-py " << sum;
    EXPECT_NEAR(s, sum, 1e-9 * (1 + std::fabs(sum))) << tensor << " row " << row;
    ++per_type[type];
    ++checked;
  }
  // The fixture covers every type in the three models; a truncated fixture must not pass quietly.
  for (const char* ty : {"F32", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "Q5_0"}) EXPECT_GE(per_type[ty], 3) << ty;
  EXPECT_GE(checked, 60);
}

}  // namespace
}  // namespace tw::gguf
