// GGUF reader: the real SmolLM2 file, a hand-built valid file, and hand-built malformed files that
// must each end in tw::Error (never a crash or an out-of-bounds read: run under ASan too).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/paths.h"
#include "gguf/gguf.h"

namespace tw::gguf {
namespace {

using VT = ValueType;

// Little-endian GGUF byte writer for hand-built files.
struct W {
  std::vector<uint8_t> b;
  template <typename T>
  W& put(T v) {
    const size_t n = b.size();
    b.resize(n + sizeof(T));
    std::memcpy(b.data() + n, &v, sizeof(T));
    return *this;
  }
  W& u8(uint8_t v) { return put(v); }
  W& u32(uint32_t v) { return put(v); }
  W& u64(uint64_t v) { return put(v); }
  W& str(const std::string& s) {
    u64(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  W& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    b.insert(b.end(), {'G', 'G', 'U', 'F'});
    return u32(version).u64(n_tensors).u64(n_kv);
  }
  W& key(const std::string& k, VT t) { return str(k).u32(static_cast<uint32_t>(t)); }
  W& tensor(const std::string& name, std::vector<uint64_t> dims, Type t, uint64_t offset) {
    str(name).u32(static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) u64(d);
    return u32(static_cast<uint32_t>(t)).u64(offset);
  }
  W& pad(size_t align) {
    b.resize((b.size() + align - 1) / align * align, 0);
    return *this;
  }
  W& zeros(size_t n) {
    b.resize(b.size() + n, 0);
    return *this;
  }
};

// Parse a copy in an exactly sized heap block, so ASan flags any read past the end.
File parse_exact(const std::vector<uint8_t>& bytes, size_t len) {
  std::unique_ptr<uint8_t[]> buf(new uint8_t[len]);
  if (len) std::memcpy(buf.get(), bytes.data(), len);
  File f = File::parse(buf.get(), len, "test.gguf");
  (void)f;
  return File::parse(bytes.data(), len, "test.gguf");  // a view that outlives buf
}

// A small valid file: every scalar value type, three array kinds, an F32 and a Q4_0 tensor. The
// last tensor ends exactly at the end of the file, so every shorter prefix is invalid.
constexpr int kValidKv = 16;
std::vector<uint8_t> valid_file(uint32_t alignment = 0) {
  W w;
  w.header(2, kValidKv + (alignment ? 1 : 0));
  w.key("general.architecture", VT::STRING).str("llama");
  w.key("t.u8", VT::U8).u8(200);
  w.key("t.i8", VT::I8).put<int8_t>(-100);
  w.key("t.u16", VT::U16).put<uint16_t>(60000);
  w.key("t.i16", VT::I16).put<int16_t>(-30000);
  w.key("t.u32", VT::U32).u32(4000000000u);
  w.key("t.i32", VT::I32).put<int32_t>(-2000000000);
  w.key("t.f32", VT::F32).put<float>(1.5f);
  w.key("t.bool", VT::BOOL).u8(1);
  w.key("t.u64", VT::U64).u64(1ull << 40);
  w.key("t.i64", VT::I64).put<int64_t>(-(1ll << 50));
  w.key("t.f64", VT::F64).put<double>(-2.25);
  w.key("t.big_u64", VT::U64).u64(~0ull);
  w.key("t.strs", VT::ARRAY).u32(static_cast<uint32_t>(VT::STRING)).u64(3).str("a").str("").str("ccc");
  w.key("t.ints", VT::ARRAY).u32(static_cast<uint32_t>(VT::I32)).u64(3).put<int32_t>(-1).put<int32_t>(0).put<int32_t>(7);
  w.key("t.floats", VT::ARRAY).u32(static_cast<uint32_t>(VT::F32)).u64(2).put<float>(0.5f).put<float>(-4.f);
  if (alignment) w.key("general.alignment", VT::U32).u32(alignment);
  const size_t al = alignment ? alignment : 32;
  w.tensor("a", {4, 2}, Type::F32, 0);                                  // 32 bytes
  w.tensor("b", {32, 2}, Type::Q4_0, (32 + al - 1) / al * al);          // 2 blocks, 36 bytes
  w.pad(al);
  for (int i = 0; i < 8; ++i) w.put<float>(static_cast<float>(i));
  w.pad(al);
  for (int blk = 0; blk < 2; ++blk) {
    w.put<uint16_t>(0x3C00);  // d = 1.0
    for (int j = 0; j < 16; ++j) w.u8(static_cast<uint8_t>(0x98 + blk));  // q: low 8+blk, high 9
  }
  return w.b;
}

// The error message must name the problem: check a fragment of it.
#define EXPECT_GGUF_ERROR(bytes, fragment)                                                   \
  do {                                                                                       \
    try {                                                                                    \
      parse_exact(bytes, (bytes).size());                                                    \
      ADD_FAILURE() << "parsed without error, expected: " << (fragment);                     \
    } catch (const Error& e) {                                                               \
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();        \
    }                                                                                        \
  } while (0)

TEST(GgufReader, ValidHandBuiltFile) {
  const std::vector<uint8_t> bytes = valid_file();
  const File f = File::parse(bytes.data(), bytes.size(), "mem");
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  ASSERT_EQ(f.keys().size(), static_cast<size_t>(kValidKv));
  EXPECT_EQ(f.keys()[0], "general.architecture");
  EXPECT_EQ(f.get_str("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("t.u8"), 200);
  EXPECT_EQ(f.get_int("t.i8"), -100);
  EXPECT_EQ(f.get_int("t.u16"), 60000);
  EXPECT_EQ(f.get_int("t.i16"), -30000);
  EXPECT_EQ(f.get_int("t.u32"), 4000000000ll);
  EXPECT_EQ(f.get_int("t.i32"), -2000000000);
  EXPECT_EQ(f.get_float("t.f32"), 1.5);
  EXPECT_EQ(f.get_float("t.u8"), 200.0);  // ints are accepted as numbers
  EXPECT_TRUE(f.get_bool("t.bool"));
  EXPECT_EQ(f.get_int("t.u64"), 1ll << 40);
  EXPECT_EQ(f.get_int("t.i64"), -(1ll << 50));
  EXPECT_EQ(f.get_float("t.f64"), -2.25);
  EXPECT_THROW(f.get_int("t.big_u64"), Error);  // does not fit int64: refused, not wrapped
  EXPECT_EQ(f.find("t.big_u64")->u, ~0ull);
  const Value& s = f.get_array("t.strs", VT::STRING);
  ASSERT_EQ(s.strs.size(), 3u);
  EXPECT_EQ(s.strs[0], "a");
  EXPECT_EQ(s.strs[1], "");
  EXPECT_EQ(s.strs[2], "ccc");
  const Value& iv = f.get_array("t.ints", VT::I64);  // any integer array reads as I64
  EXPECT_EQ(iv.ints, (std::vector<int64_t>{-1, 0, 7}));
  EXPECT_EQ(f.get_array("t.ints", VT::I32).count, 3u);
  EXPECT_EQ(f.get_array("t.floats", VT::F64).floats, (std::vector<double>{0.5, -4.0}));
  EXPECT_THROW(f.get_array("t.strs", VT::I64), Error);
  EXPECT_THROW(f.get_array("t.u8", VT::I64), Error);

  // Missing keys / wrong types: clear errors; *_or defaults only when missing.
  EXPECT_EQ(f.find("nope"), nullptr);
  EXPECT_THROW(f.get_str("nope"), Error);
  EXPECT_THROW(f.get_str("t.u8"), Error);
  EXPECT_THROW(f.get_int("general.architecture"), Error);
  EXPECT_THROW(f.get_bool("t.u8"), Error);
  EXPECT_EQ(f.get_int_or("nope", 7), 7);
  EXPECT_EQ(f.get_float_or("nope", 0.25), 0.25);
  EXPECT_EQ(f.get_str_or("nope", "x"), "x");
  EXPECT_FALSE(f.get_bool_or("nope", false));
  EXPECT_THROW(f.get_int_or("general.architecture", 1), Error);
  try {
    f.get_str("missing.key");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.key"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("mem"), std::string::npos);
  }

  ASSERT_EQ(f.tensors().size(), 2u);
  const TensorInfo& a = f.tensor("a");
  EXPECT_EQ(a.type, Type::F32);
  EXPECT_EQ(a.ne, (std::vector<int64_t>{4, 2}));
  EXPECT_EQ(a.rows(), 2);
  EXPECT_EQ(a.nbytes, 32u);
  const size_t data_start = bytes.size() - 64 - 36 + 32;  // data section = 32 (a) + pad to 32 + 36 (b)
  EXPECT_EQ(a.data, bytes.data() + data_start);
  float v;
  std::memcpy(&v, a.row(1) + 4, 4);
  EXPECT_EQ(v, 5.f);
  const TensorInfo& b = f.tensor("b");
  EXPECT_EQ(b.type, Type::Q4_0);
  EXPECT_EQ(b.nbytes, 36u);
  EXPECT_EQ(b.data + b.nbytes, bytes.data() + bytes.size());
  float y[32];
  dequantize_row(b.type, b.row(1), y, 32);
  EXPECT_EQ(y[0], 1.f);   // low nibble 9 - 8
  EXPECT_EQ(y[16], 1.f);  // high nibble 9 - 8
  EXPECT_EQ(f.find_tensor("c"), nullptr);
  EXPECT_THROW(f.tensor("c"), Error);
}

TEST(GgufReader, CustomAlignment) {
  const std::vector<uint8_t> bytes = valid_file(64);
  const File f = File::parse(bytes.data(), bytes.size());
  EXPECT_EQ(f.alignment(), 64u);
  EXPECT_EQ((f.tensor("a").data - bytes.data()) % 64, 0);
  EXPECT_EQ(f.tensor("b").offset, 64u);
  EXPECT_EQ(f.tensor("b").data + 36, bytes.data() + bytes.size());
}

TEST(GgufReader, EveryTruncationThrows) {
  for (uint32_t al : {0u, 64u}) {
    const std::vector<uint8_t> bytes = valid_file(al);
    EXPECT_NO_THROW(parse_exact(bytes, bytes.size()));
    for (size_t len = 0; len < bytes.size(); ++len) {
      EXPECT_THROW(parse_exact(bytes, len), Error) << "prefix of " << len << " of " << bytes.size() << " bytes";
    }
  }
}

TEST(GgufReader, BadMagicAndVersion) {
  std::vector<uint8_t> b = valid_file();
  b[0] = 'X';
  EXPECT_GGUF_ERROR(b, "wrong magic");
  for (uint32_t ver : {0u, 1u, 4u, 0x03000000u}) {
    std::vector<uint8_t> c = valid_file();
    std::memcpy(c.data() + 4, &ver, 4);
    EXPECT_GGUF_ERROR(c, "version");
  }
  std::vector<uint8_t> be = valid_file();
  be[4] = 0;
  be[7] = 3;
  EXPECT_GGUF_ERROR(be, "big-endian");
  std::vector<uint8_t> v2 = valid_file();  // version 2 has the same layout as 3
  v2[4] = 2;
  EXPECT_EQ(parse_exact(v2, v2.size()).version(), 2u);
}

TEST(GgufReader, HugeCountsAndLengths) {
  EXPECT_GGUF_ERROR(W().header(~0ull, 0).b, "tensor count");
  EXPECT_GGUF_ERROR(W().header(1ull << 62, 0).b, "tensor count");
  EXPECT_GGUF_ERROR(W().header(0, ~0ull).b, "metadata count");
  EXPECT_GGUF_ERROR(W().header(0, 1).u64(~0ull).zeros(16).b, "string length");             // key length
  EXPECT_GGUF_ERROR(W().header(0, 1).u64(1000).zeros(16).b, "truncated");                 // key past EOF
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", VT::STRING).u64(1ull << 31).zeros(8).b, "string length");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", VT::STRING).u64(100).zeros(8).b, "truncated");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", VT::ARRAY).u32(uint32_t(VT::U8)).u64(~0ull).zeros(8).b, "exceeds");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", VT::ARRAY).u32(uint32_t(VT::U64)).u64(1ull << 61).zeros(8).b, "exceeds");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", VT::ARRAY).u32(uint32_t(VT::STRING)).u64(1ull << 60).zeros(8).b, "exceeds");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", VT::ARRAY).u32(uint32_t(VT::STRING)).u64(2).u64(~0ull).zeros(16).b, "string length");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", VT::ARRAY).u32(uint32_t(VT::U64)).u64(1).u64(~0ull).b, "out of range");
}

TEST(GgufReader, UnknownValueTypes) {
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", static_cast<VT>(13)).zeros(8).b, "unknown value type 13");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", static_cast<VT>(0xFFFFFFFF)).zeros(8).b, "unknown value type");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", VT::ARRAY).u32(uint32_t(VT::ARRAY)).u64(0).b, "element type");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", VT::ARRAY).u32(77).u64(0).b, "element type 77");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", VT::BOOL).u8(2).b, "bool");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("k", VT::ARRAY).u32(uint32_t(VT::BOOL)).u64(2).u8(1).u8(5).b, "bool");
  // Empty arrays and an empty file are fine.
  const std::vector<uint8_t> empty_array = W().header(0, 1).key("k", VT::ARRAY).u32(uint32_t(VT::I8)).u64(0).b;
  EXPECT_EQ(parse_exact(empty_array, empty_array.size()).find("k")->count, 0u);
  EXPECT_TRUE(parse_exact(W().header(0, 0).b, 24).tensors().empty());
}

TEST(GgufReader, DuplicateKeysAndTensors) {
  EXPECT_GGUF_ERROR(W().header(0, 2).key("k", VT::U8).u8(1).key("k", VT::U8).u8(2).b, "duplicate metadata key 'k'");
  W w;
  w.header(2, 0).tensor("x", {32}, Type::F32, 0).tensor("x", {32}, Type::F32, 128).pad(32).zeros(256);
  EXPECT_GGUF_ERROR(w.b, "duplicate tensor name 'x'");
}

TEST(GgufReader, Alignment) {
  for (uint32_t al : {0u, 3u, 48u, 1u << 21}) {
    W w;
    w.header(0, 1).key("general.alignment", VT::U32).u32(al);
    EXPECT_GGUF_ERROR(w.b, "general.alignment");
  }
  EXPECT_GGUF_ERROR(W().header(0, 1).key("general.alignment", VT::STRING).str("32").b, "general.alignment");
  EXPECT_GGUF_ERROR(W().header(0, 1).key("general.alignment", VT::U64).u64(~0ull).b, "general.alignment");
  W w;  // a tensor offset that is not a multiple of the alignment
  w.header(1, 0).tensor("x", {8}, Type::F32, 4).pad(32).zeros(64);
  EXPECT_GGUF_ERROR(w.b, "not aligned");
}

TEST(GgufReader, TensorDataPastEof) {
  {
    W w;
    w.header(1, 0).tensor("x", {8}, Type::F32, 0).pad(32).zeros(31);  // needs 32 bytes
    EXPECT_GGUF_ERROR(w.b, "extends past the end");
  }
  {
    W w;
    w.header(1, 0).tensor("x", {8}, Type::F32, 64).pad(32).zeros(64);  // offset inside, end outside
    EXPECT_GGUF_ERROR(w.b, "extends past the end");
  }
  for (uint64_t off : {~0ull - 31, 1ull << 63, (~0ull - 31) & ~31ull}) {  // offset + size would wrap
    W w;
    w.header(1, 0).tensor("x", {8}, Type::F32, off & ~31ull).pad(32).zeros(64);
    EXPECT_GGUF_ERROR(w.b, "extends past the end");
  }
  {
    W w;  // no data section at all: the header ends mid-alignment
    w.header(1, 0).tensor("x", {8}, Type::F32, 0);
    EXPECT_GGUF_ERROR(w.b, "truncated");
  }
}

TEST(GgufReader, BadDims) {
  auto with_dims = [](std::vector<uint64_t> dims, Type t = Type::F32, uint32_t nd_override = 0) {
    W w;
    w.header(1, 0).str("x").u32(nd_override ? nd_override : static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) w.u64(d);
    w.u32(static_cast<uint32_t>(t)).u64(0).pad(32).zeros(4096);
    return w.b;
  };
  EXPECT_GGUF_ERROR(with_dims({}), "dimensions");
  EXPECT_GGUF_ERROR(with_dims({1, 1, 1, 1, 1}), "dimensions");
  EXPECT_GGUF_ERROR(with_dims({8}, Type::F32, 0xFFFFFFFF), "dimensions");
  EXPECT_GGUF_ERROR(with_dims({8, 0}), "dimension 1 = 0");
  EXPECT_GGUF_ERROR(with_dims({1ull << 41}), "invalid");
  EXPECT_GGUF_ERROR(with_dims({~0ull}), "invalid");
  EXPECT_GGUF_ERROR(with_dims({1ull << 20, 1ull << 20, 1ull << 20, 1ull << 20}), "too large");  // 2^80 elements
  EXPECT_GGUF_ERROR(with_dims({1ull << 24, 1ull << 20}), "past the end");  // plausible shape, no data
  EXPECT_GGUF_ERROR(with_dims({33}, Type::Q4_0), "not a multiple");
  EXPECT_GGUF_ERROR(with_dims({32}, static_cast<Type>(99)), "unknown type id 99");
  EXPECT_GGUF_ERROR(with_dims({256}, Type::Q2_K), "Q2_K");
  EXPECT_NO_THROW(parse_exact(with_dims({32, 2, 2, 2}), with_dims({32, 2, 2, 2}).size()));
}

// --- files on disk ---

TEST(GgufReader, OpenErrors) {
  try {
    File::open("/nonexistent/dir/model.gguf");
    ADD_FAILURE() << "opened a missing file";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/dir/model.gguf"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("No such file"), std::string::npos) << e.what();
  }
  const std::string dir = ::testing::TempDir();
  try {
    File::open(dir);
    ADD_FAILURE() << "opened a directory";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
  }
  const std::string empty = dir + "/tw_empty_" + std::to_string(getpid()) + ".gguf";
  { std::ofstream(empty, std::ios::binary); }
  EXPECT_THROW(File::open(empty), Error);
  const std::string text = dir + "/tw_text_" + std::to_string(getpid()) + ".gguf";
  { std::ofstream(text, std::ios::binary) << "hello, not a model\n"; }
  try {
    File::open(text);
    ADD_FAILURE() << "opened a text file";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("magic"), std::string::npos) << e.what();
  }
  std::filesystem::remove(empty);
  std::filesystem::remove(text);
}

TEST(GgufReader, OpenValidFileAndMove) {
  const std::vector<uint8_t> bytes = valid_file();
  const std::string path = ::testing::TempDir() + "/tw_valid_" + std::to_string(getpid()) + ".gguf";
  { std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size()); }
  File f = File::open(path);
  EXPECT_EQ(f.path(), path);
  File g = std::move(f);  // the mapping moves with the object; tensor pointers stay valid
  std::filesystem::remove(path);  // the mapping outlives the directory entry
  float v;
  std::memcpy(&v, g.tensor("a").row(1), 4);
  EXPECT_EQ(v, 4.f);
  EXPECT_EQ(g.get_str("general.architecture"), "llama");
}

TEST(GgufReader, SmolLM2) {
  const File f = File::open(require_model(kSmolLM2File));
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.keys().size(), 33u);
  EXPECT_EQ(f.get_str("general.architecture"), "llama");
  EXPECT_EQ(f.get_str("general.basename"), "smollm2");
  EXPECT_EQ(f.get_int("llama.block_count"), 30);
  EXPECT_EQ(f.get_int("llama.context_length"), 8192);
  EXPECT_EQ(f.get_int("llama.embedding_length"), 576);
  EXPECT_EQ(f.get_int("llama.feed_forward_length"), 1536);
  EXPECT_EQ(f.get_int("llama.attention.head_count"), 9);
  EXPECT_EQ(f.get_int("llama.attention.head_count_kv"), 3);
  EXPECT_EQ(f.get_int("llama.rope.dimension_count"), 64);
  EXPECT_EQ(f.get_int("llama.vocab_size"), 49152);
  EXPECT_EQ(f.get_float("llama.rope.freq_base"), 100000.0);
  EXPECT_EQ(f.get_float("llama.attention.layer_norm_rms_epsilon"), static_cast<double>(1e-5f));
  EXPECT_EQ(f.find("llama.attention.layer_norm_rms_epsilon")->type, VT::F32);
  EXPECT_FALSE(f.get_bool("tokenizer.ggml.add_bos_token"));
  EXPECT_EQ(f.get_str("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(f.get_str("tokenizer.ggml.pre"), "smollm");
  EXPECT_EQ(f.get_int("tokenizer.ggml.bos_token_id"), 1);
  EXPECT_EQ(f.get_int("tokenizer.ggml.eos_token_id"), 2);
  EXPECT_EQ(f.get_int("general.file_type"), 3);  // MOSTLY_Q4_1
  const Value& tokens = f.get_array("tokenizer.ggml.tokens", VT::STRING);
  ASSERT_EQ(tokens.strs.size(), 49152u);
  EXPECT_EQ(tokens.strs[0], "<|endoftext|>");
  EXPECT_EQ(tokens.strs[1], "<|im_start|>");
  EXPECT_EQ(f.get_array("tokenizer.ggml.token_type", VT::I32).ints.size(), 49152u);
  EXPECT_EQ(f.get_array("tokenizer.ggml.merges", VT::STRING).strs.size(), 48900u);
  EXPECT_NE(f.get_str("tokenizer.chat_template").find("<|im_start|>"), std::string::npos);

  ASSERT_EQ(f.tensors().size(), 272u);
  std::map<std::string, int> hist;
  for (const TensorInfo& t : f.tensors()) ++hist[type_traits(t.type).name];
  EXPECT_EQ(hist, (std::map<std::string, int>{{"F32", 61}, {"Q4_1", 210}, {"Q8_0", 1}}));
  const TensorInfo& emb = f.tensor("token_embd.weight");
  EXPECT_EQ(emb.type, Type::Q8_0);
  EXPECT_EQ(emb.ne, (std::vector<int64_t>{576, 49152}));
  EXPECT_EQ(emb.offset, 0u);
  EXPECT_EQ(emb.nbytes, 576u / 32 * 34 * 49152);
  EXPECT_EQ(f.tensors()[0].name, "token_embd.weight");
  const TensorInfo& down = f.tensor("blk.0.ffn_down.weight");
  EXPECT_EQ(down.type, Type::Q4_1);
  EXPECT_EQ(down.ne, (std::vector<int64_t>{1536, 576}));
  const TensorInfo& norm = f.tensor("output_norm.weight");
  EXPECT_EQ(norm.type, Type::F32);
  EXPECT_EQ(norm.ne, (std::vector<int64_t>{576}));
  EXPECT_EQ(f.tensor("blk.29.attn_q.weight").ne, (std::vector<int64_t>{576, 576}));
  EXPECT_EQ(f.tensor("blk.29.attn_k.weight").ne, (std::vector<int64_t>{576, 192}));
  EXPECT_EQ(f.find_tensor("output.weight"), nullptr);  // tied embeddings
  // Data section starts at byte 1785664 (gguf-py's data_offset of token_embd.weight, offset 0), and
  // the last tensor in offset order ends exactly at the end of the file.
  const uint8_t* base = emb.data - 1785664;
  const TensorInfo* last = &f.tensors()[0];
  for (const TensorInfo& t : f.tensors())
    if (t.offset > last->offset) last = &t;
  EXPECT_EQ(last->name, "output_norm.weight");
  EXPECT_EQ(static_cast<uintmax_t>(last->data + last->nbytes - base), std::filesystem::file_size(require_model(kSmolLM2File)));
}

// The two Qwen models parse too (count and type mix as gguf-py reports them).
TEST(GgufReader, QwenModels) {
  const File tiny = File::open(require_model(kQwen15File));
  EXPECT_EQ(tiny.get_str("general.architecture"), "qwen2");
  EXPECT_EQ(tiny.tensors().size(), 339u);
  std::map<std::string, int> h1;
  for (const TensorInfo& t : tiny.tensors()) ++h1[type_traits(t.type).name];
  EXPECT_EQ(h1, (std::map<std::string, int>{{"F32", 141}, {"Q4_K", 169}, {"Q6_K", 29}}));
  const File pandas = File::open(require_model(kQwen05File));
  EXPECT_EQ(pandas.get_str("general.architecture"), "qwen2");
  EXPECT_EQ(pandas.tensors().size(), 291u);
  std::map<std::string, int> h2;
  for (const TensorInfo& t : pandas.tensors()) ++h2[type_traits(t.type).name];
  EXPECT_EQ(h2, (std::map<std::string, int>{{"F32", 121}, {"Q4_K", 12}, {"Q5_0", 133}, {"Q6_K", 12}, {"Q8_0", 13}}));
}

}  // namespace
}  // namespace tw::gguf
