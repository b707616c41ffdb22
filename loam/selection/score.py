"""Writes per-document score columns next to the corpora.

    python -m loam.selection.score --scorer heuristic                 # column `quality` + signals
    python -m loam.selection.score --scorer model --workdir RUN --column ref_loss [--step N]

`heuristic` scores text with Gopher/C4/FineWeb-style signals. `model` scores each document by the
mean per-token loss of a loam checkpoint (a small reference model): low loss = typical, high =
surprising. New scorers are functions `(domain, documents) -> {column: array}` added to SCORERS.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from loam import cli
from loam import run as run_lib
from loam.data import catalog as catalog_lib
from loam.data import corpora, heldout, objectives
from loam.selection import columns as columns_lib
from loam.selection import heuristics


def heuristic_scorer(domain: str, docs: list[tuple[str, str]], **_) -> dict[str, np.ndarray]:
    return heuristics.score_documents([t for _, t in docs])


def random_scorer(domain: str, docs: list[tuple[str, str]], **_) -> dict[str, np.ndarray]:
    """Column `random`: a uniform [0, 1) number from a hash of the document id. Keeping a range
    of it takes a reproducible random subset (e.g. the same documents in two orders)."""
    return {"random": np.array([int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "little")
                                / 2**64 for d, _ in docs], np.float32)}


def model_scorer(domain: str, docs: list[tuple[str, str]], workdir: str, column: str,
                 step: int | None = None, data_dir=None, **_) -> dict[str, np.ndarray]:
    """Mean loss (nats/token) of every document under the checkpoint; NaN for empty ones."""
    params, run = _cached_run(workdir, step)
    config, model = run.config, run.model
    objective = objectives.get_objective("causal")
    seq_len, batch_size = int(config.data.seq_len), int(config.eval_batch_size)

    @jax.jit
    def token_losses(params, b):
        logits = model.apply({"params": params}, b["inputs"], segment_ids=b["segment_ids"],
                             positions=b["positions"], prefix=b["prefix"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
        return nll * b["loss_weights"]

    total = np.zeros(len(docs))
    count = np.zeros(len(docs))
    catalog = catalog_lib.default(data_dir)
    for split in ("train", "validation"):
        for b in heldout.document_batches(domain, split, objective, seq_len, batch_size,
                                          catalog=catalog):
            nll = np.asarray(token_losses(params, {k: jnp.asarray(v) for k, v in b.items()}))
            ids, w = b["doc_ids"].reshape(-1), b["loss_weights"].reshape(-1)
            keep = ids >= 0
            np.add.at(total, ids[keep], nll.reshape(-1)[keep])
            np.add.at(count, ids[keep], w[keep])
    with np.errstate(invalid="ignore", divide="ignore"):
        return {column: np.where(count > 0, total / count, np.nan)}


_RUNS: dict = {}


def _cached_run(workdir, step):
    key = (str(workdir), step)
    if key not in _RUNS:
        params, run, _ = run_lib.load_params(workdir, step)
        _RUNS[key] = (params, run)
    return _RUNS[key]


SCORERS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "heuristic": heuristic_scorer, "random": random_scorer, "model": model_scorer}


def score(scorer: str, domains=corpora.DOMAIN_NAMES, data_dir=None, out=None, **kwargs):
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {sorted(SCORERS)}")
    written = {}
    for domain in domains:
        docs = list(corpora.read_documents(corpora.corpus_path(domain, data_dir)))
        cols = SCORERS[scorer](domain, docs, data_dir=data_dir, **kwargs)
        written[domain] = columns_lib.write_columns(domain, cols, out or data_dir, data_dir)
        summary = ", ".join(f"{k} mean {np.nanmean(v):.3f}" for k, v in cols.items()
                            if k in ("quality", "random", kwargs.get("column")))
        print(f"{domain:12s} {len(docs):6d} documents -> {written[domain]} ({summary})",
              flush=True)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scorer", required=True, choices=sorted(SCORERS))
    p.add_argument("--domains", default=",".join(corpora.DOMAIN_NAMES))
    p.add_argument("--data_dir", default=None, help="corpora (default: $LOAM_DATA_DIR or bundled)")
    p.add_argument("--out", default=None, help="where columns go (default: next to the corpora)")
    p.add_argument("--workdir", help="model scorer: the reference run")
    p.add_argument("--step", type=int, default=None, help="model scorer: checkpoint step")
    p.add_argument("--column", default="ref_loss", help="model scorer: column name")
    args = p.parse_args(argv)
    cli.quiet_logs()
    if args.scorer == "model" and not args.workdir:
        cli.fail("--scorer model needs --workdir of a trained loam run")
    with cli.user_errors():
        score(args.scorer, tuple(args.domains.split(",")), args.data_dir, args.out,
              workdir=args.workdir, step=args.step, column=args.column)


if __name__ == "__main__":
    main()
