// One error type for the whole engine: every bad input ends as a tw::Error with a message that
// names the problem; the CLI prints it and exits non-zero. No silent fallbacks.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace tw {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(cat(args...));
}

}  // namespace tw

// TW_CHECK(cond, "message parts", ...): throw tw::Error when cond is false.
#define TW_CHECK(cond, ...)                  \
  do {                                       \
    if (!(cond)) ::tw::fail(__VA_ARGS__);    \
  } while (0)
