"""Scaling-law sweeps: a base run config plus axes, expanded into runs with stable ids.

    python -m loam.sweep --config loam/configs/sweep_ladder.py --workdir DIR [--parallel N]
    python -m loam.sweep --config FILE --workdir DIR --list      # launch commands, one per run
    python -m loam.sweep --config FILE --workdir DIR --collect   # rebuild DIR/results.csv only
    python -m loam.sweep --config FILE --workdir DIR --fit       # fit the table, check holdouts
    python -m loam.sweep --config FILE --workdir DIR --config.base.steps=50   # any field, as train

Exit status: 0 when every run finished, 1 on a bad sweep (one `error:` line) or a failed run,
130 when interrupted.

A sweep file's get_config(arg) returns a ConfigDict with
  base             a run config (e.g. loam.configs.default.get_config(...));
  axes             a list of axes, each a dict {key: [values]}. The runs are the product of the
                   axes; keys inside one axis vary together (zipped, equal lengths);
  holdout          (optional) a list of points {key: value}, trained like grid runs but written
                   to DIR/holdout.csv instead of results.csv, so a law fitted on the grid can be
                   checked against them (--fit);
  warmup_fraction  (optional, 0 = off) warmup steps as a fraction of each run's steps.
A key is a dotted path into the base config ("optim.lr", "seed", "data.weights") or derived:
  params            target non-embedding parameters N -> model shape via sizes.pick_size
  tokens            tokens D -> steps = round(D / (batch_size * seq_len))
  tokens_per_param  D = value * N
  flops             a compute budget C (IsoFLOP): D = C / (6 N)
N is always the non-embedding parameter count (the N of the fitted law).

Every run trains in DIR/runs/<run id> as a subprocess of `python -m loam.train`, whose config
argument is this file reading the resolved config from DIR/runs/<run id>/sweep_run.json. The run
id is a readable name plus a hash of the run's own axis values, so editing one axis value changes
only the ids of the runs that use it. Rerunning a sweep skips finished runs (final checkpoint and
final eval present, same config) and lets train resume the others from their checkpoints; failed
runs are retried. Each finished run is a row of DIR/results.csv, rewritten atomically:
  run_id, status (ok | failed), the run's axis values, N (non-embedding) and N_total, D (tokens
  trained: steps * batch_size * seq_len), C = 6ND, C_attn = D * sizes.flops_per_token (output
  projection and the attention scores included), steps and model shape, loss (mean over domains)
  and loss/<domain> from the final eval, the downstream metrics of its config.evals
  (eval/<evaluator>/<metric>, eval/<evaluator>/<task or domain>/<metric>), wall_seconds (summed over
  attempts), error (log tail).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import ml_collections
import numpy as np

from loam import cli
from loam import run as run_lib
from loam.data import vocab as vocab_lib
from loam.model import sizes
from loam.scaling import fit as fit_lib
from loam.workdir import UnreadableFile, read_json

DERIVED_KEYS = ("params", "tokens", "tokens_per_param", "flops")
_TOKEN_KEYS = ("tokens", "tokens_per_param", "flops")
RUN_FILE = "sweep_run.json"
STATUS_FILE = "sweep_status.json"
RESULTS_FILE = "results.csv"
HOLDOUT_FILE = "holdout.csv"
_FIRST_COLUMNS = ("run_id", "status")
_SIZE_COLUMNS = ("N", "N_total", "D", "C", "C_attn", "steps", "d_model", "n_layers", "n_heads",
                 "mlp_dim")
_LAST_COLUMNS = ("wall_seconds", "error")
_DOWNSTREAM = "eval/"  # the prefix of downstream-metric columns


class SweepError(ValueError):
    """A sweep config or results table that cannot be used; the message names the fix."""


# --------------------------------------------------------------------------- config as data

def get_config(arg: str) -> ml_collections.ConfigDict:
    """The run config materialised by a sweep (the --config of each run's launch command)."""
    return ml_collections.ConfigDict(read_json(arg)["config"])


def check_sweep(sweep, where: str = "the sweep") -> ml_collections.ConfigDict:
    if "base" not in sweep:
        raise SweepError(f"{where} has no `base` run config; set sweep.base = "
                         "loam.configs.default.get_config(...) (and sweep.axes = [...])")
    return sweep


def load_sweep(spec: str) -> ml_collections.ConfigDict:
    """get_config(ARG) of FILE[:ARG], loaded as `--config` loads it (cli.load_config)."""
    return check_sweep(cli.load_config(spec), spec.partition(":")[0])


def _plain(value):
    """ConfigDict / tuples -> plain JSON-able dicts and lists."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_key(base: dict, key: str):
    if key in DERIVED_KEYS:
        return
    node: object = base
    done: list[str] = []
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            where = f"'{'.'.join(done)}'" if done else "the top level of the base config"
            fields = sorted(node) if isinstance(node, dict) else []
            raise SweepError(
                f"sweep axis {key!r} names no field of the base config: {where} has "
                f"{'fields ' + ', '.join(fields) if fields else 'no sub-fields'}. Use one of "
                f"those, or a derived key ({', '.join(DERIVED_KEYS)}).")
        node = node[part]
        done.append(part)
    if "." not in key and isinstance(node, dict):
        raise SweepError(f"sweep axis {key!r} is a whole section of the base config; vary its "
                         f"fields instead ({', '.join(f'{key}.{k}' for k in sorted(node))})")


def _set(config: dict, key: str, value):
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    old = node[last]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif (isinstance(old, int) and not isinstance(old, bool) and isinstance(value, float)
          and value.is_integer()):
        value = int(value)
    node[last] = value


# --------------------------------------------------------------------------- expansion

@dataclass
class Run:
    run_id: str
    values: dict  # the varied values of this run, in axis order
    config: dict  # the resolved run config (plain dict)
    holdout: bool = False
    shape: dict = field(default_factory=dict)


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    named = value if isinstance(value, list) else [value]
    if named and all(isinstance(v, dict) and isinstance(v.get("name"), str) for v in named):
        return "+".join(v["name"] for v in named)  # e.g. curriculum stages, by their names
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:6]


def run_id(values: dict, prefix: str = "") -> str:
    """Readable name + 8 hex digits of a hash of the values: stable across expansions."""
    digest = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()
    name = "_".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in values.items())
    name = re.sub(r"[^A-Za-z0-9_.=+-]", "", name)[:80]
    return f"{prefix}{name}-{digest[:8]}" if name else f"{prefix}{digest[:8]}"


def _model_shape(config: dict) -> dict:
    model_cfg = run_lib.model_config(ml_collections.ConfigDict(config))
    counts = sizes.count_params(model_cfg)
    return {"model_cfg": model_cfg, "N": counts["non_embedding"], "N_total": counts["total"],
            "flops_per_token": sizes.flops_per_token(model_cfg, config["data"]["seq_len"])}


def resolve(base: dict, values: dict, warmup_fraction: float = 0.0) -> dict:
    """The run config for one point: dotted fields first, then model shape, then steps."""
    config = json.loads(json.dumps(base))
    token_keys = [k for k in values if k in _TOKEN_KEYS]
    if len(token_keys) > 1:
        raise SweepError(f"a run sets {token_keys}; give the training length by one of "
                         f"{', '.join(_TOKEN_KEYS)} (or steps)")
    if token_keys and "steps" in values:
        raise SweepError(f"a run sets both {token_keys[0]!r} and 'steps'; drop one")
    for key, value in values.items():
        if key not in DERIVED_KEYS:
            _set(config, key, value)
    if "params" in values:
        target = float(values["params"])
        try:
            vocab = vocab_lib.get_tokenizer(config["data"].get("tokenizer") or "bundled")
            shape = sizes.pick_size(target, vocab.vocab_size, max_len=config["data"]["seq_len"])
        except ValueError as e:
            raise SweepError(f"params={target:g}: {e}") from None
        config["model"].update(d_model=shape.d_model, n_layers=shape.n_layers,
                               n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
                               mlp_dim=shape.mlp_dim)
    if token_keys:
        key, value = token_keys[0], float(values[token_keys[0]])
        n = _model_shape(config)["N"]
        tokens = {"tokens": value, "tokens_per_param": value * n, "flops": value / (6 * n)}[key]
        per_step = config["data"]["batch_size"] * config["data"]["seq_len"]
        config["steps"] = max(1, int(round(tokens / per_step)))
    if warmup_fraction:
        config["optim"]["warmup_steps"] = max(1, int(round(warmup_fraction * config["steps"])))
    return config


def _axis_points(axis, index: int) -> list[dict]:
    axis = _plain(axis)
    if not isinstance(axis, dict) or not axis:
        raise SweepError(f"sweep.axes[{index}] is {axis!r}; each axis is a dict "
                         "{key: [values]} (several keys in one dict vary together)")
    lengths = {}
    for key, vals in axis.items():
        if not isinstance(vals, list):
            raise SweepError(f"sweep.axes[{index}][{key!r}] is {vals!r}, not a list of values; "
                             f"write {key!r}: [{vals!r}]")
        if not vals:
            raise SweepError(f"sweep.axes[{index}][{key!r}] has no values, so the grid is empty; "
                             "give at least one value or remove the axis")
        lengths[key] = len(vals)
    if len(set(lengths.values())) > 1:
        raise SweepError(f"sweep.axes[{index}] zips keys of different lengths {lengths}; keys in "
                         "one axis vary together, so give them equally many values (or put them "
                         "in separate axes for a product)")
    keys = list(axis)
    return [{k: axis[k][i] for k in keys} for i in range(lengths[keys[0]])]


def expand(sweep) -> list[Run]:
    """All runs of a sweep (grid first, then holdout points), validated and resolved."""
    base = _plain(sweep.base)
    axes = _plain(sweep.get("axes", None)) or []
    holdout = _plain(sweep.get("holdout", None)) or []
    warmup = float(sweep.get("warmup_fraction", 0.0) or 0.0)
    if isinstance(axes, dict):
        axes = [{k: v} for k, v in axes.items()]
    if not axes and not holdout:
        raise SweepError("the sweep grid is empty: sweep.axes has no axes and there is no "
                         "holdout; add an axis such as {'optim.lr': [1e-3, 3e-3]}")
    points_per_axis = [_axis_points(a, i) for i, a in enumerate(axes)]
    for points in points_per_axis:
        for key in points[0]:
            _check_key(base, key)
    seen = {}
    runs = []
    grid = itertools.product(*points_per_axis) if axes else []
    for combo in grid:
        values = {k: v for point in combo for k, v in point.items()}
        runs.append(Run(run_id(values), values, resolve(base, values, warmup)))
    for i, point in enumerate(holdout):
        point = _plain(point)
        if not isinstance(point, dict) or not point:
            raise SweepError(f"sweep.holdout[{i}] is {point!r}; give a dict {{key: value}}")
        for key in point:
            _check_key(base, key)
        runs.append(Run(run_id(point, "holdout_"), point, resolve(base, point, warmup), True))
    for run in runs:
        if run.run_id in seen:
            raise SweepError(f"two runs have the same values {run.values}; remove the duplicate "
                             "axis value")
        seen[run.run_id] = run
    return runs


# --------------------------------------------------------------------------- running

def run_dir(workdir, run: Run) -> Path:
    return Path(workdir).absolute() / "runs" / run.run_id


def materialise(workdir, run: Run) -> Path:
    d = run_dir(workdir, run)
    d.mkdir(parents=True, exist_ok=True)
    path = d / RUN_FILE
    text = json.dumps({"run_id": run.run_id, "values": run.values, "holdout": run.holdout,
                       "config": run.config}, indent=1, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def launch_command(workdir, run: Run) -> list[str]:
    config = f"{Path(__file__).absolute()}:{run_dir(workdir, run) / RUN_FILE}"
    return [sys.executable, "-m", "loam.train", f"--config={config}",
            f"--workdir={run_dir(workdir, run)}"]


def _final_eval_path(workdir, run: Run) -> Path:
    return run_dir(workdir, run) / "eval" / f"step_{run.config['steps']}.json"


def _read_eval(path: Path) -> dict[str, float]:
    """Per-domain losses of an eval record; UnreadableFile (naming the file) if it is damaged."""
    record = read_json(path)
    try:
        return {d: float(v["loss"]) for d, v in record["per_domain"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UnreadableFile(f"{path} is not an eval record (no per_domain losses: "
                             f"{type(e).__name__}: {e})") from None


def downstream_columns(record: dict) -> dict[str, float]:
    """The downstream metrics of an eval record as results-table columns: <evaluator>/<metric>
    and <evaluator>/<task or domain>/<metric> (what a search or a fit may target)."""
    out: dict[str, float] = {}
    for name, metrics in (record.get("downstream") or {}).items():
        for key, value in metrics.items():
            if isinstance(value, dict):  # per task or per domain
                for part, m in value.items():
                    out.update({f"{name}/{part}/{k}": float(v) for k, v in m.items()
                                if isinstance(v, (int, float))})
            elif isinstance(value, (int, float)):
                out[f"{name}/{key}"] = float(value)
    return out


def is_finished(workdir, run: Run) -> bool:
    """Final checkpoint and a readable final eval, written under this very config."""
    d, steps = run_dir(workdir, run), run.config["steps"]
    if not (_final_eval_path(workdir, run).is_file() and (d / "checkpoints" / str(steps)).is_dir()):
        return False
    try:
        saved = read_json(d / "config.json")
        _read_eval(_final_eval_path(workdir, run))
    except UnreadableFile:
        return False
    if saved == json.loads(json.dumps(run.config)):
        return True
    try:  # loam.train saves the resolved config (e.g. a warmup clamped to a short run)
        resolved, _ = run_lib.resolve_config(ml_collections.ConfigDict(run.config))
    except ValueError:
        return False
    return saved == json.loads(resolved.to_json_best_effort())


def _read_status(workdir, run: Run) -> dict:
    path = run_dir(workdir, run) / STATUS_FILE
    if not path.exists():
        return {}
    try:
        status = read_json(path)
    except UnreadableFile as e:
        print(f"warning: {e}; treating {run.run_id} as never launched", file=sys.stderr)
        return {}
    return status if isinstance(status, dict) else {}


def _write_status(workdir, run: Run, status: dict):
    path = run_dir(workdir, run) / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path)


def _error_tail(log: Path, lines: int = 6) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log written"
    errors = [i for i, line in enumerate(text) if line.startswith("error:")]
    tail = text[errors[-1]:] if errors else [l for l in text if l.strip()][-lines:]
    return " | ".join(l.strip() for l in tail)[-600:]


def _cell(value):
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def result_row(workdir, run: Run, shapes: dict) -> dict | None:
    """The results-table row of a finished or failed run; None while it is pending."""
    status = _read_status(workdir, run)
    finished = is_finished(workdir, run)
    losses, problem = None, None
    if finished or _final_eval_path(workdir, run).is_file():
        try:
            losses = _read_eval(_final_eval_path(workdir, run))
        except UnreadableFile as e:  # name the file, mark the row, go on with the others
            problem = (f"{e}; rerun the sweep to evaluate this run again (its checkpoints are "
                       "kept)")
            print(f"warning: {problem}", file=sys.stderr, flush=True)
    if not finished and problem is None and status.get("status") != "failed":
        return None
    info = shapes.setdefault(run.run_id, _model_shape(run.config))
    model_cfg = info["model_cfg"]
    data = run.config["data"]
    D = run.config["steps"] * data["batch_size"] * data["seq_len"]
    row: dict[str, object] = {
        "run_id": run.run_id, "status": "ok" if finished else "unreadable" if problem else "failed"}
    row.update({k: _cell(v) for k, v in run.values.items()})
    row.update(N=info["N"], N_total=info["N_total"], D=D, C=6.0 * info["N"] * D,
               C_attn=info["flops_per_token"] * D, steps=run.config["steps"],
               d_model=model_cfg.d_model, n_layers=model_cfg.n_layers,
               n_heads=model_cfg.n_heads, mlp_dim=model_cfg.mlp_dim)
    if finished and losses:
        row.update({f"loss/{d}": v for d, v in losses.items()})
        row["loss"] = sum(losses.values()) / len(losses)
        row.update({_DOWNSTREAM + k: v for k, v in
                    downstream_columns(read_json(_final_eval_path(workdir, run))).items()})
    row["wall_seconds"] = status.get("wall_seconds", "")
    row["error"] = "" if finished else problem or status.get("error", "")
    return row


def _write_table(path: Path, rows: list[dict]):
    columns = list(_FIRST_COLUMNS)
    for row in rows:  # axis values, in first-seen order
        columns += [k for k in row if k not in columns and k not in _SIZE_COLUMNS
                    and k not in _LAST_COLUMNS and not k.startswith(("loss", _DOWNSTREAM))]
    columns += list(_SIZE_COLUMNS) + ["loss"]
    for row in rows:
        columns += [k for k in row if k.startswith("loss/") and k not in columns]
    for row in rows:
        columns += [k for k in row if k.startswith(_DOWNSTREAM) and k not in columns]
    columns += list(_LAST_COLUMNS)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def collect(workdir, runs: list[Run], shapes: dict | None = None) -> dict[str, int]:
    """Rewrites DIR/results.csv (grid) and DIR/holdout.csv from the run directories."""
    shapes = {} if shapes is None else shapes
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, holdout in ((RESULTS_FILE, False), (HOLDOUT_FILE, True)):
        group = [r for r in runs if r.holdout == holdout]
        if not group:
            continue
        rows = [row for r in group if (row := result_row(workdir, r, shapes)) is not None]
        _write_table(workdir / name, rows)
        counts[name] = len(rows)
    return counts


def run_sweep(workdir, runs: list[Run], parallel: int = 1, env: dict | None = None,
              echo=print) -> dict[str, int]:
    """Trains every unfinished run, `parallel` at a time; returns counts of ok/failed/skipped."""
    workdir = Path(workdir)
    shapes: dict = {}
    todo, summary = [], {"ok": 0, "failed": 0, "skipped": 0}
    for run in runs:
        materialise(workdir, run)
        if is_finished(workdir, run):
            summary["skipped"] += 1
        else:
            todo.append(run)
    collect(workdir, runs, shapes)
    echo(f"sweep: {len(runs)} runs, {summary['skipped']} finished already, {len(todo)} to train "
         f"({parallel} at a time) in {workdir}")
    active: dict = {}  # run_id -> (run, Popen, start time, log file)

    def reap(run, proc, started, log):
        log.close()
        status = _read_status(workdir, run)
        wall = float(status.get("wall_seconds", 0.0) or 0.0) + (time.time() - started)
        ok = proc.returncode == 0 and is_finished(workdir, run)
        new = {"status": "ok" if ok else "failed", "returncode": proc.returncode,
               "wall_seconds": round(wall, 2)}
        if not ok:
            new["error"] = _error_tail(run_dir(workdir, run) / "train.log")
        _write_status(workdir, run, new)
        summary[new["status"]] += 1
        collect(workdir, runs, shapes)
        echo(f"  {new['status']:6s} {run.run_id} ({wall:.0f}s)"
             + (f": {new['error']}" if not ok else ""))

    queue = list(todo)
    try:
        while queue or active:
            while queue and len(active) < max(1, parallel):
                run = queue.pop(0)
                log = open(run_dir(workdir, run) / "train.log", "a")
                log.write(f"\n=== sweep launch {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                log.flush()
                proc = subprocess.Popen(launch_command(workdir, run), stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
                active[run.run_id] = (run, proc, time.time(), log)
                echo(f"  start  {run.run_id} ({run.config['steps']} steps)")
            time.sleep(0.2)
            for rid, (run, proc, started, log) in list(active.items()):
                if proc.poll() is not None:
                    del active[rid]
                    reap(run, proc, started, log)
    except KeyboardInterrupt:
        # SIGTERM makes train save a checkpoint at the next step and exit; a rerun resumes.
        for _, proc, _started, _log in active.values():
            proc.send_signal(signal.SIGTERM)
        for _, proc, _started, log in active.values():
            proc.wait()
            log.close()
        raise
    return summary


# --------------------------------------------------------------------------- fit and check

def fit_and_predict(workdir, out_dir=None) -> dict:
    """Approaches 2 and 3 on DIR/results.csv; predicted vs observed loss of the holdout runs."""
    workdir = Path(workdir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            table = fit_lib.load_results(workdir / RESULTS_FILE)
            report, objects = fit_lib.fit_table(table, approaches=(2, 3), required=False)
        except ValueError as e:  # say which runs were dropped before why the fit stopped
            notes = "".join(f"{w.message}; " for w in caught)
            raise SweepError(f"{notes}{e}") from None
    report["warnings"] = [str(w.message) for w in caught]
    for col, objs in objects.items():  # a vertex outside the sizes trained is an extrapolation
        for budget, (c2, c1, _), rows in getattr(objs.get(2), "details", ()):
            n_opt, sizes_run = math.exp(-c1 / (2 * c2)), table["N"][rows]
            if not sizes_run.min() <= n_opt <= sizes_run.max():
                report["warnings"].append(
                    f"{col}: approach 2 places N_opt={n_opt:.3g} at C={budget:.3g} outside the "
                    f"sizes trained there ({sizes_run.min():.3g}-{sizes_run.max():.3g}); the "
                    "budget does not bracket the optimum, so add sizes on that side or raise "
                    "the budget.")
    if out_dir:
        report["plots"] = [str(p) for p in fit_lib.plot_fits(table, objects, out_dir)]
    predictions = []
    if (workdir / HOLDOUT_FILE).is_file():
        with open(workdir / HOLDOUT_FILE, newline="") as f:
            held = [r for r in csv.DictReader(f) if r.get("status") == "ok"]
        for r in held:
            N, D = float(r["N"]), float(r["D"])
            entry = {"run_id": r["run_id"], "N": N, "D": D, "C": 6 * N * D}
            for col, objs in objects.items():
                if 3 not in objs or not r.get(col):
                    continue
                observed = float(r[col])
                predicted = float(objs[3].law.loss(N, D))
                entry[col] = {"observed": observed, "predicted": predicted,
                              "error": predicted - observed,
                              "relative_error": (predicted - observed) / observed}
            a2 = objects.get("loss", {}).get(2)
            if a2 is not None:
                entry["approach2_N_opt_at_C"] = float(a2.n_opt(np.array([6 * N * D]))[0])
            predictions.append(entry)
    report["holdout"] = predictions
    return report


# --------------------------------------------------------------------------- command line

def _define_flags(flags):
    flags.DEFINE_string("workdir", None, "Sweep directory (runs/, results.csv).")
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_integer("parallel", 1, "Runs trained at once.", lower_bound=1)
    flags.DEFINE_enum("runs", "all", ["all", "grid", "holdout"], "Which runs to act on.")
    flags.DEFINE_bool("list", False, "Print one launch command per run.")
    flags.DEFINE_bool("collect", False, "Only rebuild the results tables.")
    flags.DEFINE_bool("fit", False, "Fit approaches 2 and 3 to results.csv and predict the "
                      "holdout runs.")


def _run(sweep, flags) -> int:
    modes = [m for m in ("list", "collect", "fit") if flags[m].value]
    if len(modes) > 1:
        raise SweepError(f"--{' and --'.join(modes)} exclude each other; give one")
    workdir = flags.workdir
    runs = expand(check_sweep(sweep))
    if flags.runs != "all":
        runs = [r for r in runs if r.holdout == (flags.runs == "holdout")]
    if flags.list:
        for run in runs:
            materialise(workdir, run)
            print(shlex.join(launch_command(workdir, run)))
        return 0
    if flags.collect:
        print(json.dumps(collect(workdir, runs)))
        return 0
    if flags.fit:
        report = fit_and_predict(workdir, Path(workdir) / "fit")
        for w in report["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        (Path(workdir) / "fit" / "fit.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report))
        return 0
    try:
        summary = run_sweep(workdir, runs, flags.parallel)
    except KeyboardInterrupt:
        print("interrupted: running runs saved checkpoints; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0


def main(argv=None) -> int:
    """`python -m loam.sweep`; argv as sys.argv (program name first). Exit 1 on a bad sweep
    (one `error:` line) or when a run failed, 130 when interrupted."""
    return cli.config_main(_run, define_flags=_define_flags, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
