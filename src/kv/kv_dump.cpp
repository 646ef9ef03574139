#include "kv/kv_dump.h"

#include <cstdio>
#include <cstring>
#include <memory>

#include "common/error.h"
#include "common/fp16.h"

namespace tw::kv {

namespace {

constexpr char kMagic[8] = {'T', 'W', 'K', 'V', 'D', 'U', 'M', 'P'};
constexpr char kEnd[8] = {'T', 'W', 'K', 'V', 'E', 'N', 'D', '\0'};
constexpr uint32_t kVersion = 1;
constexpr size_t kArchLen = 16, kNameLen = 64;
constexpr uint32_t kMaxDesc = 1 << 20;

struct FileCloser {
  void operator()(FILE* f) const {
    if (f) std::fclose(f);
  }
};
using FilePtr = std::unique_ptr<FILE, FileCloser>;

class Reader {
 public:
  Reader(FILE* f, const std::string& path) : f_(f), path_(path) {}
  void bytes(void* dst, size_t n, const char* what) {
    if (n && std::fread(dst, 1, n, f_) != n) fail("kv dump '", path_, "': truncated file (reading ", what, ")");
  }
  uint32_t u32(const char* what) {
    uint32_t x;
    bytes(&x, 4, what);
    return x;
  }
  uint64_t u64(const char* what) {
    uint64_t x;
    bytes(&x, 8, what);
    return x;
  }
  std::string fixed(size_t n, const char* what) {
    std::string s(n, '\0');
    bytes(s.data(), n, what);
    return s.substr(0, s.find('\0'));
  }

 private:
  FILE* f_;
  const std::string& path_;
};

class Writer {
 public:
  Writer(FILE* f, const std::string& path) : f_(f), path_(path) {}
  void bytes(const void* src, size_t n) {
    if (n && std::fwrite(src, 1, n, f_) != n) fail("kv dump '", path_, "': write failed (disk full?)");
  }
  void u32(uint32_t x) { bytes(&x, 4); }
  void u64(uint64_t x) { bytes(&x, 8); }
  void fixed(const std::string& s, size_t n) {
    std::string b(n, '\0');
    std::memcpy(b.data(), s.data(), std::min(n, s.size()));
    bytes(b.data(), n);
  }

 private:
  FILE* f_;
  const std::string& path_;
};

uint64_t header_bytes(const KVDumpInfo& in) {
  return 8 + 4 + kArchLen + kNameLen + 4 * 4 + 8 + 8 + 4 + 4 + 4 * (uint64_t)in.layers.size() + 4 + in.desc.size();
}

KVDumpInfo read_header(Reader& r, const std::string& path) {
  char magic[8];
  r.bytes(magic, 8, "magic");
  TW_CHECK(std::memcmp(magic, kMagic, 8) == 0, "kv dump '", path, "': not a twilight KV dump (bad magic)");
  const uint32_t ver = r.u32("version");
  TW_CHECK(ver == kVersion, "kv dump '", path, "': version ", ver, " unsupported (this build reads ", kVersion, ")");
  KVDumpInfo in;
  in.arch = r.fixed(kArchLen, "arch");
  in.model_name = r.fixed(kNameLen, "model name");
  const uint32_t nl = r.u32("n_layers"), nh = r.u32("n_heads"), nkv = r.u32("n_kv_heads"), hd = r.u32("head_dim");
  TW_CHECK(nl <= 4096 && nh <= 4096 && nkv <= 4096 && hd <= 4096, "kv dump '", path, "': implausible shape ", nl,
           " layers, ", nh, " heads, ", nkv, " kv heads, d ", hd);
  in.n_layers = (int)nl;
  in.n_heads = (int)nh;
  in.n_kv_heads = (int)nkv;
  in.head_dim = (int)hd;
  const uint64_t nt = r.u64("n_tokens"), qp = r.u64("q_pos0");
  TW_CHECK(nt <= (1ull << 32) && qp <= nt, "kv dump '", path, "': implausible n_tokens ", nt, " / q_pos0 ", qp);
  in.n_tokens = (int64_t)nt;
  in.q_pos0 = (int64_t)qp;
  in.n_steps = (int)r.u32("n_steps");
  const uint32_t nd = r.u32("n_dump_layers");
  TW_CHECK(nd <= nl, "kv dump '", path, "': ", nd, " dumped layers of a ", nl, "-layer model");
  in.layers.resize(nd);
  for (uint32_t i = 0; i < nd; ++i) in.layers[i] = (int)r.u32("layer ids");
  const uint32_t dl = r.u32("description length");
  TW_CHECK(dl <= kMaxDesc, "kv dump '", path, "': description of ", dl, " bytes (corrupt header?)");
  in.desc.resize(dl);
  r.bytes(in.desc.data(), dl, "description");
  try {
    in.validate();
  } catch (const Error& e) {
    fail("kv dump '", path, "': ", e.what());
  }
  return in;
}

FilePtr open_checked(const std::string& path, uint64_t& size) {
  FilePtr f(std::fopen(path.c_str(), "rb"));
  if (!f) fail("cannot open kv dump '", path, "'");
  if (std::fseek(f.get(), 0, SEEK_END) != 0) fail("kv dump '", path, "': cannot seek");
  const long sz = std::ftell(f.get());
  TW_CHECK(sz >= 0, "kv dump '", path, "': cannot tell its size");
  size = (uint64_t)sz;
  std::rewind(f.get());
  return f;
}

}  // namespace

void KVDumpInfo::validate() const {
  TW_CHECK(!arch.empty(), "no architecture");
  TW_CHECK(n_layers > 0 && n_heads > 0 && n_kv_heads > 0 && head_dim > 0, "invalid shape (", n_layers, " layers, ",
           n_heads, " heads, ", n_kv_heads, " kv heads, d ", head_dim, ")");
  TW_CHECK(n_heads % n_kv_heads == 0, n_heads, " query heads not a multiple of ", n_kv_heads, " kv heads");
  TW_CHECK(n_tokens > 0, "no tokens");
  TW_CHECK(n_steps >= 0 && q_pos0 >= 0 && q_pos0 + n_steps <= n_tokens, "queries at positions ", q_pos0, " .. ",
           q_pos0 + n_steps - 1, " outside the ", n_tokens, " stored tokens");
  TW_CHECK(!layers.empty(), "no layers");
  for (size_t i = 0; i < layers.size(); ++i)
    TW_CHECK(layers[i] >= 0 && layers[i] < n_layers && (i == 0 || layers[i] > layers[i - 1]), "layer ids must be ascending in [0, ",
             n_layers, "), got ", layers[i], " at entry ", i);
}

uint64_t KVDumpInfo::payload_bytes() const {
  const uint64_t kv = 2ull * layers.size() * n_tokens * n_kv_heads * head_dim * 2;
  const uint64_t qb = (uint64_t)n_steps * layers.size() * n_heads * head_dim * 4;
  return kv + qb;
}

void KVDumpInfo::check_model(const std::string& a, const std::string& name, int nl, int nh, int nkv, int hd) const {
  if (a != arch || nl != n_layers || nh != n_heads || nkv != n_kv_heads || hd != head_dim ||
      name.substr(0, kNameLen) != model_name)
    fail("kv dump was made with '", model_name, "' (", arch, ", ", n_layers, " layers, ", n_heads, "/", n_kv_heads,
         " heads, d ", head_dim, "), not with '", name, "' (", a, ", ", nl, " layers, ", nh, "/", nkv, " heads, d ", hd,
         ")");
}

void write_kv_dump(const std::string& path, const KVDump& d) {
  const KVDumpInfo& in = d.info;
  in.validate();
  TW_CHECK(in.arch.size() < kArchLen, "kv dump: architecture name too long");
  TW_CHECK(in.desc.size() <= kMaxDesc, "kv dump: description too long");
  const size_t nd = in.layers.size(), row = (size_t)in.n_tokens * in.n_kv_heads * in.head_dim;
  TW_CHECK(d.k.size() == nd && d.v.size() == nd, "kv dump: K/V for ", d.k.size(), " layers, header says ", nd);
  for (size_t i = 0; i < nd; ++i)
    TW_CHECK(d.k[i].size() == row && d.v[i].size() == row, "kv dump: layer ", i, " K/V size does not match the header");
  TW_CHECK(d.q.size() == (size_t)in.n_steps * nd * in.n_heads * in.head_dim, "kv dump: query array size does not match the header");

  const std::string tmp = path + ".tmp";
  {
    FilePtr f(std::fopen(tmp.c_str(), "wb"));
    if (!f) fail("cannot write kv dump '", tmp, "'");
    Writer w(f.get(), tmp);
    w.bytes(kMagic, 8);
    w.u32(kVersion);
    w.fixed(in.arch, kArchLen);
    w.fixed(in.model_name, kNameLen);
    w.u32((uint32_t)in.n_layers);
    w.u32((uint32_t)in.n_heads);
    w.u32((uint32_t)in.n_kv_heads);
    w.u32((uint32_t)in.head_dim);
    w.u64((uint64_t)in.n_tokens);
    w.u64((uint64_t)in.q_pos0);
    w.u32((uint32_t)in.n_steps);
    w.u32((uint32_t)nd);
    for (int l : in.layers) w.u32((uint32_t)l);
    w.u32((uint32_t)in.desc.size());
    w.bytes(in.desc.data(), in.desc.size());
    for (size_t i = 0; i < nd; ++i) {
      w.bytes(d.k[i].data(), row * 2);
      w.bytes(d.v[i].data(), row * 2);
    }
    w.bytes(d.q.data(), d.q.size() * 4);
    w.bytes(kEnd, 8);
    if (std::fflush(f.get()) != 0) {
      std::remove(tmp.c_str());
      fail("kv dump '", tmp, "': write failed");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    fail("cannot rename '", tmp, "' to '", path, "'");
  }
}

KVDumpInfo read_kv_dump_info(const std::string& path) {
  uint64_t size = 0;
  FilePtr f = open_checked(path, size);
  Reader r(f.get(), path);
  KVDumpInfo in = read_header(r, path);
  const uint64_t want = header_bytes(in) + in.payload_bytes() + 8;
  TW_CHECK(size == want, "kv dump '", path, "': ", size, " bytes, the header implies ", want,
           size < want ? " (truncated file)" : " (trailing data)");
  return in;
}

KVDump read_kv_dump(const std::string& path) {
  uint64_t size = 0;
  FilePtr f = open_checked(path, size);
  Reader r(f.get(), path);
  KVDump d;
  d.info = read_header(r, path);
  const KVDumpInfo& in = d.info;
  const uint64_t want = header_bytes(in) + in.payload_bytes() + 8;
  TW_CHECK(size == want, "kv dump '", path, "': ", size, " bytes, the header implies ", want,
           size < want ? " (truncated file)" : " (trailing data)");
  const size_t nd = in.layers.size(), row = (size_t)in.n_tokens * in.n_kv_heads * in.head_dim;
  d.k.resize(nd);
  d.v.resize(nd);
  for (size_t i = 0; i < nd; ++i) {
    d.k[i].resize(row);
    d.v[i].resize(row);
    r.bytes(d.k[i].data(), row * 2, "K");
    r.bytes(d.v[i].data(), row * 2, "V");
  }
  d.q.resize((size_t)in.n_steps * nd * in.n_heads * in.head_dim);
  r.bytes(d.q.data(), d.q.size() * 4, "queries");
  char end[8];
  r.bytes(end, 8, "end marker");
  TW_CHECK(std::memcmp(end, kEnd, 8) == 0, "kv dump '", path, "': bad end marker (corrupt file)");
  return d;
}

int64_t tiled_source(int64_t t, int64_t n_tokens, int64_t keep) {
  TW_CHECK(n_tokens > 0 && keep >= 0 && keep < n_tokens && t >= 0, "tiled_source: bad arguments");
  if (t < n_tokens) return t;
  return keep + (t - n_tokens) % (n_tokens - keep);
}

void fill_pool_from_dump(const KVDump& d, KVPool& pool, SeqPages& seq, int64_t n_ctx, int64_t keep) {
  const KVDumpInfo& in = d.info;
  const KVShape& s = pool.shape();
  TW_CHECK(s.n_kv_heads == in.n_kv_heads && s.head_dim == in.head_dim && s.n_layers >= (int)in.layers.size(),
           "kv dump: pool shape (", s.n_layers, " layers, ", s.n_kv_heads, " kv heads, d ", s.head_dim,
           ") does not fit the dump (", in.layers.size(), " layers, ", in.n_kv_heads, " kv heads, d ", in.head_dim, ")");
  TW_CHECK(n_ctx > 0, "kv dump: n_ctx must be positive");
  TW_CHECK(n_ctx <= in.n_tokens || keep < in.n_tokens, "kv dump: cannot tile with keep ", keep, " >= ", in.n_tokens);
  pool.reserve(seq, n_ctx);
  const size_t w = (size_t)in.n_kv_heads * in.head_dim;
  std::vector<float> k(w), v(w);
  for (size_t i = 0; i < in.layers.size(); ++i)
    for (int64_t t = 0; t < n_ctx; ++t) {
      const int64_t src = n_ctx <= in.n_tokens ? t : tiled_source(t, in.n_tokens, keep);
      const uint16_t* kr = d.k_row((int)i, src, 0);
      const uint16_t* vr = d.v_row((int)i, src, 0);
      for (size_t x = 0; x < w; ++x) {
        k[x] = fp16_to_fp32(kr[x]);
        v[x] = fp16_to_fp32(vr[x]);
      }
      pool.write((int)i, seq, t, k.data(), v.data());
    }
  seq.n_tokens = n_ctx;
}

}  // namespace tw::kv
