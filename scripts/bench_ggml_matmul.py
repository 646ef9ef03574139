#!/usr/bin/env python3
"""Reference timings for bench/ops_bench.cpp: llama.cpp's own CPU mul_mat (ggml, through the
libggml shipped with llama-cpp-python, called with ctypes) on the same Qwen2.5-1.5B tensors.
This is ggml's plain graph path (quantise activations + vec_dot / llamafile sgemm), without the
weight repacking llama.cpp's model loader may add.
Usage: bench_ggml_matmul.py [model.gguf | --synthetic]
  --synthetic: random blocks of the same shapes/types (no model file; speed does not depend on values)
  TW_GGML_LIB=dir: take libggml-base.so.0 / libggml-cpu.so.0 from dir instead of llama_cpp's package"""
import ctypes as C
import os
import sys
import time
from pathlib import Path

import numpy as np
if os.environ.get("TW_GGML_LIB"):
    lib_dir = Path(os.environ["TW_GGML_LIB"])
    version = "TW_GGML_LIB"
else:
    import llama_cpp
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    version = llama_cpp.__version__
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


class SynTensor:
    """Random valid blocks (small positive fp16 scales) of a model tensor's shape and type."""
    SHAPES = {"blk.0.ffn_up.weight": (12, 1536, 8960, 144), "blk.0.ffn_down.weight": (14, 8960, 1536, 210),
              "blk.0.attn_q.weight": (12, 1536, 1536, 144), "q05.ffn_up.Q5_0": (6, 896, 4864, 22),
              "q05.attn_q.Q8_0": (8, 896, 896, 34), "smol.ffn_up.Q4_1": (3, 576, 1536, 20)}
    BE = {12: 256, 14: 256, 6: 32, 8: 32, 3: 32}

    def __init__(self, name):
        ty, cols, rows, bb = self.SHAPES[name]
        self.name, self.shape = name, (cols, rows)
        self.tensor_type = type("T", (), {"name": {12: "Q4_K", 14: "Q6_K", 6: "Q5_0", 8: "Q8_0", 3: "Q4_1"}[ty],
                                          "__int__": lambda s: ty})()
        raw = np.random.default_rng(5).integers(0, 256, rows * cols // self.BE[ty] * bb, dtype=np.uint8).reshape(-1, bb)
        for off in ([0, 2] if ty in (12, 3) else [208] if ty == 14 else [0]):
            raw[:, off], raw[:, off + 1] = 0x00, 0x20
        self.data = raw.reshape(-1)


class SynReader:
    def __init__(self):
        self.tensors = [SynTensor(n) for n in SynTensor.SHAPES]


def bench(reader, name, n, threads, reps):
    t = next(t for t in reader.tensors if t.name == name)
    cols, rows = int(t.shape[0]), int(t.shape[1])
    raw = np.ascontiguousarray(t.data).view(np.uint8)
    ctx = base.ggml_init(InitParams(raw.nbytes + n * cols * 4 + n * rows * 4 + (256 << 20), None, False))
    w = base.ggml_new_tensor_2d(ctx, int(t.tensor_type), cols, rows)
    C.memmove(base.ggml_get_data(w), raw.ctypes.data, raw.nbytes)
    x = base.ggml_new_tensor_2d(ctx, 0, cols, n)
    xs = np.random.default_rng(1).standard_normal(n * cols).astype(np.float32)
    C.memmove(base.ggml_get_data(x), xs.ctypes.data, xs.nbytes)
    y = base.ggml_mul_mat(ctx, w, x)
    gf = base.ggml_new_graph(ctx)
    base.ggml_build_forward_expand(gf, y)
    best = 1e30
    for _ in range(reps):
        t0 = time.perf_counter()
        cpu.ggml_graph_compute_with_ctx(ctx, gf, threads)
        best = min(best, time.perf_counter() - t0)
    base.ggml_free(ctx)
    return rows, cols, t.tensor_type.name, raw.nbytes, best


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
        "~/.cache/twilight/models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf")
    if path == "--synthetic":
        reader = SynReader()
    else:
        from gguf import GGUFReader
        reader = GGUFReader(path)
    print("ggml (llama.cpp", version, ")", path)
    for name in ["blk.0.ffn_up.weight", "blk.0.ffn_down.weight"]:
        for th in [1, 2]:
            rows, cols, ty, nbytes, t = bench(reader, name, 1, th, 30)
            print(f"matvec {name:22s} {ty:5s} {rows}x{cols} threads={th}  {t*1e6:8.1f} us  {nbytes/t/1e9:6.2f} GB/s")
    names = ["blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight"]
    if isinstance(reader, SynReader):
        names += ["q05.ffn_up.Q5_0", "q05.attn_q.Q8_0", "smol.ffn_up.Q4_1"]
    for name in names:
        for n in [64, 256, 512]:
            for th in [1, 2]:
                rows, cols, ty, nbytes, t = bench(reader, name, n, th, 3)
                print(f"matmul {name:22s} {ty:5s} {rows}x{cols} n={n:<4d} threads={th}  {t*1e3:8.2f} ms  {2*rows*cols*n/t/1e9:7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
