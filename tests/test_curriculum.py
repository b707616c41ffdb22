"""Curricula: stage switching, interpolation, planned vs realised tokens, ordered and filtered
document streams, resume across a stage boundary and with an edited future, checkpoint
averaging, and the bad inputs of each."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from loam.data import objectives, views, weights
from loam.data import stream as stream_lib

from helpers import ROOT, env, losses, rewind, run_train

DOMAINS = ["literature", "dialogue", "code", "docs", "reference"]


def make_config(stages, steps=100, interpolate=False, schedule="wsd"):
    c = ml_collections.ConfigDict()
    c.steps = steps
    c.data = ml_collections.ConfigDict(dict(domains=DOMAINS, weights="uniform", seq_len=64,
                                            batch_size=10, dir="", stages=stages,
                                            interpolate=interpolate))
    c.optim = ml_collections.ConfigDict(dict(schedule=schedule, warmup_steps=10,
                                             decay_fraction=0.2))
    return c


def stream_for(schedule, batch_size=10, seq_len=64):
    return stream_lib.MixtureStream(DOMAINS, objectives.get_objective("causal"), schedule,
                                    seq_len=seq_len, batch_size=batch_size, seed=3)


TWO_STAGES = [dict(name="a", start=0, weights="uniform"),
              dict(name="b", start="lr:decay", weights={"code": 1.0})]


def test_stage_switches_at_the_exact_step():
    sched = weights.source_from_config(make_config(TWO_STAGES))
    assert [s.start for s in sched.stages] == [0, 80]  # wsd decays over the last 20%
    stream = stream_for(sched)
    assert np.allclose(stream.weights_at(79), 0.2)
    assert stream.weights_at(80).tolist() == [0, 0, 1, 0, 0]
    code = DOMAINS.index("code")
    assert stream.rows_at(80)[code] == 10 and stream.rows_at(80).sum() == 10
    assert stream.rows_at(79)[code] < 10
    batch = stream.batch(80)
    assert set(np.unique(batch["domain_ids"]).tolist()) == {2}
    # Changing the run length moves the stage with the learning-rate schedule.
    assert weights.source_from_config(make_config(TWO_STAGES, steps=300)).stages[1].start \
        == 240


def test_fractional_and_percent_starts_and_interpolation():
    stages = [dict(name="a", start=0, weights={"literature": 1.0}),
              dict(name="b", start="50%", weights={"code": 1.0}),
              dict(name="c", start=0.9, weights={"code": 1.0})]
    sched = weights.source_from_config(make_config(stages, interpolate=True))
    assert [s.start for s in sched.stages] == [0, 50, 90]
    w = sched.weights_at(25)
    assert w[0] == pytest.approx(0.5) and w[2] == pytest.approx(0.5)
    assert sched.weights_at(50)[2] == pytest.approx(1.0)
    flat = weights.source_from_config(make_config(stages, interpolate=False))
    assert flat.weights_at(49)[0] == 1.0 and flat.weights_at(50)[2] == 1.0


def test_realised_rows_and_tokens_follow_the_plan():
    stages = [dict(name="a", start=0, weights={"literature": 3, "code": 1}),
              dict(name="b", start=40, weights={"docs": 1, "reference": 1})]
    sched = weights.source_from_config(make_config(stages))
    stream = stream_for(sched)
    for t in (1, 17, 40, 41, 77, 100):
        planned = 10 * sum(sched.weights_at(s) for s in range(t))
        realised = stream.rows_consumed(t)
        assert np.all(np.abs(realised - planned) <= 1.0), (t, realised, planned)
    stats = stream.stats(100)
    tokens = np.array(stats["tokens"], float)
    # Non-padding tokens: rows × seq_len less a small padding share.
    assert np.all(tokens <= np.array(stats["rows"]) * 64)
    assert np.all(tokens >= np.array(stats["rows"]) * 64 * 0.8)


def test_ordered_stage_streams_documents_in_score_order():
    stages = [dict(name="a", start=0, weights={"literature": 1.0},
                   order={"literature": "quality:asc"})]
    stream = stream_for(weights.source_from_config(make_config(stages)))
    quality = views.load_column("literature", "quality")
    seen = []
    for t in range(6):
        b = stream.batch(t)
        for row_docs in b["doc_ids"]:
            seen.extend(dict.fromkeys(int(d) for d in row_docs if d >= 0))
    scores = quality[seen]
    # Packing may put a later, shorter chunk into an earlier row's gap: allow that slack.
    assert np.mean(np.diff(scores) >= 0) > 0.8
    assert scores[0] <= np.percentile(quality, 5)
    desc = [dict(name="a", start=0, weights={"literature": 1.0},
                 order={"literature": "quality:desc"})]
    first = stream_for(weights.source_from_config(make_config(desc))).batch(0)
    top = [int(d) for d in first["doc_ids"][0] if d >= 0][0]
    assert quality[top] >= np.percentile(quality, 95)


def test_keep_quantile_range_filters_documents():
    stages = [dict(name="a", start=0, weights={"code": 1.0}, keep={"code": "quality:0.5:1.0"})]
    stream = stream_for(weights.source_from_config(make_config(stages)))
    quality = views.load_column("code", "quality")
    from loam.data import tokenized
    train_docs = np.asarray(tokenized.load("code").train.doc_index)
    median = np.median(quality[train_docs])
    docs = {int(d) for t in range(20) for d in stream.batch(t)["doc_ids"].ravel() if d >= 0}
    assert docs and all(quality[d] >= median - 1e-6 for d in docs)


def test_default_views_continue_across_stages_without_repeating():
    """Switching to an ordered view and back resumes the shuffled stream where it stopped."""
    stages = [dict(name="a", start=0, weights={"docs": 1.0}),
              dict(name="b", start=5, weights={"docs": 1.0}, order={"docs": "quality:asc"}),
              dict(name="c", start=10, weights={"docs": 1.0})]
    staged = stream_for(weights.source_from_config(make_config(stages)))
    plain = stream_for(weights.constant({"docs": 1.0, "literature": 0.0, "dialogue": 0.0,
                                         "code": 0.0, "reference": 0.0}))
    for t in range(5):
        assert np.array_equal(staged.batch(t)["doc_ids"], plain.batch(t)["doc_ids"])
    assert np.array_equal(staged.batch(10)["doc_ids"], plain.batch(5)["doc_ids"])


@pytest.mark.parametrize("stages, message", [
    ([dict(name="a", start=10, weights="uniform")], "must start at step 0"),
    ([dict(name="a", start=0, weights="uniform"), dict(name="b", start=0, weights="uniform")],
     "out of order or overlapping"),
    ([dict(name="a", start=0, weights="uniform"), dict(name="b", start=50, weights="uniform"),
      dict(name="c", start=20, weights="uniform")], "out of order or overlapping"),
    ([dict(name="a", start=0, weights={"poetry": 1.0})], "unknown domain(s) ['poetry']"),
    ([dict(name="a", start=0, weights={"code": -1.0})], "non-negative"),
    ([dict(name="a", start=0, weights="uniform"), dict(name="b", start="lr:nope",
                                                         weights="uniform")], "names no phase"),
    ([dict(name="a", start=0, weights="uniform"), dict(name="b", start=100, weights="uniform")],
     "at or after the end of training"),
    ([dict(name="a", start=0, weights="uniform", order={"code": "quality:sideways"})],
     "'column:asc' or 'column:desc'"),
    ([dict(name="a", start=0)], "has no weights"),
])
def test_bad_stages_are_refused(stages, message):
    with pytest.raises(ValueError) as e:
        weights.source_from_config(make_config(stages))
    assert message in str(e.value)


def test_missing_column_and_empty_quantile_are_refused():
    missing = [dict(name="a", start=0, weights="uniform", order={"code": "no_such_score:asc"})]
    with pytest.raises(views.ColumnError, match="score column 'no_such_score' does not exist"):
        stream_for(weights.source_from_config(make_config(missing)))
    empty = [dict(name="a", start=0, weights="uniform", keep={"code": "quality:0.5:0.5000001"})]
    with pytest.raises(ValueError, match="keeps no documents"):
        stream_for(weights.source_from_config(make_config(empty)))


# ----------------------------------------------------------------------------- end to end

CUR = str(ROOT / "loam/configs/curriculum.py")
RUN = ["--config.model.size=nano", "--config.data.seq_len=64", "--config.data.batch_size=8",
       "--config.steps=10", "--config.optim.warmup_steps=2", "--config.checkpoint_every=2",
       "--config.eval_every=1000", "--config.eval_tokens=512", "--config.keep_checkpoints=10"]


def run(workdir, *extra, config=CUR, check=True):
    return run_train(workdir, *extra, config=config, base=RUN, check=check)


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory):
    w = tmp_path_factory.mktemp("cur")
    run(w)
    return w


@pytest.mark.e2e
def test_curriculum_config_logs_weights_lr_and_stage_at_80_percent(curriculum_run):
    recs = [json.loads(l) for l in (curriculum_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 11))
    for r in recs:
        assert {"step", "lr", "mixture_weights", "tokens_planned", "tokens_consumed"} <= set(r)
    # Record for step s describes the update made at step index s-1; stage 2 starts at 8.
    assert recs[7]["mixture_weights"]["code"] == pytest.approx(0.2)
    assert recs[8]["mixture_weights"]["code"] == pytest.approx(3 / 9)
    assert recs[9]["lr"] < recs[8]["lr"] == recs[7]["lr"]  # decay starts with stage 2
    png = curriculum_run / "schedule.png"
    assert png.exists() and png.stat().st_size > 1000


@pytest.mark.e2e
def test_resume_across_a_stage_boundary_is_exact(curriculum_run, tmp_path):
    w = tmp_path / "run"
    shutil.copytree(curriculum_run, w)
    rewind(w, 6)  # stopped in stage 1, resumed into stage 2
    run(w)
    ref, got = losses(curriculum_run), losses(w)
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), s


@pytest.mark.e2e
def test_resume_with_an_edited_future_and_a_refused_past(curriculum_run, tmp_path):
    w = tmp_path / "run"
    shutil.copytree(curriculum_run, w)
    rewind(w, 6)
    # Edit the future: a late stage at step 9 that only trains on docs.
    edited = tmp_path / "edited.py"
    edited.write_text(
        "from loam.configs import curriculum\n"
        "def get_config(arg=None):\n"
        "    c = curriculum.get_config(arg)\n"
        "    c.data.stages = list(c.data.stages) + [dict(name='late', start=9,\n"
        "                                                 weights={'docs': 1.0})]\n"
        "    return c\n")
    proc = run(w, config=str(edited))
    assert "mixture schedule edited for steps >= 6" in proc.stdout
    recs = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "schedule_changed" for r in recs)
    ref, got = losses(curriculum_run), losses(w)
    for s in range(1, 10):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), s  # past and stage 2 alike
    last = [r for r in recs if r["step"] == 10 and "loss" in r][-1]
    assert last["mixture_weights"]["docs"] == 1.0
    # Edit the past: move the annealing stage to step 4 (before the resume step 6).
    w2 = tmp_path / "run2"
    shutil.copytree(curriculum_run, w2)
    rewind(w2, 6)
    past = tmp_path / "past.py"
    past.write_text(
        "from loam.configs import curriculum\n"
        "def get_config(arg=None):\n"
        "    c = curriculum.get_config(arg)\n"
        "    stages = [dict(s) for s in c.data.stages]\n"
        "    stages[1]['start'] = 4\n"
        "    c.data.stages = stages\n"
        "    return c\n")
    bad = run(w2, config=str(past), check=False)
    assert bad.returncode != 0
    assert "changes step 4, before the resume step 6" in bad.stderr


def test_average_of_known_trees():
    from loam.average import average_params
    a = {"w": np.full((2, 3), 1.0, np.float32), "b": np.zeros(3, np.float32)}
    b = {"w": np.full((2, 3), 4.0, np.float32), "b": np.ones(3, np.float32)}
    avg = average_params([a, b], [1, 2])
    assert np.allclose(avg["w"], 3.0) and np.allclose(avg["b"], 2 / 3)
    assert avg["w"].dtype == np.float32
    with pytest.raises(ValueError, match="non-negative"):
        average_params([a, b], [1, -1])


@pytest.mark.e2e
def test_average_cli_writes_a_checkpoint_eval_reads(curriculum_run, tmp_path):
    out = tmp_path / "avg"
    proc = subprocess.run([sys.executable, "-m", "loam.average", f"--workdir={curriculum_run}",
                           "--last", "3", "--weights", "1,1,2", f"--out={out}"], env=env(1),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    from loam import run as run_lib
    averaged, _, _ = run_lib.load_params(out)
    parts = [run_lib.load_params(curriculum_run, s)[0] for s in (6, 8, 10)]
    import jax
    expected = jax.tree.map(lambda a, b, c: (a + b + 2 * c) / 4, *parts)
    for x, y in zip(jax.tree.leaves(averaged), jax.tree.leaves(expected)):
        assert np.allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    ev = subprocess.run([sys.executable, "-m", "loam.eval", f"--workdir={out}"], env=env(1),
                        capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr
    assert (out / "eval" / "step_10.json").exists()
    bad = subprocess.run([sys.executable, "-m", "loam.average", f"--workdir={curriculum_run}",
                          "--last", "50"], env=env(1), capture_output=True, text=True)
    assert bad.returncode != 0 and "holds only" in bad.stderr


def test_curriculum_config_keeps_four_checkpoints_inside_the_anneal_stage():
    """The README averages the last 4 checkpoints of this config: they must exist and lie in
    the annealing stage (the last 20% of training), whatever `steps` is."""
    from loam.configs import curriculum as curriculum_config
    from loam.data.curriculum import lr_phases

    for steps in (300, 1000, 2000):
        c = curriculum_config.get_config(f"steps={steps}")
        saves = [s for s in range(1, steps + 1) if s % c.checkpoint_every == 0 or s == steps]
        kept = saves[-c.keep_checkpoints:]
        assert len(kept) >= 4
        anneal = lr_phases(c)["decay"]
        assert all(s > anneal for s in kept[-4:]), (steps, kept, anneal)
