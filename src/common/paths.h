// Where the project keeps what it fetches (outside the repo): models, data, Python tooling.
#pragma once
#include <string>

namespace tw {

// $TWILIGHT_CACHE, else $XDG_CACHE_HOME/twilight, else ~/.cache/twilight.
std::string cache_dir();
// <cache>/models/<file>
std::string model_path(const std::string& file);

// The models scripts/fetch_models.py assembles (file names inside <cache>/models).
inline constexpr const char* kSmolLM2File = "SmolLM2-135M-Instruct-Q4_1.gguf";        // default + test model
inline constexpr const char* kQwen15File = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf";  // 32k context
inline constexpr const char* kQwen05File = "Qwen2.5-Coder-0.5B-Instruct-AWQ.gguf";     // 32k context, smaller

// Path of a model that tests need; throws tw::Error telling the user to run the fetch script when
// the file is missing (tests that need a model fail, they never skip silently).
std::string require_model(const std::string& file);

}  // namespace tw
