"""Shared measurement of the dense-decode anchors (gpu_sdpa_anchor.py, gpu_flashinfer_anchor.py).

Method (docs/BENCHMARKS.md, "GPU attention"): every call reads a different KV set, rotated over
enough distinct sets that their total is several times the 60 MB L2 (one shared buffer would time the
cache, not HBM). Calls are timed as one CUDA-graph replay of every set once (at least `reps` calls), so
the host's Python launch cost (~10-30 us a call) does not stand in for a kernel of 20-40 us at batch 1;
where a library refuses graph capture, back-to-back calls between two events, and the row says which
("<name>_timing"). The figure is the median over `trials` blocks, per call. The copy bandwidth is
measured in the same process (device-to-device copy of 2 GiB, bytes read + written).
"""
import json
import math

import torch

L2_BYTES = 60e6


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def time_eager(fn, n_sets, reps, trials):
    """Median per-call time (s) of fn(i), i rotating over n_sets, in blocks of reps back-to-back calls."""
    for i in range(min(n_sets, 3)):  # warm-up: module load, autotuning, workspace
        fn(i)
    torch.cuda.synchronize()
    times, k = [], 0
    for _ in range(trials):
        a, b = _events()
        a.record()
        for _ in range(reps):
            fn(k % n_sets)
            k += 1
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / reps)
    return median(times)


def time_graph(fn, n_sets, reps, trials):
    """Median per-call time (s) of fn(i) captured in one CUDA graph: every set once, at least reps calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (allocations, module load)
        for i in range(min(n_sets, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    calls = max(reps, n_sets)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for k in range(calls):
            fn(k % n_sets)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        a, b = _events()
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / calls)
    del g
    return median(times)


def time_calls(fn, n_sets, reps, trials):
    """(seconds per call, "graph" | "eager: <why>"): graph replay, or eager where capture fails."""
    try:
        return time_graph(fn, n_sets, reps, trials), "graph"
    except Exception as e:  # reported in the row, never silent
        torch.cuda.synchronize()
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        return time_eager(fn, n_sets, reps, trials), "eager: " + why


def copy_bandwidth(trials=9):
    n = 1 << 30  # 1 Gi elements of fp16 = 2 GiB
    src = torch.randn(n, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    t = time_eager(lambda i: dst.copy_(src), 1, 5, trials)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / t  # bytes read + written per second


def kv_set_count(kv_bytes, min_bytes, max_mem):
    """Distinct KV sets to rotate over (0: the size cannot be measured off the L2)."""
    n_sets = max(2, math.ceil(min_bytes / kv_bytes))
    if n_sets * kv_bytes > max_mem:
        n_sets = 1 if kv_bytes <= max_mem else 0
    if n_sets == 1 and kv_bytes < 4 * L2_BYTES:
        n_sets = 0
    return n_sets


class Emitter:
    """One JSON object per line to stdout and, if given, to a file."""

    def __init__(self, path):
        self.out = open(path, "w") if path else None

    def __call__(self, obj):
        line = json.dumps(obj)
        print(line, flush=True)
        if self.out:
            self.out.write(line + "\n")
            self.out.flush()


def error_text(e, head=100, tail=140):
    """An exception's message on one line; long ones keep their start and their end (a library's own
    reason often comes last, after the file and function it names)."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= head + tail + 5 else msg[:head] + " ... " + msg[-tail:]


def rel_err(o, ref):
    return ((o.float() - ref).norm() / ref.norm()).item()
