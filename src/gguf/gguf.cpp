#include "gguf/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "common/error.h"

namespace tw::gguf {

namespace {

constexpr uint64_t kMaxStringBytes = 1ull << 30;  // a metadata string above 1 GiB is hostile
constexpr uint64_t kMaxDims = 4;                 // GGML_MAX_DIMS

// Bounds-checked little-endian cursor over the file bytes.
struct Reader {
  const uint8_t* p;
  size_t size;
  size_t pos = 0;
  const std::string& what;

  size_t left() const { return size - pos; }
  void need(uint64_t n, const char* field) const {
    if (n > left()) fail(what, ": truncated GGUF file while reading ", field, " at byte ", pos, " (need ", n, " bytes, ", left(), " left)");
  }
  template <typename T>
  T read(const char* field) {
    need(sizeof(T), field);
    T v;
    std::memcpy(&v, p + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string read_string(const char* field) {
    const uint64_t n = read<uint64_t>(field);
    if (n > kMaxStringBytes) fail(what, ": string length ", n, " in ", field, " is implausible");
    need(n, field);
    std::string s(reinterpret_cast<const char*>(p + pos), n);
    pos += n;
    return s;
  }
};

size_t scalar_size(ValueType t) {
  switch (t) {
    case ValueType::U8: case ValueType::I8: case ValueType::BOOL: return 1;
    case ValueType::U16: case ValueType::I16: return 2;
    case ValueType::U32: case ValueType::I32: case ValueType::F32: return 4;
    case ValueType::U64: case ValueType::I64: case ValueType::F64: return 8;
    default: return 0;
  }
}

bool valid_value_type(uint32_t t) { return t <= static_cast<uint32_t>(ValueType::F64); }

// Reads one scalar of type t into (i, u, f); throws for non-scalar types.
void read_scalar(Reader& r, ValueType t, Value& v, const std::string& key) {
  switch (t) {
    case ValueType::U8: v.u = r.read<uint8_t>("u8"); v.i = (int64_t)v.u; break;
    case ValueType::I8: v.i = r.read<int8_t>("i8"); break;
    case ValueType::U16: v.u = r.read<uint16_t>("u16"); v.i = (int64_t)v.u; break;
    case ValueType::I16: v.i = r.read<int16_t>("i16"); break;
    case ValueType::U32: v.u = r.read<uint32_t>("u32"); v.i = (int64_t)v.u; break;
    case ValueType::I32: v.i = r.read<int32_t>("i32"); break;
    case ValueType::U64: v.u = r.read<uint64_t>("u64"); v.i = (int64_t)v.u; break;
    case ValueType::I64: v.i = r.read<int64_t>("i64"); break;
    case ValueType::F32: v.f = r.read<float>("f32"); break;
    case ValueType::F64: v.f = r.read<double>("f64"); break;
    case ValueType::BOOL: {
      const uint8_t b = r.read<uint8_t>("bool");
      if (b > 1) fail(r.what, ": metadata key '", key, "': bool value ", (int)b, " is neither 0 nor 1");
      v.i = b;
      break;
    }
    default: fail(r.what, ": metadata key '", key, "': not a scalar type");
  }
  if (t != ValueType::F32 && t != ValueType::F64 && t != ValueType::U64 && t != ValueType::U8 &&
      t != ValueType::U16 && t != ValueType::U32)
    v.u = (uint64_t)v.i;
  if (t == ValueType::U64 && v.u > (uint64_t)std::numeric_limits<int64_t>::max()) v.i = -1;  // flagged by is_int users
}

void read_value(Reader& r, Value& v, const std::string& key) {
  const uint32_t t = r.read<uint32_t>("value type");
  if (!valid_value_type(t)) fail(r.what, ": metadata key '", key, "' has unknown value type ", t);
  v.type = static_cast<ValueType>(t);
  if (v.type == ValueType::STRING) {
    v.s = r.read_string("string value");
  } else if (v.type == ValueType::ARRAY) {
    const uint32_t et = r.read<uint32_t>("array element type");
    if (!valid_value_type(et) || et == static_cast<uint32_t>(ValueType::ARRAY))
      fail(r.what, ": metadata key '", key, "' has an array of unsupported element type ", et);
    v.elem = static_cast<ValueType>(et);
    v.count = r.read<uint64_t>("array length");
    if (v.elem == ValueType::STRING) {
      // Each string takes at least 8 bytes: reject counts the file cannot hold before reserving.
      if (v.count > r.left() / 8) fail(r.what, ": metadata key '", key, "': array of ", v.count, " strings exceeds the file");
      v.strs.reserve(v.count);
      for (uint64_t k = 0; k < v.count; ++k) v.strs.push_back(r.read_string("array string"));
    } else {
      const size_t es = scalar_size(v.elem);
      if (v.count > r.left() / es) fail(r.what, ": metadata key '", key, "': array of ", v.count, " elements exceeds the file");
      const bool fl = v.elem == ValueType::F32 || v.elem == ValueType::F64;
      if (fl) v.floats.reserve(v.count); else v.ints.reserve(v.count);
      Value tmp;
      for (uint64_t k = 0; k < v.count; ++k) {
        read_scalar(r, v.elem, tmp, key);
        if (fl) {
          v.floats.push_back(tmp.f);
        } else {
          if (v.elem == ValueType::U64 && tmp.u > (uint64_t)std::numeric_limits<int64_t>::max())
            fail(r.what, ": metadata key '", key, "': u64 array value ", tmp.u, " out of range");
          v.ints.push_back(tmp.i);
        }
      }
    }
  } else {
    read_scalar(r, v.type, v, key);
  }
}

}  // namespace

const char* value_type_name(ValueType t) {
  switch (t) {
    case ValueType::U8: return "u8"; case ValueType::I8: return "i8";
    case ValueType::U16: return "u16"; case ValueType::I16: return "i16";
    case ValueType::U32: return "u32"; case ValueType::I32: return "i32";
    case ValueType::F32: return "f32"; case ValueType::BOOL: return "bool";
    case ValueType::STRING: return "string"; case ValueType::ARRAY: return "array";
    case ValueType::U64: return "u64"; case ValueType::I64: return "i64";
    case ValueType::F64: return "f64";
  }
  return "unknown";
}

bool Value::is_int() const {
  switch (type) {
    case ValueType::U8: case ValueType::I8: case ValueType::U16: case ValueType::I16:
    case ValueType::U32: case ValueType::I32: case ValueType::I64: case ValueType::BOOL: return true;
    case ValueType::U64: return u <= (uint64_t)std::numeric_limits<int64_t>::max();
    default: return false;
  }
}
bool Value::is_float() const { return type == ValueType::F32 || type == ValueType::F64; }

int64_t TensorInfo::nelements() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

struct File::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr && addr != MAP_FAILED) munmap(addr, size);
  }
};

File::File(File&&) noexcept = default;
File& File::operator=(File&&) noexcept = default;
File::~File() = default;

File File::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open model file '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    fail("cannot stat '", path, "': ", std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("'", path, "' is not a regular file");
  }
  auto m = std::make_unique<Mapping>();
  m->size = static_cast<size_t>(st.st_size);
  if (m->size == 0) {
    ::close(fd);
    fail("'", path, "' is empty, not a GGUF file");
  }
  m->addr = mmap(nullptr, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int e = errno;
  ::close(fd);
  if (m->addr == MAP_FAILED) {
    m->addr = nullptr;
    fail("cannot mmap '", path, "': ", std::strerror(e));
  }
  File f = parse(static_cast<const uint8_t*>(m->addr), m->size, path);
  f.map_ = std::move(m);
  f.path_ = path;
  return f;
}

File File::parse(const uint8_t* data, size_t size, const std::string& what) {
  File f;
  f.path_ = what;
  Reader r{data, size, 0, what};
  if (size < 4 || std::memcmp(data, "GGUF", 4) != 0) fail(what, ": not a GGUF file (wrong magic)");
  r.pos = 4;
  f.version_ = r.read<uint32_t>("version");
  if (f.version_ != 2 && f.version_ != 3) {
    const uint32_t swapped = __builtin_bswap32(f.version_);
    fail(what, ": unsupported GGUF version ", f.version_, " (supported: 2, 3)",
         swapped == 2 || swapped == 3 ? "; this looks like a big-endian GGUF file, which is not supported" : "");
  }
  const uint64_t n_tensors = r.read<uint64_t>("tensor count");
  const uint64_t n_kv = r.read<uint64_t>("metadata count");
  // Every key-value pair takes at least 8 + 1 + 4 bytes, every tensor info at least 8 + 4 + 4 + 8.
  if (n_kv > r.left() / 13) fail(what, ": metadata count ", n_kv, " exceeds the file size");
  if (n_tensors > r.left() / 24) fail(what, ": tensor count ", n_tensors, " exceeds the file size");

  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key = r.read_string("metadata key");
    if (f.kv_.count(key)) fail(what, ": duplicate metadata key '", key, "'");
    Value v;
    read_value(r, v, key);
    f.key_order_.push_back(key);
    f.kv_.emplace(std::move(key), std::move(v));
  }

  if (const Value* a = f.find("general.alignment")) {
    if (!a->is_int() || a->i <= 0 || (a->i & (a->i - 1)) != 0 || a->i > (1 << 20))
      fail(what, ": general.alignment must be a power of two, got ", a->is_int() ? std::to_string(a->i) : value_type_name(a->type));
    f.alignment_ = static_cast<size_t>(a->i);
  }

  f.tensors_.reserve(n_tensors);
  for (uint64_t k = 0; k < n_tensors; ++k) {
    TensorInfo t;
    t.name = r.read_string("tensor name");
    const uint32_t nd = r.read<uint32_t>("tensor dims");
    if (nd == 0 || nd > kMaxDims) fail(what, ": tensor '", t.name, "' has ", nd, " dimensions (1 to 4 allowed)");
    uint64_t nel = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t n = r.read<uint64_t>("tensor dim");
      if (n == 0 || n > (1ull << 40)) fail(what, ": tensor '", t.name, "' dimension ", d, " = ", n, " is invalid");
      if (nel > (1ull << 48) / n) fail(what, ": tensor '", t.name, "' is too large");
      nel *= n;
      t.ne.push_back(static_cast<int64_t>(n));
    }
    const uint32_t type_id = r.read<uint32_t>("tensor type");
    const TypeTraits tr = type_traits(type_id);
    if (tr.block_elems == 0) fail(what, ": tensor '", t.name, "' has unknown type id ", type_id);
    if (!tr.supported) fail(what, ": tensor '", t.name, "' has type ", tr.name, ", which twilight does not support");
    t.type = static_cast<Type>(type_id);
    if (t.ne[0] % tr.block_elems != 0)
      fail(what, ": tensor '", t.name, "' row length ", t.ne[0], " is not a multiple of the ", tr.name, " block size ", tr.block_elems);
    t.nbytes = static_cast<size_t>(nel / tr.block_elems) * tr.block_bytes;
    t.offset = r.read<uint64_t>("tensor offset");
    if (t.offset % f.alignment_ != 0) fail(what, ": tensor '", t.name, "' offset ", t.offset, " is not aligned to ", f.alignment_);
    if (f.tensor_index_.count(t.name)) fail(what, ": duplicate tensor name '", t.name, "'");
    f.tensor_index_.emplace(t.name, f.tensors_.size());
    f.tensors_.push_back(std::move(t));
  }

  const size_t data_start = (r.pos + f.alignment_ - 1) / f.alignment_ * f.alignment_;
  if (data_start > size && !f.tensors_.empty()) fail(what, ": truncated GGUF file: no tensor data section");
  for (TensorInfo& t : f.tensors_) {
    const size_t avail = size >= data_start ? size - data_start : 0;
    if (t.offset > avail || t.nbytes > avail - t.offset)
      fail(what, ": truncated GGUF file: tensor '", t.name, "' (", t.nbytes, " bytes at data offset ", t.offset,
           ") extends past the end of the file (", size, " bytes)");
    t.data = data + data_start + t.offset;
  }
  return f;
}

const Value* File::find(std::string_view key) const {
  auto it = kv_.find(std::string(key));
  return it == kv_.end() ? nullptr : &it->second;
}

namespace {
const Value& need_key(const File& f, std::string_view key) {
  const Value* v = f.find(key);
  if (!v) fail(f.path(), ": required metadata key '", key, "' is missing");
  return *v;
}
[[noreturn]] void wrong_type(const File& f, std::string_view key, const Value& v, const char* want) {
  fail(f.path(), ": metadata key '", key, "' has type ", value_type_name(v.type), ", expected ", want);
}
}  // namespace

std::string File::get_str(std::string_view key) const {
  const Value& v = need_key(*this, key);
  if (v.type != ValueType::STRING) wrong_type(*this, key, v, "string");
  return v.s;
}
int64_t File::get_int(std::string_view key) const {
  const Value& v = need_key(*this, key);
  if (!v.is_int()) wrong_type(*this, key, v, "integer");
  return v.i;
}
double File::get_float(std::string_view key) const {
  const Value& v = need_key(*this, key);
  if (v.is_float()) return v.f;
  if (v.is_int()) return static_cast<double>(v.i);
  wrong_type(*this, key, v, "number");
}
bool File::get_bool(std::string_view key) const {
  const Value& v = need_key(*this, key);
  if (v.type != ValueType::BOOL) wrong_type(*this, key, v, "bool");
  return v.i != 0;
}
int64_t File::get_int_or(std::string_view key, int64_t def) const { return find(key) ? get_int(key) : def; }
double File::get_float_or(std::string_view key, double def) const { return find(key) ? get_float(key) : def; }
bool File::get_bool_or(std::string_view key, bool def) const { return find(key) ? get_bool(key) : def; }
std::string File::get_str_or(std::string_view key, const std::string& def) const { return find(key) ? get_str(key) : def; }

const Value& File::get_array(std::string_view key, ValueType elem) const {
  const Value& v = need_key(*this, key);
  if (v.type != ValueType::ARRAY) wrong_type(*this, key, v, "array");
  const bool ok = v.elem == elem ||
                  (elem == ValueType::I64 && !v.strs.size() && v.elem != ValueType::STRING && v.elem != ValueType::F32 &&
                   v.elem != ValueType::F64) ||
                  (elem == ValueType::F64 && (v.elem == ValueType::F32 || v.elem == ValueType::F64));
  if (!ok) fail(path(), ": metadata key '", key, "' is an array of ", value_type_name(v.elem), ", expected ", value_type_name(elem));
  return v;
}

const TensorInfo* File::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& File::tensor(std::string_view name) const {
  const TensorInfo* t = find_tensor(name);
  if (!t) fail(path(), ": required tensor '", name, "' is missing");
  return *t;
}

}  // namespace tw::gguf
