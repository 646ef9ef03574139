#!/usr/bin/env bash
# The FlashInfer dense-decode anchor's wheels for the GPU machine (no network there): downloaded here
# into build-wheels/ (ignored by git; ~10 MB, carried by the device tool), pinned by version and
# sha256. The GPU machine's image has torch, ninja and FlashInfer's other run-time needs for the decode
# paths; gpu_bench.sh installs these two with pip --no-index there.
#   bash scripts/fetch_anchor_wheels.sh && device tool: carry [..., "build-wheels"]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-build-wheels}
mkdir -p "$DEST"
# name==version  sha256 (python 3.12, manylinux x86_64: the GPU machine's python3)
WHEELS=(
  "flashinfer-python==0.5.3 b601293b72f9138bad173edc28df84b9f239a013be974e2e79d4ba98aeb38cf5"
  "apache-tvm-ffi==0.1.15.post2 059eed9bfc94bcd41650fb8eefde74040a1bc7e7b1a6f0a8ff897b02b118875b"
)
for w in "${WHEELS[@]}"; do
  read -r spec sum <<<"$w"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$DEST" "$spec"
done
for w in "${WHEELS[@]}"; do
  read -r spec sum <<<"$w"
  name=${spec%%==*}; ver=${spec##*==}
  f=$(ls "$DEST"/"${name//-/_}"-"$ver"-*.whl)
  got=$(sha256sum "$f" | cut -d' ' -f1)
  [ "$got" = "$sum" ] || { echo "sha256 mismatch for $f: $got, want $sum" >&2; rm -f "$f"; exit 1; }
  echo "ok $f"
done
