#pragma once

namespace tw::cli {
// Each returns the process exit code; tw::Error escapes to main, which prints it.
int cmd_generate(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_bench_gpu(int argc, char** argv);  // bench --gpu (bench_gpu.cpp)
int cmd_perplexity(int argc, char** argv);  // perplexity.cpp: ppl / KL of sparse vs dense decode
int cmd_needle(int argc, char** argv);      // needle.cpp: needle-in-a-haystack retrieval
int cmd_calibrate(int argc, char** argv);   // calibrate.cpp: Double Sparsity channel file
}  // namespace tw::cli
