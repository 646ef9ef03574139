#!/usr/bin/env python3
"""llama.cpp's speed on the same GGUF and thread count, in twilight bench's row format.

Drives llama.cpp through llama-cpp-python's low-level eval (the same library build the
correctness fixtures come from; built from source with GGML_NATIVE, so it uses this CPU's
AVX-512). Rows: pp<N> (N prompt tokens in one batch from an empty cache) and tg<N> [@ d<D>]
(N single-token evals after D cached tokens; the depth fill is not timed). One warm-up, then -r
repetitions; mean t/s +- sample standard deviation. Per-token Python overhead of eval() is ~20 us,
under 1% of a decode step of the models measured here.

Usage: python3 scripts/bench_llamacpp.py -m MODEL.gguf -t 2 -p 512 -n 128 -d 0,4096 -r 5 [-o md|json]
"""
import argparse, json, random, statistics, sys, time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", default="512")
    ap.add_argument("-n", "--n-gen", default="128")
    ap.add_argument("-d", "--n-depth", default="0")
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("-o", "--output", default="md", choices=["md", "json"])
    a = ap.parse_args()
    from llama_cpp import Llama
    pps = [int(x) for x in a.n_prompt.split(",")]
    tgs = [int(x) for x in a.n_gen.split(",")]
    depths = [int(x) for x in a.n_depth.split(",")]
    ctx = max(depths) + max(pps + tgs) + 16
    llm = Llama(model_path=a.model, n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=a.threads, n_threads_batch=a.threads,
                logits_all=False, verbose=False)
    rng = random.Random(1234)
    V = llm.n_vocab()
    toks = lambda n: [rng.randrange(V) for _ in range(n)]

    def fill(n):
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t = toks(n)
        for i in range(0, n, 512):
            llm.eval(t[i:i + 512])

    rows = []
    for d in depths:
        for n in pps:
            if n == 0:
                continue
            samples = []
            for rep in range(-1, a.repetitions):
                fill(d)
                t = toks(n)
                t0 = time.perf_counter()
                for i in range(0, n, 512):
                    llm.eval(t[i:i + 512])
                dt = time.perf_counter() - t0
                if rep >= 0:
                    samples.append(n / dt)
            rows.append((f"pp{n}" + (f" @ d{d}" if d else ""), n, d, samples))
        for n in tgs:
            if n == 0:
                continue
            samples = []
            for rep in range(-1, a.repetitions):
                fill(d)
                t = toks(n)
                t0 = time.perf_counter()
                for x in t:
                    llm.eval([x])
                dt = time.perf_counter() - t0
                if rep >= 0:
                    samples.append(n / dt)
            rows.append((f"tg{n}" + (f" @ d{d}" if d else ""), n, d, samples))
    name = llm.metadata.get("general.name", a.model)
    if a.output == "json":
        print(json.dumps([{"model": name, "backend": "llama.cpp cpu", "threads": a.threads, "test": r[0], "n_tokens": r[1],
                           "depth": r[2], "avg_ts": statistics.mean(r[3]),
                           "stddev_ts": statistics.stdev(r[3]) if len(r[3]) > 1 else 0.0, "samples_ts": r[3]} for r in rows], indent=1))
    else:
        print("| model | backend | threads | test | t/s |\n| --- | --- | ---: | ---: | ---: |")
        for r in rows:
            sd = statistics.stdev(r[3]) if len(r[3]) > 1 else 0.0
            print(f"| {name} | llama.cpp cpu | {a.threads} | {r[0]} | {statistics.mean(r[3]):.2f} ± {sd:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
