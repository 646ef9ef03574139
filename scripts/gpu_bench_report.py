#!/usr/bin/env python3
"""Merge the GPU attention benchmark (twilight bench --gpu --json) with the dense anchors measured in
the same call on the same GPU: PyTorch SDPA (scripts/gpu_sdpa_anchor.py --json) and, where its wheels
were carried, FlashInfer's paged batch decode (scripts/gpu_flashinfer_anchor.py --json). Writes a
markdown table of ratios against the best dense kernel (ours or an anchor), a table of the Twilight
stages (time, bytes read by the byte model of TWILIGHT.md section 2, GB/s and % of the copy bandwidth
measured in the run), the issue's goals checked on the rows (which rows meet each, and by how much the
others miss), and a PNG of Twilight's speedup vs context per batch size.

usage: gpu_bench_report.py OURS.jsonl SDPA.jsonl OUT.md [OUT.png] [--fi FLASHINFER.jsonl]
"""
import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def quest_us(r):
    """Fixed-budget Quest: its graph-replayed step (older runs: the sum of its two stages)."""
    return r.get("quest_graph_us", r["quest_select_us"] + r["quest_attend_us"])


def select_us(r):
    """Twilight's select stage: I0 as whole pages (older runs: the token lists fixed-budget Quest reads)."""
    return r.get("twilight_select_us", r["quest_select_us"])


def prune_share(r):
    """The pruner's share of the Twilight step, % of its three stages timed alone."""
    return 100 * r["prune_us"] / (select_us(r) + r["prune_us"] + r["attend_us"])


def bytes_dense(r):
    """Bytes our dense decode reads (the bench reports its rate and time)."""
    return r["dense_GBps"] * r["dense_us"] * 1e3


def bytes_twilight(r):
    return r["bytes_select"] + r["bytes_prune"] + r["bytes_attend"]


def bytes_quest(r, dev):
    """Fixed-budget Quest by the same byte model: the same page bounds, then K + V and a 4-B token entry
    for every one of its I0 candidates."""
    esz = 2  # fp16 / bf16 K and V, the bench's two KV dtypes
    lists = r["batch"] * dev["kv_heads"]
    return r["bytes_select"] + lists * r["i0_avg"] * (2 * dev["head_dim"] * esz + 4)


def goal_lines(rows, best_dense, anchors_of, copy_gbps, dev=None):
    """Issue 4's goals checked on this run's rows (batch >= 16, B0 = 8192 for the step's goals): each goal
    with the rows that meet it and those that do not. Ratios are compared unrounded. With the device
    record, a row that misses also shows what the byte model alone allows there ("bytes: ..."): the
    same ratio if every kernel read its bytes at the same rate and had no fixed costs (dense bytes over
    the step's, Quest's bytes over the step's, the pruner's bytes over the step's). A miss whose byte
    bound also misses cannot be met by any implementation of this layout and B0."""
    out = ["\nAgainst the goals (issue 4; Twilight rows at batch >= 16, B0 = 8192):\n"]
    with_bytes = dev is not None and "kv_heads" in dev and "head_dim" in dev
    goal_rows = [r for r in rows if r["batch"] >= 16 and r["b0"] == 8192]

    def name(r):
        return f"{r['batch']} x {r['ctx'] // 1024}k p {r['p']:g}"

    def check(text, pick, value, ok, fmt, margin, bound=None):
        """margin(v): how far v is past the goal (small = a row that could flip between runs); bound(r):
        the byte model's value for a row, shown for the rows that miss."""
        sel = [r for r in goal_rows if pick(r)]
        if not sel:
            return
        met = [r for r in sel if ok(value(r))]
        miss = [r for r in sel if not ok(value(r))]
        line = f"- {text}: {len(met)} of {len(sel)} rows"
        parts = []
        if met:
            r = min(met, key=lambda r: margin(value(r)))
            parts.append(f"least margin: {name(r)} {fmt(value(r))}")
        if miss:
            def shown(r):
                b = bound(r) if (bound and with_bytes) else None
                return f" (bytes: {fmt(b)})" if b is not None else ""
            parts.append("not: " + ", ".join(f"{name(r)} {fmt(value(r))}{shown(r)}" for r in miss))
        out.append(line + " (" + "; ".join(parts) + ")")

    def step_vs_dense(r):
        return best_dense(r) / r["twilight_graph_us"]

    def vs_quest(r):
        return quest_us(r) / r["twilight_graph_us"]

    times = lambda v: f"{v:.3f}x"
    dense_bound = lambda r: bytes_dense(r) / bytes_twilight(r) if "dense_GBps" in r else None
    quest_bound = lambda r: bytes_quest(r, dev) / bytes_twilight(r)
    prune_bound = lambda r: 100 * r["bytes_prune"] / bytes_twilight(r)
    check(">= 10x the best dense at 128k", lambda r: r["ctx"] == 131072, step_vs_dense, lambda v: v >= 10, times,
          lambda v: v - 10, dense_bound)
    check(">= 6x the best dense at 32k", lambda r: r["ctx"] == 32768, step_vs_dense, lambda v: v >= 6, times,
          lambda v: v - 6, dense_bound)
    long_ctx = lambda r: r["ctx"] >= 32768  # the contexts the goals name (at 8k, B0 8192 lists every token)
    check(">= 2x fixed-budget Quest (32k and up)", long_ctx, vs_quest, lambda v: v >= 2, times, lambda v: v - 2,
          quest_bound)
    check("pruner under 35% of the step (32k and up)", long_ctx, prune_share, lambda v: v < 35,
          lambda v: f"{v:.0f}%", lambda v: 35 - v, prune_bound)
    # Dense, once per size: ours at least as fast as the fastest anchor; above 90% of the copy figure at
    # the large sizes (batch >= 16, ctx >= 32k).
    sizes = {}
    for r in rows:
        sizes.setdefault((r["batch"], r["ctx"]), r)
    measured = [(k, r) for k, r in sorted(sizes.items()) if any(anchors_of(r))]
    slow = [(k, r) for k, r in measured if r["dense_us"] > best_dense(r)]
    if measured:
        line = f"- our dense at least as fast as the best anchor: {len(measured) - len(slow)} of {len(measured)} sizes"
        if slow:
            line += " (not: " + ", ".join(f"{b} x {c // 1024}k {best_dense(r) / r['dense_us']:.3f}" for (b, c), r in slow)
            line += ", best anchor time / ours)"
        out.append(line)
    large = [(k, r) for k, r in sorted(sizes.items()) if k[0] >= 16 and k[1] >= 32768 and "dense_GBps" in r]
    if large and copy_gbps == copy_gbps:  # not NaN
        low = [(k, r) for k, r in large if 100 * r["dense_GBps"] / copy_gbps <= 90]
        line = f"- our dense above 90% of the copy figure at batch >= 16, ctx >= 32k: {len(large) - len(low)} of {len(large)} sizes"
        if low:
            line += " (not: " + ", ".join(f"{b} x {c // 1024}k {100 * r['dense_GBps'] / copy_gbps:.0f}%" for (b, c), r in low) + ")"
        out.append(line)
    return out


def main():
    args = sys.argv[1:]
    fi_path = None
    if "--fi" in args:
        i = args.index("--fi")
        if i + 1 >= len(args):
            sys.exit("gpu_bench_report.py: --fi needs a file")
        fi_path = args[i + 1]
        del args[i:i + 2]
    if len(args) < 3:
        sys.exit(__doc__)
    ours, sdpa = load(args[0]), load(args[1])
    fi = load(fi_path) if fi_path else []
    dev = next((r for r in ours if r.get("kind") == "device"), {})
    copy = next((r for r in sdpa if r.get("kind") == "copy"), {})
    fi_copy = next((r for r in fi if r.get("kind") == "copy"), None)
    anchors = {(r["batch"], r["ctx"]): r for r in sdpa if r.get("kind") == "sdpa" and "best_us" in r}
    fi_rows = {(r["batch"], r["ctx"]): r for r in fi if r.get("kind") == "flashinfer" and "best_us" in r}
    rows = [r for r in ours if r.get("kind") == "row" and "twilight_graph_us" in r]

    def anchors_of(r):
        """This size's SDPA and FlashInfer rows (None where not measured)."""
        return anchors.get((r["batch"], r["ctx"])), fi_rows.get((r["batch"], r["ctx"]))

    def best_dense(r):
        """The fastest dense decode at this size: ours, SDPA's best backend, FlashInfer's best path."""
        return min([r["dense_us"]] + [x["best_us"] for x in anchors_of(r) if x])

    out = []
    out.append(f"GPU {dev.get('gpu', '?')}; copy bandwidth {dev.get('copy_GBps', 0):.0f} GB/s (ours), "
               f"{copy.get('copy_GBps', 0):.0f} GB/s (PyTorch, same call); torch {copy.get('torch', '?')}, "
               f"cuDNN {copy.get('cudnn', '?')}; "
               + (f"FlashInfer {fi_copy.get('flashinfer', '?')} (paged, page 16, our layout)" if fi_copy
                  else "FlashInfer: not run")
               + f"; shape H {dev.get('heads')} / Hkv {dev.get('kv_heads')} / d "
               f"{dev.get('head_dim')}, {dev.get('dtype')}; input {dev.get('input')}\n")
    out.append("| batch | ctx | p | B0 | SDPA best us (backend) | FlashInfer us (path) | ours dense us | "
               "dense: best anchor/ours | Quest us | Twilight us | pruner % of step | I1 avg (% ctx) | "
               "x best dense | x Quest |")
    out.append("| " + " | ".join(["---"] * 14) + " |")
    for r in rows:
        a, f = anchors_of(r)
        best = best_dense(r)
        anchor_best = min([x["best_us"] for x in (a, f) if x] or [float("nan")])
        quest = quest_us(r)
        tw = r["twilight_graph_us"]
        out.append(f"| {r['batch']} | {r['ctx']} | {r['p']:g} | {r['b0']} | "
                   + (f"{a['best_us']:.1f} ({a['best']})" if a else "n/a") + " | "
                   + (f"{f['best_us']:.1f} ({f['best']})" if f else "n/a")
                   + f" | {r['dense_us']:.1f} | " + (f"{anchor_best / r['dense_us']:.2f}" if (a or f) else "n/a")
                   + f" | {quest:.1f} | {tw:.1f} | {prune_share(r):.0f}% | {r['i1_avg']:.0f} "
                   f"({100 * r['i1_avg'] / r['ctx']:.2f}%) | {best / tw:.2f} | {quest / tw:.2f} |")
    # Per stage: select (Quest page scores + top pages), prune (INT4 estimate + top-p), attend (sparse
    # attention over I1, plan and combine included). % copy: read bytes over the copy figure, which counts
    # a read and a write, so a pure read can pass 100%.
    cp = dev.get("copy_GBps", 0) or float("nan")
    out.append("\nPer stage (µs, MB read, GB/s, % of the copy bandwidth):\n")
    out.append("| batch | ctx | p | B0 | select | prune | attend | I0 avg | I1 avg |")
    out.append("| " + " | ".join(["---"] * 9) + " |")

    def stage(us, nbytes):
        gbs = nbytes / (us * 1e-6) / 1e9
        return f"{us:.1f} µs, {nbytes / 1e6:.1f} MB, {gbs:.0f} GB/s ({100 * gbs / cp:.0f}%)"

    for r in rows:
        # No select bytes (the bench's byte model: B0 covers the context): every token listed, no bound read.
        sel = (f"{select_us(r):.1f} µs, every token, no bounds read" if r["bytes_select"] == 0
               else stage(select_us(r), r["bytes_select"]))
        out.append(f"| {r['batch']} | {r['ctx']} | {r['p']:g} | {r['b0']} | "
                   f"{sel} | {stage(r['prune_us'], r['bytes_prune'])} | "
                   f"{stage(r['attend_us'], r['bytes_attend'])} | {r['i0_avg']:.0f} | {r['i1_avg']:.0f} |")
    out.extend(goal_lines(rows, best_dense, anchors_of, cp, dev))
    errs = [r for r in sdpa + fi if r.get("kind") in ("sdpa", "flashinfer") and any(k.endswith("_error") for k in r)]
    if errs:
        out.append("\nAnchor backends that refused a shape:")
        for r in errs:
            for k, v in r.items():
                if k.endswith("_error"):
                    out.append(f"- {r['kind']} batch {r['batch']}, ctx {r['ctx']}: {k[:-6]}: {v}")
    eager = [(r, k) for r in sdpa + fi for k in r if k.endswith("_timing") and r[k] != "graph"]
    if eager:
        out.append("\nAnchors timed by back-to-back calls (graph capture refused):")
        for r, k in eager:
            out.append(f"- {r['kind']} batch {r['batch']}, ctx {r['ctx']}: {k[:-7]}: {r[k]}")
    text = "\n".join(out) + "\n"
    open(args[2], "w").write(text)
    print(text)
    if len(args) > 3 and rows:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, b0_mode in zip(axes, ["8192", "ctx/4"]):
            for batch in sorted({r["batch"] for r in rows}):
                for p in sorted({r["p"] for r in rows}):
                    pts = []
                    for r in rows:
                        is_l4 = r["b0"] == r["ctx"] // 4 and r["b0"] != 8192
                        if r["batch"] != batch or r["p"] != p or (b0_mode == "ctx/4") != is_l4:
                            continue
                        pts.append((r["ctx"], best_dense(r) / r["twilight_graph_us"]))
                    if pts:
                        pts.sort()
                        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"batch {batch}, p {p:g}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_title(f"B0 = {b0_mode}")
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("Twilight step speedup vs best dense decode")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"{dev.get('gpu', 'GPU')}: H {dev.get('heads')} / Hkv {dev.get('kv_heads')} / d {dev.get('head_dim')}, "
                     f"input {dev.get('input')}")
        fig.tight_layout()
        fig.savefig(args[3], dpi=120)


if __name__ == "__main__":
    main()
