"""Batches outside the training stream: every document of a split for scoring, and the model
scorer that reads them end to end (train a tiny run, score a domain with it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loam.data import corpora, heldout, tokenized, views

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("objective", ["causal", "span_corruption"])
def test_document_batches_hold_every_document_whole(objective):
    split = tokenized.load("docs").validation
    batches = list(heldout.document_batches("docs", "validation", objective, 128, 4))
    again = list(heldout.document_batches("docs", split, objective, 128, 4))
    assert len(batches) == len(again) > 1
    for a, b in zip(batches, again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(b["targets"].shape == (4, 128) for b in batches)
    ids = np.concatenate([b["doc_ids"].ravel() for b in batches])
    seg = np.concatenate([b["segment_ids"].ravel() for b in batches])
    assert np.all((ids == -1) == (seg == 0))  # -1 exactly on padding
    assert set(ids[ids >= 0].tolist()) == set(np.asarray(split.doc_index).tolist())
    if objective == "causal":  # every token of every document, once (long ones in chunks)
        targets = np.concatenate([b["targets"].ravel() for b in batches])
        for i in range(split.num_documents):
            doc = np.asarray(split.tokens[split.offsets[i]:split.offsets[i + 1]])
            got = targets[ids == split.doc_index[i]]
            assert got.size == doc.size and np.array_equal(np.sort(got), np.sort(doc)), i
        assert split.lengths.max() > 128  # the case of a document longer than a row is covered


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                PYTHONPATH=str(ROOT))


def _run(*cmd):
    proc = subprocess.run([sys.executable, "-m", *cmd], env=_env(), capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.e2e
def test_model_scorer_writes_a_finite_column(tmp_path, reference_run):
    run, out = reference_run, tmp_path / "scores"
    proc = _run("loam.selection.score", "--scorer", "model", f"--workdir={run}",
                "--column", "ref_loss", "--domains", "docs", f"--out={out}")
    assert "ref_loss mean" in proc.stdout
    column = views.load_column("docs", "ref_loss", out)
    n_docs = sum(1 for _ in corpora.read_documents(corpora.corpus_path("docs")))
    corpus = tokenized.load("docs")
    scored = np.concatenate([corpus.train.doc_index, corpus.validation.doc_index])
    assert column.shape == (n_docs,) and scored.size == n_docs - corpus.dropped_documents
    assert np.all(np.isfinite(column[scored]))
    assert 0 < column[scored].min() and column[scored].max() < 2 * np.log(8192)
