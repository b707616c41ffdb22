"""Continual pretraining: a new domain after pretraining, with and without replay, under a
re-warmed cosine or an infinite schedule, against training from scratch; then the critical
mixture ratio (CMR) law fitted to a sweep and checked at a budget it did not see.

    python -m loam.experiments.continual --workdir runs/continual [--size default|small|tiny]
        [--seeds N] [--new code] [--schedules cosine,infinite] [--replay 0.05,0.25]
        [--cmr_ratios 0.5,0.75,0.9,1] [--tolerance 0.05] [--no_cmr]

Every seed pretrains on four of the five bundled domains (``--new`` is left out: it is in the
mixture with weight 0, so every evaluation reports it) twice: with a cosine schedule, and with
an infinite schedule (warmup, cooldown, constant) whose anneal is branched on demand
(loam/configs/anneal.py) as that pretraining's finished model. Each then continues on the new
domain for ``continue`` steps with {0, 5%, 25%} replay of the four old domains:

- ``cosine``: the cosine checkpoint's parameters and Adam moments (init.carry=params+opt), the
  learning rate re-warmed and re-decayed;
- ``infinite``: the constant-phase checkpoint's whole state (init.carry=all), the learning rate
  still constant, annealed over the last ``anneal`` steps.

``scratch`` trains one model on the union for the same total steps, the new domain getting the
share of tokens it has in the continual runs without replay. Reported per arm, over seeds:

- gain: the new domain's held-out loss at the pretrained model minus at the end;
- forgetting: the old domains' mean held-out loss at the end minus at the pretrained model (the
  cosine run's end; for the infinite arm its annealed branch, the model that pretraining
  delivers);
- the stability gap (the StabilityGap hook's stability_gap.json, dense evaluation over the
  first ``dense`` steps): the old domains' mean rise above their loss at the continuation's
  start, and the step (after the start) by which every old domain is back at its start loss;
- paired differences (same seed: same pretraining, same initialisation) against no replay on
  the same schedule and against scratch, mean ± standard error over seeds.

The CMR sweep continues seed 0's cosine checkpoint at several new-domain shares r (replay
1 - r) with a re-warmed constant learning rate, evaluated along the run (each evaluation is one
token budget). loam/scaling/cmr.py fits the general (old-domain) loss law and R(T) to every
budget but the last, predicts the critical ratio at the last, and the runs' own losses there
give the observed one (the largest share whose general loss stays within the tolerance,
interpolated between the swept shares).

Finished runs are skipped, so the command resumes where it stopped. Writes results.json,
results.md (the tables and a summary), continual.png (gain, forgetting, stability gap by arm),
stability_gap.png (old-domain mean loss over the first steps of each continuation, seed 0) and
cmr.png (the sweep, the fitted law and the prediction) into the work directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from loam import cli
from loam import metrics as metrics_lib
from loam import train as train_lib
from loam.configs import anneal as anneal_config
from loam.configs import default
from loam.data.corpora import DOMAIN_NAMES
from loam.scaling import cmr as cmr_lib
from loam.scaling.parametric import ScalingFitError
from loam.workdir import read_json, write_json

REPLAY = (0.0, 0.05, 0.25)
SCHEDULES = ("cosine", "infinite")

# Every length is in steps. `dense` steps of dense evaluation (every `dense_every`) open each
# continuation; the CMR sweep evaluates every `cmr_every` steps up to `cmr_steps`.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(model="nano", seq_len=32, batch_size=8, pretrain=6, anneal=2, continue_=4,
                 warmup=1, cooldown=1, dense=2, dense_every=1, eval_tokens=256, seeds=2,
                 cmr_ratios=(0.5, 0.75, 1.0), cmr_steps=5, cmr_every=1),
    "small": dict(model="nano", seq_len=64, batch_size=16, pretrain=120, anneal=12,
                  continue_=40, warmup=8, cooldown=12, dense=16, dense_every=2,
                  eval_tokens=2048, seeds=2, cmr_ratios=(0.5, 0.75, 0.9, 1.0), cmr_steps=40,
                  cmr_every=8),
    "default": dict(model="nano", seq_len=64, batch_size=16, pretrain=240, anneal=24,
                    continue_=80, warmup=12, cooldown=24, dense=24, dense_every=3,
                    eval_tokens=4096, seeds=2, cmr_ratios=(0.5, 0.75, 0.9, 1.0),
                    cmr_steps=80, cmr_every=16),
}


def _arm(schedule: str, replay: float) -> str:
    return f"{schedule}_replay{int(round(replay * 100))}"




# --------------------------------------------------------------------------- configs

def _weights(c, weights: dict) -> None:
    with c.unlocked():
        del c.data["weights"]
        c.data.weights = {d: float(w) for d, w in weights.items()}


def base_config(s: dict, steps: int, seed: int, new: str) -> ml_collections.ConfigDict:
    c = default.get_config(f"size={s['model']},steps={steps},seq_len={s['seq_len']},"
                           f"batch_size={s['batch_size']}")
    c.seed = seed
    c.data.domains = list(DOMAIN_NAMES)
    _weights(c, {d: (0.0 if d == new else 1.0) for d in DOMAIN_NAMES})
    c.optim.warmup_steps = s["warmup"]
    c.eval_every = steps
    c.checkpoint_every = steps
    c.keep_checkpoints = 1
    c.eval_tokens = s["eval_tokens"]
    c.log_every = 1
    return c


def pretrain_config(s, seed, new, schedule):
    c = base_config(s, s["pretrain"], seed, new)
    c.optim.schedule = schedule
    if schedule == "infinite":
        c.optim.cooldown_steps = s["cooldown"]
    return c


def anneal_branch_config(s, source: Path):
    c = anneal_config.get_config(f"from={source}:{s['pretrain']},steps={s['anneal']}")
    c.eval_every = c.checkpoint_every = int(c.steps)
    return c


def _continue_data(c, s, new: str, replay: float, old: list[str]):
    _weights(c, {d: (1.0 if d == new else 0.0) for d in DOMAIN_NAMES})
    c.data.replay = ml_collections.ConfigDict(
        {"fraction": float(replay), "domains": list(old) if replay > 0 else [],
         "weights": "uniform"})


def continue_config(s, seed, new, old, schedule: str, replay: float, source: Path):
    """A continuation from a pretraining run's last checkpoint (see the module docstring)."""
    if schedule == "cosine":
        c = base_config(s, s["continue_"], seed, new)
        c.init = ml_collections.ConfigDict(
            {"checkpoint": f"{source}:{s['pretrain']}", "carry": "params+opt"})
    else:
        c = pretrain_config(s, seed, new, "infinite")
        c.steps = s["pretrain"] + s["continue_"]
        c.optim.anneal_start = int(c.steps) - s["anneal"]
        c.eval_every = c.checkpoint_every = int(c.steps)
        c.init = ml_collections.ConfigDict(
            {"checkpoint": f"{source}:{s['pretrain']}", "carry": "all"})
    _continue_data(c, s, new, replay, old)
    c.eval_dense = ml_collections.ConfigDict({"every": s["dense_every"], "until": s["dense"]})
    return c


def scratch_config(s, seed, new):
    total = s["pretrain"] + s["continue_"]
    c = base_config(s, total, seed, new)
    share = s["continue_"] / total
    _weights(c, {d: (share if d == new else (1 - share) / (len(DOMAIN_NAMES) - 1))
                 for d in DOMAIN_NAMES})
    return c


def cmr_config(s, seed, new, old, ratio: float, source: Path):
    c = base_config(s, s["cmr_steps"], seed, new)
    c.optim.schedule = "constant"
    c.init = ml_collections.ConfigDict(
        {"checkpoint": f"{source}:{s['pretrain']}", "carry": "params+opt"})
    _continue_data(c, s, new, 1.0 - ratio, old)
    c.eval_dense = ml_collections.ConfigDict({"every": s["cmr_every"], "until": s["cmr_steps"]})
    return c


# --------------------------------------------------------------------------- runs

def final_eval(run: Path, steps: int) -> dict | None:
    path = run / "eval" / f"step_{steps}.json"
    return read_json(path) if path.is_file() else None


def train_once(config, run: Path, verbose: bool) -> dict:
    steps = int(config.steps)
    done = final_eval(run, steps)
    if done is not None:
        return done
    if verbose:
        print(f"== {run.parent.name}/{run.name}", flush=True)
    train_lib.train(config, run)
    out = final_eval(run, steps)
    if out is None:
        raise cli.UserError(f"{run} finished without its final evaluation; rerun the command")
    return out


def losses(record: dict) -> dict[str, float]:
    return {d: float(v["loss"]) for d, v in record["per_domain"].items()}


def eval_curve(run: Path) -> dict[int, dict[str, float]]:
    """step -> per-domain held-out loss, from eval.jsonl (a later record of a step wins)."""
    out = {}
    for r in metrics_lib.read_jsonl(run / "eval.jsonl"):
        if "per_domain" in r:
            out[int(r["step"])] = losses(r)
    return out


def gap_of(run: Path, old: list[str]) -> dict:
    """The old domains' stability gap of a continuation, from its stability_gap.json."""
    report = read_json(run / "stability_gap.json")
    first, per = int(report["first_step"]), report["domains"]
    gaps = [float(per[d]["gap"]) for d in old if d in per]
    recovered = [per[d]["recovery_step"] for d in old if d in per]
    return {"depth": float(np.mean(gaps)) if gaps else math.nan,
            "worst_depth": float(max(gaps)) if gaps else math.nan,
            "recovery": (None if not recovered or any(r is None for r in recovered)
                         else int(max(recovered)) - first),
            "recovered_domains": int(sum(r is not None for r in recovered))}


def continual_row(arm, seed, schedule, replay, reference, final, gap, new, old) -> dict:
    return {"arm": arm, "seed": seed, "schedule": schedule, "replay": replay,
            "new_loss": final[new], "old_loss": float(np.mean([final[d] for d in old])),
            "gain": reference[new] - final[new],
            "forgetting": float(np.mean([final[d] - reference[d] for d in old])),
            "gap_depth": gap["depth"], "gap_worst": gap["worst_depth"],
            "recovery_step": gap["recovery"], "recovered_domains": gap["recovered_domains"],
            "reference": reference, "final": final}


# --------------------------------------------------------------------------- statistics

def mean_se(values) -> dict:
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    n = x.size
    return {"mean": float(x.mean()) if n else math.nan,
            "se": float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan, "n": int(n)}


def paired(rows: list[dict], arm: str, baseline: str, metric: str) -> dict:
    a = {r["seed"]: r[metric] for r in rows if r["arm"] == arm}
    b = {r["seed"]: r[metric] for r in rows if r["arm"] == baseline}
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], np.float64)
    n = len(seeds)
    return {"diff": float(d.mean()) if n else math.nan,
            "se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan, "seeds": n}


def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    arms = list(dict.fromkeys(r["arm"] for r in rows if r["arm"] != "scratch"))
    for arm in [*arms, "scratch"]:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        entry: dict = {m: mean_se([r[m] for r in mine])
                       for m in ("new_loss", "old_loss", "gain", "forgetting", "gap_depth",
                                 "recovery_step") if m in mine[0]}
        entry["unrecovered_seeds"] = sum(r.get("recovery_step", 0) is None for r in mine)
        entry["schedule"], entry["replay"] = mine[0]["schedule"], mine[0]["replay"]
        if arm != "scratch":
            base = _arm(mine[0]["schedule"], 0.0)
            entry["vs_no_replay"] = {m: paired(rows, arm, base, m)
                                     for m in ("gain", "forgetting", "gap_depth")}
            entry["vs_scratch"] = {m: paired(rows, arm, "scratch", m)
                                   for m in ("new_loss", "old_loss")}
        out[arm] = entry
    return out


def observed_cmr(ratios, deltas, tolerance: float) -> float:
    """The largest share whose general-loss rise is within tolerance, linear between shares
    (0 if none is, the largest swept share if all are)."""
    r, d = np.asarray(ratios, np.float64), np.asarray(deltas, np.float64)
    order = np.argsort(r)
    r, d = r[order], d[order]
    ok = d <= tolerance
    if not ok.any():
        return 0.0
    j = int(np.flatnonzero(ok)[-1])
    if j == r.size - 1:
        return float(r[-1])
    return float(r[j] + (tolerance - d[j]) * (r[j + 1] - r[j]) / (d[j + 1] - d[j]))


def cmr_analysis(points: list[dict], start_loss: float, held_tokens: float,
                 tolerance: float) -> dict:
    """Fit on every budget below ``held_tokens``, predict the critical ratio there, compare with
    the swept runs' losses at that budget."""
    ratio = np.array([p["ratio"] for p in points])
    tokens = np.array([p["tokens"] for p in points], np.float64)
    loss = np.array([p["general_loss"] for p in points])
    seen = tokens < held_tokens
    at_held = tokens == held_tokens
    out: dict = {"start_loss": start_loss, "held_out_tokens": held_tokens,
                 "tolerance": tolerance, "fit_budgets": sorted(set(tokens[seen].tolist()))}
    out["observed_cmr"] = observed_cmr(ratio[at_held], loss[at_held] - start_loss, tolerance)
    out["observed_delta"] = {f"{r:g}": float(x - start_loss)
                             for r, x in zip(ratio[at_held], loss[at_held])}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = cmr_lib.fit_cmr_law(ratio[seen], tokens[seen], loss[seen],
                                         start_loss=start_loss, tolerance=tolerance)
        pred = result.predict(np.array([held_tokens]))
        law = result.fit.law
        out.update({
            "fit": result.fit.as_dict(), "budget_law": result.budget.as_dict(),
            "warnings": [str(w.message) for w in caught],
            "predicted_cmr_budget_law": float(pred["cmr_budget_law"][0]),
            "predicted_cmr_loss_law": float(pred["cmr_loss_law"][0]),
            "predicted_delta": {f"{r:g}": float(law.delta(r, held_tokens))
                                for r in ratio[at_held]}})
    except ScalingFitError as e:
        out["fit_error"] = str(e)
    return out


# --------------------------------------------------------------------------- report

def _pm(x: dict, digits: int = 4) -> str:
    if not x["n"] or math.isnan(x["mean"]):
        return "–"
    se = "" if math.isnan(x["se"]) else f" ± {x['se']:.{digits}f}"
    return f"{x['mean']:+.{digits}f}{se}"


def _pd(p: dict) -> str:
    if not p["seeds"] or math.isnan(p["diff"]):
        return "–"
    se = "" if math.isnan(p["se"]) else f" ± {p['se']:.4f}"
    return f"{p['diff']:+.4f}{se}"


def _recovery(e: dict) -> str:
    r = e.get("recovery_step")
    if r is None:
        return "–"
    txt = "–" if not r["n"] else f"{r['mean']:.1f}"
    if e["unrecovered_seeds"]:
        txt += f" ({e['unrecovered_seeds']} seed(s) not recovered)"
    return txt


def tables(summary: dict, cmr: dict | None, setup: dict) -> str:
    lines = [f"### continual pretraining on {setup['new']} ({setup['seeds']} seeds, "
             f"{setup['size']})", "",
             "| arm | new-domain gain | forgetting (old) | gap depth (old) | recovery step | "
             "gain − no replay | forgetting − no replay | new loss − scratch | "
             "old loss − scratch |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, e in summary.items():
        if arm == "scratch":
            lines.append(f"| scratch | – | – | – | – | – | – | new {_pm(e['new_loss'], 3)} "
                         f"| old {_pm(e['old_loss'], 3)} |")
            continue
        vn, vs = e["vs_no_replay"], e["vs_scratch"]
        lines.append(f"| {arm} | {_pm(e['gain'])} | {_pm(e['forgetting'])} | "
                     f"{_pm(e['gap_depth'])} | {_recovery(e)} | {_pd(vn['gain'])} | "
                     f"{_pd(vn['forgetting'])} | {_pd(vs['new_loss'])} | "
                     f"{_pd(vs['old_loss'])} |")
    lines += ["", "Held-out losses in nats/token; mean ± standard error over seeds; differences "
              "are paired by seed. Gain: the new domain's loss falls by this much from the "
              "pretrained model (higher is better). Forgetting: the old domains' mean loss "
              "rises by this much (lower is better). Gap depth: the old domains' mean worst "
              "rise over the dense evaluations; recovery: steps after the start until every "
              "old domain is back at its start loss. Scratch row: its absolute final losses.",
              ""]
    if cmr is not None:
        lines += [f"### critical mixture ratio (seed 0, tolerance {cmr['tolerance']} nats)", ""]
        if "fit_error" in cmr:
            lines.append(f"The CMR law could not be fitted: {cmr['fit_error']}")
        else:
            lines += [
                "| held-out budget (tokens) | predicted CMR (R(T)) | predicted CMR (loss law) "
                "| observed CMR |", "|---|---|---|---|",
                f"| {cmr['held_out_tokens']:.0f} | {cmr['predicted_cmr_budget_law']:.3f} | "
                f"{cmr['predicted_cmr_loss_law']:.3f} | {cmr['observed_cmr']:.3f} |", "",
                "| new-domain share r | general-loss rise observed | predicted |",
                "|---|---|---|"]
            for r, d in cmr["observed_delta"].items():
                lines.append(f"| {r} | {d:+.4f} | {cmr['predicted_delta'][r]:+.4f} |")
        lines.append("")
    return "\n".join(lines)


def _better(p: dict) -> str:
    """A paired loss difference in words: lower is better; within two standard errors is a
    tie."""
    if math.isnan(p["diff"]):
        return "no comparison"
    if math.isnan(p["se"]) or abs(p["diff"]) <= 2 * p["se"]:
        return "no clear difference"
    return "better" if p["diff"] < 0 else "worse"


def _rises(cmr: dict) -> str:
    return ", ".join(f"r={r} {d:+.3f} (law {cmr['predicted_delta'][r]:+.3f})"
                     for r, d in cmr["observed_delta"].items())


def summary_text(summary: dict, cmr: dict | None) -> str:
    """What the numbers say, whichever way they fall."""
    out = []
    for arm, e in summary.items():
        if arm == "scratch" or not e["replay"]:
            continue
        f, g = e["vs_no_replay"]["forgetting"], e["vs_no_replay"]["gain"]
        if math.isnan(f["diff"]):
            continue
        sig = (not math.isnan(f["se"])) and abs(f["diff"]) > 2 * f["se"]
        verb = "less" if f["diff"] < 0 else "more"
        out.append(f"- {e['schedule']}, {e['replay'] * 100:g}% replay: {verb} forgetting than "
                   f"no replay ({f['diff']:+.4f} ± {f['se']:.4f}"
                   f"{'' if sig else ', within two standard errors'}), new-domain gain "
                   f"{'lower' if g['diff'] < 0 else 'higher'} by {abs(g['diff']):.4f} ± "
                   f"{g['se']:.4f}.")
    for sched in SCHEDULES:
        e = summary.get(_arm(sched, 0.0))
        if e is not None and e["gap_depth"]["n"]:
            out.append(f"- {sched} without replay: stability gap depth "
                       f"{e['gap_depth']['mean']:+.4f} nats; recovery {_recovery(e)}.")
    for arm, e in summary.items():
        if arm == "scratch" or not e["vs_scratch"]["new_loss"]["seeds"]:
            continue
        n, o = e["vs_scratch"]["new_loss"], e["vs_scratch"]["old_loss"]
        out.append(f"- {arm} against scratch (same total steps): new-domain loss "
                   f"{_pd(n)}, old-domain loss {_pd(o)} ({_better(n)} on the new domain, "
                   f"{_better(o)} on the old ones).")
    a, b = summary.get(_arm("cosine", 0.0)), summary.get(_arm("infinite", 0.0))
    if a and b:
        out.append(f"- no replay, infinite vs cosine: forgetting {b['forgetting']['mean']:+.4f} "
                   f"vs {a['forgetting']['mean']:+.4f}, gain {b['gain']['mean']:+.4f} vs "
                   f"{a['gain']['mean']:+.4f} (each against its own pretrained model).")
    if cmr is not None:
        if "fit_error" in cmr:
            out.append("- CMR: the law could not be fitted to this sweep.")
        else:
            out.append(f"- CMR at the held-out budget: predicted "
                       f"{cmr['predicted_cmr_budget_law']:.3f} (R(T)) / "
                       f"{cmr['predicted_cmr_loss_law']:.3f} (loss law), observed "
                       f"{cmr['observed_cmr']:.3f}"
                       + "".join(f"; {w}" for w in cmr["warnings"])
                       + (" (R(T) is not bounded to [0, 1]: above 1 it admits every share)"
                          if cmr["predicted_cmr_budget_law"] > 1 else "")
                       + f"; observed general-loss rises there: {_rises(cmr)}.")
    return "\n".join(["### summary", "", *out, ""])


def plots(workdir: Path, summary: dict, curves: dict, cmr: dict | None,
          cmr_points: list[dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    arms = [a for a in summary if a != "scratch"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, metric, label in zip(axes, ("gain", "forgetting", "gap_depth"),
                                 ("new-domain gain", "forgetting (old domains)",
                                  "stability gap depth (old domains)")):
        m = [summary[a][metric]["mean"] for a in arms]
        s = [0.0 if math.isnan(summary[a][metric]["se"]) else summary[a][metric]["se"]
             for a in arms]
        x = np.arange(len(arms))
        ax.bar(x, m, yerr=s, capsize=3, color=["C0" if a.startswith("cosine") else "C1"
                                               for a in arms])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, [a.replace("_", "\n") for a in arms], fontsize=7)
        ax.set_ylabel(f"{label} (nats/token)")
    fig.tight_layout()
    fig.savefig(workdir / "continual.png", dpi=100)
    plt.close(fig)
    written.append(str(workdir / "continual.png"))

    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (arm, (xs, ys)) in enumerate(curves.items()):
            ax.plot(xs, ys, marker=".", label=arm, color=f"C{i}",
                    linestyle="-" if arm.startswith("cosine") else "--")
        ax.set_xlabel("steps since the continuation's start")
        ax.set_ylabel("old domains' mean held-out loss")
        ax.set_title("stability gap (seed 0)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(workdir / "stability_gap.png", dpi=100)
        plt.close(fig)
        written.append(str(workdir / "stability_gap.png"))

    if cmr_points and cmr is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ratios = sorted({p["ratio"] for p in cmr_points})
        law = None if "fit_error" in cmr else cmr_lib.CMRLaw(**{
            k: cmr["fit"][k] for k in ("L0", *cmr_lib.PARAM_NAMES)})
        for i, r in enumerate(ratios):
            pts = sorted((p["tokens"], p["general_loss"] - cmr["start_loss"])
                         for p in cmr_points if p["ratio"] == r)
            ax.plot(*zip(*pts), marker="o", linestyle="", color=f"C{i}", label=f"r={r:g}")
            if law is not None:
                t = np.linspace(min(x for x, _ in pts), max(x for x, _ in pts), 50)
                ax.plot(t, law.delta(r, t), color=f"C{i}", lw=1)
        ax.axhline(cmr["tolerance"], color="k", linestyle=":", lw=0.8, label="tolerance")
        ax.axvline(cmr["held_out_tokens"], color="grey", linestyle="--", lw=0.8,
                   label="held-out budget")
        ax.set_xlabel("tokens since the continuation's start")
        ax.set_ylabel("general (old-domain) loss − start")
        title = f"CMR observed {cmr['observed_cmr']:.3f}"
        if law is not None:
            title += (f", predicted {cmr['predicted_cmr_budget_law']:.3f} (R(T)), "
                      f"{cmr['predicted_cmr_loss_law']:.3f} (loss law)")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(workdir / "cmr.png", dpi=100)
        plt.close(fig)
        written.append(str(workdir / "cmr.png"))
    return written


# --------------------------------------------------------------------------- the command

def run_seed(s: dict, seed: int, new: str, old: list[str], workdir: Path, verbose: bool,
             curves: dict, schedules=SCHEDULES, replays=REPLAY) -> list[dict]:
    rows = []
    pre = {sched: workdir / "pretrain" / f"{sched}_seed{seed}" for sched in schedules}
    reference = {}
    for sched in schedules:
        done = train_once(pretrain_config(s, seed, new, sched), pre[sched], verbose)
        if sched == "cosine":
            reference[sched] = losses(done)
        else:  # the model infinite pretraining delivers: its anneal, branched on demand
            annealed = workdir / "pretrain" / f"infinite_annealed_seed{seed}"
            reference[sched] = losses(train_once(anneal_branch_config(s, pre[sched]),
                                                 annealed, verbose))
    for sched in schedules:
        for r in replays:
            arm = _arm(sched, r)
            run = workdir / "continue" / f"{arm}_seed{seed}"
            final = losses(train_once(
                continue_config(s, seed, new, old, sched, r, pre[sched]), run, verbose))
            rows.append(continual_row(arm, seed, sched, r, reference[sched], final,
                                      gap_of(run, old), new, old))
            if seed == 0:
                curve = eval_curve(run)
                first = min(curve)
                xs = [t - first for t in sorted(curve) if t - first <= s["dense"]]
                curves[arm] = (xs, [float(np.mean([curve[first + x][d] for d in old]))
                                    for x in xs])
    final = losses(train_once(scratch_config(s, seed, new),
                              workdir / "scratch" / f"seed{seed}", verbose))
    rows.append({"arm": "scratch", "seed": seed, "schedule": "cosine", "replay": None,
                 "new_loss": final[new], "old_loss": float(np.mean([final[d] for d in old])),
                 "final": final})
    return rows


def run_cmr(s: dict, new: str, old: list[str], workdir: Path, verbose: bool,
            schedule: str = "cosine") -> tuple[list[dict], float]:
    source = workdir / "pretrain" / f"{schedule}_seed0"
    tokens_per_step = s["seq_len"] * s["batch_size"]
    points, start = [], []
    for ratio in s["cmr_ratios"]:
        run = workdir / "cmr" / f"share{int(round(ratio * 100))}"
        train_once(cmr_config(s, 0, new, old, ratio, source), run, verbose)
        for step, per in sorted(eval_curve(run).items()):
            general = float(np.mean([per[d] for d in old]))
            if step == 0:
                start.append(general)
                continue
            points.append({"ratio": float(ratio), "step": step,
                           "tokens": float(step * tokens_per_step), "general_loss": general,
                           "new_loss": per[new]})
    return points, float(np.mean(start))


def _number(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise cli.UserError(f"{flag}: {text!r} is not a number") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--size", default="default", help=f"one of {', '.join(SIZES)}")
    p.add_argument("--seeds", type=int, default=0, help="0: the size's")
    p.add_argument("--new", default="code", help="the domain left out of pretraining")
    p.add_argument("--tolerance", type=float, default=cmr_lib.TOLERANCE,
                   help="CMR: the general-loss rise allowed, nats")
    p.add_argument("--schedules", default=",".join(SCHEDULES),
                   help="the continuations' schedules, among " + ", ".join(SCHEDULES))
    p.add_argument("--replay", default=",".join(f"{r:g}" for r in REPLAY),
                   help="replay fractions in [0, 1); 0 (the baseline of the paired "
                        "differences) is always run")
    p.add_argument("--cmr_ratios", default="",
                   help="the CMR sweep's new-domain shares in (0, 1] (empty: the size's)")
    p.add_argument("--no_cmr", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    with cli.user_errors():
        if args.size not in SIZES:
            raise cli.UserError(f"--size {args.size!r} is not one of {', '.join(SIZES)}")
        if args.new not in DOMAIN_NAMES:
            raise cli.UserError(f"--new {args.new!r} is not a bundled domain; choose among "
                                f"{', '.join(DOMAIN_NAMES)}")
        s: dict[str, Any] = dict(SIZES[args.size])
        seeds = args.seeds or s["seeds"]
        if seeds < 2:
            raise cli.UserError("--seeds must be >= 2: the standard errors are over paired "
                                "seeds")
        if not (math.isfinite(args.tolerance) and args.tolerance > 0):
            raise cli.UserError(f"--tolerance {args.tolerance} must be a positive number of "
                                "nats")
        schedules = [x for x in args.schedules.split(",") if x]
        bad = sorted(set(schedules) - set(SCHEDULES))
        if bad or not schedules:
            raise cli.UserError(f"--schedules {args.schedules!r}: choose among "
                                f"{', '.join(SCHEDULES)}")
        replays = sorted({0.0, *(_number(x, "--replay") for x in args.replay.split(",") if x)})
        if any(not 0 <= r < 1 for r in replays):
            raise cli.UserError(f"--replay {args.replay!r}: fractions must lie in [0, 1)")
        if args.cmr_ratios:
            s["cmr_ratios"] = tuple(_number(x, "--cmr_ratios")
                                    for x in args.cmr_ratios.split(",") if x)
        if not args.no_cmr and (len(set(s["cmr_ratios"])) < cmr_lib.MIN_RATIOS or any(
                not 0 < r <= 1 for r in s["cmr_ratios"])):
            raise cli.UserError(f"--cmr_ratios {args.cmr_ratios!r}: the CMR law needs "
                                f"{cmr_lib.MIN_RATIOS} or more distinct shares in (0, 1]")
        new, old = args.new, [d for d in DOMAIN_NAMES if d != args.new]
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        curves: dict = {}
        for seed in range(seeds):
            rows += run_seed(s, seed, new, old, workdir, not args.quiet, curves, schedules,
                             replays)
        summary = summarise(rows)
        cmr: dict | None = None
        cmr_points: list[dict] = []
        if not args.no_cmr:
            cmr_points, start = run_cmr(s, new, old, workdir, not args.quiet, schedules[0])
            held = float(s["cmr_steps"] * s["seq_len"] * s["batch_size"])
            cmr = cmr_analysis(cmr_points, start, held, args.tolerance)
        setup = {"size": args.size, **{k: (list(v) if isinstance(v, tuple) else v)
                                       for k, v in s.items()},
                 "seeds": seeds, "new": new, "old": old, "replay": replays,
                 "schedules": schedules,
                 "tokens_per_step": s["seq_len"] * s["batch_size"],
                 "total_steps_per_arm": s["pretrain"] + s["continue_"]}
        table = tables(summary, cmr, setup) + "\n" + summary_text(summary, cmr)
        written = plots(workdir, summary, curves, cmr, cmr_points)
        write_json(workdir / "results.json",
                   {"setup": setup, "runs": rows, "summary": summary, "cmr": cmr,
                    "cmr_points": cmr_points, "plots": written}, indent=2)
        (workdir / "results.md").write_text(table)
        print(table)
        print(json.dumps({"setup": setup, "summary": summary, "cmr": cmr, "plots": written}),
              file=sys.stdout)


if __name__ == "__main__":
    main()
