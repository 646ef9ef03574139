// libFuzzer target for the GGUF reader and the dequantisers. Arbitrary bytes go through
// File::parse; a file that parses must be safe to use: every metadata value and every tensor byte
// is read (ASan flags any pointer that escapes the input), every typed getter either works or
// throws tw::Error, and the first row of every tensor is dequantised. Anything other than a clean
// parse or a tw::Error (crash, sanitizer report, other exception, broken invariant) is a finding.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "gguf/gguf.h"
#include "gguf/quants.h"

using namespace tw::gguf;

namespace {

volatile uint64_t g_sink;  // keeps the touching loops from being optimised away

uint64_t touch_value(const File& f, const std::string& key, const Value& v) {
  uint64_t acc = v.count + static_cast<uint64_t>(v.i) + v.u + (v.f > 0);
  acc += v.s.size() + (v.s.empty() ? 0 : static_cast<uint8_t>(v.s.back()));
  for (const std::string& s : v.strs) acc += s.size() + (s.empty() ? 0 : static_cast<uint8_t>(s[0]));
  for (int64_t x : v.ints) acc += static_cast<uint64_t>(x);
  for (double x : v.floats) acc += x == x ? 1 : 2;
  if (v.type == ValueType::ARRAY) {
    const size_t n = v.strs.size() + v.ints.size() + v.floats.size();
    if (n != v.count) __builtin_trap();  // the element vectors must hold exactly count elements
  }
  // Every getter must either succeed or throw tw::Error.
  try { acc += f.get_str(key).size(); } catch (const tw::Error&) {}
  try { acc += static_cast<uint64_t>(f.get_int(key)); } catch (const tw::Error&) {}
  try { acc += f.get_float(key) > 0; } catch (const tw::Error&) {}
  try { acc += f.get_bool(key); } catch (const tw::Error&) {}
  for (ValueType e : {ValueType::STRING, ValueType::I64, ValueType::F64, ValueType::U8}) {
    try { acc += f.get_array(key, e).count; } catch (const tw::Error&) {}
  }
  return acc;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const File f = File::parse(data, size, "fuzz");
    uint64_t acc = f.version() + f.alignment();
    for (const std::string& key : f.keys()) {
      const Value* v = f.find(key);
      if (!v) __builtin_trap();  // keys() and the map disagree
      acc += touch_value(f, key, *v);
    }
    std::vector<float> row;
    for (const TensorInfo& t : f.tensors()) {
      if (f.find_tensor(t.name) != &t) __builtin_trap();
      if (t.nbytes == 0 || t.data < data || t.nbytes > size || t.data - data > static_cast<ptrdiff_t>(size - t.nbytes))
        __builtin_trap();  // tensor bytes must lie inside the input
      if (t.nbytes != row_bytes(t.type, t.cols()) * static_cast<size_t>(t.rows())) __builtin_trap();
      for (size_t i = 0; i < t.nbytes; ++i) acc += t.data[i];
      row.assign(static_cast<size_t>(t.cols()), 0.f);
      dequantize_row(t.type, t.row(0), row.data(), t.cols());
      for (float x : row) acc += x == x;  // reads every output element (NaN-safe)
    }
    g_sink = acc;
  } catch (const tw::Error&) {
    // Rejected input: the expected outcome for almost all random bytes.
  }
  return 0;
}
