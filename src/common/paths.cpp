#include "common/paths.h"

#include <cstdlib>
#include <filesystem>

#include "common/error.h"

namespace tw {

std::string cache_dir() {
  if (const char* c = std::getenv("TWILIGHT_CACHE"); c && *c) return c;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/twilight";
  const char* home = std::getenv("HOME");
  return std::string(home && *home ? home : ".") + "/.cache/twilight";
}

std::string model_path(const std::string& file) { return cache_dir() + "/models/" + file; }

std::string require_model(const std::string& file) {
  const std::string p = model_path(file);
  if (!std::filesystem::exists(p))
    fail("model '", p, "' is not there: run scripts/setup.sh (or python3 scripts/fetch_models.py) first");
  return p;
}

}  // namespace tw
