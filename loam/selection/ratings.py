"""QuRating-style ratings (Wettig et al. 2024): Bradley-Terry scores fitted from pairwise judgments.

A judgments file is JSON lines, one comparison each: ``{"a": ID, "b": ID, "p": P(a better than
b)}`` (a soft label in [0, 1]) or ``{"winner": ID, "loser": ID}`` (p = 1), IDs being document
ids of the source, optionally with ``"judge"`` saying who judged. The model is
P(a beats b) = sigmoid(s_a - s_b); the scores maximise

    sum_k [p_k log sigmoid(s_a - s_b) + (1 - p_k) log sigmoid(s_b - s_a)] - l2/2 * sum_i s_i^2

(L-BFGS on this convex objective, a few hundred iterations at most). The L2 term is a Gaussian
prior N(0, 1/l2) on every score: it fixes the offset that the likelihood cannot see (at the
optimum the scores sum to zero, since the likelihood's gradient sums to zero over documents) and
keeps the scale finite when a document wins or loses all its comparisons (the pure maximum
likelihood would send it to infinity). Column ``rating`` holds the fitted score of every judged
document; a document without judgments is left unscored (NaN in the column store).

QuRating selects by sampling with the ratings as logits at temperature tau (tau = 2 in the
paper; tau -> 0 is top-k): that is the shared Gumbel top-k policy,
``config.data.selection[domain] = {"score": "rating", "policy": "gumbel", "temperature": 2.0,
"fraction": ...}``.

QuRating's judge is a large language model asked which of two texts has more of a quality.
Here, judgments can also be made from a reference model's losses or from the heuristic quality
signals, labelled as such in every line (``judge``) and in the column's manifest::

    python -m loam.selection.ratings judge --from heuristic --out judgments.jsonl [--pairs N]
    python -m loam.selection.ratings judge --from loss --workdir RUN --out judgments.jsonl

(p = sigmoid((v_a - v_b) / scale), v the heuristic ``quality`` or minus the mean per-token loss,
scale the standard deviation of v over the documents judged.)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize
import scipy.special

from loam import cli
from loam.data import catalog as catalog_lib
from loam.data import corpora
from loam.data import sources as sources_lib
from loam.selection import heuristics, perplexity
from loam.selection.base import Scorer, ScorerError, register


@dataclasses.dataclass(frozen=True)
class Judgments:
    ids: tuple[str, ...]   # the documents judged, in order of first appearance
    a: np.ndarray          # index into ids of each comparison's first document
    b: np.ndarray
    p: np.ndarray          # P(a better than b)
    judges: tuple[str, ...]


def _fail(path, lineno, what):
    raise ScorerError(f"{path}:{lineno}: {what}; each line is {{\"a\": ID, \"b\": ID, \"p\": "
                      "P(a better than b)}} or {{\"winner\": ID, \"loser\": ID}}")


def read_judgments(path: str) -> Judgments:
    """Parses and checks a judgments file; ScorerError naming file:line and the fix."""
    p = Path(path)
    if not path or not p.exists():
        raise ScorerError(f"judgments file {path!r} does not exist; write one (JSON lines of "
                          "{\"a\", \"b\", \"p\"}) or make one with `python -m "
                          "loam.selection.ratings judge --from heuristic --out FILE`")
    index: dict[str, int] = {}
    a_list: list[int] = []
    b_list: list[int] = []
    p_list: list[float] = []
    judges: dict[str, None] = {}
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                _fail(path, lineno, "not JSON")
            if not isinstance(r, dict):
                _fail(path, lineno, "not a JSON object")
            if "winner" in r or "loser" in r:
                a, b, prob = r.get("winner"), r.get("loser"), 1.0
            else:
                a, b, prob = r.get("a"), r.get("b"), r.get("p")
            if not isinstance(a, str) or not isinstance(b, str):
                _fail(path, lineno, "the two document ids must be strings")
            if isinstance(prob, bool) or not isinstance(prob, (int, float)):
                _fail(path, lineno, f"p must be a number in [0, 1], got {prob!r}")
            if not 0.0 <= prob <= 1.0:  # also refuses NaN
                _fail(path, lineno, f"p must be a number in [0, 1], got {prob!r}")
            if a == b:
                _fail(path, lineno, f"a document ({a!r}) compared with itself")
            judges[str(r.get("judge", "unlabelled"))] = None
            a_list.append(index.setdefault(a, len(index)))
            b_list.append(index.setdefault(b, len(index)))
            p_list.append(float(prob))
    if not p_list:
        raise ScorerError(f"judgments file {path} has no judgments; add lines of "
                          "{\"a\", \"b\", \"p\"} or {\"winner\", \"loser\"}")
    return Judgments(tuple(index), np.asarray(a_list, np.int64), np.asarray(b_list, np.int64),
                     np.asarray(p_list, np.float64), tuple(judges))


def fit_bradley_terry(a, b, p, n: int, l2: float = 0.01, max_iter: int = 500) -> np.ndarray:
    """MAP Bradley-Terry scores of n documents from comparisons (a[k], b[k], p[k])."""

    if not l2 > 0:
        raise ScorerError(f"l2 must be > 0 (the prior fixes the scores' offset and scale), got "
                          f"{l2}")
    a, b, p = np.asarray(a), np.asarray(b), np.asarray(p, np.float64)

    def value_and_grad(s):
        d = s[a] - s[b]
        value = np.sum(p * np.logaddexp(0.0, -d) + (1 - p) * np.logaddexp(0.0, d))
        r = scipy.special.expit(d) - p
        grad = np.bincount(a, r, n) - np.bincount(b, r, n) + l2 * s
        return value + 0.5 * l2 * s @ s, grad

    res = scipy.optimize.minimize(value_and_grad, np.zeros(n), jac=True, method="L-BFGS-B",
                                  options={"maxiter": max_iter, "gtol": 1e-9, "ftol": 1e-15})
    scores = res.x
    if not np.all(np.isfinite(scores)):
        raise ScorerError("the Bradley-Terry fit gave non-finite scores; check the judgments "
                          "or raise l2")
    return scores


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_known(found: list[str], ids: Sequence[str]) -> None:
    """Refuses judgments naming documents the run does not score."""
    unknown = sorted(set(ids) - set(found))
    if unknown:
        raise ScorerError(
            f"{len(unknown)} judged document id(s) are not among the scored documents, e.g. "
            f"{', '.join(repr(u) for u in unknown[:5])}; judgments must name the source's "
            "document ids of the domains being scored (score those domains too, or drop "
            "those lines)")


@register
@dataclasses.dataclass
class Ratings(Scorer):
    """Column ``rating``: Bradley-Terry scores from a judgments file."""

    name = "ratings"
    columns = ("rating",)

    judgments: str = ""
    l2: float = 0.01
    max_iter: int = 500

    def check(self, catalog) -> None:
        if self.max_iter < 1:
            raise ScorerError(f"ratings max_iter must be >= 1, got {self.max_iter}")
        self._fit()

    def _fit(self) -> tuple[Judgments, dict[str, float]]:
        if getattr(self, "_fitted", None) is None:
            j = read_judgments(self.judgments)
            scores = fit_bradley_terry(j.a, j.b, j.p, len(j.ids), self.l2, self.max_iter)
            self._fitted = (j, dict(zip(j.ids, scores.tolist())))
        return self._fitted

    def inputs(self) -> dict[str, str]:
        j, _ = self._fit()
        return {"judgments": f"{self.judgments} (sha256 {file_sha256(self.judgments)})",
                "judge": ", ".join(j.judges)}

    def expand(self, docs):
        import apache_beam as beam  # noqa: PLC0415

        j, scores = self._fit()
        ids = j.ids
        found = (docs
                 | "RatingsJudged" >> beam.Filter(lambda d, s: d.doc_id in s, s=scores)
                 | "RatingsIds" >> beam.Map(lambda d: d.doc_id)
                 | "RatingsFound" >> beam.combiners.ToList())
        checked = found | "RatingsCheck" >> beam.Map(lambda f: _check_known(f, ids))
        return (docs
                | "RatingsScore" >> beam.FlatMap(
                    lambda d, s, _: [(d.domain, d.index, {"rating": s[d.doc_id]})]
                    if d.doc_id in s else [],
                    s=scores, _=beam.pvalue.AsSingleton(checked)))

    def report(self, domain: str, columns: Mapping[str, Any], tokens: Any) -> dict | None:
        r = np.asarray(columns["rating"], np.float64)
        judged = np.isfinite(r)
        if not judged.any():
            return None
        return {"documents": int(r.size), "judged": int(judged.sum()),
                "mean": float(r[judged].mean()), "std": float(r[judged].std())}


# --------------------------------------------------------------------------- judging

def pair_judgments(ids: Sequence[str], values, pairs: int, seed: int, judge: str,
                   scale: float | None = None) -> list[dict]:
    """``pairs`` comparisons of distinct random documents, p = sigmoid((v_a - v_b) / scale)."""
    v = np.asarray(values, np.float64)
    bad = [ids[i] for i in np.flatnonzero(~np.isfinite(v))[:5]]
    if bad:
        raise ScorerError(f"{int((~np.isfinite(v)).sum())} document(s) have a NaN or infinite "
                          f"value to judge by, e.g. {bad}; drop them (empty documents?) or fix "
                          "the scores")
    if len(ids) < 2:
        raise ScorerError(f"need at least two documents to compare, got {len(ids)}")
    scale = float(scale if scale else v.std())
    if not scale > 0:
        raise ScorerError("every document has the same value: there is nothing to judge")
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(ids), pairs)
    b = (a + rng.integers(1, len(ids), pairs)) % len(ids)  # never a itself
    out = []
    for i, k in zip(a.tolist(), b.tolist()):
        prob = 1.0 / (1.0 + math.exp(-(v[i] - v[k]) / scale))
        out.append({"a": ids[i], "b": ids[k], "p": round(prob, 6), "judge": judge})
    return out


def _documents(domains: Sequence[str], max_docs: int, data_dir=None):

    catalog = catalog_lib.default(data_dir)
    docs: list[tuple[str, str]] = []
    for domain in domains:
        for k, doc in enumerate(sources_lib.read_documents(catalog.source(domain))):
            if max_docs and k >= max_docs:
                break
            docs.append(doc)
    return docs


def judge(source: str, out: str, domains: Sequence[str], pairs: int, seed: int = 0,
          max_docs: int = 0, workdir: str | None = None, step: int | None = None,
          scale: float | None = None, data_dir=None) -> int:
    """Writes generated judgments; returns how many."""
    docs = _documents(domains, max_docs, data_dir)
    ids = [d for d, _ in docs]
    if source == "heuristic":
        values = heuristics.score_documents(t for _, t in docs)["quality"]
        label = "heuristic:quality (generated, not a human or LLM judge)"
    elif source == "loss":
        if not workdir:
            raise ScorerError("judge --from loss needs --workdir RUN (a trained loam run)")
        model = perplexity.DocumentLoss(workdir, step)
        values = -np.array([model.loss(t)[0] for _, t in docs])
        label = (f"loss:{workdir}@{model.step} (generated from a reference model's per-token "
                 "loss, lower = better; not a human or LLM judge)")
    else:
        raise ScorerError(f"judge --from {source!r}: use loss or heuristic")
    lines = pair_judgments(ids, values, pairs, seed, label, scale)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    tmp.replace(path)
    return len(lines)


def main(argv=None):

    parser = argparse.ArgumentParser(prog="python -m loam.selection.ratings",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    j = sub.add_parser("judge", help="generate pairwise judgments from losses or heuristics")
    j.add_argument("--from", dest="source", required=True, choices=("loss", "heuristic"))
    j.add_argument("--out", required=True, help="the judgments file to write (JSON lines)")
    j.add_argument("--domains", default=",".join(corpora.DOMAIN_NAMES))
    j.add_argument("--pairs", type=int, default=10_000)
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--max_docs", type=int, default=0, help="per domain, the first N (0: all)")
    j.add_argument("--workdir", help="--from loss: the reference run")
    j.add_argument("--step", type=int, default=None, help="--from loss: checkpoint step")
    j.add_argument("--scale", type=float, default=None,
                   help="p = sigmoid(difference / scale) (default: the values' std)")
    j.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    cli.quiet_logs()
    if args.pairs < 1:
        cli.fail(f"--pairs must be >= 1, got {args.pairs}")
    with cli.user_errors():
        n = judge(args.source, args.out, args.domains.split(","), args.pairs, args.seed,
                  args.max_docs, args.workdir, args.step, args.scale, args.data_dir)
        print(json.dumps({"judgments": n, "out": args.out, "from": args.source}))


if __name__ == "__main__":
    main()
