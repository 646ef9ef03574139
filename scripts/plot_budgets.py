#!/usr/bin/env python3
"""Budget heatmap from `twilight generate|bench --attn-stats FILE`: layer x head, the tokens attended
(|I1|) as % of the context, averaged over the decode steps. Dense layers are shown hatched grey.

Usage: python3 scripts/plot_budgets.py budgets.json budgets.png
Needs matplotlib (pip install -r requirements-reference.txt).
"""
import json, sys, textwrap


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        d = json.load(f)
    import numpy as np
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L, H = d["n_layers"], d["n_lists"]
    pct = np.full((L, H), np.nan)
    for layer in d["layers"]:
        for i, e in enumerate(layer["lists"]):
            if e["steps"] > 0 and e["avg_ctx"] > 0:
                pct[layer["layer"], i] = 100.0 * e["avg_i1"] / e["avg_ctx"]
    if np.all(np.isnan(pct)):
        sys.exit(f"{src}: no decode step ran sparse (context too short?): nothing to plot")
    fig, ax = plt.subplots(figsize=(2.0 + 0.5 * H, 1.5 + 0.22 * L))
    ax.set_facecolor("#dddddd")
    im = ax.imshow(pct, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    for l in range(L):
        for h in range(H):
            if not np.isnan(pct[l, h]):
                ax.text(h, l, f"{pct[l, h]:.1f}", ha="center", va="center", fontsize=6,
                        color="white" if pct[l, h] < np.nanmax(pct) * 0.6 else "black")
    ax.set_xlabel("kv head" if "group mode" in d["attention"] else "query head")
    ax.set_ylabel("layer (grey: dense)")
    ax.set_xticks(range(H))
    ax.set_title("tokens attended, % of context\n" + "\n".join(textwrap.wrap(d["attention"], 48)), fontsize=7)
    fig.colorbar(im, ax=ax, label="|I1| / context (%)")
    fig.tight_layout()
    fig.savefig(dst, dpi=130)
    print(f"wrote {dst}: mean {np.nanmean(pct):.2f}% of the context over sparse layers")


if __name__ == "__main__":
    main()
