#pragma once

namespace tw::cli {
// Each returns the process exit code; tw::Error escapes to main, which prints it.
int cmd_generate(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_calibrate(int argc, char** argv);
}  // namespace tw::cli
