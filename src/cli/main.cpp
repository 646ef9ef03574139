// twilight: one executable, subcommands. Every error is one line on stderr and a non-zero exit.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "cli/commands.h"
#include "common/error.h"

namespace {
const char* kUsage =
    "usage: twilight <command> [options]\n"
    "\n"
    "commands:\n"
    "  generate   generate text from a prompt (default model when -m is not given)\n"
    "  bench      llama-bench style speed rows (pp512, tg128, tg128 @ dN)\n"
    "  perplexity perplexity and KL(dense || sparse) of decode-mode attention configs over a text\n"
    "  needle     needle-in-a-haystack retrieval under attention configs (one dense prefill)\n"
    "  calibrate  write a model's Double Sparsity channel file from a prefill over a text\n"
    "\n"
    "twilight <command> --help shows the options of a command.\n";
}

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "--help")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "generate") return tw::cli::cmd_generate(argc, argv);
    if (cmd == "bench") {
      for (int i = 2; i < argc; ++i)
        if (!std::strcmp(argv[i], "--gpu")) return tw::cli::cmd_bench_gpu(argc, argv);
      return tw::cli::cmd_bench(argc, argv);
    }
    if (cmd == "perplexity") return tw::cli::cmd_perplexity(argc, argv);
    if (cmd == "needle") return tw::cli::cmd_needle(argc, argv);
    if (cmd == "calibrate") return tw::cli::cmd_calibrate(argc, argv);
    std::fprintf(stderr, "twilight: unknown command '%s'\n\n%s", cmd.c_str(), kUsage);
    return 2;
  } catch (const tw::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "\ntwilight %s: error: %s\n", cmd.c_str(), e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "\ntwilight %s: error: out of memory\n", cmd.c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\ntwilight %s: internal error: %s\n", cmd.c_str(), e.what());
    return 3;
  }
}
