"""Helpers shared by the end-to-end tests: launch `python -m loam.train` on a miniature run, read
its losses back, rewind a run directory to an earlier checkpoint.

Imported as `import helpers` (pyproject.toml puts tests/ on pytest's `pythonpath`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "loam/configs/default.py")
# A miniature run: nano model, short sequences, checkpoints every 4 steps.
SMALL = ["--config.model.size=nano", "--config.data.seq_len=64", "--config.data.batch_size=8",
         "--config.steps=12", "--config.optim.warmup_steps=2", "--config.log_every=1",
         "--config.checkpoint_every=4", "--config.eval_every=1000", "--config.eval_tokens=1024",
         "--config.keep_checkpoints=5"]


def env(devices: int = 8):
    """Environment of a subprocess: `devices` CPU devices, and loam importable from the checkout."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_train(workdir, *extra, devices=8, check=True, config=CONFIG, base=SMALL, **kw):
    cmd = [sys.executable, "-m", "loam.train", f"--config={config}", f"--workdir={workdir}",
           *base, *extra]
    proc = subprocess.run(cmd, env=env(devices), capture_output=True, text=True, timeout=600,
                          **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(workdir) -> dict[int, float]:
    out = {}
    for line in Path(workdir, "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # a resumed run overwrites the replayed steps
    return out


def rewind(workdir, step):
    """The state of a run killed right after its checkpoint at `step`."""
    for p in (workdir / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > step:
            shutil.rmtree(p)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    (workdir / "metrics.jsonl").write_text(
        "".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))


def run_scorer(scorer, docs, out_dir, workers: int = 1, **options) -> dict:
    """{(domain, index): columns} of a selection scorer's Beam transform over Doc records, run by
    the DirectRunner (``workers`` > 1: that many worker processes); ``options`` go to Beam's
    PipelineOptions."""
    import apache_beam as beam  # noqa: PLC0415  (only the selection tests need Beam)
    from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415

    flags = ([f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
             if workers > 1 else [])
    prefix = str(Path(out_dir) / "scored")
    with beam.Pipeline(options=PipelineOptions(flags=flags, **options)) as p:
        (scorer.expand(p | beam.Create(docs))
         | beam.Map(lambda s: json.dumps([s[0], s[1], s[2]]))
         | beam.io.WriteToText(prefix))
    out = {}
    for f in Path(out_dir).glob("scored*"):
        for line in f.read_text().splitlines():
            domain, index, cols = json.loads(line)
            out[domain, index] = cols
    return out


def corpus_docs(domain: str, n: int, start: int = 0) -> list:
    """Doc records of a bundled corpus's documents start..start+n (indices are their corpus
    positions; tokens: words + 1, a stand-in where no tokenizer is involved)."""
    from loam.data import corpora  # noqa: PLC0415
    from loam.selection.base import Doc  # noqa: PLC0415

    docs = list(corpora.read_documents(corpora.corpus_path(domain)))[start:start + n]
    return [Doc(domain, i, doc_id, "validation" if corpora.is_validation(doc_id) else "train",
                text, len(text.split()) + 1) for i, (doc_id, text) in enumerate(docs, start)]
