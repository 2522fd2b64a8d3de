"""The heads' learning curve: held-out teacher-forced agreement (depth 1)
against the answer tokens a head has trained on, log scale, one line per
training run (e.g. the last state alone against fused features), with decoding
AR_1 where an eval-heads JSON is given, and a log-linear extrapolation of the
tokens needed for a target agreement.

    python scripts/learning_curve.py --run "last state=runs/smollm2/plain" \
        --run "fused 2,15,27=runs/smollm2/fused:runs/smollm2/fused-eval.json" \
        --png docs/learning_curve.png --json docs/learning_curve.json [--target 0.7]

A run is LABEL=TRAIN_OUT[:EVAL_JSON]; TRAIN_OUT holds trainer_state.json (its
history records `tokens_seen` and `eval_agreement` at every evaluation).
`--keep JSON` adds the runs of an earlier `--json` output (their training
folders may be gone), so that the curve of every recipe run stays in one plot.
Tokens seen in the first epoch are all new data; past it the same tokens come
again, which the plot marks (open markers), and the fit uses only first-epoch
points unless there are fewer than three.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def read_run(spec: str) -> dict:
    label, _, rest = spec.partition("=")
    train_out, _, eval_json = rest.partition(":")
    state = json.loads((Path(train_out) / "trainer_state.json").read_text())
    points = [{"tokens": h["tokens_seen"], "agreement": h["eval_agreement"][0], "epoch": h.get("epoch", 0),
               "step": h["step"], "seconds": h.get("seconds")}
              for h in state["history"] if "eval_agreement" in h and h.get("tokens_seen")]
    if not points:
        raise SystemExit(f"{train_out}: no evaluation with tokens_seen in its history (train with --eval-data)")
    run = {"label": label, "points": points, "best": state.get("best")}
    if eval_json:
        ev = json.loads(Path(eval_json).read_text())
        best = ev["best"]
        run["decoding"] = {"AR_1": best["AR_1"], "tau": best["mean_accepted_length"], "D": best["num_draft"],
                           "teacher_forced": ev.get("teacher_forced_agreement")}
    return run


def fit(points):
    """agreement = a + b ln(tokens), least squares."""
    xs = [math.log(p["tokens"]) for p in points]
    ys = [p["agreement"] for p in points]
    n = len(xs)
    mx_, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx_) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        return None
    b = sum((x - mx_) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx_, b


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], help="LABEL=TRAIN_OUT[:EVAL_JSON]")
    ap.add_argument("--keep", default=None, help="An earlier --json output whose runs are plotted too.")
    ap.add_argument("--target", type=float, default=0.7, help="Agreement to extrapolate to (default 0.7).")
    ap.add_argument("--png", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    kept = json.loads(Path(args.keep).read_text()) if args.keep else []
    runs = [read_run(r) for r in args.run]
    if not runs and not kept:
        raise SystemExit("give at least one --run (or --keep)")
    for run in runs:
        first = [p for p in run["points"] if p["epoch"] == 0]
        use = first if len(first) >= 3 else run["points"]
        f = fit(use)
        run["fit"] = None
        if f is not None:
            a, b = f
            need = math.exp((args.target - a) / b) if b > 0 else None
            tok_s = None
            timed = [p for p in run["points"] if p["seconds"]]
            if timed:
                tok_s = timed[-1]["tokens"] / timed[-1]["seconds"]
            run["fit"] = {"a": a, "b_per_e": b, "points": len(use), "target": args.target,
                          "tokens_for_target": need, "train_tokens_per_s": tok_s}
        last = run["points"][-1]
        print(f"{run['label']}: {len(run['points'])} evaluations, last {last['agreement']:.3f} at "
              f"{last['tokens']:,} tokens; best {run['best']}; decoding {run.get('decoding')}")
        if run["fit"] and run["fit"]["tokens_for_target"]:
            print(f"  fit a + b ln(tokens): b = {run['fit']['b_per_e']:.4f} per e-fold; "
                  f"{args.target} at ~{run['fit']['tokens_for_target']:.3g} answer tokens")
    names = {r["label"] for r in runs}
    runs = runs + [r for r in kept if r["label"] not in names]
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(11, 4.8))
        for i, run in enumerate(runs):
            color = f"C{i}"
            xs = [p["tokens"] for p in run["points"]]
            ys = [p["agreement"] for p in run["points"]]
            ax.plot(xs, ys, color=color, label=run["label"])
            for p in run["points"]:
                ax.plot(p["tokens"], p["agreement"], "o", color=color,
                        markerfacecolor=color if p["epoch"] == 0 else "white")
            if run.get("decoding") and run["best"]:
                at = next(p["tokens"] for p in run["points"] if p["step"] == run["best"]["step"])
                ax.plot(at, run["decoding"]["AR_1"], "*", ms=12, color=color,
                        label=f"{run['label']}: AR_1 in decoding (exported step)")
            if run["fit"]:
                lo, hi = min(xs), max(xs) * 10
                grid = [lo * (hi / lo) ** (k / 40) for k in range(41)]
                ax.plot(grid, [run["fit"]["a"] + run["fit"]["b_per_e"] * math.log(x) for x in grid], "--",
                        color=color, alpha=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("answer tokens trained on (open markers: past the first epoch)")
        ax.set_ylabel("held-out agreement, depth 1 (teacher-forced)")
        ax.axhline(args.target, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, not over it
        fig.tight_layout()
        fig.savefig(args.png, dpi=110, bbox_inches="tight")
        print(f"-> {args.png}")


if __name__ == "__main__":
    main()
