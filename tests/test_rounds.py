"""Online mixing in rounds, Aioli and Skill-it: their update rules against hand-computed steps and
fixed points, the graph estimates, bad hyperparameters and graphs, probes trained as a swarm
equal to probes trained one after another, and through the real trainer: the weights change at
rounds only, rounds.json is written, the output mixture trains, and a SIGKILLed run resumes
bit-exactly (the round at the checkpoint's step is run again, identically)."""

from __future__ import annotations

import json
import sys

import jax
import ml_collections
import numpy as np
import pytest
from test_online import kill_after, records

from loam import run as run_lib
from loam import step as step_lib
from loam.configs import default
from loam.data import weights as weights_lib
from loam.mixing.online import aioli, rounds, skillit

from helpers import CONFIG, SMALL, env, losses, run_train

NAMES = ["a", "b", "c"]


# ------------------------------------------------------------------ Aioli's rule


def test_aioli_unsmoothing_recovers_the_matrix_by_hand():
    """G[i, j] = Σ_m w_j[m] A[i, m]: the probes' drops are what A predicts for their smoothed
    mixtures, and learn_matrix inverts that."""
    a_true = np.array([[0.3, 0.1, -0.05], [0.02, 0.4, 0.0], [0.1, 0.1, 0.2]])
    w = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    assert np.array_equal(aioli.probe_mixtures(3, 0.5), w)
    g = np.array([[sum(w[j, m] * a_true[i, m] for m in range(3)) for j in range(3)]
                  for i in range(3)])
    before = np.array([5.0, 6.0, 7.0])
    after = before[None, :] - g.T  # after[j, i]: domain i's loss after probe j
    np.testing.assert_allclose(aioli.learn_matrix(before, after, 0.5), a_true, atol=1e-12)
    # Plain one-hot probes: A is the drops themselves.
    np.testing.assert_allclose(aioli.learn_matrix(before, after, 1.0), g, atol=1e-12)


def test_aioli_round_matches_a_hand_computed_step():
    source = aioli.Aioli(NAMES, [0.5, 0.3, 0.2], one_hot=1.0, eta=0.5, normalize=True)
    before = np.array([4.0, 4.0, 4.0])
    after = np.array([[3.0, 3.5, 4.0],    # probe a: drops 1, 0.5, 0
                      [4.0, 3.0, 4.5],    # probe b: drops 0, 1, -0.5
                      [4.0, 4.0, 3.0]])   # probe c: drops 0, 0, 1
    source.apply_round(0, before, after)
    g = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, -0.5, 1.0]])  # G[i, j]
    shifted = g + 0.5
    norm = shifted / shifted.sum()
    want = np.array([0.5, 0.3, 0.2]) * np.exp(0.5 * norm.sum(axis=0))
    np.testing.assert_allclose(source.p, want / want.sum(), rtol=1e-13)
    np.testing.assert_allclose(source.log[0]["A"], g, atol=1e-15)
    # Accumulating: the second round multiplies the first's weights.
    p1 = source.p.copy()
    source.apply_round(4, before, after)
    want2 = p1 * np.exp(0.5 * norm.sum(axis=0))
    np.testing.assert_allclose(source.p, want2 / want2.sum(), rtol=1e-13)


def test_aioli_ema_and_the_released_scripts_variant():
    """accumulate=False: p = p₀ ⊙ exp(η colsum Ā), Ā the moving average of the rounds' A."""
    p0 = np.array([0.2, 0.3, 0.5])
    source = aioli.Aioli(NAMES, p0, one_hot=1.0, eta=2.0, normalize=False, ema=0.5,
                         accumulate=False)
    before = np.full(3, 5.0)
    first = before - np.array([[0.3, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.2]])
    second = before - np.array([[0.1, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.2]])
    source.apply_round(0, before, first)
    source.apply_round(5, before, second)
    a_bar = 0.5 * np.diag([0.1, 0.5, 0.2]) + 0.5 * np.diag([0.3, 0.1, 0.2])
    want = p0 * np.exp(2.0 * a_bar.sum(axis=0))
    np.testing.assert_allclose(source.p, want / want.sum(), rtol=1e-12)


def test_aioli_fixed_point_equal_column_sums():
    """When every domain helps the others equally (equal column sums), the weights stay."""
    source = aioli.Aioli(NAMES, [0.6, 0.3, 0.1], one_hot=1.0, eta=3.0, normalize=False)
    before = np.full(3, 5.0)
    drops = np.array([[0.3, 0.1, 0.2], [0.2, 0.3, 0.1], [0.1, 0.2, 0.3]])  # rows: probes
    source.apply_round(0, before, before - drops)
    np.testing.assert_allclose(source.p, [0.6, 0.3, 0.1], rtol=1e-13)


# ------------------------------------------------------------------ Skill-it's rule


def test_skillit_update_matches_a_hand_computed_step():
    graph = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 1.0]])
    source = skillit.SkillIt(NAMES, [0.2, 0.3, 0.5], eta=0.5, window=2,
                             graph=json.dumps(graph.tolist()))
    rows = [np.array([5.0, 4.0, 3.0]), np.array([4.0, 4.0, 2.0]), np.array([3.0, 2.0, 2.0])]
    for step, losses_ in zip((0, 10, 20), rows):
        source.apply_round(step, losses_)
    # The window holds the last two rounds: L = [7, 6, 4].
    z = 0.5 * np.array([7 + 0.5 * 6, 6, 0.2 * 7 + 4])
    want = np.array([0.2, 0.3, 0.5]) * np.exp(z)
    np.testing.assert_allclose(source.p, want / want.sum(), rtol=1e-13)


def test_skillit_identity_graph_with_equal_losses_keeps_the_initial_mixture():
    source = skillit.SkillIt(NAMES, [0.1, 0.2, 0.7], graph="identity")
    source.apply_round(0, np.full(3, 6.5))
    np.testing.assert_allclose(source.p, [0.1, 0.2, 0.7], rtol=1e-13)


def test_skillit_graph_estimates_by_hand():
    before = np.array([5.0, 5.0, 5.0])
    alone = np.array([[4.0, 4.5, 5.2],   # trained on a: a -1, b -0.5, c +0.2
                      [4.8, 3.0, 5.0],
                      [5.0, 4.9, 4.0]])
    lin = skillit.linear_graph(before, alone)
    diag_mean = (1.0 + 2.0 + 1.0) / 3
    np.testing.assert_allclose(lin, np.array([[1.0, 0.5, 0.0], [0.2, 2.0, 0.0],
                                              [0.0, 0.1, 1.0]]) / diag_mean, atol=1e-12)
    mixtures, pairs = skillit.pair_mixtures(3)
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    np.testing.assert_allclose(mixtures[3], [0.5, 0.5, 0.0])
    pair = np.array([[3.9, 3.2, 5.0],     # a+b: a 3.9 (alone 4.0), b 3.2 (alone 3.0)
                     [4.1, 5.0, 3.8],     # a+c: a 4.1, c 3.8 (alone 4.0)
                     [5.0, 3.1, 4.0]])    # b+c: b 3.1, c 4.0
    a = skillit.pairwise_graph(before, np.concatenate([alone, pair]))
    want = np.eye(3)
    want[1, 0] = (4.0 - 3.9) / 1.0      # b helps a
    want[2, 1] = 0.0                     # c does not help b (3.1 > 3.0)
    want[2, 0] = 0.0                     # c: a 4.1 > 4.0
    want[0, 2] = (4.0 - 3.8) / 1.0      # a helps c
    want[0, 1] = 0.0                     # a: b 3.2 > 3.0
    want[1, 2] = 0.0
    np.testing.assert_allclose(a, want, atol=1e-12)
    with pytest.raises(RuntimeError, match="graph_steps"):
        skillit.linear_graph(before, np.full((3, 3), 5.5))


# ------------------------------------------------------------------ bad input


def _config(method, **given):
    c = default.get_config("runlocal")
    with c.unlocked():
        for k, v in given.items():
            c.mixing[method][k] = v
    c.mixing.method = method
    return c


@pytest.mark.parametrize("method,given,match", [
    ("aioli", {"eta": 0.0}, "eta"),
    ("aioli", {"eta": -1.0}, "eta"),
    ("aioli", {"update_steps": 0}, "update_steps"),
    ("aioli", {"probe_steps": 0}, "probe_steps"),
    ("aioli", {"one_hot": 0.1}, "one_hot"),
    ("aioli", {"ema": 1.0}, "ema"),
    ("aioli", {"probes": "parallel"}, "probes"),
    ("skillit", {"eta": 0.0}, "eta"),
    ("skillit", {"window": 0}, "window"),
    ("skillit", {"graph": "[[1, 0], [0, 1]]"}, r"shape \(2, 2\).*5 domains"),
    ("skillit", {"graph": json.dumps([[1, 0, 0, 0, 0]] * 4 + [[0, 0, 0, 0, float("nan")]])},
     "NaN"),
    ("skillit", {"graph": "sideways"}, "K×K matrix"),
])
def test_bad_hyperparameters_are_refused_with_the_key(method, given, match):
    with pytest.raises(ValueError, match=match):
        weights_lib.source_from_config(_config(method, **given))


def test_unknown_keys_and_stages_are_refused():
    c = _config("aioli")
    with c.unlocked():
        c.mixing.aioli.lr = 1.0
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr'\]"):
        weights_lib.source_from_config(c)
    for method in ("aioli", "skillit"):
        c = _config(method)
        c.data.stages = [{"name": "x", "start": 0, "weights": "uniform"}]
        with pytest.raises(ValueError, match="cannot follow config.data.stages"):
            weights_lib.source_from_config(c)


def test_a_bad_value_from_the_command_line_is_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    proc = run_train(workdir, "--config.mixing.method=skillit", "--config.mixing.skillit.window=0",
                     check=False, devices=1)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "config.mixing.skillit.window=0" in err[-1] and "Traceback" not in proc.stderr
    assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()


def test_state_round_trip_is_exact():
    source = aioli.Aioli(NAMES, [0.5, 0.3, 0.2], eta=0.7)
    before = np.array([5.0, 5.1, 5.2])
    after = before - np.array([[0.3, 0.1, 0.0], [0.05, 0.2, 0.1], [0.0, 0.1, 0.4]])
    source.apply_round(0, before, after)
    saved = json.loads(json.dumps(source.state_dict()))
    other = aioli.Aioli(NAMES, [0.5, 0.3, 0.2], eta=0.7)
    other.load_state_dict(saved)
    for s in (source, other):
        s.apply_round(7, before, after - 0.01)
    assert source.p.tolist() == other.p.tolist()
    assert not other.due(7) and not other.due(57) and other.due(50)


# ------------------------------------------------------------------ probes


def test_probes_as_a_swarm_equal_probes_one_after_another():
    """The same K branches of one state, trained together in one compiled step or in turn:
    the same held-out losses (up to the float order of batched kernels), and training lowers
    the probed domain's loss most."""
    c = default.get_config("runlocal")
    c.eval_batch_size = 8
    model, mesh = run_lib.build_model(c), run_lib.build_mesh(c)
    optimizer = run_lib.build_optimizer(c)
    state, _ = step_lib.init_state(model, optimizer, jax.random.PRNGKey(0), mesh,
                                   c.data.seq_len, c.data.batch_size)
    domains = run_lib.mixture_domains(c)
    mixtures = np.eye(len(domains))
    got = {}
    for mode in rounds.PROBE_MODES:
        lab = rounds.Lab(c, model, mesh, domains, eval_tokens=512, mode=mode).at(3, state)
        before = lab.heldout()
        got[mode] = lab.probes(mixtures, 3)
    np.testing.assert_allclose(got["swarm"], got["sequential"], rtol=2e-5)
    drops = before[None, :] - got["swarm"]
    assert np.all(drops > 0)  # from a fresh model every domain's loss falls
    assert np.all(np.diag(drops) >= drops.max(axis=0) - 1e-6)  # its own domain falls most


# ------------------------------------------------------------------ through the real trainer

AIOLI = [*SMALL, "--config.mixing.method=aioli", "--config.mixing.aioli.update_steps=4",
         "--config.mixing.aioli.probe_steps=2", "--config.mixing.aioli.eval_tokens=512",
         "--config.mixing.aioli.eta=5.0", "--config.eval_batch_size=4"]
SKILLIT = [*SMALL, "--config.mixing.method=skillit", "--config.mixing.skillit.update_steps=4",
           "--config.mixing.skillit.graph=linear", "--config.mixing.skillit.graph_steps=2",
           "--config.mixing.skillit.eval_tokens=512", "--config.eval_batch_size=4"]


@pytest.fixture(scope="module")
def aioli_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("aioli") / "ref"
    run_train(workdir, *AIOLI, devices=1)
    return workdir


@pytest.mark.e2e
def test_aioli_changes_the_weights_at_rounds_only(aioli_run):
    want = records(aioli_run)
    assert sorted(want) == list(range(1, 13))
    names = list(want[1]["mixture_weights"])
    w = {s - 1: np.array([want[s]["mixture_weights"][d] for d in names]) for s in want}
    log = json.loads((aioli_run / "rounds.json").read_text())["rounds"]
    assert [r["step"] for r in log] == [0, 4, 8]
    for r in log:  # each round's weights are those of the steps until the next round
        for s in range(r["step"], r["step"] + 4):
            np.testing.assert_allclose(w[s], r["weights"], rtol=1e-14)
    assert not np.allclose(log[0]["weights"], log[2]["weights"])
    assert (aioli_run / "output_mixture.json").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("flags", [AIOLI, SKILLIT], ids=["aioli", "skillit"])
def test_a_sigkilled_rounds_run_resumes_bit_exactly(flags, aioli_run, tmp_path):
    if flags is AIOLI:
        ref = aioli_run
    else:
        ref = tmp_path / "ref"
        run_train(ref, *flags, devices=1)
    want = records(ref)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "loam.train", f"--config={CONFIG}", f"--workdir={killed}",
           *flags]
    kill_after(cmd, killed, 6, env(1))
    assert max(losses(killed)) < 12, "the run finished before it could be killed"
    run_train(killed, *flags, devices=1)
    got = records(killed)
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s]["loss"] == want[s]["loss"], s
        assert got[s]["mixture_weights"] == want[s]["mixture_weights"], s
    assert (json.loads((killed / "rounds.json").read_text())
            == json.loads((ref / "rounds.json").read_text()))
    if flags is SKILLIT:
        graph = np.array(json.loads((ref / "rounds.json").read_text())["rounds"][0]["graph"])
        assert graph.shape == (5, 5) and np.mean(np.diag(graph)) == pytest.approx(1.0)


@pytest.mark.e2e
def test_the_output_mixture_of_an_aioli_run_trains(aioli_run, tmp_path):
    path = aioli_run / "output_mixture.json"
    loaded = ml_collections.ConfigDict(json.loads(path.read_text()))
    assert loaded.mixing.method == "static"
    run_train(tmp_path / "transfer", "--config.steps=2", config=str(path), base=[], devices=1)
    for rec in records(tmp_path / "transfer").values():
        assert rec["mixture_weights"] == pytest.approx(dict(loaded.data.weights), rel=1e-14)


SWARM_SCRIPT = """
import sys
from loam.configs import default
from loam.mixing import swarm as sw

c = default.get_config("size=nano,steps=12,seq_len=64,batch_size=8")
c.optim.warmup_steps = 2
c.log_every, c.checkpoint_every, c.eval_every, c.keep_checkpoints = 1, 4, 1000, 5
c.eval_tokens, c.eval_batch_size = 1024, 4
aioli = {"update_steps": 4, "probe_steps": 2, "eval_tokens": 512, "eta": 5.0}
members = [sw.Member("uniform", seed=0, name="aioli", mixing={"method": "aioli", "aioli": aioli}),
           sw.Member("uniform", seed=1, name="skillit",
                     mixing={"method": "skillit", "skillit": {"update_steps": 3,
                             "graph": "identity", "eval_tokens": 512}})]
sw.train_swarm(c, members, sys.argv[1], eval_domains=["code"], verbose=False)
"""


@pytest.mark.e2e
def test_a_swarm_member_running_aioli_equals_the_single_run(aioli_run, tmp_path):
    """Rounds members in a swarm: the Aioli member's probes branch from its own parameters and
    match the single run; the Skill-it member (identity graph, rounds every 3 steps) moves its
    weights at its own rounds."""
    import subprocess

    script = tmp_path / "swarm.py"
    script.write_text(SWARM_SCRIPT)
    out = tmp_path / "swarm"
    subprocess.run([sys.executable, str(script), str(out)], env=env(1), check=True,
                   timeout=900, capture_output=True)
    single, swarm = records(aioli_run), records(out)
    assert sorted(swarm) == sorted(single)
    names = list(single[1]["mixture_weights"])
    for s in single:
        np.testing.assert_allclose(swarm[s]["loss"][0], single[s]["loss"], rtol=2e-5)
        np.testing.assert_allclose([swarm[s]["mixture_weights"][0][d] for d in names],
                                   [single[s]["mixture_weights"][d] for d in names], rtol=1e-4)
    skillit_w = [tuple(swarm[s]["mixture_weights"][1].values()) for s in sorted(swarm)]
    changes = [s for s in range(1, 12) if skillit_w[s] != skillit_w[s - 1]]
    assert changes and set(changes) <= {3, 6, 9}
