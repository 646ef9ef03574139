#!/usr/bin/env python3
"""Per-layer true-mass report from `--attn-stats` JSON written with `--attn-true-mass` (policy.h,
BudgetStats): budget, true mass kept (mean and least-served head), the split of the loss into its
causes (outside I0 / allowed by top-p / group averaging / INT4 estimate) and the guard's bound.

usage: scripts/mass_report.py STATS.json [--summary]
"""
import json
import sys


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        sys.exit(__doc__)
    with open(args[0]) as f:
        js = json.load(f)
    if not js.get("true_mass"):
        sys.exit(f"{args[0]}: written without --attn-true-mass; no true mass to report")
    summary_only = "--summary" in sys.argv
    rows = []
    for layer in js["layers"]:
        lists = [x for x in layer["lists"] if x["steps"] > 0]
        if not lists:
            continue
        n = len(lists)
        avg = lambda k: sum(x.get(k, 0.0) for x in lists) / n
        rows.append({
            "layer": layer["layer"],
            "i1_pct": 100 * sum(x["avg_i1"] / x["avg_ctx"] for x in lists) / n,
            "i0_pct": 100 * sum(x["avg_i0"] / x["avg_ctx"] for x in lists) / n,
            "true": avg("avg_true_mass"),
            "true_min": min(x["avg_true_min"] for x in lists),
            "outside": avg("avg_loss_outside"),
            "allowed": avg("avg_loss_allowed"),
            "group": avg("avg_loss_group"),
            "estimate": avg("avg_loss_estimate"),
            "bound0": max((x.get("avg_bound0", float("nan")) for x in lists), default=float("nan")),
            "bound": max((x.get("avg_bound", float("nan")) for x in lists), default=float("nan")),
            "acts": sum(x.get("guard_acts", 0) for x in lists) / sum(x["steps"] for x in lists),
            "bound_exact": max(x["avg_bound_exact"] for x in lists),
            "viol": sum(x["bound_violations"] for x in lists),
            "slack": avg("avg_bound_slack") if all("avg_bound_slack" in x for x in lists) else float("nan"),
            "est_min": min(x["avg_est_mass_min"] for x in lists),
        })
    if not rows:
        sys.exit("no sparse decode steps in " + args[0])
    print(js["attention"])
    if not summary_only:
        print("layer | I0 %ctx | I1 %ctx | true mass | min head | loss: outside | allowed | estimate |"
              " est. min head | bound(I0) exact | slack | guard bound0 -> bound | acts")
        for r in rows:
            print(f"{r['layer']:5d} | {r['i0_pct']:7.1f} | {r['i1_pct']:7.2f} | {r['true']:9.3f} | {r['true_min']:8.3f} |"
                  f" {r['outside']:13.3f} | {r['allowed']:7.3f} | {r['estimate']:8.3f} | {r['est_min']:13.3f} |"
                  f" {r['bound_exact']:15.3f} | {r['slack']:5.1f} | {r['bound0']:6.3f} -> {r['bound']:5.3f} | {r['acts']:4.2f}")
    n = len(rows)
    mean = lambda k: sum(r[k] for r in rows) / n
    viol = sum(r["viol"] for r in rows)
    print(f"summary: {n} sparse layers, I1 {mean('i1_pct'):.2f}% of ctx (I0 {mean('i0_pct'):.1f}%), true mass mean "
          f"{mean('true'):.3f}, min layer {min(r['true'] for r in rows):.3f}, min head {min(r['true_min'] for r in rows):.3f}; "
          f"loss split outside {mean('outside'):.3f} allowed {mean('allowed'):.3f} "
          f"estimate {mean('estimate'):.3f}; est. mass of the least-served head (min layer) {min(r['est_min'] for r in rows):.3f}; "
          f"Quest bound slack {mean('slack'):.1f} nats; guard acts on {100 * mean('acts'):.0f}% of lists; bound violations {viol}")


if __name__ == "__main__":
    main()
