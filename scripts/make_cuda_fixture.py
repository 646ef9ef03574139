#!/usr/bin/env python3
"""Extract a few rows of real tensors into src/ops/cuda/testdata/real_rows.bin, the small fixture the
CUDA tests use on the GPU machine (the model files are too big to carry there).

Format (little endian): b"TWFX", u32 version=1, u32 count, then per entry:
  u32 name_len, name (utf-8), u32 source_len, source file name (utf-8), u32 ggml type id,
  i64 cols (ne[0]), i64 first_row, i64 rows, u64 nbytes, nbytes of raw GGUF row data.
A 1-D tensor (norm weight) is stored as rows=1.

Usage: python3 scripts/make_cuda_fixture.py [--models DIR] [--out FILE]
"""
import argparse
import os
import struct

import gguf
import numpy as np

# (model file, tensor, first row, rows): SmolLM2 (Q4_1 layers, Q8_0 embedding, F32 norm) is the
# project's test model; a few Qwen2.5-1.5B rows add real Q4_K and Q6_K blocks.
PICKS = [
    ("SmolLM2-135M-Instruct-Q4_1.gguf", "blk.0.ffn_down.weight", 100, 16),
    ("SmolLM2-135M-Instruct-Q4_1.gguf", "blk.0.attn_q.weight", 0, 8),
    ("SmolLM2-135M-Instruct-Q4_1.gguf", "token_embd.weight", 1000, 8),
    ("SmolLM2-135M-Instruct-Q4_1.gguf", "blk.0.attn_norm.weight", 0, 1),
    ("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", "blk.0.ffn_gate.weight", 7, 4),
    ("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", "blk.0.ffn_down.weight", 3, 2),
]


def default_models_dir():
    cache = os.environ.get("TWILIGHT_CACHE")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = os.path.join(xdg, "twilight") if xdg else os.path.expanduser("~/.cache/twilight")
    return os.path.join(cache, "models")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=default_models_dir())
    ap.add_argument("--out", default=os.path.join(here, "..", "src", "ops", "cuda", "testdata", "real_rows.bin"))
    args = ap.parse_args()

    readers = {}
    entries = []
    for fname, tname, first, rows in PICKS:
        if fname not in readers:
            readers[fname] = gguf.GGUFReader(os.path.join(args.models, fname))
        t = next(t for t in readers[fname].tensors if t.name == tname)
        cols = int(t.shape[0])
        total_rows = int(np.prod([int(s) for s in t.shape[1:]])) if len(t.shape) > 1 else 1
        assert first + rows <= total_rows, (tname, first, rows, total_rows)
        raw = np.asarray(t.data).view(np.uint8).reshape(-1)
        row_bytes = raw.size // total_rows
        data = raw[first * row_bytes:(first + rows) * row_bytes].tobytes()
        entries.append((tname, fname, int(t.tensor_type), cols, first, rows, data))

    out = bytearray(b"TWFX" + struct.pack("<II", 1, len(entries)))
    for name, src, ty, cols, first, rows, data in entries:
        nb, sb = name.encode(), src.encode()
        out += struct.pack("<I", len(nb)) + nb + struct.pack("<I", len(sb)) + sb
        out += struct.pack("<Iqqq Q".replace(" ", ""), ty, cols, first, rows, len(data)) + data
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:
        f.write(out)
    print(f"wrote {args.out}: {len(entries)} entries, {len(out)} bytes")


if __name__ == "__main__":
    main()
