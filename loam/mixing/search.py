"""Mixture search: sample mixtures, train proxies as swarms, fit RegMix regressors and data-mixing
laws, propose mixtures, write them as training configs, and report against baselines.

    python -m loam.mixsearch --config loam/configs/regmix.py --workdir runs/regmix
    python -m loam.train --config runs/regmix/proposals/regmix.json --workdir runs/regmix-train

Resumable like a sweep: the sampled mixtures are saved first, each swarm of proxies trains in its
own directory (checkpointed, skipped once its results exist), and the fits are cheap to redo.
The workdir receives config.json, mixtures.json, proxies/swarm_*/ (results.json, metrics,
checkpoints), proxies.jsonl (one row per proxy), proposals/*.json (resolved target-size training
configs, as `python -m loam.train --config` reads them), report.json, report.md and plots
(predicted_vs_observed.png, proposals.png); with `validate.seeds > 0` also validate/
(target-size models on every proposal and baseline).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from loam import cli
from loam.configs import default
from loam.data import catalog as catalog_lib
from loam.data import recipes
from loam.mixing import laws as laws_lib
from loam.mixing import regmix
from loam.mixing import swarm as swarm_lib
from loam.workdir import UnreadableFile, read_json, save_config, workdir_lock, write_json


def _target_config(config, weights: dict, seed: int = 0):
    """The target-size training config of a mixture (what the written proposal runs)."""
    t = config.target
    c = default.get_config(f"size={t.size},steps={t.steps},seq_len={t.seq_len},"
                           f"batch_size={t.batch_size}")
    c.optim.lr, c.optim.warmup_steps = t.lr, t.warmup_steps
    c.data.domains = list(config.proxy.data.domains)
    for key in ("sources", "tokenizer", "prepared_dir", "dir"):
        if config.proxy.data.get(key):
            with c.unlocked():
                c.data[key] = config.proxy.data[key]
    c.seed = seed
    c.eval_tokens, c.eval_batch_size = config.proxy.eval_tokens, config.proxy.eval_batch_size
    return swarm_lib.member_config(c, swarm_lib.Member(weights, seed=seed))


def _baseline_weights(name: str, domains, sizes) -> np.ndarray:
    try:
        return recipes.recipe_weights(name, domains, sizes=sizes)
    except ValueError as e:
        raise regmix.MixSearchError(f"baseline {name!r}: {e}") from None


def _swarm_chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start // size, list(range(start, min(n, start + size)))


def sample(config, workdir: Path, domains, sizes) -> tuple[np.ndarray, np.ndarray]:
    """The proxies' mixtures (saved; a rerun must regenerate the same ones) and the caps."""
    s, t = config.search, config.target
    budget = t.steps * t.batch_size * t.seq_len
    upper = regmix.max_weights(sizes, budget, s.max_epochs)
    shares = sizes / sizes.sum()
    R = regmix.sample_mixtures(s.num_proxies, shares, list(s.concentration), s.seed, upper)
    path = workdir / "mixtures.json"
    record = {"domains": domains, "token_shares": shares.tolist(), "max_weights": upper.tolist(),
              "budget_tokens": budget, "mixtures": R.tolist()}
    if path.exists():
        try:
            saved = read_json(path)
            same = saved["domains"] == domains and np.allclose(saved["mixtures"], R)
        except (UnreadableFile, KeyError, TypeError, ValueError) as e:
            raise regmix.MixSearchError(
                f"cannot check the saved mixtures: {e}. Sampling is deterministic: move "
                f"{path} away to write it again from this config") from None
        if not same:
            raise regmix.MixSearchError(
                f"{path} holds other mixtures than this config samples (search settings, "
                "domains or corpora changed); use a new workdir or restore the config")
    else:
        write_json(path, record, indent=1)
    return R, upper


def train_proxies(config, workdir: Path, R: np.ndarray, domains, eval_domains) -> list[dict]:
    s = config.search
    rows = []
    chunks = list(_swarm_chunks(len(R), s.swarm_size))
    for j, idx in chunks:
        sdir = workdir / "proxies" / f"swarm_{j:03d}"
        res_path = sdir / "results.json"
        results = None
        if res_path.exists():
            try:
                results = read_json(res_path)
            except UnreadableFile as e:  # name it, keep it, and let the swarm write it again
                aside = res_path.with_name(f"results.unreadable.{time.strftime('%Y%m%d-%H%M%S')}")
                res_path.rename(aside)
                print(f"warning: {e}; moved it to {aside.name} and finishing swarm {j} again "
                      "from its checkpoints", flush=True)
        if results is None:
            print(f"proxies: swarm {j + 1}/{len(chunks)} ({len(idx)} members)", flush=True)
            members = [swarm_lib.Member(dict(zip(domains, R[i].tolist())),
                                        seed=s.seed + i, name=f"proxy-{i:03d}") for i in idx]
            results = swarm_lib.train_swarm(config.proxy, members, sdir,
                                            eval_domains=eval_domains)
        for i, m in zip(idx, results["members"]):
            rows.append({"proxy": i, "name": m["name"], "weights": m["weights"],
                         "eval_loss": m["eval_loss"], "alive": m["alive"],
                         "diverged_at": m["diverged_at"], "finite": m["finite"]})
    with open(workdir / "proxies.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def _regmix_name(search, regressor: str) -> str:
    """Report name of a regressor's proposal: "regmix" for the configured one (RegMix's)."""
    return "regmix" if regressor == search.proposal else f"regmix_{regressor}"


def fit_and_propose(config, workdir: Path, rows, domains, sizes, upper) -> dict:
    s = config.search
    tdomains = regmix.target_domains(s.target, domains,
                                     known=catalog_lib.for_config(config.proxy).names)
    R = np.array([[r["weights"][d] for d in domains] for r in rows])
    y = np.array([regmix.target_values([r["eval_loss"]], s.target, domains)[0]
                  if r["finite"] else float("nan") for r in rows])
    ok, notes = regmix.finite_rows(R, y, [r["name"] for r in rows])
    for n in notes:
        print(f"warning: {n}", flush=True)
    X, Y = R[ok], y[ok]
    regmix.check_enough(len(X), len(domains))
    per_domain = {d: np.array([r["eval_loss"][d] for r, k in zip(rows, ok) if k])
                  for d in tdomains}

    candidates = regmix.sample_mixtures(s.num_candidates, sizes / sizes.sum(),
                                        list(s.concentration), s.seed + 1, upper)
    fits, proposals, predictors = {}, {}, {}
    for name in s.regressors:
        fit = regmix.fit_regressor(name, X, Y, s.holdout_fraction, s.seed)
        w, info = regmix.propose(fit["regressor"], candidates, s.top_k)
        fits[name] = {k: v for k, v in fit.items() if k != "regressor"}
        proposals[_regmix_name(s, name)] = w
        predictors[name] = fit["regressor"].predict
        print(f"{name}: held-out Spearman {fit['spearman']:.3f}; proposal "
              f"{np.round(w, 3).tolist()}", flush=True)

    # Data-mixing laws: held-out check on the same split, then a fit on all proxies.
    train, test = regmix.split_heldout(len(X), s.holdout_fraction, s.seed)
    held = laws_lib.fit_laws(X[train], {d: v[train] for d, v in per_domain.items()},
                             seed=s.seed)
    law_pred = np.mean([law.predict(X[test]) for law in held.values()], axis=0)
    fitted = laws_lib.fit_laws(X, per_domain, seed=s.seed)
    w, info = laws_lib.propose(list(fitted.values()), candidates, upper)
    fits["mixing_law"] = {"name": "mixing_law", "spearman": regmix.spearman(law_pred, Y[test]),
                          "heldout": test.tolist(), "heldout_predicted": law_pred.tolist(),
                          "heldout_observed": Y[test].tolist(),
                          "laws": {d: law.to_json() for d, law in fitted.items()}}
    proposals["mixing_law"] = w
    predictors["mixing_law"] = lambda Z: np.mean([law.predict(Z) for law in fitted.values()],
                                                 axis=0)
    print(f"mixing law: held-out Spearman {fits['mixing_law']['spearman']:.3f}; proposal "
          f"{np.round(w, 3).tolist()}", flush=True)
    for b in s.baselines:
        proposals[b] = np.asarray(_baseline_weights(b, domains, sizes), np.float64)

    table = []
    for name, w in proposals.items():
        row = {"mixture": name, "weights": dict(zip(domains, map(float, w))),
               "within_caps": bool(np.all(w <= upper + 1e-9)),
               "predicted": {p: float(f(w[None])[0]) for p, f in predictors.items()}}
        table.append(row)
    return {"target": s.target, "target_domains": tdomains, "num_proxies": len(rows),
            "usable_proxies": int(ok.sum()), "excluded": notes, "fits": fits,
            "proposals": table, "max_weights": dict(zip(domains, map(float, upper))),
            "proxy_tokens": int(config.proxy.steps * config.proxy.data.batch_size
                                * config.proxy.data.seq_len)}


def write_proposal(path: str | Path, config) -> Path:
    """A resolved training config as JSON (`python -m loam.train --config PATH` reads it; change
    fields with --config.KEY=VALUE). Refuses weights that are not a mixture."""
    w = {str(k): float(v) for k, v in config.data.weights.items()}
    if not all(math.isfinite(v) and v >= 0 for v in w.values()) or sum(w.values()) <= 0:
        raise regmix.MixSearchError(f"cannot write mixture {w}: weights must be finite, "
                                    "non-negative and not all zero")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, config.to_dict(), indent=2, sort_keys=True)


def write_proposals(config, workdir: Path, report: dict) -> None:
    """proposals/<mixture>.json: the target-size run of each proposal and baseline, exactly
    as validation trains it."""
    for row in report["proposals"]:
        name = row["mixture"].replace(":", "_")
        row["config"] = str(write_proposal(workdir / "proposals" / f"{name}.json",
                                           _target_config(config, row["weights"])))


def validate(config, workdir: Path, report: dict, domains, eval_domains) -> None:
    """Target-size models on every proposal and baseline, ``validate.seeds`` seeds each, trained
    together as one swarm; the target metric per mixture as mean and std over seeds."""
    seeds = int(config.validate.seeds)
    if seeds <= 0:
        return
    names = [row["mixture"] for row in report["proposals"]]
    weights = {row["mixture"]: row["weights"] for row in report["proposals"]}
    wanted = list(config.validate.get("mixtures", None) or names)
    names = [n for n in names if n in wanted]
    members = [swarm_lib.Member(weights[n], seed=1000 + s, name=f"{n}/seed{s}")
               for n in names for s in range(seeds)]
    base = _target_config(config, weights[names[0]])
    print(f"validate: {len(members)} target models ({base.model.size}, {base.steps} steps)",
          flush=True)
    results = swarm_lib.train_swarm(base, members, workdir / "validate",
                                    eval_domains=eval_domains)
    by_name: dict[str, list[float]] = {n: [] for n in names}
    for m in results["members"]:
        n = m["name"].rsplit("/", 1)[0]
        if m["finite"]:
            by_name[n].append(float(regmix.target_values([m["eval_loss"]],
                                                         config.search.target, domains)[0]))
    for row in report["proposals"]:
        if row["mixture"] not in by_name:
            continue
        v = by_name[row["mixture"]]
        row["validated"] = {"values": v, "mean": float(np.mean(v)) if v else float("nan"),
                            "std": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"),
                            "model": base.model.size, "steps": int(base.steps)}


def plot(workdir: Path, report: dict, domains) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = report["fits"]
    fig, axes = plt.subplots(1, len(fits), figsize=(4 * len(fits), 3.6), squeeze=False)
    for ax, (name, f) in zip(axes[0], fits.items()):
        obs, pred = np.array(f["heldout_observed"]), np.array(f["heldout_predicted"])
        ax.scatter(obs, pred, s=14)
        lo, hi = min(obs.min(), pred.min()), max(obs.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(f"{name}: Spearman {f['spearman']:.2f}")
        ax.set_xlabel("observed (held-out proxies)")
        ax.set_ylabel("predicted")
    fig.suptitle(f"target: {report['target']}")
    fig.tight_layout()
    fig.savefig(workdir / "predicted_vs_observed.png", dpi=110)
    plt.close(fig)

    rows = report["proposals"]
    fig, ax = plt.subplots(figsize=(1.6 * len(domains) + 3, 3.8))
    width = 0.8 / len(rows)
    x = np.arange(len(domains))
    for i, row in enumerate(rows):
        ax.bar(x + i * width, [row["weights"][d] for d in domains], width, label=row["mixture"])
    ax.plot(x + 0.4 - width / 2, [report["max_weights"][d] for d in domains], "k_", ms=20,
            label="epoch cap")
    ax.set_xticks(x + 0.4 - width / 2, domains)
    ax.set_ylabel("weight")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(workdir / "proposals.png", dpi=110)
    plt.close(fig)


def format_report(report: dict, domains) -> str:
    lines = [f"# Mixture search (target: {report['target']})", "",
             f"{report['usable_proxies']}/{report['num_proxies']} proxies usable, "
             f"{report['proxy_tokens']:,} tokens each.", ""]
    for n in report["excluded"]:
        lines.append(f"- excluded: {n}")
    lines += ["", "| fit | held-out Spearman |", "|---|---|"]
    lines += [f"| {n} | {f['spearman']:.3f} |" for n, f in report["fits"].items()]
    preds = list(report["proposals"][0]["predicted"])
    has_val = any("validated" in row for row in report["proposals"])
    base = next((r["validated"]["values"] for r in report["proposals"]
                 if r["mixture"] == "uniform" and "validated" in r), None)
    head = ["mixture"] + domains + [f"pred. {p}" for p in preds] + (
        ["validated (mean ± std)", "vs uniform (paired mean ± s.e.)"] if has_val else [])
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["proposals"]:
        cells = [row["mixture"] + ("" if row["within_caps"] else " (exceeds caps)")]
        cells += [f"{row['weights'][d]:.3f}" for d in domains]
        cells += [f"{row['predicted'][p]:.4f}" for p in preds]
        if has_val and "validated" not in row:
            cells += ["—", "—"]
        elif has_val:
            v = row["validated"]
            cells.append(f"{v['mean']:.4f} ± {v['std']:.4f} (n={len(v['values'])})")
            if base is not None and len(base) == len(v["values"]) > 1:
                d = np.asarray(v["values"]) - np.asarray(base)
                cells.append(f"{d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f}")
            else:
                cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_config(config) -> None:
    """Refuses a search that cannot run, before anything is trained or written."""
    s = config.search
    for key, low in (("num_proxies", 1), ("swarm_size", 1), ("num_candidates", 1),
                     ("top_k", 1)):
        if int(s[key]) < low:
            raise regmix.MixSearchError(f"search.{key}={s[key]} must be at least {low}"
                                        + (" (proxies trained together in one compiled step; "
                                           "e.g. swarm=16)" if key == "swarm_size" else ""))
    if int(s.top_k) > int(s.num_candidates):
        raise regmix.MixSearchError(f"search.top_k={s.top_k} exceeds search.num_candidates="
                                    f"{s.num_candidates}; lower top_k or raise num_candidates")
    if not 0 < float(s.holdout_fraction) < 1:
        raise regmix.MixSearchError(f"search.holdout_fraction={s.holdout_fraction} must be "
                                    "between 0 and 1 (exclusive)")
    if int(config.validate.seeds) < 0:
        raise regmix.MixSearchError(f"validate.seeds={config.validate.seeds} must be >= 0 "
                                    "(0: propose only)")


def run(config, workdir: str | Path) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir):
        return _run(config, workdir)


def _run(config, workdir: Path) -> dict:
    check_config(config)
    domains = catalog_lib.mixture_domains(config.proxy)
    s = config.search
    if s.proposal not in s.regressors:
        raise regmix.MixSearchError(f"search.proposal={s.proposal!r} is not among "
                                    f"search.regressors {list(s.regressors)}")
    tdomains = regmix.target_domains(s.target, domains,
                                     known=catalog_lib.for_config(config.proxy).names)
    eval_domains = list(dict.fromkeys(domains + tdomains))
    regmix.check_enough(s.num_proxies, len(domains), "proxies configured")
    known = [_regmix_name(s, r) for r in s.regressors] + ["mixing_law"] + list(s.baselines)
    unknown = [n for n in config.validate.get("mixtures", None) or [] if n not in known]
    if unknown:
        raise regmix.MixSearchError(f"validate.mixtures names {unknown}, which this search does "
                                    f"not propose; choose from {known}")
    sizes = recipes.domain_sizes(domains, catalog=catalog_lib.for_config(config.proxy))

    R, upper = sample(config, workdir, domains, sizes)  # refuses other mixtures than saved
    save_config(workdir, config)
    rows = train_proxies(config, workdir, R, domains, eval_domains)
    report = fit_and_propose(config, workdir, rows, domains, sizes, upper)
    write_proposals(config, workdir, report)
    validate(config, workdir, report, domains, eval_domains)
    write_json(workdir / "report.json", report, indent=1)
    text = format_report(report, domains)
    (workdir / "report.md").write_text(text)
    plot(workdir, report, domains)
    print(text, flush=True)
    return report


def _define_flags(flags):
    flags.DEFINE_string("workdir", None, "Search directory (created; resumed if it exists).")
    flags.mark_flag_as_required("workdir")


def main(argv=None):
    """`python -m loam.mixsearch --config loam/configs/regmix.py[:arg] --workdir DIR`."""
    swarm_lib.use_host_cores()  # the search trains swarms: one CPU device per core
    cli.config_main(lambda config, flags: run(config, flags.workdir),
                    define_flags=_define_flags, argv=argv)


if __name__ == "__main__":
    main()
