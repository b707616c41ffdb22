"""DSIR: loam's Beam scorer against the authors' ``data-selection`` package, same data and seed.

    python -m loam.bench.dsir [--reference_python .venv-bench/bin/python]
    python -m loam.bench.dsir --raw_domains docs,code --max_docs 40 --fraction 0.25   # toy size

Raw documents: the bundled corpora of ``--raw_domains`` (the first ``--max_docs`` of each, 0 =
all); target: ``--target`` (a domain, ``DOMAIN:validation`` or a JSON-lines file, as the
scorer's ``target=``). Both sides hash unigrams and bigrams of the same lower-cased word tokens
into ``--num_buckets`` buckets with sha256, add ``--smoothing`` pseudo-counts to the target
counts (default 0: the released 1.0.3 does not smooth; later versions of the package take
``target_laplace_smoothing``, passed when present) and fit on every token (the package's
``num_tokens_to_fit="all"``, ``min_example_length=0`` so that no document is filtered out,
``tokenizer="wordpunct"``).

Measured:
- ``loam_docs_per_s``: documents over the wall seconds of ``loam.selection.dsir.DSIR`` run as a
  Beam pipeline on the DirectRunner with ``--workers`` workers (target counts, raw counts,
  weights; the documents handed over in memory, the weights written to a temporary file);
  ``loam_inmemory_docs_per_s`` the same computation as one loop (``dsir.importance_weights``);
- ``reference_docs_per_s``: documents over the seconds of the package's
  ``fit_importance_estimator`` + ``compute_importance_weights`` with ``num_proc=--workers``, on
  the same documents written beforehand as uncompressed JSON lines;
- ``logw_max_abs_diff``: the largest difference of the two sides' log-weights (float64 both);
- ``selection_overlap``: |A & B| / k of the k = ``--fraction`` x documents each side draws by
  Gumbel top-k at ``--seed`` (loam: ``dsir.resample``; the package: ``resample`` after
  ``np.random.seed(seed)``). With one worker the package draws its noise in document order, as
  loam does, so equal weights give the same selection; with more, it draws in its virtual-shard
  order and the overlap is that of two independent samples. ``topk_overlap``: the same for the
  deterministic top k (``top_k=True``), any worker count.

The package is run by ``--reference_python`` (an interpreter with it installed: this file is
run there as a script, without importing loam), else imported from this interpreter if it is
installed; without it only loam's figures are reported. Install it apart from loam's
environment::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install data-selection==1.0.3

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loam.data import corpora
from loam.selection import dsir
from loam.selection.base import Doc

INSTALL_HINT = ("python3 -m venv .venv-bench && .venv-bench/bin/pip install "
                "data-selection==1.0.3, then --reference_python .venv-bench/bin/python")


# --------------------------------------------------------------------------- the package's side
# Runs in the reference interpreter: standard library, numpy and data_selection only.

def reference(raw_path: str, target_path: str, workdir: str, num_buckets: int,
              smoothing: float, workers: int, k: int, seed: int) -> dict:
    import data_selection  # noqa: PLC0415
    from data_selection import HashedNgramDSIR  # noqa: PLC0415

    n = sum(1 for line in open(raw_path) if line.strip())
    extra = {}
    if "target_laplace_smoothing" in inspect.signature(HashedNgramDSIR).parameters:
        extra["target_laplace_smoothing"] = smoothing
    elif smoothing:
        raise SystemExit(f"data-selection {data_selection.__version__} has no target smoothing "
                         "(its target counts are not smoothed): compare with --smoothing 0")
    t0 = time.perf_counter()
    ds = HashedNgramDSIR([raw_path], [target_path], cache_dir=os.path.join(workdir, "cache"),
                         num_proc=workers, ngrams=2, num_buckets=num_buckets,
                         tokenizer="wordpunct", min_example_length=0, **extra)
    ds.fit_importance_estimator(num_tokens_to_fit="all")
    ds.compute_importance_weights()
    seconds = time.perf_counter() - t0
    # The weights, in document order (shard j holds documents j, j + S, j + 2S, ...).
    shards = ds._get_virtually_sharded_datasets(ds.raw_datasets)
    logw = np.empty(n)
    for s in shards:
        w = np.load(os.path.join(workdir, "cache", "log_importance_weights",
                                 f"{s['overall_idx']}.npy"))
        logw[s["shard_idx"]::s["num_shards"]] = w

    def selected(name, top_k):
        np.random.seed(seed)
        out = os.path.join(workdir, name)
        ds.resample(out_dir=out, num_to_sample=k, cache_dir=out + ".tmp", top_k=top_k)
        ids = []
        for f in sorted(Path(out).glob("*.jsonl")):
            ids += [json.loads(line)["id"] for line in open(f) if line.strip()]
        return ids

    return {"seconds": seconds, "docs": n, "logw": logw.tolist(),
            "gumbel": selected("gumbel", False), "topk": selected("topk", True),
            "version": data_selection.__version__}


def _run_reference(python: str | None, args: dict) -> dict | None:
    if python:
        proc = subprocess.run([python, os.path.abspath(__file__), "--reference-worker",
                               json.dumps(args)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the reference run failed ({python}):\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    if importlib.util.find_spec("data_selection") is not None:
        return reference(**args)
    return None


# --------------------------------------------------------------------------- loam's side

def _loam_beam(docs, target: str, num_buckets: int, smoothing: float, workers: int,
               workdir: str) -> tuple[np.ndarray, float]:
    import apache_beam as beam  # noqa: PLC0415
    from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415


    scorer = dsir.DSIR(target=target, num_buckets=num_buckets, smoothing=smoothing)
    scorer.check(None)
    options = PipelineOptions(flags=[], direct_num_workers=workers,
                              direct_running_mode="multi_processing" if workers > 1
                              else "in_memory")
    prefix = os.path.join(workdir, "loam_weights")
    t0 = time.perf_counter()
    with beam.Pipeline(options=options) as p:
        (scorer.expand(p | beam.Create(docs))
         | beam.Map(lambda s: f"{s[1]}\t{s[2]['dsir_logw']!r}")
         | beam.io.WriteToText(prefix))
    seconds = time.perf_counter() - t0
    logw = np.full(len(docs), np.nan)
    for f in Path(workdir).glob("loam_weights*"):
        for line in f.read_text().splitlines():
            i, w = line.split("\t")
            logw[int(i)] = float(w)
    return logw, seconds


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--reference-worker"]:
        # Run as a script by the reference interpreter: keep this file's folder (loam/bench,
        # whose module names are generic) off the import path.
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
        print(json.dumps(reference(**json.loads(argv[1]))))
        return 0

    parser = argparse.ArgumentParser(prog="python -m loam.bench.dsir", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw_domains", default="literature,dialogue,code,docs,reference")
    parser.add_argument("--max_docs", type=int, default=0, help="per raw domain (0: all)")
    parser.add_argument("--target", default="code:validation")
    parser.add_argument("--num_buckets", type=int, default=10_000)
    parser.add_argument("--smoothing", type=float, default=0.0,
                        help="target pseudo-counts (data-selection 1.0.3 has none: 0)")
    parser.add_argument("--fraction", type=float, default=0.1, help="k = fraction x documents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reference_python", default=None,
                        help="an interpreter with data-selection installed")
    args = parser.parse_args(argv)


    docs: list = []
    for domain in args.raw_domains.split(","):
        for j, (doc_id, text) in enumerate(corpora.read_documents(corpora.corpus_path(domain))):
            if args.max_docs and j >= args.max_docs:
                break
            docs.append(Doc(domain, len(docs), doc_id, "train", text, 0))
    target = dsir.Target.parse(args.target)
    target_texts = list(target.texts())
    n = len(docs)
    k = max(1, round(args.fraction * n))
    print(json.dumps({"docs": n, "target_docs": len(target_texts), "k": k}), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        logw, seconds = _loam_beam(docs, args.target, args.num_buckets, args.smoothing,
                                   args.workers, tmp)
        t0 = time.perf_counter()
        inmemory = dsir.importance_weights([d.text for d in docs], target_texts,
                                           args.num_buckets, smoothing=args.smoothing)
        inmemory_seconds = time.perf_counter() - t0
        if not np.allclose(logw, inmemory, rtol=1e-9, atol=1e-9):
            raise SystemExit("loam's Beam weights differ from its in-memory weights")
        ids = [d.doc_id for d in docs]
        mine = {ids[i] for i in dsir.resample(logw, k, args.seed)}
        mine_top = {ids[i] for i in dsir.resample(logw, k, top_k=True)}
        report: dict = {
            "docs": n, "target": args.target, "target_docs": len(target_texts), "k": k,
            "seed": args.seed, "workers": args.workers, "num_buckets": args.num_buckets,
            "smoothing": args.smoothing,
            "loam_seconds": seconds, "loam_docs_per_s": n / seconds,
            "loam_inmemory_docs_per_s": n / inmemory_seconds,
        }

        raw_path, target_path = os.path.join(tmp, "raw.jsonl"), os.path.join(tmp, "target.jsonl")
        with open(raw_path, "w") as f:
            f.writelines(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in docs)
        with open(target_path, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in target_texts)
        ref = _run_reference(args.reference_python, {
            "raw_path": raw_path, "target_path": target_path, "workdir": tmp,
            "num_buckets": args.num_buckets, "smoothing": args.smoothing,
            "workers": args.workers, "k": k, "seed": args.seed})

    if ref is None:
        report.update({"reference": None, "reference_docs_per_s": None,
                       "selection_overlap": None, "topk_overlap": None,
                       "logw_max_abs_diff": None,
                       "reference_missing": f"data-selection is not installed here: "
                                            f"{INSTALL_HINT}"})
    else:
        theirs, theirs_top = set(ref["gumbel"]), set(ref["topk"])
        ref_logw = np.asarray(ref["logw"])
        report.update({
            "reference": f"data-selection {ref['version']}",
            "reference_seconds": ref["seconds"],
            "reference_docs_per_s": ref["docs"] / ref["seconds"],
            "logw_max_abs_diff": float(np.max(np.abs(ref_logw - logw))),
            "selection_overlap": len(mine & theirs) / k,
            "selection_jaccard": len(mine & theirs) / len(mine | theirs),
            "topk_overlap": len(mine_top & theirs_top) / k,
        })
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
