#include "attention/ds_side.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <sstream>

#include "common/error.h"

namespace tw::attn {

namespace {
constexpr const char* kMagic = "twilight-ds-channels";
constexpr int kVersion = 1;
}  // namespace

void DsChannels::validate(const std::string& what) const {
  TW_CHECK(n_layers > 0 && n_layers <= 1024 && n_kv_heads > 0 && n_kv_heads <= 1024 && head_dim > 0 && head_dim <= 1024,
           what, ": implausible shape (n_layers ", n_layers, ", n_kv_heads ", n_kv_heads, ", head_dim ", head_dim, ")");
  TW_CHECK(r > 0 && r <= head_dim, what, ": r = ", r, " must be in [1, head_dim = ", head_dim, "]");
  TW_CHECK(ch.size() == (size_t)n_layers * n_kv_heads * r, what, ": ", ch.size(), " channel entries, expected ",
           (size_t)n_layers * n_kv_heads * r);
  std::vector<char> seen(head_dim);
  for (int l = 0; l < n_layers; ++l)
    for (int h = 0; h < n_kv_heads; ++h) {
      std::fill(seen.begin(), seen.end(), 0);
      const int32_t* c = at(l, h);
      for (int i = 0; i < r; ++i) {
        TW_CHECK(c[i] >= 0 && c[i] < head_dim, what, ": layer ", l, " head ", h, ": channel ", c[i],
                 " outside [0, ", head_dim, ")");
        TW_CHECK(!seen[c[i]], what, ": layer ", l, " head ", h, ": channel ", c[i], " listed twice");
        seen[c[i]] = 1;
      }
    }
}

void write_ds_channels(const std::string& path, const DsChannels& c) {
  c.validate("ds channels for '" + path + "'");
  TW_CHECK(c.arch.find_first_of(" \t\r\n") == std::string::npos && c.name.find_first_of("\r\n") == std::string::npos &&
               c.fingerprint.find_first_of(" \t\r\n") == std::string::npos && !c.arch.empty() && !c.fingerprint.empty(),
           "ds channels: arch / fingerprint must be single words and name a single line");
  const std::string tmp = path + ".tmp";
  {
    std::ofstream o(tmp);
    if (!o) fail("cannot write '", tmp, "'");
    o << kMagic << ' ' << kVersion << "\narch " << c.arch << "\nname " << c.name << "\nfingerprint " << c.fingerprint
      << "\nn_layers " << c.n_layers << "\nn_kv_heads " << c.n_kv_heads << "\nhead_dim " << c.head_dim << "\nr " << c.r
      << "\ncalib_tokens " << c.calib_tokens << '\n';
    for (int l = 0; l < c.n_layers; ++l)
      for (int h = 0; h < c.n_kv_heads; ++h) {
        o << l << ' ' << h;
        for (int i = 0; i < c.r; ++i) o << ' ' << c.at(l, h)[i];
        o << '\n';
      }
    if (!o) fail("error writing '", tmp, "'");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) fail("cannot rename '", tmp, "' to '", path, "': ", ec.message());
}

DsChannels read_ds_channels(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("cannot read Double Sparsity channel file '", path, "'");
  DsChannels c;
  std::string line;
  int n = 0;
  auto next = [&](const char* what) {
    if (!std::getline(in, line)) fail(path, ": truncated (expected ", what, " at line ", n + 1, ")");
    ++n;
    if (!line.empty() && line.back() == '\r') line.pop_back();
  };
  // "key value" header line; value = rest of the line.
  auto field = [&](const char* key) {
    next(key);
    const std::string k = key;
    if (line.compare(0, k.size() + 1, k + " ") != 0) fail(path, ":", n, ": expected '", key, " ...', got '", line, "'");
    return line.substr(k.size() + 1);
  };
  auto integer = [&](const char* key, int64_t lo, int64_t hi) {
    const std::string v = field(key);
    char* end = nullptr;
    const long long x = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end || x < lo || x > hi) fail(path, ":", n, ": ", key, " must be an integer in [", lo, ", ", hi, "], got '", v, "'");
    return (int64_t)x;
  };
  next("the header");
  if (line != std::string(kMagic) + " " + std::to_string(kVersion))
    fail(path, ": not a Double Sparsity channel file (expected first line '", kMagic, " ", kVersion, "')");
  c.arch = field("arch");
  c.name = field("name");
  c.fingerprint = field("fingerprint");
  c.n_layers = (int)integer("n_layers", 1, 1024);
  c.n_kv_heads = (int)integer("n_kv_heads", 1, 1024);
  c.head_dim = (int)integer("head_dim", 1, 1024);
  c.r = (int)integer("r", 1, c.head_dim);
  c.calib_tokens = integer("calib_tokens", 0, std::numeric_limits<int64_t>::max());
  c.ch.resize((size_t)c.n_layers * c.n_kv_heads * c.r);
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_kv_heads; ++h) {
      next("a channel row");
      std::istringstream ls(line);
      long long ll = -1, hh = -1;
      if (!(ls >> ll >> hh) || ll != l || hh != h) fail(path, ":", n, ": expected the row of layer ", l, " head ", h);
      int32_t* row = c.ch.data() + ((size_t)l * c.n_kv_heads + h) * c.r;
      for (int i = 0; i < c.r; ++i) {
        long long x;
        if (!(ls >> x)) fail(path, ":", n, ": expected ", c.r, " channels, got ", i);
        if (x < 0 || x >= c.head_dim) fail(path, ":", n, ": channel ", x, " outside [0, ", c.head_dim, ")");
        row[i] = (int32_t)x;
      }
      std::string extra;
      if (ls >> extra) fail(path, ":", n, ": more than ", c.r, " channels");
    }
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") != std::string::npos) fail(path, ":", n, ": unexpected trailing content");
  }
  c.validate(path);
  return c;
}

void check_ds_model(const DsChannels& c, const std::string& path, int n_layers, int n_kv_heads, int head_dim,
                    const std::string& fingerprint) {
  TW_CHECK(c.n_layers == n_layers && c.n_kv_heads == n_kv_heads && c.head_dim == head_dim, "Double Sparsity file '",
           path, "' was calibrated for another model: '", c.name, "' (", c.n_layers, " layers, ", c.n_kv_heads,
           " kv heads, d ", c.head_dim, "), this model has ", n_layers, " layers, ", n_kv_heads, " kv heads, d ",
           head_dim, " (run twilight calibrate for it)");
  TW_CHECK(fingerprint.empty() || c.fingerprint == fingerprint, "Double Sparsity file '", path,
           "' was calibrated for another model: '", c.name, "' (fingerprint ", c.fingerprint,
           "), this model's fingerprint is ", fingerprint, " (run twilight calibrate for it)");
}

DsCalibration::DsCalibration(int n_layers, int n_heads, int n_kv_heads, int head_dim)
    : n_layers_(n_layers), h_(n_heads), hkv_(n_kv_heads), d_(head_dim) {
  TW_CHECK(n_layers > 0 && n_kv_heads > 0 && head_dim > 0 && n_heads > 0 && n_heads % n_kv_heads == 0,
           "ds calibration: invalid shape");
  tokens_.assign(n_layers, 0);
  sum_.assign((size_t)n_layers * n_kv_heads * head_dim, 0.0);
}

void DsCalibration::add(int layer, int64_t n, const float* q, const float* k) {
  TW_CHECK(layer >= 0 && layer < n_layers_ && n >= 0, "ds calibration: layer ", layer, " / n ", n, " out of range");
  const int G = h_ / hkv_;
  for (int64_t t = 0; t < n; ++t) {
    const float* qt = q + (size_t)t * h_ * d_;
    const float* kt = k + (size_t)t * hkv_ * d_;
    for (int h = 0; h < hkv_; ++h) {
      double* acc = sum_.data() + ((size_t)layer * hkv_ + h) * d_;
      const float* kh = kt + (size_t)h * d_;
      for (int g = 0; g < G; ++g) {
        const float* qh = qt + (size_t)(h * G + g) * d_;
        for (int c = 0; c < d_; ++c) acc[c] += std::fabs((double)qh[c] * kh[c]);
      }
    }
  }
  tokens_[layer] += n;
}

DsChannels DsCalibration::channels(int r) const {
  TW_CHECK(r >= 1 && r <= d_ && r <= kDsMaxR, "ds calibration: r = ", r, " channels must be in [1, ",
           std::min(d_, kDsMaxR), "]");
  DsChannels c;
  c.n_layers = n_layers_;
  c.n_kv_heads = hkv_;
  c.head_dim = d_;
  c.r = r;
  c.calib_tokens = tokens_[0];
  std::vector<int32_t> idx(d_);
  for (int l = 0; l < n_layers_; ++l)
    for (int h = 0; h < hkv_; ++h) {
      const double* s = sum(l, h);
      for (int i = 0; i < d_; ++i)
        TW_CHECK(std::isfinite(s[i]), "ds calibration: non-finite activations at layer ", l, " kv head ", h);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [s](int32_t a, int32_t b) { return s[a] > s[b]; });
      c.ch.insert(c.ch.end(), idx.begin(), idx.begin() + r);
    }
  return c;
}

DsSide::DsSide(const kv::KVShape& s, DsChannels channels) : shape_(s), ch_(std::move(channels)) {
  TW_CHECK(s.n_layers > 0 && s.n_kv_heads > 0 && s.head_dim > 0 && s.n_pages > 0, "ds side: invalid shape");
  ch_.validate("ds side");
  TW_CHECK(ch_.r <= kDsMaxR, "ds side: r = ", ch_.r, " channels, at most ", kDsMaxR, " supported");
  check_ds_model(ch_, "(in memory)", s.n_layers, s.n_kv_heads, s.head_dim, "");
  const size_t n = (size_t)s.n_pages * s.n_kv_heads * kv::kPageSize * ch_.r;
  for (int l = 0; l < s.n_layers; ++l) lab_.emplace_back(new uint16_t[n]);
}

size_t DsSide::bytes() const {
  return (size_t)shape_.n_layers * shape_.n_pages * shape_.n_kv_heads * kv::kPageSize * ch_.r * sizeof(uint16_t);
}

void DsSide::append(const kv::KVPool& pool, int layer, const kv::SeqPages& seq, int64_t pos) {
  const kv::KVShape& ps = pool.shape();
  TW_CHECK(ps.n_layers == shape_.n_layers && ps.n_kv_heads == shape_.n_kv_heads && ps.head_dim == shape_.head_dim &&
               ps.n_pages == shape_.n_pages,
           "ds side: shape does not match the kv pool");
  TW_CHECK(layer >= 0 && layer < shape_.n_layers, "ds side: layer ", layer, " out of range");
  TW_CHECK(pos >= 0 && pos / kv::kPageSize < (int64_t)seq.pages.size(), "ds side: position ", pos, " not reserved");
  const int32_t phys = seq.pages[pos / kv::kPageSize];
  TW_CHECK(phys >= 0 && phys < shape_.n_pages, "ds side: physical page ", phys, " out of range");
  const int slot = (int)(pos % kv::kPageSize), d = shape_.head_dim, r = ch_.r;
  for (int h = 0; h < shape_.n_kv_heads; ++h) {
    const uint16_t* k = pool.k_page(layer, phys, h) + (size_t)slot * d;
    uint16_t* dst = lab_[layer].get() + ((size_t)phys * shape_.n_kv_heads + h) * kv::kPageSize * r + slot;
    const int32_t* c = ch_.at(layer, h);
    for (int i = 0; i < r; ++i) dst[(size_t)i * kv::kPageSize] = k[c[i]];
  }
}

}  // namespace tw::attn
