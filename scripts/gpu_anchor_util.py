"""Shared measurement of the dense-decode anchors (gpu_sdpa_anchor.py, gpu_flashinfer_anchor.py).

Method (docs/BENCHMARKS.md, "GPU attention"): every call reads a different KV set, rotated over
enough distinct sets that their total is several times the 60 MB L2 (one shared buffer would time the
cache, not HBM). Calls are timed as one CUDA-graph replay of every set once (at least `reps` calls), so
the host's Python launch cost (~10-30 us a call) does not stand in for a kernel of 20-40 us at batch 1;
where a library refuses graph capture, back-to-back calls between two events, and the row says which
("<name>_timing"). The figure is the median over `trials` blocks, per call. The copy bandwidth is
measured in the same process (device-to-device copy of 2 GiB, bytes read + written).
"""
import argparse
import json
import math
import sys
import time

import torch

L2_BYTES = 60e6


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def warm_up(run_once, min_s=0.02):
    """run_once() repeatedly for at least min_s: whichever path ran first after its buffers were filled
    came out 5-12% slow at batch 1 with a shorter warm-up (H200, our dense decode bench)."""
    t0 = time.perf_counter()
    while True:
        run_once()
        torch.cuda.synchronize()
        if time.perf_counter() - t0 >= min_s:
            break


SETTLE_AFTER_S = 0.1
SETTLE_S = 1.0


def settle_after(t0):
    """A pause after a measurement that kept the GPU busy for more than SETTLE_AFTER_S: a long
    full-bandwidth one takes the H200 to its power cap, and the SM clock stays held down for ~0.5 s
    after it (bench_attn.cu, settle_after: the same rule for our own paths)."""
    if time.perf_counter() - t0 > SETTLE_AFTER_S:
        time.sleep(SETTLE_S)


def time_eager(fn, n_sets, reps, trials):
    """Median per-call time (s) of fn(i), i rotating over n_sets, in blocks of reps back-to-back calls."""
    t0 = time.perf_counter()
    for i in range(min(n_sets, 3)):  # warm-up: module load, autotuning, workspace
        fn(i)
    warm_up(lambda: [fn(i % n_sets) for i in range(reps)])
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
    settle_after(t0)
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
    t0 = time.perf_counter()
    warm_up(g.replay)
    times = []
    for _ in range(trials):
        a, b = _events()
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / calls)
    del g
    settle_after(t0)
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


def parse_args(doc, name):
    """The anchors' common command line (sizes, shape, dtype, rotation, repeats, --json); exits when
    there is no CUDA device."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        sys.exit(f"{name}: no CUDA device")
    a.sizes = [(int(b), int(c)) for b in a.batch.split(",") for c in a.ctx.split(",")]
    return a


def each_size(a, kind, emit):
    """The sizes of the command line that can be measured off the L2: (B, L, row, generator) with row
    the size's fields of the result (kind, shape, kv_bytes, kv_sets) and a generator seeded by the size;
    a size that does not fit with rotation gets a "skipped" row instead. The caller's tensors of a size
    are freed (empty_cache) before the next one."""
    dt = getattr(torch, a.dtype)
    for B, L in a.sizes:
        kv_bytes = 2 * B * a.kv_heads * L * a.head_dim * torch.finfo(dt).bits // 8  # K + V read once per call
        n_sets = kv_set_count(kv_bytes, a.min_bytes, a.max_mem)
        if n_sets == 0:
            emit({"kind": kind, "batch": B, "ctx": L, "skipped": "does not fit with rotation"})
            continue
        row = {"kind": kind, "batch": B, "ctx": L, "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
               "dtype": a.dtype, "kv_bytes": kv_bytes, "kv_sets": n_sets}
        yield B, L, row, torch.Generator(device="cuda").manual_seed(B * 1000003 + L)
        torch.cuda.empty_cache()


def time_backends(row, backends, ref, a):
    """Checks and times each backend into row (a row of each_size): backends maps a name to make(),
    which returns (its output on KV set 0, call(i) on set i) or raises for a shape it refuses. The output
    is checked against ref (float32, where given); row gets <name>_us / _GBps / _timing / _rel_err, or
    <name>_error, and best / best_us."""
    best = None
    for name, make in backends.items():
        try:
            out, call = make()
            if ref is not None:
                err = rel_err(out, ref)
                row[name + "_rel_err"] = err
                if not err < 2e-2:
                    raise RuntimeError(f"wrong result (rel err {err:.3g})")
            t, how = time_calls(call, row["kv_sets"], a.reps, a.trials)
            row[name + "_us"] = t * 1e6
            row[name + "_GBps"] = row["kv_bytes"] / t / 1e9
            row[name + "_timing"] = how
            if best is None or t < best[1]:
                best = (name, t)
        except Exception as e:  # a backend that refuses the shape is reported, not hidden
            row[name + "_error"] = error_text(e)
    if best:
        row["best"] = best[0]
        row["best_us"] = best[1] * 1e6
