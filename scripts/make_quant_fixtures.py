#!/usr/bin/env python3
"""Reference fixtures for tw::gguf::dequantize_row, produced by the `gguf` Python package
(gguf.quants.dequantize, which matches ggml's dequantize_row_* bit for bit).

Writes into tests/fixtures/quants/:
  <TYPE>.bin  random blocks of that type (random bytes, but every fp16 scale field finite; a few
              scales are fp16 subnormals so the half->float path is exercised)
  <TYPE>.f32  the gguf-py dequantisation of <TYPE>.bin, little-endian float32
  models.txt  for a few tensors of every type in the three project models: a few rows, each with the
              FNV-1a 64 hash of the gguf-py float32 row bytes and the row sum (checked bit-exactly by
              src/gguf/quants_test.cpp)

Usage: python3 scripts/make_quant_fixtures.py [--no-models]
The model part needs the models in the twilight cache (scripts/fetch_models.py).
"""
import argparse
import os
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFReader
from gguf.quants import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "quants")

# Byte offsets of the fp16 scale fields in each block (ggml-common.h layouts).
HALF_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
# Blocks per type: enough to cover every code path, small enough to keep the fixtures ~ tens of KB.
N_BLOCKS = {T.Q4_0: 8, T.Q4_1: 8, T.Q5_0: 8, T.Q5_1: 8, T.Q8_0: 8, T.Q4_K: 3, T.Q5_K: 3, T.Q6_K: 3}
N_FLOAT = 256  # elements for F32 / F16 / BF16

MODELS = [  # (file name in <cache>/models, as in src/common/paths.h)
    "SmolLM2-135M-Instruct-Q4_1.gguf",
    "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
    "Qwen2.5-Coder-0.5B-Instruct-AWQ.gguf",
]


def cache_dir():
    if os.environ.get("TWILIGHT_CACHE"):
        return os.environ["TWILIGHT_CACHE"]
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "twilight")
    return os.path.join(os.path.expanduser("~"), ".cache", "twilight")


def random_halves(rng, n):
    """Finite fp16 values of moderate magnitude, every 5th one a subnormal."""
    mag = np.exp2(rng.uniform(-12, 2, n)).astype(np.float32)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)
    h = (mag * sign).astype(np.float16)
    sub = rng.integers(1, 0x3FF, n).astype(np.uint16) | np.where(rng.random(n) < 0.5, 0x8000, 0).astype(np.uint16)
    bits = h.view(np.uint16).copy()
    bits[::5] = sub[::5]
    return bits


def random_floats(rng, qtype):
    """Raw bytes for F32/F16/BF16 with signed zeros, infinities, subnormals and ordinary values."""
    if qtype == T.F32:
        v = rng.standard_normal(N_FLOAT).astype(np.float32) * 10
        v[:6] = [0.0, -0.0, np.inf, -np.inf, 1e-40, -3e-45]  # the last two are f32 subnormals
        return v.view(np.uint8)
    bits = rng.integers(0, 1 << 16, N_FLOAT).astype(np.uint16)
    if qtype == T.F16:
        bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # no NaN (payload handling is not what we test)
        bits[:6] = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x0001, 0x83FF]
    else:
        bits[(bits & 0x7F80) == 0x7F80] &= 0xFF7F  # BF16: no NaN
        bits[:6] = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x807F]
    return bits.view(np.uint8)


def make_random(rng):
    os.makedirs(OUT, exist_ok=True)
    for qtype in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]:
        if qtype in N_BLOCKS:
            _, bsz = GGML_QUANT_SIZES[qtype]
            nb = N_BLOCKS[qtype]
            raw = rng.integers(0, 256, (nb, bsz)).astype(np.uint8)
            for off in HALF_FIELDS[qtype]:
                raw[:, off:off + 2] = random_halves(rng, nb).view(np.uint8).reshape(nb, 2)
            raw = raw.reshape(-1)
        else:
            raw = random_floats(rng, qtype)
        ref = dequantize(raw, qtype).astype("<f4").reshape(-1)
        assert np.all(np.isfinite(ref) | (qtype in (T.F32, T.F16, T.BF16))), qtype.name
        with open(os.path.join(OUT, qtype.name + ".bin"), "wb") as f:
            f.write(raw.tobytes())
        with open(os.path.join(OUT, qtype.name + ".f32"), "wb") as f:
            f.write(ref.tobytes())
        print(f"{qtype.name}: {raw.size} bytes -> {ref.size} floats")


def fnv1a64(b):
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def make_models():
    lines = ["# model tensor type row ne0 fnv1a64(float32 row bytes) sum(row, float64)"]
    for name in MODELS:
        path = os.path.join(cache_dir(), "models", name)
        r = GGUFReader(path)
        by_type = {}
        for t in r.tensors:
            by_type.setdefault(t.tensor_type, []).append(t)
        for qtype, ts in sorted(by_type.items(), key=lambda kv: kv[0].value):
            picks = [ts[0], ts[len(ts) // 2], ts[-1]]  # first, middle, last of this type in file order
            seen = set()
            for t in picks:
                if t.name in seen:
                    continue
                seen.add(t.name)
                ne0 = int(t.shape[0])
                rows = int(np.prod([int(d) for d in t.shape])) // ne0
                bs, bsz = GGML_QUANT_SIZES[qtype]
                rb = ne0 // bs * bsz
                raw = np.asarray(r.data[t.data_offset:t.data_offset + rows * rb]).reshape(rows, rb)
                for row in sorted({0, rows // 2, rows - 1}):
                    v = dequantize(raw[row].copy(), qtype).astype("<f4").reshape(-1)
                    assert v.size == ne0
                    lines.append(f"{name} {t.name} {qtype.name} {row} {ne0} {fnv1a64(v.tobytes()):016x} "
                                 f"{float(np.sum(v.astype(np.float64))):.17g}")
        print(f"{name}: {sum(len(v) for v in by_type.values())} tensors, types {[k.name for k in by_type]}")
    with open(os.path.join(OUT, "models.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"models.txt: {len(lines) - 1} rows")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-models", action="store_true", help="only the random-block fixtures")
    args = ap.parse_args()
    make_random(np.random.default_rng(20250101))
    if not args.no_models:
        make_models()


if __name__ == "__main__":
    sys.exit(main())
