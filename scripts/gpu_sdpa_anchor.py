#!/usr/bin/env python3
"""Dense decode anchors for the GPU attention benchmark: PyTorch's scaled_dot_product_attention.

One decode step (one query token per sequence) over a contiguous KV cache, at the shapes the
twilight benchmark uses, with each backend PyTorch offers (cuDNN, flash, memory-efficient) and
enable_gqa (no K/V repetition in memory). Runs on the GPU machine, where PyTorch is installed.

Measurement: gpu_anchor_util.py (rotated KV sets off the L2, CUDA-graph replay, medians, the copy
bandwidth in the same process).

Output: one JSON object per line to stdout (and --json FILE): kind "copy" or "sdpa".
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_anchor_util import Emitter, copy_bandwidth, error_text, kv_set_count, rel_err, time_calls

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--ctx", default="8192,32768,131072")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--min-bytes", type=float, default=512e6, help="rotate KV sets until their total reaches this")
    ap.add_argument("--max-mem", type=float, default=100e9, help="skip sizes whose rotation would exceed this")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("gpu_sdpa_anchor: no CUDA device")
    dt = getattr(torch, a.dtype)
    emit = Emitter(a.json)

    emit({"kind": "copy", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "cudnn": torch.backends.cudnn.version(), "copy_GBps": copy_bandwidth() / 1e9})

    H, Hkv, d = a.heads, a.kv_heads, a.head_dim
    for B in [int(x) for x in a.batch.split(",")]:
        for L in [int(x) for x in a.ctx.split(",")]:
            kv_bytes = 2 * B * Hkv * L * d * torch.finfo(dt).bits // 8  # K + V read once per call
            n_sets = kv_set_count(kv_bytes, a.min_bytes, a.max_mem)
            if n_sets == 0:
                emit({"kind": "sdpa", "batch": B, "ctx": L, "skipped": "does not fit with rotation"})
                continue
            g = torch.Generator(device="cuda").manual_seed(B * 1000003 + L)
            ks = [torch.randn(B, Hkv, L, d, device="cuda", dtype=dt, generator=g) for _ in range(n_sets)]
            vs = [torch.randn(B, Hkv, L, d, device="cuda", dtype=dt, generator=g) for _ in range(n_sets)]
            q = torch.randn(B, H, 1, d, device="cuda", dtype=dt, generator=g)
            row = {"kind": "sdpa", "batch": B, "ctx": L, "heads": H, "kv_heads": Hkv, "head_dim": d,
                   "dtype": a.dtype, "kv_bytes": kv_bytes, "kv_sets": n_sets}
            ref = F.scaled_dot_product_attention(q.float(), ks[0].float().repeat_interleave(H // Hkv, 1),
                                                 vs[0].float().repeat_interleave(H // Hkv, 1)) if B * L <= 65536 else None
            best = None
            for name, be in BACKENDS.items():
                try:
                    with sdpa_kernel([be]):
                        o = F.scaled_dot_product_attention(q, ks[0], vs[0], enable_gqa=True)
                        if ref is not None:
                            err = rel_err(o, ref)
                            if not err < 2e-2:
                                raise RuntimeError(f"wrong result (rel err {err:.3g})")
                        t, how = time_calls(lambda i: F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True),
                                            n_sets, a.reps, a.trials)
                    row[name + "_us"] = t * 1e6
                    row[name + "_timing"] = how
                    row[name + "_GBps"] = kv_bytes / t / 1e9
                    if best is None or t < best[1]:
                        best = (name, t)
                except Exception as e:  # a backend that refuses the shape is reported, not hidden
                    row[name + "_error"] = error_text(e)
            if best:
                row["best"] = best[0]
                row["best_us"] = best[1] * 1e6
            emit(row)
            del ks, vs, q
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
