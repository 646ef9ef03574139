#!/usr/bin/env python3
"""Dense decode anchors for the GPU attention benchmark: PyTorch's scaled_dot_product_attention.

One decode step (one query token per sequence) over a contiguous KV cache, at the shapes the
twilight benchmark uses, with each backend PyTorch offers (cuDNN, flash, memory-efficient) and
enable_gqa (no K/V repetition in memory). Runs on the GPU machine, where PyTorch is installed.

Measurement: gpu_anchor_util.py (rotated KV sets off the L2, CUDA-graph replay, medians, the copy
bandwidth in the same process).

Output: one JSON object per line to stdout (and --json FILE): kind "copy" or "sdpa".
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_anchor_util import Emitter, copy_bandwidth, each_size, parse_args, time_backends

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def main():
    a = parse_args(__doc__, "gpu_sdpa_anchor")

    dt = getattr(torch, a.dtype)
    emit = Emitter(a.json)

    emit({"kind": "copy", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "cudnn": torch.backends.cudnn.version(), "copy_GBps": copy_bandwidth() / 1e9})

    H, Hkv, d = a.heads, a.kv_heads, a.head_dim
    for B, L, row, g in each_size(a, "sdpa", emit):
        ks = [torch.randn(B, Hkv, L, d, device="cuda", dtype=dt, generator=g) for _ in range(row["kv_sets"])]
        vs = [torch.randn(B, Hkv, L, d, device="cuda", dtype=dt, generator=g) for _ in range(row["kv_sets"])]
        q = torch.randn(B, H, 1, d, device="cuda", dtype=dt, generator=g)
        ref = F.scaled_dot_product_attention(q.float(), ks[0].float().repeat_interleave(H // Hkv, 1),
                                             vs[0].float().repeat_interleave(H // Hkv, 1)) if B * L <= 65536 else None

        def backend(be):
            def call(i):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)
            return lambda: (call(0), call)

        time_backends(row, {name: backend(be) for name, be in BACKENDS.items()}, ref, a)
        emit(row)
        del ks, vs, q


if __name__ == "__main__":
    main()
