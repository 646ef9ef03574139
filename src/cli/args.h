// A small command-line parser: declared flags with typed targets, checked values, one clear error.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace tw::cli {

class Args {
 public:
  explicit Args(std::string command) : command_(std::move(command)) {}

  // Register flags. names: e.g. {"-n", "--n-predict"}.
  void flag(std::vector<std::string> names, std::string help, bool* target);
  void opt(std::vector<std::string> names, std::string metavar, std::string help, std::string* target);
  void opt(std::vector<std::string> names, std::string metavar, std::string help, int64_t* target, int64_t lo, int64_t hi);
  void opt(std::vector<std::string> names, std::string metavar, std::string help, int* target, int lo, int hi);
  void opt(std::vector<std::string> names, std::string metavar, std::string help, float* target, float lo, float hi);
  void opt(std::vector<std::string> names, std::string metavar, std::string help, uint64_t* target);
  // Repeatable option: every occurrence appends its value.
  void opt(std::vector<std::string> names, std::string metavar, std::string help, std::vector<std::string>* target);

  // Parses argv[first..argc); throws tw::Error on unknown flags, missing or invalid values.
  // Returns false when help was requested (usage already printed to stdout).
  bool parse(int argc, char** argv, int first);
  std::string usage() const;
  bool given(const std::string& name) const;  // was this flag (any alias) on the command line

 private:
  struct Spec {
    std::vector<std::string> names;
    std::string metavar, help;
    std::function<void(const std::string& name, const std::string& value)> set;  // value empty for bool flags
    bool takes_value = true;
    bool seen = false;
  };
  Spec* find(const std::string& name);
  std::string command_;
  std::vector<Spec> specs_;
};

}  // namespace tw::cli
