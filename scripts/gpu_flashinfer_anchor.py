#!/usr/bin/env python3
"""Dense decode anchor for the GPU attention benchmark: FlashInfer's batch decode over a paged KV cache.

The layout is ours (attention/cuda/layout.h): K and V pools of [n_pages][Hkv][16][d] (FlashInfer's
"HND" with page size 16), each sequence's pages scattered over its pool, one decode query per sequence.
Both of FlashInfer's decode paths for this shape are timed: the CUDA-core decode kernel and the
tensor-core one (`use_tensor_cores=True`, its fa2 prefill kernel with one query row), the faster is the
row's `best`. FlashInfer compiles both kernels on first use (JIT, nvcc of the machine).

Runs on the GPU machine with flashinfer-python and apache-tvm-ffi carried as wheels
(scripts/fetch_anchor_wheels.sh; gpu_bench.sh installs them). Measurement: gpu_anchor_util.py.
Each result is checked against a float32 reference on the gathered pages (sizes up to 64k tokens).

Output: one JSON object per line to stdout (and --json FILE): kind "copy", then "flashinfer" rows.
"""
import torch
import torch.nn.functional as F

from gpu_anchor_util import Emitter, copy_bandwidth, each_size, parse_args, time_backends

PAGE = 16
VARIANTS = {"fi_decode": False, "fi_tc": True}  # name -> use_tensor_cores


def main():
    a = parse_args(__doc__, "gpu_flashinfer_anchor")

    import flashinfer  # carried wheel: a missing one is an error here, not a skipped anchor

    dt = getattr(torch, a.dtype)
    emit = Emitter(a.json)
    emit({"kind": "copy", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "flashinfer": flashinfer.__version__, "copy_GBps": copy_bandwidth() / 1e9})

    H, Hkv, d = a.heads, a.kv_heads, a.head_dim
    G = H // Hkv
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    for B, L, row, g in each_size(a, "flashinfer", emit):
        n_sets = row["kv_sets"]
        row["page_size"] = PAGE
        np_seq = (L + PAGE - 1) // PAGE
        n_pages = B * np_seq
        # Pools [n_pages][Hkv][16][d]; page indices a random permutation (scattered pages).
        ks = [torch.randn(n_pages, Hkv, PAGE, d, device="cuda", dtype=dt, generator=g) for _ in range(n_sets)]
        vs = [torch.randn(n_pages, Hkv, PAGE, d, device="cuda", dtype=dt, generator=g) for _ in range(n_sets)]
        q = torch.randn(B, H, d, device="cuda", dtype=dt, generator=g)
        indices = torch.randperm(n_pages, device="cuda", generator=g).to(torch.int32)
        indptr = torch.arange(0, B + 1, device="cuda", dtype=torch.int32) * np_seq
        last = torch.full((B,), L - (np_seq - 1) * PAGE, device="cuda", dtype=torch.int32)
        ref = None
        if B * L <= 65536:  # float32 reference on the gathered pages: [B, Hkv, L, d]
            idx = indices.long().view(B, np_seq)
            kc = ks[0][idx].permute(0, 2, 1, 3, 4).reshape(B, Hkv, np_seq * PAGE, d)[:, :, :L].float()
            vc = vs[0][idx].permute(0, 2, 1, 3, 4).reshape(B, Hkv, np_seq * PAGE, d)[:, :, :L].float()
            ref = F.scaled_dot_product_attention(q.float().view(B, H, 1, d), kc.repeat_interleave(G, 1),
                                                 vc.repeat_interleave(G, 1)).view(B, H, d)

        def backend(tc):
            def make():
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND", use_tensor_cores=tc)
                w.plan(indptr, indices, last, H, Hkv, d, PAGE, pos_encoding_mode="NONE", q_data_type=dt,
                       kv_data_type=dt)
                out = torch.empty(B, H, d, device="cuda", dtype=dt)
                call = lambda i: w.run(q, (ks[i], vs[i]), out=out)  # noqa: E731
                return call(0), call
            return make

        time_backends(row, {name: backend(tc) for name, tc in VARIANTS.items()}, ref, a)
        emit(row)
        del ks, vs, q


if __name__ == "__main__":
    main()
