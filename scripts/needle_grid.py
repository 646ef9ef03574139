#!/usr/bin/env python3
"""Needle-in-a-haystack grid: `twilight needle` over context lengths x needle depths, comparing
dense attention, Quest at fixed budgets and Twilight at several p (one dense prefill per cell).

  scripts/needle_grid.py --model smollm2 --lengths 2048,4096,8192 --out ~/.cache/twilight/results/needle-smollm2
  scripts/needle_grid.py --model qwen1.5b --lengths 4096,8192,16384 --out ~/.cache/twilight/results/needle-qwen15

Each cell (length, depth) is one `twilight needle` run writing <out>/cell-<length>-<depth>.json; a
cell whose JSON exists with the same configurations is not run again (an interrupted grid resumes;
--force re-runs). At the end <out>/needle.md holds the tables: accuracy per configuration and
length (correct / depths) with the average budget (|I1| / context over the sparse layers), and the
per-cell answers. Only the standard library is needed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"smollm2": "SmolLM2-135M-Instruct-Q4_1.gguf",
          "qwen1.5b": "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
          "qwen0.5b": "Qwen2.5-Coder-0.5B-Instruct-AWQ.gguf"}


def cache_dir() -> Path:
    if os.environ.get("TWILIGHT_CACHE"):
        return Path(os.environ["TWILIGHT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "twilight"
    return Path(os.environ.get("HOME", ".")) / ".cache" / "twilight"


def configs(length: int, quest_budgets: list[str], ps: list[str]) -> list[tuple[str, str]]:
    """(name, --compare spec) per configuration; 'n/8' budgets are resolved per length."""
    out = [("dense", "dense")]
    for b in quest_budgets:
        n = length // 8 if b == "n/8" else int(b)
        out.append((f"quest b0={b}", f"quest b0={n}"))
    for p in ps:
        out.append((f"twilight p={p}", f"twilight p={p}"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help=f"{', '.join(MODELS)} or a GGUF path")
    ap.add_argument("--lengths", default="2048,4096,8192", help="prompt lengths in tokens")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths in [0, 1]")
    ap.add_argument("--quest", default="256,1024,n/8", help="Quest budgets (tokens, or n/8)")
    ap.add_argument("--p", default="0.85,0.9,0.95", help="Twilight top-p values")
    ap.add_argument("--extra", action="append", default=[],
                    help="more --compare specs, e.g. 'twilight p=0.95 gqa=head' (repeatable)")
    ap.add_argument("--text", default=str(cache_dir() / "data/austen/all.txt"), help="haystack text")
    ap.add_argument("--bin", default=str(ROOT / "build/twilight"), help="twilight executable")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="results folder (outside the repository)")
    ap.add_argument("--force", action="store_true", help="re-run cells that have results")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: tabulate the cells already in --out (lengths with every depth done)")
    args = ap.parse_args()

    model = str(cache_dir() / "models" / MODELS[args.model]) if args.model in MODELS else args.model
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    quest = [x for x in args.quest.split(",") if x]
    ps = [x for x in args.p.split(",") if x]
    for p in (model, args.text, args.bin):
        if not Path(p).is_file():
            sys.exit(f"needle_grid: {p} not found (scripts/setup.sh fetches models and text; build twilight)")
    out = Path(args.out).expanduser()
    if out.resolve().is_relative_to(ROOT):
        sys.exit(f"needle_grid: --out {out} is inside the repository; results go outside it")
    out.mkdir(parents=True, exist_ok=True)

    cells = {}
    t_start = time.time()
    todo = [(L, d) for L in lengths for d in depths]
    for k, (L, d) in enumerate(todo):
        cfg = configs(L, quest, ps) + [(e, e) for e in args.extra]
        path = out / f"cell-{L}-{d:g}.json"
        specs = [s for _, s in cfg]
        if path.is_file() and not args.force:
            j = json.loads(path.read_text())
            if [r["label"] for r in j["runs"]] == specs:
                cells[(L, d)] = (cfg, j)
                continue
        if args.report_only:
            continue
        cmd = [args.bin, "needle", "-m", model, "-f", args.text, "--length", str(L), "--depth", str(d),
               "--seed", str(L * 10 + depths.index(d) + 1), "-t", str(args.threads), "-o", str(path)]
        for s in specs:
            cmd += ["--compare", s]
        t0 = time.time()
        print(f"[needle_grid] cell {k + 1}/{len(todo)}: length {L}, depth {d} ...", file=sys.stderr, flush=True)
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            sys.exit(f"needle_grid: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
        print(r.stdout, file=sys.stderr)
        print(f"[needle_grid]   {time.time() - t0:.0f} s (total {time.time() - t_start:.0f} s)", file=sys.stderr,
              flush=True)
        cells[(L, d)] = (cfg, json.loads(path.read_text()))

    # Tables, over the lengths whose every depth has a result.
    lengths = [L for L in lengths if all((L, d) in cells for d in depths)]
    if not lengths:
        sys.exit(f"needle_grid: no length has results for every depth in {out}")
    names = [n for n, _ in configs(lengths[0], quest, ps)] + list(args.extra)
    first = cells[(lengths[0], depths[0])][1]
    md = [f"# Needle retrieval: {first['model']} ({Path(model).name})", "",
          f"Haystack: {args.text} from byte {first['offset']}; depths {', '.join(f'{d:g}' for d in depths)}; "
          f"answer: greedy, 24 tokens, correct when a run of digits in it is the 7-digit number; budget = |I1| / context over the sparse "
          f"layers (decode steps of the answer), averaged over the depths.", "",
          "| config | " + " | ".join(f"{L} acc | {L} budget" for L in lengths) + " | all acc | same as dense |",
          "| --- | " + " | ".join("---: | ---:" for _ in lengths) + " | ---: | ---: |"]
    for i, name in enumerate(names):
        row, tot_ok, tot = [], 0, 0
        for L in lengths:
            runs = [cells[(L, d)][1]["runs"][i] for d in depths]
            ok = sum(r["correct"] for r in runs)
            tot_ok += ok
            tot += len(runs)
            sparse = [r["budget"]["i1_frac"] for r in runs if r["budget"]["sparse_layers"] > 0]
            budget = f"{100 * sum(sparse) / len(sparse):.1f}%" if sparse else "100%"
            row.append(f"{ok}/{len(runs)} | {budget}")
        # Cells where this configuration's outcome (right / wrong) equals dense's (configuration 0).
        same = sum(cells[(L, d)][1]["runs"][i]["correct"] == cells[(L, d)][1]["runs"][0]["correct"]
                   for L in lengths for d in depths)
        md.append(f"| {name} | " + " | ".join(row) + f" | {100 * tot_ok / tot:.0f}% | {same}/{tot} |")
    md += ["", "Per cell (prompt tokens, actual depth; answers of the configurations that missed):", ""]
    for L in lengths:
        for d in depths:
            j = cells[(L, d)][1]
            miss = [f"{names[i]}: \"{' '.join(r['answer'].split())[:72]}\"" for i, r in enumerate(j["runs"])
                    if not r["correct"]]
            md.append(f"- {L} / {d:g}: {j['n_prompt']} tokens, depth {j['depth_actual']:.2f}, number {j['number']}, "
                      f"prefill {j['prefill_s']:.0f} s; " + ("all correct" if not miss else "missed: " + "; ".join(miss)))
    (out / "needle.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
