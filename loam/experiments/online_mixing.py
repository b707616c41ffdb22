"""Online mixing methods against stratified and token-proportional sampling, then transferred.

    python -m loam.experiments.online_mixing --workdir runs/online_mixing [--seeds 4]

On the bundled five domains, at one token budget, every seed trains one proxy per method:

- ``stratified`` (uniform weights) and ``proportional`` (training tokens): the baselines;
- ``odm``: Online Data Mixing (EXP3 on the training losses);
- ``doremi``: DoReMi, whose reference is the same seed's ``proportional`` run;
- ``aioli``: Aioli (probe rounds), ``skillit``: Skill-it (held-out losses, a linear graph).

Each method's run is an ordinary ``loam.train`` run of ``--size`` (same data seed, same
initialisation, same steps per seed: the seeds pair the comparisons). Then the output mixtures of
DoReMi and ODM (the average of their weights over the run) and the two baselines train a model
of ``--target`` size (≥ 10× the proxy's non-embedding parameters: tiny against a nano whose MLP
is 176 wide) for the same steps, as the
papers transfer them. The metrics are the held-out loss at the end: the mean over domains and
the worst domain (what DoReMi optimises), compared with paired same-seed differences (mean ± s.e.).

Finished runs are skipped, so the command resumes where it stopped. Writes results.json,
results.md (the tables), results.png (paired differences with s.e.) and weights.png (the weight
trajectories of seed 0) into the work directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from loam import cli
from loam.configs import default
from loam.experiments.common import fmt_paired, train_once
from loam.model import sizes
from loam.workdir import read_json, write_json

METHODS = ("stratified", "proportional", "odm", "doremi", "aioli", "skillit")
BASELINES = ("stratified", "proportional")
TRANSFERRED = ("stratified", "proportional", "odm", "doremi")


def base_config(size: str, steps: int, seq_len: int, batch_size: int, eval_tokens: int,
                mlp_dim: int = 0):
    c = default.get_config(f"size={size},steps={steps},seq_len={seq_len},"
                           f"batch_size={batch_size}")
    c.model.mlp_dim = mlp_dim  # 0: the named size's
    c.optim.warmup_steps = max(1, steps // 10)
    c.eval_every = steps
    c.checkpoint_every = steps
    c.keep_checkpoints = 1
    c.eval_tokens = eval_tokens
    c.log_every = 1
    return c


def method_config(c, method: str, seed: int, workdir: Path, rounds_every: int):
    c = c.copy_and_resolve_references()
    c.seed = seed
    c.mixing.method = method
    if method == "doremi":
        c.mixing.doremi.reference = str(run_dir(workdir, "proxy", "proportional", seed))
    if method == "aioli":
        c.mixing.aioli.update_steps = rounds_every
        c.mixing.aioli.probe_steps = max(2, rounds_every // 5)
    if method == "skillit":
        c.mixing.skillit.update_steps = rounds_every
        c.mixing.skillit.graph_steps = max(2, rounds_every // 4)
    return c


def run_dir(workdir: Path, stage: str, method: str, seed: int) -> Path:
    return workdir / stage / f"{method}_seed{seed}"


def transfer_config(c_target, method: str, seed: int, workdir: Path):
    """The target-size run of a method: the baselines as they are, an online method's output
    mixture (static weights) from its proxy of the same seed."""
    c = c_target.copy_and_resolve_references()
    c.seed = seed
    if method in BASELINES:
        c.mixing.method = method
        return c
    out = run_dir(workdir, "proxy", method, seed) / "output_mixture.json"
    weights = read_json(out)["data"]["weights"]
    c.mixing.method = "static"
    del c.data["weights"]
    c.data.weights = {k: float(v) for k, v in weights.items()}
    return c


def record_row(stage: str, method: str, seed: int, record: dict) -> dict:
    per = {d: float(v["loss"]) for d, v in record["per_domain"].items()}
    return {"stage": stage, "method": method, "seed": seed,
            "mean_loss": float(np.mean(list(per.values()))),
            "worst_loss": float(max(per.values())), "worst_domain": max(per, key=lambda d: per[d]),
            "per_domain": per}


def paired(rows: list[dict], stage: str, method: str, baseline: str, metric: str) -> dict:
    a = {r["seed"]: r[metric] for r in rows if r["stage"] == stage and r["method"] == method}
    b = {r["seed"]: r[metric] for r in rows if r["stage"] == stage and r["method"] == baseline}
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds])
    n = len(seeds)
    return {"diff": float(d.mean()) if n else math.nan,
            "se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan, "seeds": n}


def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    for stage, methods in (("proxy", METHODS), ("transfer", TRANSFERRED)):
        out[stage] = {}
        for m in methods:
            mine = [r for r in rows if r["stage"] == stage and r["method"] == m]
            if not mine:
                continue
            entry: dict = {"seeds": len(mine),
                     "mean_loss": float(np.mean([r["mean_loss"] for r in mine])),
                     "worst_loss": float(np.mean([r["worst_loss"] for r in mine]))}
            for base in BASELINES:
                for metric in ("mean_loss", "worst_loss"):
                    entry[f"{metric}_vs_{base}"] = paired(rows, stage, m, base, metric)
            out[stage][m] = entry
    return out


def tables(summary: dict, proxy_size: str, target_size: str) -> str:
    lines = []
    for stage, size in (("proxy", proxy_size), ("transfer", target_size)):
        lines += [f"### {stage} ({size})", "",
                  "| method | seeds | mean loss | worst-domain loss | mean − stratified | "
                  "mean − proportional | worst − stratified | worst − proportional |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, e in summary[stage].items():
            lines.append(
                f"| {m} | {e['seeds']} | {e['mean_loss']:.4f} | {e['worst_loss']:.4f} | "
                f"{fmt_paired(e['mean_loss_vs_stratified'])} | "
                f"{fmt_paired(e['mean_loss_vs_proportional'])} "
                f"| {fmt_paired(e['worst_loss_vs_stratified'])} | "
                f"{fmt_paired(e['worst_loss_vs_proportional'])} |")
        lines.append("")
    lines.append("Differences are paired over seeds (same initialisation and data order), "
                 "mean ± standard error; negative is better than the baseline.")
    return "\n".join(lines)


def weight_trajectories(workdir: Path, seed: int) -> dict:
    """method -> (domains, [steps, K] weights) of one seed's proxy runs, from metrics.jsonl (for
    DoReMi its domain weights α, the mixture its loss is weighted with)."""
    out = {}
    for m in METHODS:
        path = run_dir(workdir, "proxy", m, seed) / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = {}
        for line in path.read_text().splitlines():
            r = json.loads(line)
            w = r.get("doremi_weights") or r.get("mixture_weights")
            if w and "loss" in r:
                rows[r["step"]] = w
        if rows:
            domains = list(next(iter(rows.values())))
            out[m] = (domains, np.array([[rows[s][d] for d in domains] for s in sorted(rows)]))
    return out


def plots(workdir: Path, summary: dict, seed: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, metric in zip(axes, ("mean_loss", "worst_loss")):
        labels, diffs, ses = [], [], []
        for stage in ("proxy", "transfer"):
            for m, e in summary[stage].items():
                if m == "stratified":
                    continue
                p = e[f"{metric}_vs_stratified"]
                labels.append(f"{m}\n({stage})")
                diffs.append(p["diff"])
                ses.append(0.0 if math.isnan(p["se"]) else p["se"])
        x = np.arange(len(labels))
        ax.bar(x, diffs, yerr=ses, capsize=3,
               color=["C0" if "proxy" in lab else "C1" for lab in labels])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel(f"{metric.replace('_', ' ')} − stratified (nats/token)")
    fig.tight_layout()
    fig.savefig(workdir / "results.png", dpi=100)
    plt.close(fig)

    traj = weight_trajectories(workdir, seed)
    if traj:
        fig, axes = plt.subplots(1, len(traj), figsize=(3.2 * len(traj), 3), sharey=True)
        for ax, (m, (domains, w)) in zip(np.atleast_1d(axes), traj.items()):
            for k, d in enumerate(domains):
                ax.plot(np.arange(len(w)), w[:, k], label=d)
            ax.set_title(m + (" (α)" if m == "doremi" else ""))
            ax.set_xlabel("step")
        np.atleast_1d(axes)[0].set_ylabel("weight")
        np.atleast_1d(axes)[-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(workdir / "weights.png", dpi=100)
        plt.close(fig)


def non_embedding(size: str, mlp_dim: int = 0) -> int:
    cfg = sizes.get_size(size, **({"mlp_dim": mlp_dim} if mlp_dim else {}))
    return int(sizes.count_params(cfg)["non_embedding"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--size", default="nano", help="proxy model size")
    p.add_argument("--mlp_dim", type=int, default=176,
                   help="the proxy's MLP width (0: the size's); 176 makes nano (0.10M "
                        "non-embedding parameters) a tenth of tiny")
    p.add_argument("--target", default="tiny", help="the transfer's model size")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--eval_tokens", type=int, default=16384)
    p.add_argument("--rounds_every", type=int, default=40,
                   help="update_steps of Aioli and Skill-it")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--no_transfer", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    with cli.user_errors():
        methods = [m for m in args.methods.split(",") if m]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise cli.UserError(f"--methods names {unknown}; choose among {', '.join(METHODS)}")
        if "doremi" in methods and "proportional" not in methods:
            raise cli.UserError("doremi's reference is the proportional run: keep 'proportional' "
                                "in --methods")
        if args.seeds < 2:
            raise cli.UserError("--seeds must be >= 2: the standard errors are over paired seeds")
        ratio = non_embedding(args.target) / non_embedding(args.size, args.mlp_dim)
        if not args.no_transfer and ratio < 10:
            raise cli.UserError(f"--target {args.target} has {ratio:.1f}x the non-embedding "
                                f"parameters of --size {args.size}; the transfer needs >= 10x")
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        proxy = base_config(args.size, args.steps, args.seq_len, args.batch_size,
                            args.eval_tokens, args.mlp_dim)
        target = base_config(args.target, args.steps, args.seq_len, args.batch_size,
                             args.eval_tokens)
        order = [m for m in METHODS if m in methods]  # proportional before doremi
        rows = []
        for seed in range(args.seeds):
            for m in order:
                cfg = method_config(proxy, m, seed, workdir, args.rounds_every)
                rec = train_once(cfg, run_dir(workdir, "proxy", m, seed), not args.quiet)
                rows.append(record_row("proxy", m, seed, rec))
        if not args.no_transfer:
            for seed in range(args.seeds):
                for m in (t for t in TRANSFERRED if t in methods):
                    cfg = transfer_config(target, m, seed, workdir)
                    rec = train_once(cfg, run_dir(workdir, "transfer", m, seed), not args.quiet)
                    rows.append(record_row("transfer", m, seed, rec))
        summary = summarise(rows)
        setup = {"proxy_size": args.size, "proxy_mlp_dim": args.mlp_dim,
                 "proxy_non_embedding": non_embedding(args.size, args.mlp_dim),
                 "target_size": args.target, "target_non_embedding": non_embedding(args.target),
                 "non_embedding_ratio": ratio, "steps": args.steps,
                 "tokens_per_run": args.steps * args.batch_size * args.seq_len,
                 "seeds": args.seeds, "rounds_every": args.rounds_every,
                 "eval_tokens_per_domain": args.eval_tokens}
        write_json(workdir / "results.json", {"setup": setup, "runs": rows, "summary": summary},
                   indent=2)
        table = tables(summary, args.size, args.target)
        (workdir / "results.md").write_text(table + "\n")
        plots(workdir, summary, seed=0)
        print(table)
        print(json.dumps({"setup": setup, "summary": summary}), file=sys.stdout)


if __name__ == "__main__":
    main()
