#!/usr/bin/env python3
"""Writes src/ops/cpu/testdata/dequant_ref.bin: random valid blocks of every weight type the CPU
matmul supports, with their dequantised values computed by the `gguf` Python package (llama.cpp's
own numpy reference). matmul_test.cpp checks tw::ops get_row / dequantize_row_ref against it, so the
block layouts are verified by an implementation independent of ours.

Format (little endian): b"TWQF", u32 count, then per record:
  u32 ggml type id, u32 n elements, u32 nbytes, nbytes of blocks, n float32 values.
"""
import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

N = 512  # elements per record: 2 k-quant super-blocks, 16 blocks of 32
rng = np.random.default_rng(1234)


def f16(x):
    return np.asarray(x, dtype=np.float16).tobytes()


def random_blocks(t):
    """Random quant bits with sane fp16 scales (random bytes there could be inf/nan)."""
    if t == T.F32:
        return rng.standard_normal(N).astype(np.float32).tobytes()
    if t == T.F16:
        return (rng.standard_normal(N) * 0.1).astype(np.float16).tobytes()
    if t == T.BF16:
        f = (rng.standard_normal(N) * 0.1).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    layout = {  # block bytes, block elems, fp16 field offsets
        T.Q4_0: (18, 32, [0]), T.Q4_1: (20, 32, [0, 2]), T.Q5_0: (22, 32, [0]), T.Q5_1: (24, 32, [0, 2]),
        T.Q8_0: (34, 32, [0]), T.Q4_K: (144, 256, [0, 2]), T.Q5_K: (176, 256, [0, 2]), T.Q6_K: (210, 256, [208]),
    }[t]
    bb, be, fields = layout
    out = bytearray()
    for _ in range(N // be):
        blk = bytearray(rng.integers(0, 256, bb, dtype=np.uint8).tobytes())
        for off in fields:
            blk[off:off + 2] = f16(rng.uniform(-0.05, 0.05))
        out += blk
    return bytes(out)


def main():
    dst = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "src/ops/cpu/testdata/dequant_ref.bin"
    types = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
    buf = bytearray(b"TWQF" + struct.pack("<I", len(types)))
    for t in types:
        raw = random_blocks(t)
        vals = dequantize(np.frombuffer(raw, dtype=np.uint8), t).astype(np.float32).reshape(-1)
        assert vals.size == N and np.all(np.isfinite(vals)), t
        buf += struct.pack("<III", int(t), N, len(raw)) + raw + vals.tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(buf))
    print(f"wrote {dst} ({len(buf)} bytes, {len(types)} types)")


if __name__ == "__main__":
    main()
