"""Data selection methods at an equal token budget, against random selection.

    python -m loam.experiments.selection --workdir runs/selection [--size small] [--seeds 3]

The corpus is a slice of the five bundled domains written as JSON-lines sources into the work
directory (the training documents in an order fixed by a hash of their ids, up to
``domain_tokens`` per domain; the validation documents likewise, up to ``val_tokens``), prepared
there with its own column store: every score is computed by the real scoring pipeline
(``loam.selection.pipeline``, Beam's DirectRunner) into that private store, never into the
columns other runs read. A reference run (a ``--size``-sized model trained on the domains other
than the target; or ``--prior RUN``) is the prior of CoLoR-Filter, the model of the perplexity
scorer and the judge of the ratings.

Two comparisons, each one run per method and seed (same model, steps, seeds and initialisation
for every method: the seeds pair them), trained with ``config.data.selection``:

* **budget**: each of the five domains keeps ``fraction`` (half) of its training tokens, chosen
  by the method, and the domains are mixed in proportion to their tokens. Methods: ``random``
  (the baseline: a hash of the document id), ``heuristic`` (top ``quality``), ``filters`` (the
  documents passing every Gopher/C4/FineWeb rule, then random ones to fill the budget; random
  among them if they exceed it), ``dedup`` (MinHash keep, then random fill), ``perplexity``
  (lowest loss under the reference model first), ``ratings`` (Bradley-Terry ratings fitted from
  pairwise judgments generated from the reference model's losses within each domain, selected
  by Gumbel top-k at QuRating's temperature 2). Metric: the held-out loss of every domain and
  their mean.
* **target**: the target domain (``--target``, default ``docs``) is left out of training; the
  methods choose ``fraction`` of the other domains' training tokens as one pool (a method may
  take more of one domain than of another; the domains are then mixed in proportion to the
  tokens chosen from each), aligned to the target's training documents. Methods: ``random``,
  ``heuristic`` (target-agnostic references), ``dsir`` (top importance log-weight: with weights
  spread over hundreds of nats Gumbel resampling would choose the same documents; the weight
  sums over a document's n-grams, so across domains of very different document lengths it
  ranks documents by length as much as by text), ``zipfit`` (top gzip alignment), ``color``
  (CoLoR-Filter, top conditional loss reduction; the conditional model is the reference
  fine-tuned on the target's training documents). Metric: the held-out loss on the target's
  validation documents, which no method saw.

Each difference to random is the mean of the same-seed differences with its standard error.
Finished runs and scores are reused, so the command resumes where it stopped. Writes
results.json, results.md (tables and a summary) and results.png into the work directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from loam import cli
from loam.configs import default
from loam.data import catalog as catalog_lib
from loam.data import columns as columns_lib
from loam.data import corpora, views
from loam.data import vocab as vocab_lib
from loam.experiments.common import fmt_paired, train_once
from loam.selection import base, pipeline, ratings
from loam.workdir import read_json, write_json

BUDGET_METHODS = ("random", "heuristic", "filters", "dedup", "perplexity", "ratings")
TARGET_METHODS = ("random", "heuristic", "dsir", "zipfit", "color")
METHODS = tuple(dict.fromkeys(BUDGET_METHODS + TARGET_METHODS))

SIZES: dict[str, dict[str, Any]] = {
    # the test's: seconds of training, a handful of documents (cut short) per domain
    "tiny": dict(model="nano", domain_tokens=1500, val_tokens=200, max_chars=1200, steps=2,
                 seq_len=32, batch_size=8, eval_tokens=256, reference_steps=4,
                 finetune_steps=2, seeds=2),
    "small": dict(model="nano", domain_tokens=50_000, val_tokens=6000, max_chars=0, steps=40,
                  seq_len=64,
                  batch_size=16, eval_tokens=4096, reference_steps=40, finetune_steps=20,
                  seeds=2),
    # about 20 minutes on an idle 2-core machine
    "default": dict(model="nano", domain_tokens=150_000, val_tokens=20_000, max_chars=0,
                    steps=100, seq_len=128, batch_size=16, eval_tokens=16384, reference_steps=100,
                    finetune_steps=40, seeds=3),
}
REFERENCE_SEED = 1000   # not one of the paired seeds
JUDGMENTS_PER_DOC = 8   # pairs per document for the ratings' judgments


# ---------------------------------------------------------------------------------- corpus

def _hash_order(doc_id: str) -> bytes:
    return hashlib.sha256(doc_id.encode()).digest()


def write_corpus(out: Path, domain_tokens: int, val_tokens: int, max_chars: int = 0) -> dict:
    """Each bundled domain's slice as ``out/<domain>.jsonl`` (ids kept, so the hash split puts
    each document where the bundled corpus has it; texts cut to ``max_chars`` if > 0):
    {domain: {split: [documents, tokens]}}."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = vocab_lib.get_tokenizer("bundled")
    stats: dict[str, dict[str, list[int]]] = {}
    for domain in corpora.DOMAIN_NAMES:
        docs = [(i, t[:max_chars] if max_chars else t)
                for i, t in corpora.read_documents(corpora.corpus_path(domain)) if t.strip()]
        docs.sort(key=lambda d: _hash_order(d[0]))
        kept: list[tuple[str, str]] = []
        stats[domain] = {}
        for split, budget in (("train", domain_tokens), ("validation", val_tokens)):
            total = n = 0
            for doc_id, text in docs:
                if (split == "validation") != corpora.is_validation(doc_id):
                    continue
                if total >= budget and n >= 1:
                    break
                total += len(tokenizer.encode([text])[0]) + 1
                n += 1
                kept.append((doc_id, text))
            stats[domain][split] = [n, total]
        (out / f"{domain}.jsonl").write_text(
            "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in kept))
    return stats


def base_config(workdir: Path, s: dict):
    c = default.get_config(f"size={s['model']},steps={s['steps']},seq_len={s['seq_len']},"
                           f"batch_size={s['batch_size']}")
    c.data.sources = {d: f"jsonl:{workdir / 'corpus' / d}.jsonl" for d in corpora.DOMAIN_NAMES}
    c.data.prepared_dir = str(workdir / "prepared")
    c.data.weights = "proportional"
    c.optim.warmup_steps = max(1, s["steps"] // 10)
    c.eval_every = c.checkpoint_every = s["steps"]
    c.keep_checkpoints = 1
    c.eval_tokens = s["eval_tokens"]
    c.log_every = 1
    return c


def _set(c, key: str, value) -> None:
    """c.data[key] = value, whatever type the field had."""
    with c.unlocked():
        if key in c.data:
            del c.data[key]
        c.data[key] = value


# ---------------------------------------------------------------------------------- runs

def reference_run(c, workdir: Path, s: dict, target: str, verbose: bool) -> str:
    """A model trained on the pool (the target's weight 0): the prior and the judge."""
    c = c.copy_and_resolve_references()
    c.seed = REFERENCE_SEED
    c.steps = s["reference_steps"]
    c.eval_every = c.checkpoint_every = s["reference_steps"]
    _set(c, "weights", {d: 0.0 if d == target else 1.0 for d in corpora.DOMAIN_NAMES})
    run = workdir / "reference"
    train_once(c, run, verbose)
    return str(run)


# ---------------------------------------------------------------------------------- scoring

def score(catalog, name: str, params: dict, domains, verbose: bool) -> None:
    """Runs a scorer over ``domains`` unless their columns already hold its run with these
    parameters."""
    scorer = base.make(name, params)
    first = scorer.columns[0]
    want = columns_lib._jsonable(scorer.params())
    if all((columns_lib.manifest(catalog, d, first) or {}).get("params") == want
           for d in domains):
        return
    if verbose:
        print(f"== scoring {name} {params or ''} over {', '.join(domains)}", flush=True)
    results = pipeline.score(scorer, catalog, list(domains), num_workers=1)
    if verbose:
        print("\n".join(pipeline.summary_lines(scorer, results)), flush=True)


def write_judgments(catalog, workdir: Path, reference: str) -> str:
    """Pairwise judgments within each domain from the reference model's losses (the
    ``ppl_loss`` column): p = sigmoid of minus the loss difference over its spread."""
    out = workdir / "judgments.jsonl"
    if out.is_file():
        return str(out)
    lines = []
    for k, d in enumerate(corpora.DOMAIN_NAMES):
        ids = [json.loads(line)["id"] for line in
               (workdir / "corpus" / f"{d}.jsonl").read_text().splitlines()]
        loss = np.asarray(columns_lib.load(catalog, d, "ppl_loss"), np.float64)[:len(ids)]
        lines += ratings.pair_judgments(
            ids, -loss, JUDGMENTS_PER_DOC * len(ids), seed=k,
            judge=f"loss:{reference} (generated from a reference model's per-token loss, "
                  "lower = better; not a human or LLM judge)")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    tmp.replace(out)
    return str(out)


def score_all(catalog, workdir: Path, methods, s: dict, target: str, reference: str,
              verbose: bool) -> None:
    everything = list(corpora.DOMAIN_NAMES)
    pool = [d for d in everything if d != target]
    goal = f"{target}:train"
    if "random" in methods or "filters" in methods or "dedup" in methods:
        score(catalog, "random", {}, everything, verbose)
    if "heuristic" in methods:
        score(catalog, "heuristic", {}, everything, verbose)
    if "filters" in methods:
        score(catalog, "filters", {}, everything, verbose)
    if "dedup" in methods:
        score(catalog, "dedup", {}, everything, verbose)
    if "perplexity" in methods or "ratings" in methods:
        score(catalog, "perplexity", {"workdir": reference}, everything, verbose)
    if "ratings" in methods:
        score(catalog, "ratings", {"judgments": write_judgments(catalog, workdir, reference)},
              everything, verbose)
    if "dsir" in methods:
        score(catalog, "dsir", {"target": goal}, pool, verbose)
    if "zipfit" in methods:
        score(catalog, "zipfit", {"target": goal}, pool, verbose)
    if "color" in methods:
        score(catalog, "color_filter", {"prior": reference, "target": goal,
                                        "finetune_steps": s["finetune_steps"],
                                        "conditional_dir": str(workdir / "conditional")},
              pool, verbose)


# ---------------------------------------------------------------------------------- selections

# Budget comparison: each domain's entry of config.data.selection, with its token budget.
# A weight of 1000 on a 0/1 column's z-score puts every passing document before any other; the
# random column (z-scored, |z| < 2) orders the documents within each group.
BUDGET_ENTRIES: dict[str, dict[str, Any]] = {
    "random": {"score": "random", "policy": "top"},
    "heuristic": {"score": "quality", "policy": "top"},
    "filters": {"score": {"filters_pass": 1000.0, "random": 1.0}, "policy": "top"},
    "dedup": {"score": {"dup_keep": 1000.0, "random": 1.0}, "policy": "top"},
    "perplexity": {"score": {"ppl_loss": -1.0}, "policy": "top"},
    "ratings": {"score": "rating", "policy": "gumbel", "temperature": 2.0},
}
# Target comparison: the column each method ranks the pool by (higher = chosen first).
TARGET_COLUMNS = {"random": "random", "heuristic": "quality", "dsir": "dsir_logw",
                  "zipfit": "zipfit_align", "color": "color"}


def train_split(catalog, domain: str) -> tuple[np.ndarray, np.ndarray]:
    split = catalog.split(domain, "train")
    return np.asarray(split.doc_index), np.asarray(split.lengths, np.int64)


def budget_selection(catalog, method: str, fraction: float) -> dict:
    out = {}
    for d in corpora.DOMAIN_NAMES:
        _, lengths = train_split(catalog, d)
        out[d] = {**BUDGET_ENTRIES[method], "tokens": max(1, int(fraction * lengths.sum()))}
    return out


def pooled_selection(catalog, method: str, pool, fraction: float) -> dict[str, int]:
    """{domain: tokens} of the pool's top documents by the method's column up to ``fraction``
    of the pool's training tokens. Per domain, the documents of the pool's top are the top of
    the domain up to those tokens, so ``top`` policies with them choose exactly this set."""
    col = TARGET_COLUMNS[method]
    keys, lengths, owner = [], [], []
    for k, d in enumerate(pool):
        docs, lens = train_split(catalog, d)
        v = np.asarray(columns_lib.load(catalog, d, col), np.float64)[docs]
        if not np.isfinite(v).all():
            raise cli.UserError(f"column {col!r} of domain {d!r} has unscored training "
                                "documents; delete the column store and rerun")
        keys.append(v)
        lengths.append(lens)
        owner.append(np.full(len(v), k))
    key, length, who = (np.concatenate(a) for a in (keys, lengths, owner))
    order = np.argsort(-key, kind="stable")
    within = np.cumsum(length[order]) <= fraction * length.sum()
    within[0] = True
    chosen = order[within]
    return {d: int(length[chosen][who[chosen] == k].sum()) for k, d in enumerate(pool)}


def check_pooled(catalog, method: str, budgets: dict[str, int]) -> None:
    """The per-domain selections choose the pooled tokens exactly (else the budget would not be
    the same for every method)."""
    for d, tokens in budgets.items():
        if tokens == 0:
            continue
        docs, lens = train_split(catalog, d)
        sel = views.parse_selection(d, {"score": TARGET_COLUMNS[method], "policy": "top",
                                        "tokens": tokens})
        def column(name: str, d: str = d) -> np.ndarray:
            return columns_lib.load(catalog, d, name)

        copies = views.select_documents(sel, d, docs, lens, column)
        got = int((lens * copies).sum())
        if got != tokens:
            raise RuntimeError(f"{method}: the selection of {d} has {got} tokens, the pooled "
                               f"choice {tokens}")


def method_config(c, experiment: str, method: str, seed: int, catalog, target: str,
                  fraction: float):
    c = c.copy_and_resolve_references()
    c.seed = seed
    if experiment == "budget":
        _set(c, "selection", budget_selection(catalog, method, fraction))
        return c, None
    pool = [d for d in corpora.DOMAIN_NAMES if d != target]
    budgets = pooled_selection(catalog, method, pool, fraction)
    check_pooled(catalog, method, budgets)
    _set(c, "selection", {d: {"score": TARGET_COLUMNS[method], "policy": "top", "tokens": t}
                          for d, t in budgets.items() if t > 0})
    _set(c, "weights", {d: float(budgets.get(d, 0)) for d in corpora.DOMAIN_NAMES})
    return c, budgets


def run_dir(workdir: Path, experiment: str, method: str, seed: int) -> Path:
    return workdir / "runs" / experiment / f"{method}_seed{seed}"


def record_row(experiment: str, method: str, seed: int, record: dict, target: str,
               selected: dict | None) -> dict:
    per = {d: float(v["loss"]) for d, v in record["per_domain"].items()}
    row = {"experiment": experiment, "method": method, "seed": seed, "per_domain": per}
    if experiment == "budget":
        row["mean_loss"] = float(np.mean(list(per.values())))
    else:
        row["target_loss"] = per[target]
        row["pool_mean_loss"] = float(np.mean([v for d, v in per.items() if d != target]))
        row["selected_tokens"] = selected
    return row


# ---------------------------------------------------------------------------------- report

def paired(rows, experiment: str, method: str, metric: str, baseline: str = "random") -> dict:
    def values(m):
        return {r["seed"]: (r[metric] if metric in r else r["per_domain"][metric])
                for r in rows if r["experiment"] == experiment and r["method"] == m}
    a, b = values(method), values(baseline)
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds])
    n = len(seeds)
    return {"diff": float(d.mean()) if n else math.nan,
            "se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan, "seeds": n}


METRICS = {"budget": ("mean_loss",), "target": ("target_loss", "pool_mean_loss")}


def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    for experiment, methods in (("budget", BUDGET_METHODS), ("target", TARGET_METHODS)):
        out[experiment] = {}
        for m in methods:
            mine = [r for r in rows if r["experiment"] == experiment and r["method"] == m]
            if not mine:
                continue
            domains = list(mine[0]["per_domain"])
            e: dict = {"seeds": len(mine),
                       "per_domain": {d: float(np.mean([r["per_domain"][d] for r in mine]))
                                      for d in domains},
                       "per_domain_vs_random": {d: paired(rows, experiment, m, d)
                                                for d in domains}}
            for metric in METRICS[experiment]:
                e[metric] = float(np.mean([r[metric] for r in mine]))
                e[f"{metric}_vs_random"] = paired(rows, experiment, m, metric)
            if experiment == "target":
                tok = [r["selected_tokens"] for r in mine if r.get("selected_tokens")]
                if tok:
                    total = sum(tok[0].values())
                    e["selected_share"] = {d: t / total for d, t in tok[0].items()}
            out[experiment][m] = e
    return out


def _vs(method: str, p: dict) -> str:
    return "(baseline)" if method == "random" else fmt_paired(p)


def tables(summary: dict, target: str) -> str:
    lines = []
    b = summary.get("budget") or {}
    if b:
        domains = list(next(iter(b.values()))["per_domain"])
        lines += ["### budget: each domain keeps the same share of its training tokens", "",
                  "| method | seeds | mean held-out loss | − random | "
                  + " | ".join(domains) + " |",
                  "|---|---|---|---|" + "---|" * len(domains)]
        for m, e in b.items():
            cells = " | ".join(
                f"{e['per_domain'][d]:.4f} ({fmt_paired(e['per_domain_vs_random'][d])})"
                if m != "random" else f"{e['per_domain'][d]:.4f}" for d in domains)
            lines.append(f"| {m} | {e['seeds']} | {e['mean_loss']:.4f} | "
                         f"{_vs(m, e['mean_loss_vs_random'])} | {cells} |")
        lines += ["", "Per domain: held-out loss (its paired difference to random).", ""]
    t = summary.get("target") or {}
    if t:
        pool = [d for d in next(iter(t.values()))["per_domain"] if d != target]
        lines += [f"### target: {target} left out, the pool's tokens chosen for it", "",
                  f"| method | seeds | {target} loss | − random | pool mean loss | − random | "
                  "share of the chosen tokens (" + ", ".join(pool) + ") |",
                  "|---|---|---|---|---|---|---|"]
        for m, e in t.items():
            share = ", ".join(f"{e.get('selected_share', {}).get(d, 0):.2f}" for d in pool)
            lines.append(f"| {m} | {e['seeds']} | {e['target_loss']:.4f} | "
                         f"{_vs(m, e['target_loss_vs_random'])} | {e['pool_mean_loss']:.4f} | "
                         f"{_vs(m, e['pool_mean_loss_vs_random'])} | {share} |")
        lines.append("")
    lines.append("Losses in nats/token on held-out documents at the end of training; differences "
                 "are paired over seeds (same initialisation), mean ± standard error; negative "
                 "is better than random.")
    return "\n".join(lines)


def verdicts(summary: dict, target: str) -> list[str]:
    """One sentence per method and metric, whatever the sign: beyond two standard errors of
    random or not."""
    out = []
    for experiment, metric, what in (("budget", "mean_loss", "mean held-out loss"),
                                     ("target", "target_loss", f"{target} loss")):
        for m, e in (summary.get(experiment) or {}).items():
            if m == "random":
                continue
            p = e[f"{metric}_vs_random"]
            if math.isnan(p["se"]):
                call = "too few seeds to tell"
            elif p["diff"] < -2 * p["se"]:
                call = "better than random beyond 2 s.e."
            elif p["diff"] > 2 * p["se"]:
                call = "worse than random beyond 2 s.e."
            else:
                call = "within 2 s.e. of random (no difference detected)"
            out.append(f"- {experiment} / {m}: {what} {fmt_paired(p)} vs random over {p['seeds']} "
                       f"seeds: {call}" + ("" if call.endswith(".") else "."))
    return out


def plot(workdir: Path, summary: dict, target: str) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = [(e, metric, title) for e, metric, title in
              (("budget", "mean_loss", "budget: mean held-out loss − random"),
               ("target", "target_loss", f"target: {target} loss − random"))
              if summary.get(e)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 3.8))
    for ax, (experiment, metric, title) in zip(np.atleast_1d(axes), panels):
        names = [m for m in summary[experiment] if m != "random"]
        diffs = [summary[experiment][m][f"{metric}_vs_random"]["diff"] for m in names]
        ses = [summary[experiment][m][f"{metric}_vs_random"]["se"] for m in names]
        ses = [0.0 if math.isnan(s) else s for s in ses]
        x = np.arange(len(names))
        ax.bar(x, diffs, yerr=ses, capsize=3,
               color=["C2" if d < 0 else "C3" for d in diffs])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("nats/token (paired, ± s.e.)")
    fig.tight_layout()
    fig.savefig(workdir / "results.png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--size", default="default", choices=sorted(SIZES))
    p.add_argument("--seeds", type=int, default=None, help="paired seeds (default: the size's)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated; random (the baseline) is always run")
    p.add_argument("--experiments", default="budget,target")
    p.add_argument("--target", default="docs", help="the target comparison's held-out domain")
    p.add_argument("--fraction", type=float, default=0.5,
                   help="the share of the training tokens every method selects")
    p.add_argument("--prior", default=None,
                   help="a trained run to use as the reference model (default: trained here)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    with cli.user_errors():
        s = dict(SIZES[args.size])
        seeds = args.seeds if args.seeds is not None else s["seeds"]
        methods = ["random"] + [m for m in args.methods.split(",") if m and m != "random"]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise cli.UserError(f"--methods names {unknown}; choose among {', '.join(METHODS)}")
        experiments = [e for e in args.experiments.split(",") if e]
        if not experiments or set(experiments) - {"budget", "target"}:
            raise cli.UserError(f"--experiments {args.experiments!r}: give budget, target or "
                                "both")
        if args.target not in corpora.DOMAIN_NAMES:
            raise cli.UserError(f"--target {args.target!r} is not a domain; choose one of "
                                f"{', '.join(corpora.DOMAIN_NAMES)}")
        if not 0 < args.fraction < 1:
            raise cli.UserError(f"--fraction must be in (0, 1), got {args.fraction}")
        if seeds < 2:
            raise cli.UserError("--seeds must be >= 2: the standard errors are over paired seeds")
        verbose = not args.quiet
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        corpus = {"size": args.size, "domain_tokens": s["domain_tokens"],
                  "val_tokens": s["val_tokens"]}
        if s["max_chars"]:
            corpus["max_chars"] = s["max_chars"]
        made = read_json(workdir / "corpus.json") if (workdir / "corpus.json").is_file() else None
        if made is None:
            stats = write_corpus(workdir / "corpus", s["domain_tokens"], s["val_tokens"],
                                 s["max_chars"])
            write_json(workdir / "corpus.json", {**corpus, "documents_tokens": stats}, indent=2)
        elif {k: made.get(k) for k in corpus} != corpus:
            raise cli.UserError(f"{workdir} holds the corpus of --size {made.get('size')}; give "
                                "another --workdir for another size")
        c = base_config(workdir, s)
        catalog = catalog_lib.for_config(c)
        reference = (str(Path(args.prior).resolve()) if args.prior
                     else reference_run(c, workdir, s, args.target, verbose))
        wanted = {m for m in methods if any(
            m in (BUDGET_METHODS if e == "budget" else TARGET_METHODS) for e in experiments)}
        score_all(catalog, workdir, wanted, s, args.target, reference, verbose)

        rows = []
        for experiment in experiments:
            names = [m for m in (BUDGET_METHODS if experiment == "budget" else TARGET_METHODS)
                     if m in methods]
            for seed in range(seeds):
                for m in names:
                    cfg, selected = method_config(c, experiment, m, seed, catalog, args.target,
                                                  args.fraction)
                    rec = train_once(cfg, run_dir(workdir, experiment, m, seed), verbose)
                    rows.append(record_row(experiment, m, seed, rec, args.target, selected))
        summary = summarise(rows)
        setup = {"size": args.size, **s, "seeds": seeds, "fraction": args.fraction,
                 "target": args.target, "reference": reference, "methods": methods,
                 "experiments": experiments,
                 "tokens_per_run": s["steps"] * s["batch_size"] * s["seq_len"],
                 "train_tokens": {d: int(train_split(catalog, d)[1].sum())
                                  for d in corpora.DOMAIN_NAMES}}
        write_json(workdir / "results.json", {"setup": setup, "runs": rows, "summary": summary},
                   indent=2)
        table = tables(summary, args.target)
        summary_lines = verdicts(summary, args.target)
        (workdir / "results.md").write_text(
            table + "\n\n#### Summary\n\n" + "\n".join(summary_lines) + "\n")
        plot(workdir, summary, args.target)
        print(table)
        print("\n".join(summary_lines))
        print(json.dumps({"setup": setup, "summary": summary}), file=sys.stdout)


if __name__ == "__main__":
    main()
