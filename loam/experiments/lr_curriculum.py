"""Runs the curriculum × learning-rate grid and writes a results table and plot.

    python -m loam.experiments.lr_curriculum --workdir runs/lrcur [--seeds 3] [--steps 300]

Cells: order ∈ {random, asc} × {constant, cosine to 0, moderate decay (to 0.3·peak), moderate
decay + uniform average of the last 4 checkpoints}. The averaged cell reuses the moderate runs.
Runs are resumable (rerun the command); the metric is the mean per-domain validation loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lr_curriculum.py"
ORDERS = ("random", "asc")
CELLS = ("constant", "cosine", "moderate", "moderate+avg")


def _run(cmd):
    proc = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def _final_eval(workdir: Path) -> dict:
    evals = sorted(workdir.glob("eval/step_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    return json.loads(evals[-1].read_text())


def run_grid(workdir: Path, seeds: int, steps: int, size: str) -> list[dict]:
    rows = []
    for seed in range(seeds):
        for order in ORDERS:
            for lr in ("constant", "cosine", "moderate"):
                arg = f"order={order},lr={lr},seed={seed},steps={steps},size={size}"
                run_dir = workdir / arg.replace(",", "_").replace("=", "-")
                done = run_dir / "eval" / f"step_{steps}.json"
                if not done.exists():
                    print(f"training {arg}", flush=True)
                    _run(["loam.train", f"--config={CONFIG}:{arg}", f"--workdir={run_dir}"])
                cells = [(lr, run_dir)]
                if lr == "moderate":
                    avg = run_dir / "avg_last4"
                    if not (avg / "eval" / f"step_{steps}.json").exists():
                        _run(["loam.average", f"--workdir={run_dir}", "--last", "4"])
                        _run(["loam.eval", f"--workdir={avg}"])
                    cells.append(("moderate+avg", avg))
                for cell, d in cells:
                    ev = _final_eval(d)
                    rows.append({"seed": seed, "order": order, "lr": cell,
                                 "loss": ev["loss_domain_mean"],
                                 **{f"loss/{k}": v["loss"] for k, v in ev["per_domain"].items()}})
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for cell in CELLS:
        by = {o: np.array([r["loss"] for r in rows if r["lr"] == cell and r["order"] == o])
              for o in ORDERS}
        paired = by["asc"] - by["random"]  # same seed: paired differences
        n = len(paired)
        out[cell] = {
            "random_mean": float(by["random"].mean()), "asc_mean": float(by["asc"].mean()),
            "random_std": float(by["random"].std(ddof=1)) if n > 1 else math.nan,
            "asc_std": float(by["asc"].std(ddof=1)) if n > 1 else math.nan,
            "curriculum_gain": float(-paired.mean()),  # positive: curriculum lowers the loss
            "gain_se": float(paired.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
            "seeds": n}
    return out


def write_report(workdir: Path, rows, summary):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (workdir / "results.json").write_text(json.dumps({"runs": rows, "summary": summary},
                                                     indent=2))
    lines = ["| LR schedule | random order | ascending quality | curriculum gain (± s.e.) |",
             "|---|---|---|---|"]
    for cell, s in summary.items():
        lines.append(f"| {cell} | {s['random_mean']:.4f} ± {s['random_std']:.4f} | "
                     f"{s['asc_mean']:.4f} ± {s['asc_std']:.4f} | "
                     f"{s['curriculum_gain']:+.4f} ± {s['gain_se']:.4f} |")
    table = "\n".join(lines)
    (workdir / "results.md").write_text(table + "\n")
    x = np.arange(len(CELLS))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, o in enumerate(ORDERS):
        means = [summary[c][f"{o}_mean"] for c in CELLS]
        errs = [summary[c][f"{o}_std"] for c in CELLS]
        ax.bar(x + (i - 0.5) * 0.38, means, 0.38, yerr=errs, label=f"{o} order", capsize=3)
    lo = min(min(summary[c]["random_mean"], summary[c]["asc_mean"]) for c in CELLS)
    hi = max(max(summary[c]["random_mean"], summary[c]["asc_mean"]) for c in CELLS)
    ax.set_ylim(lo - 0.1 * (hi - lo + 0.05), hi + 0.2 * (hi - lo + 0.05))
    ax.set_xticks(x, CELLS)
    ax.set_ylabel("mean validation loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "results.png", dpi=100)
    plt.close(fig)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--size", default="micro")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 12:
        p.error("need --seeds >= 1 and --steps >= 12 (4 checkpoints to average)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = run_grid(args.workdir, args.seeds, args.steps, args.size)
    summary = summarise(rows)
    print(write_report(args.workdir, rows, summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
