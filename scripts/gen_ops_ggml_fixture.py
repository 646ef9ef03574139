#!/usr/bin/env python3
"""Writes src/ops/cpu/testdata/ggml_matmul_ref.bin: small random weight matrices of every type the
CPU matmul supports, random activations, and the product computed by llama.cpp's own CPU code
(ggml_mul_mat through the libggml of llama-cpp-python, called with ctypes). matmul_test.cpp checks
that tw::ops::matmul agrees with it to fp32 rounding, i.e. that we quantise the activations and
combine the block dots exactly as llama.cpp does.

Format (little endian): b"TWGM", u32 count, then per record:
  u32 ggml type id, u32 rows, u32 cols, u32 n, u32 nbytes, nbytes of weights,
  n*cols float32 activations, n*rows float32 results (row i = W . x_i).
Usage: gen_ops_ggml_fixture.py [out.bin]   (TW_GGML_LIB=dir overrides the libggml location)
"""
import ctypes as C
import os
import struct
import sys
from pathlib import Path

import numpy as np

if os.environ.get("TW_GGML_LIB"):
    lib_dir = Path(os.environ["TW_GGML_LIB"])
else:
    import llama_cpp
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
base = C.CDLL(str(lib_dir / "libggml-base.so.0"), mode=C.RTLD_GLOBAL)
cpu = C.CDLL(str(lib_dir / "libggml-cpu.so.0"), mode=C.RTLD_GLOBAL)


class InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


base.ggml_init.restype = C.c_void_p
base.ggml_init.argtypes = [InitParams]
base.ggml_free.argtypes = [C.c_void_p]
base.ggml_new_tensor_2d.restype = C.c_void_p
base.ggml_new_tensor_2d.argtypes = [C.c_void_p, C.c_int, C.c_int64, C.c_int64]
base.ggml_get_data.restype = C.c_void_p
base.ggml_get_data.argtypes = [C.c_void_p]
base.ggml_mul_mat.restype = C.c_void_p
base.ggml_mul_mat.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p]
base.ggml_new_graph.restype = C.c_void_p
base.ggml_new_graph.argtypes = [C.c_void_p]
base.ggml_build_forward_expand.argtypes = [C.c_void_p, C.c_void_p]
cpu.ggml_graph_compute_with_ctx.restype = C.c_int
cpu.ggml_graph_compute_with_ctx.argtypes = [C.c_void_p, C.c_void_p, C.c_int]
cpu.ggml_cpu_init()

rng = np.random.default_rng(4321)
# type id: (block bytes, block elems, fp16 field offsets)
LAYOUT = {2: (18, 32, [0]), 3: (20, 32, [0, 2]), 6: (22, 32, [0]), 7: (24, 32, [0, 2]), 8: (34, 32, [0]),
          12: (144, 256, [0, 2]), 13: (176, 256, [0, 2]), 14: (210, 256, [208])}
NAMES = {0: "F32", 1: "F16", 30: "BF16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
         12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


def weights(t, rows, cols):
    if t == 0:
        return (rng.standard_normal(rows * cols) * 0.1).astype(np.float32).tobytes()
    if t == 1:
        return (rng.standard_normal(rows * cols) * 0.1).astype(np.float16).tobytes()
    if t == 30:
        f = (rng.standard_normal(rows * cols) * 0.1).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    bb, be, fields = LAYOUT[t]
    raw = rng.integers(0, 256, (rows * cols // be, bb), dtype=np.uint8)
    for off in fields:
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.tobytes()


def ggml_matmul(t, rows, cols, n, wbytes, x):
    ctx = base.ggml_init(InitParams(len(wbytes) + x.nbytes + n * rows * 4 + (64 << 20), None, False))
    w = base.ggml_new_tensor_2d(ctx, t, cols, rows)
    C.memmove(base.ggml_get_data(w), wbytes, len(wbytes))
    xt = base.ggml_new_tensor_2d(ctx, 0, cols, n)
    C.memmove(base.ggml_get_data(xt), x.ctypes.data, x.nbytes)
    y = base.ggml_mul_mat(ctx, w, xt)
    gf = base.ggml_new_graph(ctx)
    base.ggml_build_forward_expand(gf, y)
    assert cpu.ggml_graph_compute_with_ctx(ctx, gf, 1) == 0
    out = np.ctypeslib.as_array((C.c_float * (n * rows)).from_address(base.ggml_get_data(y))).copy()
    base.ggml_free(ctx)
    return out


def main():
    dst = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "src/ops/cpu/testdata/ggml_matmul_ref.bin"
    recs = []
    for t in [0, 1, 30, 2, 3, 6, 7, 8, 12, 13, 14]:
        rows, cols, n = (8, 512, 2) if t in (12, 13, 14) else (8, 256, 2)
        wb = weights(t, rows, cols)
        x = rng.standard_normal(n * cols).astype(np.float32)
        x[rng.integers(0, n * cols, 16)] *= 8.0  # a few outliers, like real activations
        y = ggml_matmul(t, rows, cols, n, wb, x)
        assert np.all(np.isfinite(y)), NAMES[t]
        recs.append(struct.pack("<IIIII", t, rows, cols, n, len(wb)) + wb + x.tobytes() + y.astype(np.float32).tobytes())
    buf = b"TWGM" + struct.pack("<I", len(recs)) + b"".join(recs)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf)
    print(f"wrote {dst} ({len(buf)} bytes, {len(recs)} types)")


if __name__ == "__main__":
    main()
