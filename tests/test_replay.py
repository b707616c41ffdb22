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


def test_replay_with_an_online_method_is_refused():
    c = _config(0.25)
    c.mixing.method = "greedy_loss"
    with pytest.raises(ValueError, match="online mixing method"):
        _stream(c)
