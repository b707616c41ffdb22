"""Summary of the curriculum × learning-rate grid trained by `loam.sweep`: a table and a plot.

    python -m loam.sweep --config loam/configs/lr_curriculum.py --workdir runs/lrcur
    python -m loam.experiments.lr_curriculum --workdir runs/lrcur

Cells: order ∈ {random, asc} × {constant, cosine to 0, moderate decay (to 0.3·peak), moderate
decay + uniform average of the last 4 checkpoints}. The averaged cell is made here from the
moderate runs (`loam.average` + `loam.eval`, skipped once done); the metric is the mean per-domain
validation loss, compared between orders with paired differences over seeds. Writes
results.json, results.md and results.png into the sweep directory.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from loam import cli
from loam.configs.lr_curriculum import LR, ORDERS
from loam.workdir import UnreadableFile, read_json, write_json

CELLS = (*LR, "moderate+avg")
AVERAGED = "avg_last4"


def _run(cmd: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        raise cli.UserError(f"python -m {' '.join(cmd)} failed: {' | '.join(err[-3:])}")


def _mean_loss(path: Path) -> dict:
    record = read_json(path)
    try:
        return {"loss": float(record["loss_domain_mean"]),
                **{f"loss/{k}": float(v["loss"]) for k, v in record["per_domain"].items()}}
    except (KeyError, TypeError, ValueError) as e:
        raise UnreadableFile(f"{path} is not an eval record ({type(e).__name__}: {e})") from None


def _cell(config: dict) -> tuple[str, str]:
    """(order, learning-rate cell) of a run of the grid, from its resolved config."""
    o = config["optim"]
    lr = next((name for name, (sched, final) in LR.items()
               if o["schedule"] == sched and math.isclose(o["final_lr_fraction"], final)), None)
    stage = (config["data"].get("stages") or [{}])[0]
    order = stage.get("name")
    if lr is None or order not in ORDERS:
        raise cli.UserError(f"a run with schedule {o['schedule']!r}, final_lr_fraction "
                            f"{o['final_lr_fraction']} and stage {order!r} is not a cell of the "
                            "grid; was the sweep made from loam/configs/lr_curriculum.py?")
    return order, lr


def collect(workdir: Path, average: bool = True) -> list[dict]:
    """One row per finished run (and per averaged moderate run); unfinished or unreadable runs
    are named on stderr and left out."""
    runs = sorted((workdir / "runs").glob("*/sweep_run.json"))
    if not runs:
        raise cli.UserError(f"{workdir / 'runs'} holds no sweep runs; train the grid first: "
                            "python -m loam.sweep --config loam/configs/lr_curriculum.py "
                            f"--workdir {workdir}")
    rows = []
    for path in runs:
        run_dir = path.parent
        try:
            config = read_json(path)["config"]
            order, lr = _cell(config)
            steps = int(config["steps"])
            cells = [(lr, run_dir)]
            final = run_dir / "eval" / f"step_{steps}.json"
            if not final.is_file():
                print(f"warning: {run_dir.name} has not finished (no {final.relative_to(workdir)})"
                      "; rerun the sweep to train it", file=sys.stderr)
                continue
            if lr == "moderate" and average:
                avg = run_dir / AVERAGED
                if not (avg / "eval" / f"step_{steps}.json").is_file():
                    print(f"averaging the last 4 checkpoints of {run_dir.name}", flush=True)
                    _run(["loam.average", f"--workdir={run_dir}", "--last", "4",
                          f"--out={avg}"])
                    _run(["loam.eval", f"--workdir={avg}"])
                cells.append(("moderate+avg", avg))
            for cell, d in cells:
                rows.append({"seed": int(config["seed"]), "order": order, "lr": cell,
                             **_mean_loss(d / "eval" / f"step_{steps}.json")})
        except (UnreadableFile, KeyError, TypeError) as e:
            print(f"warning: skipping {run_dir.name}: {cli.one_line(e)}", file=sys.stderr)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per cell: mean and std of each order over seeds, and the curriculum gain (random − asc)
    with the standard error of its paired, same-seed differences."""
    out = {}
    for cell in CELLS:
        by = {o: {r["seed"]: r["loss"] for r in rows if r["lr"] == cell and r["order"] == o}
              for o in ORDERS}
        seeds = sorted(set(by["random"]) & set(by["asc"]))
        if not seeds:
            continue
        rand = np.array([by["random"][s] for s in seeds])
        asc = np.array([by["asc"][s] for s in seeds])
        paired = asc - rand  # same seed: paired differences
        n = len(seeds)
        out[cell] = {
            "random_mean": float(rand.mean()), "asc_mean": float(asc.mean()),
            "random_std": float(rand.std(ddof=1)) if n > 1 else math.nan,
            "asc_std": float(asc.std(ddof=1)) if n > 1 else math.nan,
            "curriculum_gain": float(-paired.mean()),  # positive: curriculum lowers the loss
            "gain_se": float(paired.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
            "seeds": n}
    return out


def write_report(workdir: Path, rows, summary) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(workdir / "results.json", {"runs": rows, "summary": summary}, indent=2)
    lines = ["| LR schedule | random order | ascending quality | curriculum gain (± s.e.) |",
             "|---|---|---|---|"]
    for cell, s in summary.items():
        lines.append(f"| {cell} | {s['random_mean']:.4f} ± {s['random_std']:.4f} | "
                     f"{s['asc_mean']:.4f} ± {s['asc_std']:.4f} | "
                     f"{s['curriculum_gain']:+.4f} ± {s['gain_se']:.4f} |")
    table = "\n".join(lines)
    (workdir / "results.md").write_text(table + "\n")
    cells = list(summary)
    x = np.arange(len(cells))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, o in enumerate(ORDERS):
        means = [summary[c][f"{o}_mean"] for c in cells]
        errs = [summary[c][f"{o}_std"] for c in cells]
        ax.bar(x + (i - 0.5) * 0.38, means, 0.38, yerr=errs, label=f"{o} order", capsize=3)
    lo = min(min(summary[c]["random_mean"], summary[c]["asc_mean"]) for c in cells)
    hi = max(max(summary[c]["random_mean"], summary[c]["asc_mean"]) for c in cells)
    ax.set_ylim(lo - 0.1 * (hi - lo + 0.05), hi + 0.2 * (hi - lo + 0.05))
    ax.set_xticks(x, cells)
    ax.set_ylabel("mean validation loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "results.png", dpi=100)
    plt.close(fig)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, type=Path, help="the sweep directory")
    args = p.parse_args(argv)
    with cli.user_errors():
        rows = collect(args.workdir)
        summary = summarise(rows)
        if not summary:
            cli.fail(f"no cell of the grid in {args.workdir} has both orders finished for a "
                     "common seed yet; finish the sweep, then rerun this command")
        print(write_report(args.workdir, rows, summary))
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
