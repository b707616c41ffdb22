"""Near-duplicate detection: loam's MinHash dedup against datatrove's, on injected duplicates.

    python -m loam.bench.dedup [--documents 2000] [--datatrove_python .venv-bench/bin/python]

The corpus: ``--documents`` originals from the bundled prose domains (literature, dialogue,
docs; at least ``--min_words`` words each, no two with the same normalised text), taken in turn
from each domain, then copies of some of them appended with controlled edits, all by a seeded
random generator and recorded as the ground truth:

* near copies (``--near_fraction`` of the originals get one, ``--second_copy`` of those a
  second): 0, 0.5%, 1% or 2% of the words replaced by words of the corpus at random places, or
  only the case, spacing and punctuation changed (an exact duplicate after normalisation).
  For a long document, replacing a fraction f of the words keeps about (1 - f)^5 of the word
  5-grams: Jaccard similarity about 0.82 at f = 2%, well above the 14 x 8 LSH threshold (0.72);
* far copies (``--far_fraction`` of the originals): 25% of the words replaced (Jaccard about
  0.1): an edited copy that is not a duplicate.

An original and its near copies are one true cluster; far copies and the other originals are
singletons. Precision and recall are over pairs of documents: a predicted pair is two documents
in one predicted cluster, a true pair two in one true cluster. ``expected_recall`` is the mean,
over the true pairs, of the LSH detection probability 1 - (1 - s^8)^14 at their measured Jaccard
s (a lower bound in effect: clusters also join pairs through a third document).

Both sides use word 5-grams, 14 bands of 8 rows, seed 1, and the same word split (white space
after each side's own normalisation: loam's ``dedup.normalise``; datatrove's ``simplify_text``,
which also folds digits and diacritics, with a white-space word tokenizer instead of its NLTK
one, whose model would have to be downloaded). loam runs ``loam.selection.dedup.Dedup`` as a
Beam pipeline on the DirectRunner (``--workers``); datatrove runs its four MinHash stages
(signatures, buckets, clusters, filter) with its LocalPipelineExecutor on one task. Each side's
seconds are the wall time of its dedup alone (corpus written beforehand; interpreter start-up
and imports excluded); documents/s is the corpus size over them.

datatrove is found in ``--datatrove_python`` (an interpreter with datatrove installed, run on a
small script), else imported from this interpreter; without it, only loam's figures are
reported. Install it apart from loam's environment (its pins need not agree with loam's), with
the packages its MinHash and JSON-lines steps import (xxhash 4 breaks its string hashing)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install datatrove==0.10.1 'xxhash<4' orjson regex tokenizers

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from loam.data import corpora
from loam.selection import dedup
from loam.selection.base import Doc, ScorerError

PROSE_DOMAINS = ("literature", "dialogue", "docs")
NEAR_EDITS = (0.0, 0.005, 0.01, 0.02, "surface")
FAR_EDIT = 0.25
INSTALL_HINT = ("python3 -m venv .venv-bench && .venv-bench/bin/pip install datatrove==0.10.1 "
                "'xxhash<4' orjson regex tokenizers; then pass --datatrove_python "
                ".venv-bench/bin/python")


# ---------------------------------------------------------------------------------- corpus

def originals(n: int, min_words: int) -> list[tuple[str, str]]:
    """(id, text) of n documents taken in turn from the prose domains."""
    pools = {d: [(f"{d}:{i}", t) for i, t in corpora.read_documents(corpora.corpus_path(d))
                 if len(t.split()) >= min_words] for d in PROSE_DOMAINS}
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    cursor = dict.fromkeys(PROSE_DOMAINS, 0)
    while len(out) < n and any(cursor[d] < len(pools[d]) for d in PROSE_DOMAINS):
        for d in PROSE_DOMAINS:
            while cursor[d] < len(pools[d]) and len(out) < n:
                doc_id, text = pools[d][cursor[d]]
                cursor[d] += 1
                key = dedup.normalise(text)
                if key not in seen:
                    seen.add(key)
                    out.append((doc_id, text))
                    break
    return out


def replace_words(text: str, fraction: float, vocab: list[str], rng: random.Random) -> str:
    words = text.split()
    k = max(1, round(fraction * len(words))) if fraction > 0 else 0
    for i in rng.sample(range(len(words)), k):
        new = words[i]
        while new == words[i]:
            new = rng.choice(vocab)
        words[i] = new
    return " ".join(words)


def surface_edit(text: str, rng: random.Random) -> str:
    """Case, spacing and punctuation changed; the same words."""
    out = text.upper() if rng.random() < 0.5 else text.lower()
    return out.replace(",", " ,").replace(". ", ".\n\n").replace(";", "")


def build_corpus(args) -> tuple[list[dict], dict]:
    """Documents ({id, text}) and the ground truth."""
    rng = random.Random(args.seed)
    base = originals(args.documents, args.min_words)
    vocab = sorted({w for _, t in base for w in t.split() if w.isalpha()})
    docs = [{"id": doc_id, "text": text} for doc_id, text in base]
    truth_group = {d["id"]: d["id"] for d in docs}
    copies: list[dict] = []
    near = rng.sample(range(len(base)), round(args.near_fraction * len(base)))
    for i in near:
        for k in range(1 + (rng.random() < args.second_copy)):
            edit = rng.choice(NEAR_EDITS)
            text = (surface_edit(base[i][1], rng) if edit == "surface"
                    else replace_words(base[i][1], float(edit), vocab, rng))
            copies.append({"id": f"{base[i][0]}#near{k}", "of": base[i][0], "edit": edit,
                           "text": text, "duplicate": True})
    rest = sorted(set(range(len(base))) - set(near))
    for i in rng.sample(rest, min(len(rest), round(args.far_fraction * len(base)))):
        copies.append({"id": f"{base[i][0]}#far", "of": base[i][0], "edit": FAR_EDIT,
                       "text": replace_words(base[i][1], FAR_EDIT, vocab, rng),
                       "duplicate": False})
    rng.shuffle(copies)
    texts = {d["id"]: d["text"] for d in docs}
    for c in copies:
        c["jaccard"] = round(dedup.jaccard(texts[c["of"]], c["text"], args.ngram), 4)
        docs.append({"id": c["id"], "text": c.pop("text")})
        truth_group[c["id"]] = c["of"] if c["duplicate"] else c["id"]
    return docs, {"group": truth_group, "copies": copies}


# ---------------------------------------------------------------------------------- scoring

def pairs(sizes) -> int:
    return sum(s * (s - 1) // 2 for s in sizes)


def precision_recall(clusters: list[list[str]], truth_group: dict[str, str]) -> dict:
    """Pairwise precision and recall of predicted clusters against the true groups."""
    predicted = pairs(len(c) for c in clusters)
    correct = sum(pairs(Counter(truth_group[d] for d in c).values()) for c in clusters)
    true = pairs(Counter(truth_group.values()).values())
    return {"precision": correct / predicted if predicted else 1.0,
            "recall": correct / true if true else 1.0,
            "predicted_pairs": predicted, "correct_pairs": correct, "true_pairs": true}


# ---------------------------------------------------------------------------------- loam

def run_loam(docs: list[dict], args, workdir: Path) -> dict:
    import apache_beam as beam  # noqa: PLC0415
    from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415

    records = [Doc("bench", i, d["id"], "train", d["text"], 0) for i, d in enumerate(docs)]
    scorer = dedup.Dedup(ngram=args.ngram, bands=args.bands, rows=args.rows, seed=args.seed)
    flags = ["--default_sdk_harness_log_level=WARNING"]
    if args.workers > 1:
        flags += [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
    prefix = str(workdir / "loam" / "scored")
    start = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(flags)) as p:
        (scorer.expand(p | beam.Create(records))
         | beam.Map(lambda s: json.dumps([s[1], s[2]["dup_cluster"]]))
         | beam.io.WriteToText(prefix))
    seconds = time.perf_counter() - start
    members: dict[float, list[str]] = {}
    for f in sorted((workdir / "loam").glob("scored*")):
        for line in f.read_text().splitlines():
            index, cluster = json.loads(line)
            members.setdefault(cluster, []).append(docs[index]["id"])
    return {"seconds": seconds, "clusters": [m for m in members.values() if len(m) > 1]}


# ---------------------------------------------------------------------------------- datatrove

DATATROVE_SCRIPT = r'''
import json, sys, time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets,
    MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.word_tokenizers import WordTokenizer


class Whitespace(WordTokenizer):
    def word_tokenize(self, text):
        return text.split()

    def sent_tokenize(self, text):
        return [text]

    def span_tokenize(self, text):
        return [(0, len(text))]


spec = json.loads(sys.argv[1])
work = Path(spec["workdir"])
config = MinhashConfig(n_grams=spec["ngram"], num_buckets=spec["bands"],
                       hashes_per_bucket=spec["rows"], seed=spec["seed"])
tok = Whitespace()


def reader():
    return JsonlReader(str(Path(spec["corpus"]).parent), glob_pattern=Path(spec["corpus"]).name)


def run(steps):
    LocalPipelineExecutor(pipeline=steps, tasks=1, workers=1,
                          logging_dir=str(work / "logs" / str(time.monotonic_ns()))).run()


start = time.perf_counter()
run([reader(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=config,
                                     language=tok)])
LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=str(work / "sigs"),
                                                    output_folder=str(work / "buckets"),
                                                    config=config)],
                      tasks=config.num_buckets, workers=1,
                      logging_dir=str(work / "logs" / "buckets")).run()
run([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"),
                         config=config, save_cluster_id=True)])
run([reader(), MinhashDedupFilter(input_folder=str(work / "remove"), load_cluster_ids=True,
                                  exclusion_writer=JsonlWriter(str(work / "removed"))),
     JsonlWriter(str(work / "kept"))])
seconds = time.perf_counter() - start

import gzip
members = {}
for folder in ("kept", "removed"):
    for f in sorted((work / folder).glob("*")):
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rt") as fh:
            for line in fh:
                rec = json.loads(line)
                cluster = rec.get("metadata", {}).get("minhash_cluster_id", -1)
                if cluster != -1:
                    members.setdefault(cluster, []).append(rec["id"])
from importlib.metadata import version
print(json.dumps({"seconds": seconds, "clusters": list(members.values()),
                  "version": version("datatrove")}))
'''


def datatrove_interpreter(path: str | None) -> str | None:
    if path:
        return path
    return sys.executable if importlib.util.find_spec("datatrove") else None


def run_datatrove(python: str, corpus: Path, args, workdir: Path) -> dict:
    script = workdir / "datatrove_minhash.py"
    script.write_text(DATATROVE_SCRIPT)
    spec = {"workdir": str(workdir / "datatrove"), "corpus": str(corpus), "ngram": args.ngram,
            "bands": args.bands, "rows": args.rows, "seed": args.seed}
    proc = subprocess.run([python, str(script), json.dumps(spec)], capture_output=True,
                          text=True, env={**os.environ, "DATATROVE_COLORIZE_LOGS": "0"})
    if proc.returncode != 0:
        raise SystemExit(f"datatrove's MinHash run failed ({python}):\n{proc.stderr[-3000:]}\n"
                         f"install it with: {INSTALL_HINT}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--documents", type=int, default=2000, help="originals")
    p.add_argument("--min_words", type=int, default=100)
    p.add_argument("--near_fraction", type=float, default=0.2)
    p.add_argument("--second_copy", type=float, default=0.25,
                   help="chance that an original with a near copy gets a second one")
    p.add_argument("--far_fraction", type=float, default=0.1)
    p.add_argument("--ngram", type=int, default=5)
    p.add_argument("--bands", type=int, default=14)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="loam's DirectRunner workers")
    p.add_argument("--datatrove_python", default=None,
                   help="an interpreter with datatrove installed (default: this one, if it has "
                        "datatrove)")
    p.add_argument("--workdir", default=None, help="corpus and outputs (default: a temporary "
                                                   "directory, removed at the end)")
    args = p.parse_args(argv)
    if args.documents < 2 or args.min_words < args.ngram:
        p.error("--documents must be >= 2 and --min_words >= --ngram")
    for name in ("near_fraction", "second_copy", "far_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name} must be in [0, 1]")
    if args.near_fraction + args.far_fraction > 1:
        p.error("--near_fraction + --far_fraction must be at most 1")
    try:
        dedup.Dedup(ngram=args.ngram, bands=args.bands, rows=args.rows, seed=args.seed)
    except ScorerError as e:
        p.error(str(e))
    if args.datatrove_python and not shutil.which(args.datatrove_python):
        p.error(f"--datatrove_python {args.datatrove_python} is not an interpreter here; "
                f"install one with: {INSTALL_HINT}")

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dedup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        docs, truth = build_corpus(args)
        corpus = workdir / "corpus" / "corpus.jsonl"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (workdir / "ground_truth.json").write_text(json.dumps(truth["copies"], indent=1))
        near = [c for c in truth["copies"] if c["duplicate"]]
        far = [c for c in truth["copies"] if not c["duplicate"]]
        true_sims = [c["jaccard"] for c in near]
        report: dict = {
            "num_documents": len(docs), "originals": len(docs) - len(truth["copies"]),
            "injected_duplicates": len(near), "injected_far_copies": len(far),
            "near_jaccard_min": min(true_sims, default=None),
            "far_jaccard_max": max((c["jaccard"] for c in far), default=None),
            "ngram": args.ngram, "bands": args.bands, "rows": args.rows,
            "lsh_threshold": round(dedup.lsh_threshold(args.bands, args.rows), 4),
            "expected_recall": (sum(dedup.detection_probability(s, args.bands, args.rows)
                                    for s in true_sims) / len(true_sims)) if true_sims else None,
        }
        loam = run_loam(docs, args, workdir)
        scores = precision_recall(loam["clusters"], truth["group"])
        report.update({"loam_docs_per_s": len(docs) / loam["seconds"],
                       "loam_seconds": loam["seconds"], "loam_workers": args.workers,
                       "loam_precision": scores["precision"], "loam_recall": scores["recall"],
                       "loam_pairs": scores})
        python = datatrove_interpreter(args.datatrove_python)
        if python is None:
            print(f"datatrove is not installed; reporting loam only. To compare: {INSTALL_HINT}",
                  file=sys.stderr)
            report.update({"datatrove_docs_per_s": None, "datatrove_precision": None,
                           "datatrove_recall": None, "datatrove": "not installed"})
        else:
            dt = run_datatrove(python, corpus, args, workdir)
            scores = precision_recall(dt["clusters"], truth["group"])
            report.update({"datatrove_docs_per_s": len(docs) / dt["seconds"],
                           "datatrove_seconds": dt["seconds"],
                           "datatrove_precision": scores["precision"],
                           "datatrove_recall": scores["recall"], "datatrove_pairs": scores,
                           "datatrove": dt["version"]})
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
