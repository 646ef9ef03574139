#!/usr/bin/env bash
# Set up a machine to build, test and run twilight (Debian 12; run as root, or as a user with sudo).
#
#   scripts/setup.sh [--reference] [--no-apt] [--no-models] [fetch_models.py options...]
#
#   1. apt packages: only the missing ones are installed (dpkg is asked first, so a second run
#      touches neither the network nor apt);
#   2. a Python venv for the tooling at $TWILIGHT_CACHE/venv (default ~/.cache/twilight/venv) with
#      the pinned requirements-tools.txt; --reference also installs llama-cpp-python
#      (requirements-reference.txt; it compiles llama.cpp, ~15 min on 2 cores);
#   3. the models, via scripts/fetch_models.py (default: all three, as the tests use them; --only NAME
#      for fewer); already verified models are not fetched again;
#   4. the evaluation text (Jane Austen's novels from r-cran-janeaustenr) via scripts/fetch_data.py.
# nvcc is optional: CMake builds the CUDA backend when it finds one.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n "${TWILIGHT_CACHE:-}" ]]; then CACHE=$TWILIGHT_CACHE
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then CACHE=$XDG_CACHE_HOME/twilight
else CACHE=${HOME:-.}/.cache/twilight; fi
VENV=$CACHE/venv

REFERENCE=0 APT=1 MODELS=1
FETCH_ARGS=()
for a in "$@"; do
  case "$a" in
    --reference) REFERENCE=1 ;;
    --no-apt) APT=0 ;;
    --no-models) MODELS=0 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) FETCH_ARGS+=("$a") ;;
  esac
done

say() { printf '[setup] %s\n' "$*"; }
T0=$SECONDS

# ---- 1. system packages ---------------------------------------------------------------------------
# libclang-rt-14-dev: libFuzzer for fuzz/; r-cran-janeaustenr: the evaluation text (plain English).
PKGS=(cmake ninja-build g++ pkg-config git ca-certificates python3 python3-venv python3-pip
      libgtest-dev libgmock-dev nlohmann-json3-dev clang libclang-rt-14-dev llvm-14 r-cran-janeaustenr)
missing=()
if command -v dpkg-query >/dev/null; then
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
else
  say "no dpkg here (not Debian?): not checking system packages; you need: ${PKGS[*]}"
fi
if ((${#missing[@]})); then
  if ((APT == 0)); then
    say "warning: missing packages (--no-apt given, not installing): ${missing[*]}"
  else
    if [[ $(id -u) -eq 0 ]]; then SUDO=()
    elif command -v sudo >/dev/null; then SUDO=(sudo)
    else echo "[setup] error: missing packages ${missing[*]} and not root (no sudo either)" >&2; exit 1; fi
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq </dev/null
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
  fi
else
  say "system packages: all ${#PKGS[@]} present"
fi

if command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  say "nvcc found: CMake will build the CUDA backend (TWILIGHT_CUDA=AUTO)"
else
  say "no nvcc: CPU-only build (GPU tests are not built)"
fi

# ---- 2. Python venv for the tooling --------------------------------------------------------------
mkdir -p "$CACHE"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  say "creating venv $VENV"
  rm -rf "$VENV"  # ours (inside the twilight cache) and broken or absent
  python3 -m venv "$VENV"
fi
# Install a requirements set only when its content changed since the last successful install.
install_reqs() {  # $1: requirements file, $2: stamp name
  local want have
  want=$(cat "$1" "$ROOT/requirements-tools.txt" | sha256sum | cut -d' ' -f1)
  have=$(cat "$VENV/.installed-$2" 2>/dev/null || true)
  if [[ "$want" == "$have" ]]; then
    say "venv: $2 requirements up to date"
    return
  fi
  say "venv: pip install -r $(basename "$1") (into $VENV)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$1" </dev/null
  echo "$want" >"$VENV/.installed-$2"
}
install_reqs "$ROOT/requirements-tools.txt" tools
if ((REFERENCE)); then
  install_reqs "$ROOT/requirements-reference.txt" reference
fi

# ---- 3. models ---------------------------------------------------------------------------------
if ((MODELS)); then
  "$VENV/bin/python" "$ROOT/scripts/fetch_models.py" "${FETCH_ARGS[@]}"
elif ((${#FETCH_ARGS[@]})); then
  echo "[setup] error: unknown option(s) ${FETCH_ARGS[*]} (model options make no sense with --no-models)" >&2
  exit 2
fi

# ---- 4. evaluation text (twilight perplexity / needle) ------------------------------------------
if [[ -d /usr/lib/R/site-library/janeaustenr/data ]]; then
  "$VENV/bin/python" "$ROOT/scripts/fetch_data.py"
else
  say "warning: r-cran-janeaustenr not installed: no evaluation text (scripts/fetch_data.py)"
fi
say "done in $((SECONDS - T0)) s (cache: $CACHE)"
