"""Online Data Mixing (EXP3 over domains) and the stratified / token-proportional baselines as
weight sources: ODM's update against steps computed by hand, its exploration schedule, exact state
round trips and bad hyperparameters; the baselines equal their recipes; the output mixture is a
config loam.train loads; and through the real trainer ODM moves the mixture, resumes bit-exactly
after SIGKILL, and a swarm member running it equals the single run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_online import kill_after, records

from loam import cli
from loam import run as run_lib
from loam import train as train_lib
from loam.configs import default
from loam.data import catalog as catalog_lib
from loam.data import recipes
from loam.data import weights as weights_lib
from loam.data.schedules import ConstantWeights, WeightSource
from loam.mixing.online import odm
from loam.mixing.online import output as output_lib

from helpers import CONFIG, SMALL, env, losses, run_train

NAMES = ["a", "b", "c"]


def _softmax(z):
    e = [math.exp(x) for x in z]
    return [x / sum(e) for x in e]


def _policy(rewards, t, k=3):
    """π_t by hand: (1 - K ε_t) softmax(ε_{t-1} R) + ε_t."""
    def eps(s):
        return 1 / k if s == 0 else min(1 / k, math.sqrt(math.log(k) / (k * s)))
    p = _softmax([eps(t - 1) * r for r in rewards])
    return [(1 - k * eps(t)) * x + eps(t) for x in p]


def test_update_matches_a_hand_computed_run():
    """Through a real weights log (feedback delay 1): steps 0 and 1 observed under uniform π,
    step 2 observes nothing, step 3 is rewarded with the importance weights of its own π."""
    source = odm.OnlineDataMixing(NAMES, alpha=0.9)
    log = weights_lib.WeightsLog(source, NAMES)
    third = [1 / 3] * 3
    assert list(log.at(0)) == pytest.approx(third) and list(log.at(1)) == pytest.approx(third)
    log.observe(0, [6.0, 3.0, 0.0], [3, 1, 0])  # r = 2, 3, and c absent
    assert list(log.at(2)) == pytest.approx(third)  # t = 3 < K ln K: still uniform
    # R after step 0: 0.1 * r / (1/3); c keeps 0.
    r_after0 = [0.1 * 2.0 * 3, 0.1 * 3.0 * 3, 0.0]
    assert list(source.rewards) == pytest.approx(r_after0, rel=1e-14)
    log.observe(1, [2.0, 2.0, 4.0], [1, 1, 1])
    w3 = log.at(3)
    r_after1 = [0.9 * r_after0[0] + 0.1 * 2.0 * 3, 0.9 * r_after0[1] + 0.1 * 2.0 * 3,
                0.9 * 0.0 + 0.1 * 4.0 * 3]  # 1.14, 1.41, 1.2
    assert list(source.rewards) == pytest.approx(r_after1, rel=1e-14)
    eps4 = math.sqrt(math.log(3) / 12)  # the first ε below 1/3
    p = _softmax([r / 3 for r in r_after1])
    pi3 = [(1 - 3 * eps4) * x + eps4 for x in p]
    assert list(w3) == pytest.approx(pi3, rel=1e-13)
    assert w3[1] > w3[2] > w3[0]  # the highest smoothed reward gets the most weight

    log.observe(2, [0.0, 0.0, 0.0], [0, 0, 0])  # an empty observation changes nothing
    w4 = log.at(4)
    assert list(source.rewards) == pytest.approx(r_after1, rel=1e-14)
    assert list(w4) == pytest.approx(_policy(r_after1, 5), rel=1e-13)
    log.observe(3, [2.0, 5.0, 3.0], [2, 2, 1])  # r = 1.0, 2.5, 3.0, weighted by 1 / π_3
    w5 = log.at(5)
    r_after3 = [0.9 * r_after1[0] + 0.1 * 1.0 / pi3[0], 0.9 * r_after1[1] + 0.1 * 2.5 / pi3[1],
                0.9 * r_after1[2] + 0.1 * 3.0 / pi3[2]]
    assert list(source.rewards) == pytest.approx(r_after3, rel=1e-13)
    assert list(w5) == pytest.approx(_policy(r_after3, 6), rel=1e-13)


def test_a_domain_absent_from_a_batch_keeps_its_reward():
    source = odm.OnlineDataMixing(NAMES, alpha=0.5)
    source.load_state_dict({"rewards": [1.0, 2.0, 3.0], "proposed": [[7, [0.5, 0.25, 0.25]]]})
    source.observe(7, np.array([4.0, 0.0, 9.0]), np.array([2.0, 0.0, 3.0]))
    assert source.rewards.tolist() == [0.5 * 1.0 + 0.5 * 2.0 / 0.5, 2.0,
                                       0.5 * 3.0 + 0.5 * 3.0 / 0.25]


def test_exploration_schedule():
    k = 5
    assert odm.epsilon(0, k) == 0.2
    # ε = 1/K while ln K / (K t) >= 1/K², i.e. t <= K ln K = 8.05 for five domains.
    assert [odm.epsilon(t, k) for t in range(1, 9)] == [0.2] * 8
    for t in (9, 10, 100, 10_000):
        assert odm.epsilon(t, k) == pytest.approx(math.sqrt(math.log(5) / (5 * t)), rel=1e-15)
    source = odm.OnlineDataMixing(["v", "w", "x", "y", "z"])
    source.rewards = np.array([5.0, 1.0, 0.0, 2.0, 30.0])
    for step in (0, 7, 8, 50, 5000):
        pi = source.policy(step)
        eps = odm.epsilon(step + 1, k)
        assert pi.sum() == pytest.approx(1.0, abs=1e-15) and pi.min() >= eps * (1 - 1e-12)
        if step < 8:
            assert pi.tolist() == pytest.approx([0.2] * 5)  # no exploitation yet
    # Past the uniform phase the weights follow the smoothed rewards.
    assert np.argsort(source.policy(50)).tolist() == np.argsort(source.rewards).tolist()


def test_state_round_trip_is_exact():
    """Saved mid-run with the log (through JSON, as checkpoints store it) and reloaded into a
    fresh source: the rest of the run is equal float for float."""
    domains = ["v", "w", "x", "y", "z"]
    rng = np.random.default_rng(0)
    obs = [(rng.uniform(0, 50, 5), rng.integers(0, 3, 5).astype(float) * 8) for _ in range(40)]
    log = weights_lib.WeightsLog(odm.OnlineDataMixing(domains, alpha=0.8), domains)
    state = None
    for s, (sums, tokens) in enumerate(obs):
        if s == 23:
            state = json.loads(json.dumps(log.state_dict(23)))
        log.at(s)
        log.observe(s, sums, tokens)
    resumed = weights_lib.WeightsLog(odm.OnlineDataMixing(domains, alpha=0.8), domains)
    resumed.load_state_dict(state)
    for s in range(23, len(obs)):
        resumed.at(s)
        resumed.observe(s, *obs[s])
    a, b = log.rows(len(obs)), resumed.rows(len(obs))
    assert len({tuple(r) for r in a}) > 10  # the weights moved
    assert a.tolist() == b.tolist()
    assert log.source.state_dict() == resumed.source.state_dict()
    with pytest.raises(ValueError, match="odm state has 5 domains, the config 3"):
        odm.OnlineDataMixing(NAMES).load_state_dict(log.source.state_dict())


def _config(method, **odm_given):
    c = default.get_config("runlocal")
    c.mixing.method = method
    if odm_given:
        c.mixing.odm = dict(c.mixing.get("odm") or {}, **odm_given)
    return c


@pytest.mark.parametrize("given, match", [
    ({"alpha": 1.0}, r"config.mixing.odm.alpha=1.0 must be a number in \[0, 1\)"),
    ({"alpha": -0.1}, r"config.mixing.odm.alpha=-0.1 must be"),
    ({"beta": 2.0}, r"config.mixing.odm has unknown key\(s\) \['beta'\]; known: \['alpha'\]"),
])
def test_bad_hyperparameters_are_refused_when_the_source_is_built(given, match):
    with pytest.raises(ValueError, match=match):
        weights_lib.source_from_config(_config("odm", **given))


def test_hyperparameters_from_the_command_line(tmp_path, capsys):
    config = cli.config_main(lambda c, flags: c, argv=[
        "loam.train", f"--config={CONFIG}", "--config.mixing.method=odm",
        "--config.mixing.odm.alpha=0.8"])
    source = weights_lib.source_from_config(config)
    assert isinstance(source, odm.OnlineDataMixing) and source.alpha == 0.8
    with pytest.raises(SystemExit) as e:  # one error line, before anything is trained
        train_lib.main(["loam.train", f"--config={CONFIG}", f"--workdir={tmp_path}",
                        "--config.mixing.method=odm", "--config.mixing.odm.alpha=1.5"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config.mixing.odm.alpha=1.5 must be a number in [0, 1)")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()


def test_methods_refuse_curriculum_stages():
    for method in ("odm", "stratified", "proportional"):
        c = _config(method)
        c.data.stages = [{"name": "all", "start": 0, "weights": "uniform"}]
        with pytest.raises(ValueError, match=f"method='{method}'.*cannot follow "
                                             "config.data.stages"):
            weights_lib.source_from_config(c)


def test_baselines_equal_their_recipes_whatever_data_weights_say():
    c = _config("stratified")
    del c.data["weights"]
    c.data.weights = {"code": 5.0, "docs": 1.0, "dialogue": 0.0, "literature": 0.0,
                      "reference": 0.0}  # a static run's weights: the method overrides them
    domains = catalog_lib.mixture_domains(c)
    source = weights_lib.source_from_config(c)
    assert isinstance(source, ConstantWeights) and not source.adaptive
    assert source.weights.tolist() == recipes.recipe_weights("uniform", domains).tolist()
    assert source.weights.tolist() == [0.2] * 5
    c.mixing.method = "proportional"
    source = weights_lib.source_from_config(c)
    catalog = run_lib.build_catalog(c)
    assert source.weights.tolist() == recipes.recipe_weights(
        "proportional", domains, catalog=catalog).tolist()
    tokens = np.array([catalog.num_tokens(d, "train") for d in domains], float)
    np.testing.assert_allclose(source.weights, tokens / tokens.sum(), rtol=1e-15)
    stream = run_lib.build_stream(run_lib.resolve_config(c)[0])
    assert stream.weights_at(3).tolist() == source.weights.tolist()


def test_output_mixture_is_a_loadable_config_with_the_average_weights(tmp_path):
    config, _ = run_lib.resolve_config(_config("odm"))
    config.steps = 30
    stream = run_lib.build_stream(config)
    rng = np.random.default_rng(1)
    for s in range(30):
        stream.weights_at(s)
        stream.observe(s, rng.uniform(10, 60, 5), np.full(5, 100.0))
    path = output_lib.write_output_mixture(tmp_path, config, stream)
    assert path.name == "output_mixture.json"
    loaded = cli.load_config(str(path))
    assert loaded.mixing.method == "static" and list(loaded.data.stages) == []
    assert "notes" not in json.loads(path.read_text())
    log = stream.weights_log(30)
    assert len({tuple(r) for r in log}) > 5
    want = dict(zip(stream.names, log.mean(axis=0)))
    assert dict(loaded.data.weights) == pytest.approx(want, rel=1e-14)
    # It runs as it stands: a static source with those weights, same data and model.
    resolved, _ = run_lib.resolve_config(loaded)
    source = weights_lib.source_from_config(resolved)
    assert isinstance(source, ConstantWeights)
    np.testing.assert_allclose(source.weights, log.mean(axis=0), rtol=1e-14)
    assert run_lib.resume_mismatch(config, resolved).startswith("mixing was")
    assert resolved.model.to_dict() == config.model.to_dict()

    class OwnRule(WeightSource):  # a method with its own output rule
        def output_weights(self, log):
            return {"code": 1.0, "docs": 3.0}

    stream.source = OwnRule(stream.names)
    assert output_lib.output_weights(stream, 30) == {
        d: {"code": 0.25, "docs": 0.75}.get(d, 0.0) for d in stream.names}


# ------------------------------------------------------------------ through the real trainer

ODM = [*SMALL, "--config.mixing.method=odm", "--config.steps=16", "--config.checkpoint_every=5"]

SWARM_SCRIPT = textwrap.dedent("""
    import sys
    from loam.configs import default
    from loam.mixing import swarm as sw

    c = default.get_config("size=nano,steps=16,seq_len=64,batch_size=8")
    c.optim.warmup_steps = 2
    c.log_every, c.checkpoint_every, c.eval_every, c.keep_checkpoints = 1, 5, 1000, 5
    c.eval_tokens, c.eval_batch_size = 256, 4
    members = [sw.Member("uniform", seed=0, name="odm", mixing={"method": "odm"}),
               sw.Member("uniform", seed=0, name="odm_alpha0",
                         mixing={"method": "odm", "odm": {"alpha": 0.0}})]
    sw.train_swarm(c, members, sys.argv[1], eval_domains=["code"], verbose=False)
""")


@pytest.fixture(scope="module")
def odm_run(tmp_path_factory):
    """One ODM run of the real trainer on one device (16 steps, checkpoints every 5)."""
    workdir = tmp_path_factory.mktemp("odm") / "ref"
    run_train(workdir, *ODM, devices=1)
    return workdir


@pytest.mark.e2e
def test_odm_moves_the_mixture_in_the_real_trainer(odm_run):
    want = records(odm_run)
    assert sorted(want) == list(range(1, 17))
    weights = [np.array(list(want[s]["mixture_weights"].values())) for s in sorted(want)]
    # Uniform while ε_t = 1/K (steps 0-7, t <= 8 for five domains), moving afterwards.
    for w in weights[:8]:
        np.testing.assert_allclose(w, 0.2, rtol=1e-12)
    assert len({tuple(w) for w in weights[8:]}) == 8
    assert abs(weights[-1] - 0.2).max() > 0.002
    meta = json.loads(next((odm_run / "checkpoints" / "10").rglob("meta/metadata")).read_text())
    assert len(meta["data"]["weights_log"]) == 10
    assert len(meta["data"]["source_state"]["rewards"]) == 5


@pytest.mark.e2e
def test_the_output_mixture_of_a_run_is_the_average_and_trains(odm_run, tmp_path):
    want = records(odm_run)
    names = list(want[1]["mixture_weights"])
    logged = np.array([[want[s]["mixture_weights"][d] for d in names] for s in sorted(want)])
    path = odm_run / "output_mixture.json"
    loaded = cli.load_config(str(path))
    assert loaded.mixing.method == "static"
    assert dict(loaded.data.weights) == pytest.approx(dict(zip(names, logged.mean(axis=0))),
                                                      rel=1e-14)
    # loam.train runs it as it stands (here for 2 steps): constant weights, the output's.
    run_train(tmp_path / "transfer", "--config.steps=2", config=str(path), base=[], devices=1)
    for rec in records(tmp_path / "transfer").values():
        assert rec["mixture_weights"] == pytest.approx(dict(loaded.data.weights), rel=1e-14)


@pytest.mark.e2e
def test_a_sigkilled_odm_run_resumes_bit_exactly(odm_run, tmp_path):
    want = records(odm_run)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "loam.train", f"--config={CONFIG}", f"--workdir={killed}",
           *ODM]
    kill_after(cmd, killed, 7, env(1))
    assert max(losses(killed)) < 16, "the run finished before it could be killed"
    run_train(killed, *ODM, devices=1)
    got = records(killed)
    assert sorted(got) == sorted(want)
    for s in want:  # bit-exact: the same floats
        assert got[s]["loss"] == want[s]["loss"], s
        assert got[s]["mixture_weights"] == want[s]["mixture_weights"], s
    out = "output_mixture.json"
    assert (killed / out).read_text() == (odm_run / out).read_text()


@pytest.mark.e2e
def test_a_swarm_member_running_odm_equals_the_single_run(odm_run, tmp_path):
    script = tmp_path / "swarm.py"
    script.write_text(SWARM_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "swarm")], env=env(2),
                   check=True, timeout=600, capture_output=True)
    single, swarm = records(odm_run), records(tmp_path / "swarm")
    assert sorted(swarm) == sorted(single)
    names = list(single[1]["mixture_weights"])
    for s in single:
        np.testing.assert_allclose(swarm[s]["loss"][0], single[s]["loss"], rtol=2e-5)
        np.testing.assert_allclose([swarm[s]["mixture_weights"][0][d] for d in names],
                                   [single[s]["mixture_weights"][d] for d in names], rtol=1e-4)
    # The member with its own hyperparameter (alpha=0: only the last reward counts) moved
    # elsewhere: each member runs its own controller.
    last = [swarm[16]["mixture_weights"][i] for i in (0, 1)]
    assert last[0] != last[1]
