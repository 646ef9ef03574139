// twilight: one executable, subcommands (generate, bench, ...).
#include <cstdio>
#include <exception>
#include <string>

#include "common/error.h"

int main(int argc, char** argv) {
  std::fprintf(stderr, "usage: twilight <generate|bench> [options]\n");
  return 2;
}
