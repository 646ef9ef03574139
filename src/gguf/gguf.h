// GGUF reader: mmaps the file, parses header, typed metadata and tensor infos, and checks every
// offset and size against the file before anything points into it. A truncated, malformed or
// hostile file throws tw::Error naming the problem; nothing reads out of bounds.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "gguf/quants.h"

namespace tw::gguf {

enum class ValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};
const char* value_type_name(ValueType t);

// One metadata value. Scalars live in i/u/f/s; arrays in the vectors below, by element kind.
struct Value {
  ValueType type = ValueType::U8;
  ValueType elem = ValueType::U8;  // element type when type == ARRAY
  int64_t i = 0;                   // signed integers and bool
  uint64_t u = 0;                  // unsigned integers
  double f = 0;                    // floats
  std::string s;                   // string
  std::vector<std::string> strs;   // array of strings
  std::vector<int64_t> ints;       // array of integers / bools (u64 values above 2^63 rejected)
  std::vector<double> floats;      // array of floats
  uint64_t count = 0;              // array length

  bool is_int() const;             // any integer type or bool
  bool is_float() const;
};

struct TensorInfo {
  std::string name;
  Type type = Type::F32;
  std::vector<int64_t> ne;         // dims, ne[0] is the contiguous row length (GGML order)
  uint64_t offset = 0;             // relative to the data section
  const uint8_t* data = nullptr;   // points into the mapping, bounds-checked
  size_t nbytes = 0;

  int64_t nelements() const;
  int64_t rows() const { return ne.empty() ? 0 : nelements() / ne[0]; }
  int64_t cols() const { return ne.empty() ? 0 : ne[0]; }
  size_t row_bytes() const { return gguf::row_bytes(type, cols()); }
  const uint8_t* row(int64_t r) const { return data + static_cast<size_t>(r) * row_bytes(); }
};

class File {
 public:
  // Map and parse a file. Throws tw::Error (file name in the message) on any problem.
  static File open(const std::string& path);
  // Parse a buffer the caller keeps alive (tests, fuzzing).
  static File parse(const uint8_t* data, size_t size, const std::string& what = "<memory>");

  File(File&&) noexcept;
  File& operator=(File&&) noexcept;
  ~File();

  uint32_t version() const { return version_; }
  size_t alignment() const { return alignment_; }
  const std::string& path() const { return path_; }

  // Metadata. find() returns nullptr when absent; the get_* helpers throw a clear error when the
  // key is missing or has the wrong type; the *_or variants return a default when missing.
  const Value* find(std::string_view key) const;
  const std::vector<std::string>& keys() const { return key_order_; }
  std::string get_str(std::string_view key) const;
  int64_t get_int(std::string_view key) const;
  double get_float(std::string_view key) const;  // accepts integer values too
  bool get_bool(std::string_view key) const;
  int64_t get_int_or(std::string_view key, int64_t def) const;
  double get_float_or(std::string_view key, double def) const;
  bool get_bool_or(std::string_view key, bool def) const;
  std::string get_str_or(std::string_view key, const std::string& def) const;
  const Value& get_array(std::string_view key, ValueType elem) const;

  // Tensors.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(std::string_view name) const;
  const TensorInfo& tensor(std::string_view name) const;  // throws when absent

 private:
  File() = default;
  struct Mapping;
  std::unique_ptr<Mapping> map_;
  std::string path_;
  uint32_t version_ = 0;
  size_t alignment_ = 32;
  std::unordered_map<std::string, Value> kv_;
  std::vector<std::string> key_order_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace tw::gguf
