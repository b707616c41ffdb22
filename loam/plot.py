"""Curves of runs, read back from their run directories (metrics.jsonl, eval.jsonl).

    python -m loam.plot --runs runs/a runs/b [...] --out compare.png [--smooth 10]

One figure: a column per domain with its training loss (line) and held-out loss (markers) in
the top row and the mixture weight it was realised with in the second, and, when the runs ran
downstream evaluators (config.evals), a row of their metrics (accuracy per evaluator, chance
dashed). Each run is one colour throughout. Every run writes its own ``curves.png`` (the same
figure for one run) next to ``schedule.png``, at each evaluation and at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys

import numpy as np

from loam import cli, metrics, paths


class PlotError(cli.UserError):
    """Runs that cannot be plotted; the message names the directory and the fix."""


@dataclasses.dataclass
class Curves:
    """What the figure draws of one run: step -> value series, per domain or per metric."""
    label: str
    train_loss: dict[str, tuple[np.ndarray, np.ndarray]]
    eval_loss: dict[str, tuple[np.ndarray, np.ndarray]]
    weights: dict[str, tuple[np.ndarray, np.ndarray]]
    downstream: dict[str, tuple[np.ndarray, np.ndarray]]  # "<evaluator>/acc" etc.
    chance: dict[str, float]

    @property
    def domains(self) -> list[str]:
        return list(dict.fromkeys([*self.train_loss, *self.eval_loss, *self.weights]))


def _series(points: dict[str, dict[int, float]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)]))
            for k, v in points.items() if v}


def read_curves(workdir: paths.PathLike, label: str | None = None) -> Curves:
    """A run's curves; a step logged twice (a resumed run replays steps) keeps its last value."""
    run = paths.Path(workdir)
    if not metrics.jsonl_exists(run / "metrics.jsonl"):
        raise PlotError(f"{run} has no metrics.jsonl: give the directory of a run trained "
                        "by python -m loam.train")
    train: dict[str, dict[int, float]] = {}
    weights: dict[str, dict[int, float]] = {}
    for rec in metrics.read_jsonl(run / "metrics.jsonl"):
        step = int(rec["step"])
        for d, v in (rec.get("loss_per_domain") or {}).items():
            train.setdefault(d, {})[step] = float(v)
        for d, v in (rec.get("mixture_weights") or {}).items():
            weights.setdefault(d, {})[step] = float(v)
    evals: dict[str, dict[int, float]] = {}
    down: dict[str, dict[int, float]] = {}
    chance: dict[str, float] = {}
    if metrics.jsonl_exists(run / "eval.jsonl"):
        for rec in metrics.read_jsonl(run / "eval.jsonl"):
            step = int(rec.get("eval_step", rec["step"]))
            for d, v in (rec.get("per_domain") or {}).items():
                evals.setdefault(d, {})[step] = float(v["loss"])
            for name, m in (rec.get("downstream") or {}).items():
                for key in ("acc", "acc_norm"):
                    if isinstance(m.get(key), (int, float)):
                        down.setdefault(f"{name}/{key}", {})[step] = float(m[key])
                if isinstance(m.get("chance"), (int, float)):
                    chance[name] = float(m["chance"])
    return Curves(label or run.name, _series(train), _series(evals), _series(weights),
                  _series(down), chance)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    head = np.cumsum(y[:window - 1]) / np.arange(1, window)  # a trailing mean over what exists
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def plot_runs(runs: list[Curves], out: paths.PathLike, smooth: int = 1):
    """Draws the figure (module docstring) to ``out``; returns the matplotlib figure's axes
    grid (closed; for tests to inspect)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(dict.fromkeys(d for r in runs for d in r.domains))
    evaluators = sorted({k.split("/")[0] for r in runs for k in r.downstream})
    cols = max(len(domains), len(evaluators), 1)
    nrows = 3 if evaluators else 2
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        c = colours[i % len(colours)]
        for j, d in enumerate(domains):
            if d in run.train_loss:
                x, y = run.train_loss[d]
                axes[0, j].plot(x, _smooth(y, smooth), color=c, linewidth=1,
                                label=f"{run.label} train")
            if d in run.eval_loss:
                x, y = run.eval_loss[d]
                axes[0, j].plot(x, y, "o--", color=c, markersize=4, linewidth=0.8,
                                label=f"{run.label} eval")
            if d in run.weights:
                x, y = run.weights[d]
                axes[1, j].plot(x, y, color=c, linewidth=1, drawstyle="steps-post",
                                label=run.label)
        for j, name in enumerate(evaluators):
            for key, style in (("acc", "o-"), ("acc_norm", "s:")):
                if f"{name}/{key}" in run.downstream:
                    x, y = run.downstream[f"{name}/{key}"]
                    axes[2, j].plot(x, y, style, color=c, markersize=4, linewidth=1,
                                    label=f"{run.label} {key}")
            if name in run.chance:
                axes[2, j].axhline(run.chance[name], color="grey", linestyle="--",
                                   linewidth=0.8)
    for j in range(cols):
        if j < len(domains):
            axes[0, j].set_title(domains[j], fontsize=9)
            axes[0, j].set_ylabel("loss (nats/token)" if j == 0 else "")
            axes[1, j].set_ylabel("mixture weight" if j == 0 else "")
            axes[1, j].set_xlabel("step")
            axes[1, j].set_ylim(0, 1)
        else:
            axes[0, j].axis("off")
            axes[1, j].axis("off")
        if evaluators:
            if j < len(evaluators):
                axes[2, j].set_title(f"{evaluators[j]} (chance dashed)", fontsize=9)
                axes[2, j].set_xlabel("step")
                axes[2, j].set_ylim(0, 1)
            else:
                axes[2, j].axis("off")
    axes[0, 0].legend(fontsize=6)
    if evaluators:
        axes[2, 0].legend(fontsize=6)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    paths.atomic_write(out, png.getvalue())  # one object on a store, whole locally
    return axes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run directories")
    p.add_argument("--labels", nargs="+", default=None, help="legend names (default: dir names)")
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--smooth", type=int, default=1, help="trailing mean over this many steps "
                   "of the training loss")
    args = p.parse_args(argv)
    with cli.user_errors():
        if args.labels and len(args.labels) != len(args.runs):
            raise PlotError(f"{len(args.labels)} --labels for {len(args.runs)} --runs: give one "
                            "label per run, or none")
        labels = args.labels or [None] * len(args.runs)
        runs = [read_curves(r, label) for r, label in zip(args.runs, labels)]
        plot_runs(runs, args.out, smooth=args.smooth)
        print(f"wrote {args.out}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
