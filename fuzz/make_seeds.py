#!/usr/bin/env python3
"""Seed corpus for fuzz/gguf_fuzz: small valid GGUF files written with the gguf-py writer.

One file per supported tensor type (1-3 tiny tensors of random blocks with finite fp16 scales),
plus files that carry every metadata value type, custom alignments, 1-4 dims, and no tensors.
Usage: python3 fuzz/make_seeds.py OUT_DIR
"""
import os
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType as V, GGUFWriter

TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
HALF_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
               T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def tensor_bytes(rng, qtype, rows, blocks_per_row):
    bs, bsz = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * blocks_per_row, bsz)).astype(np.uint8)
    for off in HALF_FIELDS.get(qtype, []):
        h = rng.uniform(-1, 1, rows * blocks_per_row).astype(np.float16)
        raw[:, off:off + 2] = h.view(np.uint8).reshape(-1, 2)
    if qtype == T.F32:
        raw = rng.standard_normal(rows * blocks_per_row).astype(np.float32).view(np.uint8).reshape(-1, 4)
    elif qtype in (T.F16, T.BF16):
        raw = rng.standard_normal(rows * blocks_per_row).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks_per_row * bsz)


def write(path, build, alignment=None):
    w = GGUFWriter(path, "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "seeds"
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(7)

    for qtype in TYPES:
        def build(w, qtype=qtype):
            w.add_uint32("llama.block_count", 1)
            for k, rows in enumerate([1, 2]):
                raw = tensor_bytes(rng, qtype, rows, 1)
                w.add_tensor(f"t{k}.weight", raw, raw_dtype=qtype)
        write(os.path.join(out, f"type_{qtype.name}.gguf"), build)

    def all_values(w):
        w.add_key_value("v.u8", 200, V.UINT8)
        w.add_key_value("v.i8", -5, V.INT8)
        w.add_key_value("v.u16", 60000, V.UINT16)
        w.add_key_value("v.i16", -300, V.INT16)
        w.add_key_value("v.u32", 4000000000, V.UINT32)
        w.add_key_value("v.i32", -7, V.INT32)
        w.add_key_value("v.f32", 1.5, V.FLOAT32)
        w.add_key_value("v.bool", True, V.BOOL)
        w.add_key_value("v.str", "hello", V.STRING)
        w.add_key_value("v.u64", 1 << 40, V.UINT64)
        w.add_key_value("v.i64", -(1 << 40), V.INT64)
        w.add_key_value("v.f64", -2.25, V.FLOAT64)
        w.add_array("v.strs", ["a", "", "ccc"])
        w.add_array("v.ints", [1, -2, 3])
        w.add_array("v.floats", [0.5, -1.0])
        w.add_array("v.bools", [True, False])
        w.add_tensor("x", np.arange(8, dtype=np.float32))
    write(os.path.join(out, "values.gguf"), all_values)

    write(os.path.join(out, "empty.gguf"), lambda w: None)

    def dims(w):
        w.add_tensor("d1", np.zeros((32,), np.float32))
        w.add_tensor("d2", np.zeros((2, 32), np.float16))
        w.add_tensor("d3", np.zeros((2, 1, 32), np.float32))
        w.add_tensor("d4", tensor_bytes(rng, T.Q4_0, 4, 1).reshape(2, 1, 2, 18), raw_dtype=T.Q4_0)
    write(os.path.join(out, "dims.gguf"), dims)
    write(os.path.join(out, "align64.gguf"), dims, alignment=64)
    write(os.path.join(out, "align1.gguf"), dims, alignment=1)

    def mixed(w):
        for k, qtype in enumerate([T.Q4_K, T.Q6_K, T.Q8_0, T.F32]):
            w.add_tensor(f"m{k}", tensor_bytes(rng, qtype, 1, 1), raw_dtype=qtype)
    write(os.path.join(out, "mixed.gguf"), mixed)
    n = len(os.listdir(out))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{n} seed files, {size} bytes in {out}")


if __name__ == "__main__":
    main()
