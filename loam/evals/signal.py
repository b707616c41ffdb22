"""Which evaluation tasks carry early signal: a report over a sweep's runs (FineWeb2's criteria
for choosing evaluation tasks).

    python -m loam.evals.signal --sweep SWEEP_DIR [--min_monotonicity 0.5] [--min_distance 2]

For every downstream metric the runs' eval files hold (config.evals: probes and task files; the
mean of an evaluator and each task or domain, ``acc`` and ``acc_norm``), over the runs of a sweep
(``python -m loam.sweep``: SWEEP_DIR/runs/<run id>/eval.jsonl; runs that differ only in their
seed are seeds of one config):

- monotonicity: the Spearman correlation of the metric with the training step, per run,
  averaged over runs (a metric that rises steadily while the model learns ranks data early);
- spread: the standard deviation of the final metric across the seeds of a config, averaged over
  configs (noise that can hide a difference between two mixtures);
- progress: the final metric minus the first evaluation's, averaged over runs (what training
  moved; the spread must be smaller for the metric to tell runs apart);
- distance from chance: the final mean minus chance, in units of its standard error (the seeds'
  standard error, but at least the binomial error of an accuracy over the task's items),
  averaged over configs.

A metric carries signal when it is monotonic (mean Spearman >= --min_monotonicity), clear of
chance (distance >= --min_distance standard errors) and its seed spread is smaller than its
progress; the verdict lists the criteria it misses. The report is SWEEP_DIR/signal.md (a table)
and SWEEP_DIR/signal.json (the same, with every config's numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from scipy import stats

from loam import cli, paths
from loam import metrics as metrics_lib
from loam.workdir import read_json, write_json

RUN_FILE = "sweep_run.json"  # loam.sweep's record of a run's axis values
SKIP = {"chance", "n", "tokens"}  # not metrics: what a metric is compared with or counted over


class SignalError(cli.UserError):
    """A sweep the report cannot be made from; the message names the problem and the fix."""


# --------------------------------------------------------------------------- statistics

def monotonicity(steps: Sequence[float], values: Sequence[float]) -> float:
    """Spearman's rank correlation of values with steps; 0 for a constant curve (no trend)."""
    if len(steps) < 2 or np.ptp(values) == 0 or np.ptp(steps) == 0:
        return 0.0
    return float(stats.spearmanr(steps, values).statistic)


def spread(finals: Sequence[float]) -> float:
    """Standard deviation (ddof 1) of one config's final values across its seeds."""
    return float(np.std(finals, ddof=1)) if len(finals) > 1 else math.nan


def standard_error(finals: Sequence[float], items: float | None = None) -> float:
    """Standard error of the mean of the seeds' final values: the seeds' own (sd / sqrt(k)), at
    least the binomial error of an accuracy over ``items`` items in each of k runs, so that
    seeds that happen to agree do not make any distance from chance infinitely significant."""
    k = len(finals)
    mean = float(np.mean(finals))
    se = float(np.std(finals, ddof=1)) / math.sqrt(k) if k > 1 else 0.0
    if items and 0 <= mean <= 1:
        se = max(se, math.sqrt(max(mean * (1 - mean), 1e-12) / (items * k)))
    return se


def distance_from_chance(finals: Sequence[float], chance: float,
                         items: float | None = None) -> float:
    """(mean of the final values - chance) / its standard error."""
    se = standard_error(finals, items)
    diff = float(np.mean(finals)) - chance
    if se == 0:
        return math.copysign(math.inf, diff) if diff else 0.0
    return diff / se


def verdict(row: dict, min_monotonicity: float = 0.5, min_distance: float = 2.0
            ) -> tuple[bool, list[str]]:
    """(carries signal, reasons): the reasons say which criteria hold or fail, with numbers."""
    reasons, ok = [], True
    m = row["monotonicity"]
    if m >= min_monotonicity:
        reasons.append(f"monotonic (Spearman {m:.2f} >= {min_monotonicity:g})")
    else:
        ok = False
        reasons.append(f"not monotonic (Spearman {m:.2f} < {min_monotonicity:g})")
    d = row.get("distance_from_chance")
    if d is None:
        reasons.append("no chance level to compare with")
    elif d >= min_distance:
        reasons.append(f"above chance ({d:.1f} SE >= {min_distance:g})")
    else:
        ok = False
        where = "below chance" if d <= -min_distance else "not clear of chance"
        reasons.append(f"{where} ({d:.1f} SE < {min_distance:g})")
    s, p = row["spread"], row["progress"]
    if s < abs(p):
        reasons.append(f"seed spread {s:.3g} below the progress over training {p:+.3g}")
    else:
        ok = False
        reasons.append(f"seed spread {s:.3g} not below the progress over training {p:+.3g}")
    return ok, reasons


# --------------------------------------------------------------------------- reading a sweep

def flat_downstream(record: dict) -> dict[str, dict]:
    """{metric: {"value", "chance", "n"}} of an eval record's downstream metrics: each
    evaluator's means (``probes/acc``) and each task's or domain's (``probes/code/acc``)."""
    out: dict[str, dict] = {}

    def visit(prefix: str, node: dict):
        chance = node.get("chance")
        n = node.get("n")
        for key, value in node.items():
            if isinstance(value, dict):
                for part, sub in value.items():
                    if isinstance(sub, dict):
                        visit(f"{prefix}/{part}", sub)
            elif key not in SKIP and isinstance(value, (int, float)) and not isinstance(
                    value, bool):
                out[f"{prefix}/{key}"] = {"value": float(value), "chance": chance, "n": n}

    for name, metrics in (record.get("downstream") or {}).items():
        if isinstance(metrics, dict):
            visit(name, metrics)
    return out


def read_sweep(sweep_dir: paths.PathLike) -> list[dict]:
    """Per run: {"run_id", "config" (axis values without the seed, as JSON), "seed", "curves":
    {metric: [(step, value)]}, "chance": {metric: c}, "n": {metric: items}}."""
    root = paths.Path(sweep_dir)
    if not paths.is_dir(root / "runs"):
        raise SignalError(f"{sweep_dir} is not a sweep directory (no runs/ in it); give the "
                          "--workdir of python -m loam.sweep")
    runs = []
    for run_dir in sorted(paths.iterdir(root / "runs"), key=str):
        if not paths.exists(run_dir / "eval.jsonl"):
            continue
        values: dict = {}
        if paths.exists(run_dir / RUN_FILE):
            values = dict(read_json(run_dir / RUN_FILE).get("values") or {})
        config = read_json(run_dir / "config.json") if paths.exists(
            run_dir / "config.json") else {}
        seed = values.pop("seed", config.get("seed", 0))
        by_step: dict[int, dict] = {}
        for record in metrics_lib.read_jsonl(run_dir / "eval.jsonl"):
            flat = flat_downstream(record)
            if flat:
                by_step[int(record["step"])] = flat  # a resumed run's later record wins
        curves: dict[str, list] = defaultdict(list)
        chance: dict[str, float] = {}
        items: dict[str, float] = {}
        for step in sorted(by_step):
            for metric, v in by_step[step].items():
                curves[metric].append((step, v["value"]))
                if v["chance"] is not None:
                    chance[metric] = float(v["chance"])
                if v["n"]:
                    items[metric] = float(v["n"])
        if curves:
            runs.append({"run_id": run_dir.name, "seed": seed,
                         "config": json.dumps(values, sort_keys=True, default=str),
                         "curves": dict(curves), "chance": chance, "n": items})
    if not runs:
        raise SignalError(f"no run in {sweep_dir}/runs has downstream metrics in its eval.jsonl; "
                          "give the sweep's base config evaluators (e.g. config.evals = "
                          "[{'kind': 'probes'}]) and run it")
    return runs


def _items(runs: list[dict], metric: str) -> float | None:
    """Items per evaluation of a metric; a mean over tasks or domains counts all of theirs."""
    n = [r["n"][metric] for r in runs if metric in r["n"]]
    if n:
        return float(np.mean(n))
    parts = {}
    prefix, _, leaf = metric.rpartition("/")
    for r in runs:
        for m, count in r["n"].items():
            head, _, tail = m.rpartition("/")
            if tail == leaf and head.rpartition("/")[0] == prefix:
                parts[head] = count
    return float(sum(parts.values())) if parts else None


def report(runs: list[dict], min_monotonicity: float = 0.5, min_distance: float = 2.0,
           min_evals: int = 3) -> dict:
    """The report's rows (one per metric) and the per-config numbers behind them."""
    short = sorted({r["run_id"] for r in runs for c in r["curves"].values()
                    if len(c) < min_evals})
    if short:
        raise SignalError(f"run(s) {', '.join(short[:3])} have fewer than {min_evals} "
                          "evaluations of a metric; monotonicity needs a curve: evaluate more "
                          "often (a smaller eval_every in the sweep's base config)")
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["config"]].append(r)
    if not any(len(g) > 1 for g in groups.values()):
        raise SignalError("no config of the sweep was trained with more than one seed, so the "
                          "spread across seeds cannot be measured; add a seed axis (e.g. "
                          "{'seed': [0, 1, 2]}) to the sweep")
    metrics = sorted({m for r in runs for m in r["curves"]})
    rows = []
    for metric in metrics:
        having = [r for r in runs if metric in r["curves"]]
        rhos = [monotonicity(*zip(*r["curves"][metric])) for r in having]
        progress = [r["curves"][metric][-1][1] - r["curves"][metric][0][1] for r in having]
        chances = [r["chance"][metric] for r in having if metric in r["chance"]]
        chance = float(np.mean(chances)) if chances else None
        items = _items(having, metric)
        per_config = []
        for config, members in groups.items():
            members = [r for r in members if metric in r["curves"]]
            if not members:
                continue
            common = set.intersection(*({s for s, _ in r["curves"][metric]} for r in members))
            if not common:
                continue
            final_step = max(common)
            finals = [dict(r["curves"][metric])[final_step] for r in members]
            entry = {"config": json.loads(config), "seeds": [r["seed"] for r in members],
                     "final_step": final_step, "finals": finals,
                     "mean": float(np.mean(finals)), "spread": spread(finals)}
            if chance is not None:
                entry["distance_from_chance"] = distance_from_chance(finals, chance, items)
            per_config.append(entry)
        seeded = [c["spread"] for c in per_config if len(c["finals"]) > 1]
        row = {"metric": metric, "runs": len(having), "configs": len(per_config),
               "chance": chance,
               "final_mean": float(np.mean([c["mean"] for c in per_config])),
               "monotonicity": float(np.mean(rhos)),
               "spread": float(np.mean(seeded)) if seeded else math.nan,
               "progress": float(np.mean(progress)),
               "distance_from_chance": (float(np.mean([c["distance_from_chance"]
                                                      for c in per_config]))
                                        if chance is not None else None),
               "per_config": per_config}
        row["signal"], row["reasons"] = verdict(row, min_monotonicity, min_distance)
        rows.append(row)
    return {"criteria": {"min_monotonicity": min_monotonicity, "min_distance": min_distance,
                         "spread": "below the progress over training"},
            "runs": len(runs), "configs": len(groups), "metrics": rows}


def json_safe(value):
    """NaN (no spread: one seed) and infinities as the strings "nan", "inf": strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def markdown(result: dict) -> str:
    lines = [f"Early signal of the downstream metrics over {result['runs']} runs "
             f"({result['configs']} configs): monotonicity is the mean Spearman correlation "
             "with step, spread the seed standard deviation of the final value, distance the "
             "final mean minus chance in standard errors.", "",
             "| metric | chance | final | monotonicity | seed spread | progress | distance "
             "(SE) | signal | reasons |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]

    def num(x, fmt=".3f"):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    for r in result["metrics"]:
        lines.append(
            f"| {r['metric']} | {num(r['chance'])} | {num(r['final_mean'])} | "
            f"{num(r['monotonicity'], '.2f')} | {num(r['spread'])} | {num(r['progress'], '+.3f')}"
            f" | {num(r['distance_from_chance'], '.1f')} | {'yes' if r['signal'] else 'no'} | "
            f"{'; '.join(r['reasons'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep", required=True, help="a sweep directory (python -m loam.sweep)")
    p.add_argument("--min_monotonicity", type=float, default=0.5,
                   help="mean Spearman correlation with step a metric needs")
    p.add_argument("--min_distance", type=float, default=2.0,
                   help="standard errors above chance a metric needs")
    args = p.parse_args(argv)
    with cli.user_errors():
        result = report(read_sweep(args.sweep), args.min_monotonicity, args.min_distance)
        table = markdown(result)
        root = paths.Path(args.sweep)
        paths.atomic_write(root / "signal.md", table)
        write_json(root / "signal.json", json_safe(result), indent=2)
        print(table, end="")
        print(f"report in {root / 'signal.md'} and {root / 'signal.json'}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
