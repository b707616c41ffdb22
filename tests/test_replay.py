"""Replay (config.data.replay): a fixed share of every batch from old domains, through the
ordinary weight sources and row allocation of the mixture stream."""

from __future__ import annotations

import numpy as np
import pytest

from loam import run as run_lib
from loam import train as train_lib
from loam.configs import default

OLD = ["literature", "dialogue"]


def _config(fraction, **data):
    c = default.get_config("runlocal")
    c.data.replay.fraction = fraction
    c.data.replay.domains = list(OLD)
    for k, v in data.items():
        c.data[k] = v
    return c


def _stream(config):
    config, _ = run_lib.resolve_config(config)
    return run_lib.build_stream(config)


@pytest.mark.parametrize("fraction", [0.05, 0.25])
def test_realised_replay_rows_track_the_fraction_within_one_row(fraction):
    stream = _stream(_config(fraction, weights="uniform"))
    old = [stream.names.index(d) for d in OLD]
    B, steps = stream.batch_size, 200
    w = stream.weights_at(0)
    assert w[old].sum() == pytest.approx(fraction)
    new = [k for k in range(len(stream.names)) if k not in old]
    assert w[new] == pytest.approx([(1 - fraction) / 3] * 3)  # uniform over the new domains
    for t in range(1, steps + 1):
        rows = stream.rows_consumed(t)
        assert abs(rows[old].sum() - fraction * B * t) <= 1, t
        assert np.all(np.abs(rows - w * B * t) <= 1), t
    # The rows of a batch are the domains the allocation says.
    batch = stream.global_batch(7)
    ids = [int(stream.domain_ids[k]) for k in old]
    row_domains = [int(d[s > 0][0]) for d, s in zip(batch["domain_ids"], batch["segment_ids"])]
    assert sum(d in ids for d in row_domains) == int(stream.rows_at(7)[old].sum()) > 0


def test_replay_composes_with_curriculum_stages():
    stages = [{"start": 0, "weights": {"code": 1, "docs": 0, "reference": 0}},
              {"start": 10, "weights": {"code": 0, "docs": 1, "reference": 1}}]
    stream = _stream(_config(0.25, stages=stages))
    names = stream.names
    w0, w1 = stream.weights_at(0), stream.weights_at(10)
    assert w0[names.index("code")] == pytest.approx(0.75)
    assert w1[names.index("docs")] == pytest.approx(0.375) == w1[names.index("reference")]
    for w in (w0, w1):
        assert w[[names.index(d) for d in OLD]].sum() == pytest.approx(0.25)
    want = np.zeros(len(names))
    for t in range(30):  # across the stage switch, every domain within one row
        want += stream.weights_at(t) * stream.batch_size
        assert np.all(np.abs(stream.rows_consumed(t + 1) - want) <= 1), t
    assert stream.rows_consumed(30)[[names.index(d) for d in OLD]].sum() == pytest.approx(
        0.25 * 30 * stream.batch_size, abs=2)
    assert _stream(_config(0.0)).weights_at(0) == pytest.approx([0.2] * 5)  # 0: no replay


@pytest.mark.parametrize("fields,message", [
    ({"fraction": 1.0}, "replay.fraction=1.0 must lie in [0, 1)"),
    ({"fraction": -0.1}, "replay.fraction=-0.1 must lie in [0, 1)"),
    ({"domains": []}, "replay.domains is empty"),
    ({"domains": ["klingon"]}, "are not domains of the mixture"),
])
def test_bad_replay_is_refused_before_anything_is_written(tmp_path, fields, message):
    c = _config(0.25)
    for k, v in fields.items():
        c.data.replay[k] = v
    with pytest.raises(ValueError) as e:
        train_lib.train(c, tmp_path / "run")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def _feed(stream, t):
    """The stream's step t as a trainer would report it: each domain's rows times a per-domain
    loss (the new domain "code" the hardest, so an online method leans towards it)."""
    rows = stream.rows_at(t).astype(np.float64)
    per_token = np.array([{"code": 4.0}.get(d, 2.0) for d in stream.names])
    tokens = rows * stream.seq_len
    stream.observe(t, per_token * tokens, tokens)


def test_replay_composes_with_an_online_method():
    """ODM picks the new domains' share (its arms are the new domains alone), replay keeps its
    fraction of the rows; the method reads back its own weights, not the replay-scaled ones."""
    c = _config(0.25)
    c.mixing.method = "odm"
    stream = _stream(c)
    source = stream.source
    assert source.adaptive and source.inner.domains == ["code", "docs", "reference"]
    old = [stream.names.index(d) for d in OLD]
    code = stream.names.index("code")
    B, steps = stream.batch_size, 60
    for t in range(steps):
        if t >= 1:
            _feed(stream, t - 1)
        w = stream.weights_at(t)
        assert w[old].sum() == pytest.approx(0.25)
        new = [stream.names.index(d) for d in source.inner.domains]
        assert w[new] / 0.75 == pytest.approx(source.inner.policy(t))  # ODM's own π
        assert abs(stream.rows_consumed(t + 1)[old].sum() - 0.25 * B * (t + 1)) <= 1, t
    late = stream.weights_at(steps - 1)
    assert late[code] > late[stream.names.index("docs")]  # the bandit learnt the hard domain
    # Methods that need the trainer beyond the losses are refused in one line.
    c.mixing.method = "aioli"
    with pytest.raises(ValueError, match="reference model or probe rounds"):
        _stream(c)


def test_a_schedule_of_replay_fractions_is_realised_step_by_step():
    c = _config(0.0, weights="uniform")
    c.data.replay = {"fraction": [[0, 0.25], [20, 0.05], [50, 0.0]], "domains": list(OLD),
                     "weights": "uniform"}
    stream = _stream(c)
    old = [stream.names.index(d) for d in OLD]
    B = stream.batch_size
    want = 0.0  # rows of each replay domain (uniform: half the fraction each)
    for t in range(80):
        f = 0.25 if t < 20 else 0.05 if t < 50 else 0.0
        assert stream.weights_at(t)[old].sum() == pytest.approx(f), t
        want += f / 2 * B
        assert np.all(np.abs(stream.rows_consumed(t + 1)[old] - want) <= 1), t
    assert stream.rows_consumed(80)[old].sum() == stream.rows_consumed(50)[old].sum()


@pytest.mark.parametrize("fraction,message", [
    ([[0, 0.25], [10, 1.5]], "replay.fraction=1.5 must lie in [0, 1)"),
    ([[0, 0.25], [10, 0.1], [5, 0.05]], "step 5 comes after step 10; list the [step, fraction] "
                                        "pairs by increasing step"),
    ([[3, 0.25]], "the first [step, fraction] pair must be at step 0"),
    ([[0, 0.25], [2.5, 0.1]], "step 2.5 is not a step number"),
    ([0.25, 0.1], "0.25 is not a [step, fraction] pair"),
])
def test_bad_replay_schedules_are_one_line(tmp_path, fraction, message):
    c = _config(0.0)
    c.data.replay = {"fraction": fraction, "domains": list(OLD), "weights": "uniform"}
    with pytest.raises(ValueError) as e:
        train_lib.train(c, tmp_path / "run")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()
