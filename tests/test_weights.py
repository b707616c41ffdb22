"""The weights log: static sources fill it from the config, adaptive ones from observed losses,
independently of when the loop delivers them (FEEDBACK_DELAY); a saved log resumes bit-exactly."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from loam.configs import default
from loam.data import recipes, weights
from loam.data import stream as stream_lib
from loam.mixing.online import greedy_loss

DOMAINS = ["literature", "dialogue", "code", "docs", "reference"]


def make_stream(source, batch_size=8, seq_len=64, domains=DOMAINS):
    return stream_lib.MixtureStream(domains, "causal", source, seq_len=seq_len,
                                    batch_size=batch_size, seed=7)


class CumulativeLoss(weights.WeightSource):
    """Test source: weights grow with each domain's mean observed per-token loss and lean on the
    previous row; it asserts the stream's contract (step order, exactly the allowed steps)."""
    adaptive = True

    def __init__(self, domains):
        super().__init__(domains)
        self.total, self.seen = np.zeros(len(self.domains)), 0

    def observe(self, step, loss_sums, tokens):
        assert step == self.seen, "observations must arrive in step order"
        self.total += loss_sums / np.maximum(tokens, 1.0)
        self.seen += 1

    def propose(self, step, history):
        assert history.shape == (step, len(self.domains)) and not history.flags.writeable
        assert self.seen == max(0, step - weights.FEEDBACK_DELAY), (step, self.seen)
        previous = history[-1] if step else np.zeros(len(self.domains))
        return 1.0 + self.total / (1.0 + self.seen) + 0.5 * previous

    def state_dict(self):
        return {"total": self.total.tolist(), "seen": self.seen}

    def load_state_dict(self, state):
        self.total, self.seen = np.array(state["total"], np.float64), int(state["seen"])


def fake_losses(stream, batch):
    """Per-domain 'loss sums' and token counts, a deterministic function of the batch."""
    loss, tokens = np.zeros(len(stream.names)), np.zeros(len(stream.names))
    for k, did in enumerate(stream.domain_ids):
        m = (batch["domain_ids"] == did) & (batch["loss_weights"] > 0)
        tokens[k] = m.sum()
        loss[k] = (batch["targets"][m] % 13).sum() / 4.0
    return loss, tokens


def run_loop(stream, start, stop, lag, flush_every=None):
    """Builds batches start..stop-1 and observes each step's losses ``lag`` steps later (lag 1:
    the trainer dispatches step t+1 before fetching step t); every ``flush_every`` steps all
    pending losses are observed at once, as the trainer does at a checkpoint."""
    batches, pending = [], []
    for t in range(start, stop):
        b = stream.global_batch(t)
        batches.append(b)
        pending.append((t, b))
        keep = 0 if flush_every and (t + 1) % flush_every == 0 else lag
        while len(pending) > keep:
            s, bb = pending.pop(0)
            stream.observe(s, *fake_losses(stream, bb))
    for s, bb in pending:
        stream.observe(s, *fake_losses(stream, bb))
    return batches


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert np.array_equal(x[k], y[k]), k


def config(**data):
    c = default.get_config("runlocal")
    c.data.update(data)
    return c


def test_static_log_is_the_recipe_and_is_not_saved():
    c = config(weights="proportional")
    source = weights.source_from_config(c)
    assert isinstance(source, weights.ConstantWeights) and not source.adaptive
    stream = make_stream(source)
    want = recipes.recipe_weights("proportional", DOMAINS)
    assert np.array_equal(stream.weights_log(6), np.tile(want, (6, 1)))
    assert np.array_equal(stream.weights_at(1000), want)
    state = stream.state_dict(6)
    assert set(state) == {"step", "rows_consumed", "domains", "seed", "batch_size",
                          "fingerprints"}
    stream.observe(3, np.ones(5), np.ones(5))  # ignored by a static source
    make_stream(weights.source_from_config(c)).load_state(state)
    # A curriculum's log is its stages' weights, step by step.
    c = config(stages=[dict(name="a", start=0, weights="uniform"),
                       dict(name="b", start=3, weights={"code": 1.0})])
    staged = make_stream(weights.source_from_config(c))
    log = staged.weights_log(5)
    assert np.array_equal(log[:3], np.full((3, 5), 0.2)) and log[3:, 2].tolist() == [1.0, 1.0]
    assert "weights_log" not in staged.state_dict(5)


def test_recipe_registry():
    assert set(recipes.RECIPES) == {"uniform", "proportional", "temperature", "unimax"}
    sizes = np.array([1.0, 3.0, 6.0])
    np.testing.assert_allclose(recipes.recipe_weights("uniform", "abc"), np.full(3, 1 / 3))
    np.testing.assert_allclose(recipes.recipe_weights("temperature:2", "abc", sizes),
                               np.sqrt(sizes) / np.sqrt(sizes).sum())
    np.testing.assert_allclose(recipes.recipe_weights("unimax:2", "abc", sizes, 6.0),
                               [1 / 3, 1 / 3, 1 / 3])
    with pytest.raises(ValueError, match="not a recipe; use 'uniform'"):
        recipes.recipe_weights("bogus", "abc", sizes)
    with pytest.raises(ValueError, match="unimax needs the run's token budget"):
        recipes.recipe_weights("unimax", "abc", sizes)


def test_adaptive_batches_do_not_depend_on_when_losses_arrive():
    early = make_stream(CumulativeLoss(DOMAINS))
    late = make_stream(CumulativeLoss(DOMAINS))
    a = run_loop(early, 0, 24, lag=0)
    b = run_loop(late, 0, 24, lag=1, flush_every=5)
    same_batches(a, b)
    assert np.array_equal(early.weights_log(24), late.weights_log(24))
    log = early.weights_log(24)
    assert len({tuple(r) for r in log}) > 10, "the source never moved the weights"
    np.testing.assert_allclose(log.sum(1), 1.0)


def test_asking_too_early_raises_and_nothing_is_observed_twice():
    s = make_stream(CumulativeLoss(DOMAINS))
    s.batch(0), s.batch(1)  # steps 0 and 1 need no losses
    with pytest.raises(RuntimeError, match=r"step 2 depend.*stream.observe\(0,"):
        s.batch(2)
    with pytest.raises(RuntimeError, match="has not been observed"):  # a loop 2 steps behind
        run_loop(make_stream(CumulativeLoss(DOMAINS)), 0, 6, lag=2)
    s.observe(0, np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="observed twice"):
        s.observe(0, np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="one loss sum and one token count per domain"):
        s.observe(1, np.ones(3), np.ones(3))
    # A position whose losses were not all observed cannot be saved: the resumed run could not
    # reproduce the weights.
    with pytest.raises(RuntimeError, match=r"step\(s\) \[1\] were not observed"):
        s.state_dict(2)


@pytest.mark.parametrize("make_source", [
    lambda: CumulativeLoss(DOMAINS),
    lambda: weights.source_from_config(_greedy_config()),
], ids=["cumulative", "greedy_loss"])
def test_resume_mid_run_is_bit_exact(make_source):
    full = make_stream(make_source())
    want = run_loop(full, 0, 30, lag=1, flush_every=6)
    first = make_stream(make_source())
    run_loop(first, 0, 12, lag=1, flush_every=6)  # a checkpoint at step 12
    state = json.loads(json.dumps(first.state_dict(12)))
    assert len(state["weights_log"]) == 12 and state["observed_steps"] <= 11
    resumed = make_stream(make_source())
    resumed.load_state(state)
    got = run_loop(resumed, 12, 30, lag=1, flush_every=6)
    same_batches(want[12:], got)
    assert np.array_equal(full.weights_log(30), resumed.weights_log(30))
    assert resumed.state_dict(30)["rows_consumed"] == full.state_dict(30)["rows_consumed"]
    # Another batch size cannot take the position; an adaptive source needs the saved log.
    with pytest.raises(ValueError, match="batch_size"):
        make_stream(make_source(), batch_size=4).load_state(state)
    static = make_stream(weights.source_from_config(config())).state_dict(12)
    with pytest.raises(ValueError, match="holds no weights log"):
        make_stream(make_source()).load_state(static)


def _greedy_config(**mixing):
    c = config(weights="uniform")
    c.mixing.method = "greedy_loss"
    c.mixing.greedy_loss = ml_collections.ConfigDict(dict(ema=0.5, boost=0.6, **mixing))
    return c


def test_greedy_loss_boosts_the_worst_domain():
    source = weights.source_from_config(_greedy_config())
    assert isinstance(source, greedy_loss.GreedyLoss) and source.adaptive
    s = make_stream(source)
    np.testing.assert_array_equal(s.weights_at(1), np.full(5, 0.2))  # nothing observed yet
    s.observe(0, np.array([10.0, 1, 1, 1, 0]), np.array([5.0, 1, 1, 1, 0]))
    np.testing.assert_allclose(s.weights_at(2), [0.4 * 0.2 + 0.6, 0.08, 0.08, 0.08, 0.08])
    s.observe(1, np.array([1.0, 1, 9, 1, 0]), np.array([1.0, 1, 1, 1, 0]))
    # EMA 0.5: literature 0.5*2 + 0.5*1 = 1.5, code 0.5*1 + 0.5*9 = 5: code leads now.
    assert int(np.argmax(s.weights_at(3))) == 2
    assert source.state_dict() == {"loss": [1.5, 1.0, 5.0, 1.0, None]}
    with pytest.raises(ValueError, match="unknown key"):
        weights.source_from_config(_greedy_config(speed=3))
    c = config()
    c.mixing.method = "no_such_controller"
    with pytest.raises(ValueError, match="no module loam.mixing.online.no_such_controller"):
        weights.source_from_config(c)


def test_source_over_other_domain_order_sees_its_own_order():
    names = list(reversed(DOMAINS))
    mine, theirs = make_stream(CumulativeLoss(DOMAINS)), make_stream(CumulativeLoss(names))
    same_batches(run_loop(mine, 0, 10, lag=1), run_loop(theirs, 0, 10, lag=1))
    np.testing.assert_allclose(mine.weights_log(10), theirs.weights_log(10), rtol=1e-12)
    # A source naming a subset leaves the other domains at zero.
    sub = make_stream(weights.constant({"code": 1.0, "docs": 3.0}))
    assert sub.weights_log(2).tolist() == [[0, 0, 0.25, 0.75, 0]] * 2
