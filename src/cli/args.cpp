#include "cli/args.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "common/error.h"

namespace tw::cli {

namespace {
int64_t parse_int(const std::string& name, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno == ERANGE) fail(name, ": expected an integer, got '", v, "'");
  return x;
}
float parse_float(const std::string& name, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  const float x = std::strtof(v.c_str(), &end);
  if (v.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(x)) fail(name, ": expected a number, got '", v, "'");
  return x;
}
}  // namespace

void Args::flag(std::vector<std::string> names, std::string help, bool* t) {
  Spec s{std::move(names), "", std::move(help), [t](const std::string&, const std::string&) { *t = true; }};
  s.takes_value = false;
  specs_.push_back(std::move(s));
}
void Args::opt(std::vector<std::string> names, std::string mv, std::string help, std::string* t) {
  specs_.push_back({std::move(names), std::move(mv), std::move(help), [t](const std::string&, const std::string& v) { *t = v; }});
}
void Args::opt(std::vector<std::string> names, std::string mv, std::string help, int64_t* t, int64_t lo, int64_t hi) {
  specs_.push_back({std::move(names), std::move(mv), std::move(help), [t, lo, hi](const std::string& n, const std::string& v) {
                      const int64_t x = parse_int(n, v);
                      if (x < lo || x > hi) fail(n, " must be in [", lo, ", ", hi, "], got ", x);
                      *t = x;
                    }});
}
void Args::opt(std::vector<std::string> names, std::string mv, std::string help, int* t, int lo, int hi) {
  specs_.push_back({std::move(names), std::move(mv), std::move(help), [t, lo, hi](const std::string& n, const std::string& v) {
                      const int64_t x = parse_int(n, v);
                      if (x < lo || x > hi) fail(n, " must be in [", lo, ", ", hi, "], got ", x);
                      *t = (int)x;
                    }});
}
void Args::opt(std::vector<std::string> names, std::string mv, std::string help, float* t, float lo, float hi) {
  specs_.push_back({std::move(names), std::move(mv), std::move(help), [t, lo, hi](const std::string& n, const std::string& v) {
                      const float x = parse_float(n, v);
                      if (x < lo || x > hi) fail(n, " must be in [", lo, ", ", hi, "], got ", v);
                      *t = x;
                    }});
}
void Args::opt(std::vector<std::string> names, std::string mv, std::string help, uint64_t* t) {
  specs_.push_back({std::move(names), std::move(mv), std::move(help), [t](const std::string& n, const std::string& v) {
                      const int64_t x = parse_int(n, v);
                      if (x < 0) fail(n, " must be >= 0, got ", x);
                      *t = (uint64_t)x;
                    }});
}

void Args::opt(std::vector<std::string> names, std::string mv, std::string help, std::vector<std::string>* t) {
  specs_.push_back({std::move(names), std::move(mv), std::move(help),
                    [t](const std::string&, const std::string& v) { t->push_back(v); }});
}

Args::Spec* Args::find(const std::string& name) {
  for (Spec& s : specs_)
    for (const std::string& n : s.names)
      if (n == name) return &s;
  return nullptr;
}

bool Args::given(const std::string& name) const {
  for (const Spec& s : specs_)
    for (const std::string& n : s.names)
      if (n == name) return s.seen;
  return false;
}

bool Args::parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i], value;
    if (a == "-h" || a == "--help") {
      std::fputs(usage().c_str(), stdout);
      return false;
    }
    bool inline_value = false;
    if (a.rfind("--", 0) == 0) {
      const size_t eq = a.find('=');
      if (eq != std::string::npos) {
        value = a.substr(eq + 1);
        a = a.substr(0, eq);
        inline_value = true;
      }
    }
    Spec* s = find(a);
    if (!s) fail("twilight ", command_, ": unknown option '", a, "' (see twilight ", command_, " --help)");
    if (s->takes_value && !inline_value) {
      if (i + 1 >= argc) fail("twilight ", command_, ": option ", a, " needs a value");
      value = argv[++i];
    } else if (!s->takes_value && inline_value) {
      fail("twilight ", command_, ": option ", a, " takes no value");
    }
    s->set(a, value);
    s->seen = true;
  }
  return true;
}

std::string Args::usage() const {
  std::ostringstream os;
  os << "usage: twilight " << command_ << " [options]\n\noptions:\n";
  for (const Spec& s : specs_) {
    std::string lhs;
    for (size_t k = 0; k < s.names.size(); ++k) lhs += (k ? ", " : "") + s.names[k];
    if (s.takes_value) lhs += " " + s.metavar;
    os << "  " << lhs;
    os << std::string(lhs.size() < 28 ? 28 - lhs.size() : 1, ' ') << s.help << "\n";
  }
  os << "  -h, --help                  show this help\n";
  return os.str();
}

}  // namespace tw::cli
