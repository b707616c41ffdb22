"""Per-token loss weights in the shared update, and DoReMi on top of them.

The seam: all-ones token weights give the very update of a batch without them (bit for bit, with
and without gradient accumulation), and other weights give the gradient of the weighted loss
(checked against jax.grad of Σ w·nll / Σ loss_weights), while the per-domain sums stay
unweighted. DoReMi: its update rule against hand-computed steps, then a real reference run, a
DoReMi run against it that moves its domain weights, a SIGKILLed DoReMi run that resumes bit for
bit, and the bad inputs refused before any training.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_online import kill_after, records

from loam import step as st
from loam.configs import default
from loam.data import weights as weights_lib
from loam.mixing.online import doremi
from loam.model import sharding as shd
from loam.model.transformer import ModelConfig, Transformer

from helpers import SMALL, env, losses, run_train

# --------------------------------------------------------------------------- per-token weights

CFG = ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_dim=64,
                  max_len=16, tied_embeddings=False)
MODEL = Transformer(CFG)
B, L, DOMAINS, Z_LOSS = 8, 16, 3, 1e-4
# Plain SGD at learning rate 1 through the update's own lr bookkeeping: an update subtracts
# exactly the gradient the step computed.
SGD = optax.chain(optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=1.0))


def _batch(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seg = np.ones((B, L), np.int32)
    seg[::3, 12:] = 0  # some padding
    return dict(inputs=rng.integers(0, 256, (B, L)).astype(np.int32),
                targets=rng.integers(0, 256, (B, L)).astype(np.int32),
                loss_weights=(seg > 0).astype(np.float32), segment_ids=seg,
                positions=np.arange(L, dtype=np.int32)[None].repeat(B, 0) * (seg > 0),
                prefix=np.zeros((B, L), np.int32),
                domain_ids=rng.integers(0, DOMAINS, (B, L)).astype(np.int32))


BATCH = _batch()


@functools.cache
def _setup():
    """A 2-device mesh, the initial state (on the host) and its shardings, and the parameters
    of another initialisation to serve as a reference model."""
    mesh = shd.make_mesh(2, 1, 1, devices=jax.devices()[:2])
    state, shardings = st.init_state(MODEL, SGD, jax.random.key(0), mesh, L, B)
    reference, _ = st.init_state(MODEL, SGD, jax.random.key(7), mesh, L, B)
    return mesh, jax.device_get(state), shardings, reference.params


@functools.cache
def _train_step(accum_steps: int, reference: bool):
    mesh, _, shardings, _ = _setup()
    return st.make_train_step(MODEL, SGD, mesh, shardings, DOMAINS, z_loss=Z_LOSS,
                              accum_steps=accum_steps,
                              reference_shardings=shardings.params if reference else None)


def _step(batch, accum_steps=1, reference=False):
    """One compiled update of the initial state: (params after, metrics), on the host."""
    mesh, initial, shardings, reference_params = _setup()
    state = jax.device_put(initial, shardings)  # fresh buffers: the step donates its state
    extra = (reference_params,) if reference else ()
    state, metrics = _train_step(accum_steps, reference)(state, shd.shard_batch(batch, mesh),
                                                         *extra)
    return jax.device_get(state.params), jax.device_get(metrics)


@functools.cache
def _plain(accum_steps: int):
    return _step(BATCH, accum_steps)


_nll = jax.jit(lambda params, batch: st.token_nll(params, MODEL, batch))


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_all_ones_token_weights_are_the_unweighted_update(accum_steps):
    plain, plain_m = _plain(accum_steps)
    ones, ones_m = _step(dict(BATCH, token_weights=np.ones((B, L), np.float32)), accum_steps)
    assert _equal(plain, ones)
    assert sorted(plain_m) == sorted(ones_m)
    for k in plain_m:
        assert np.array_equal(plain_m[k], ones_m[k]), k


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_token_weights_give_the_gradient_of_the_weighted_loss(accum_steps):
    domain_weight = np.array([2.0, 1.0, 0.5], np.float32)  # domain 0 counts twice, 2 half
    tw = domain_weight[BATCH["domain_ids"]]
    after, metrics = _step(dict(BATCH, token_weights=tw), accum_steps)
    before = _setup()[1].params

    def weighted_loss(params):  # z-loss stays unweighted: it regularises the logits
        nll, lse = st.token_nll(params, MODEL, BATCH)
        lw = jnp.asarray(BATCH["loss_weights"])
        return (jnp.sum(nll * lw * tw) + Z_LOSS * jnp.sum(lse**2 * lw)) / jnp.sum(lw)

    grads = jax.jit(jax.grad(weighted_loss))(before)
    for g, p0, p1 in zip(jax.tree.leaves(grads), jax.tree.leaves(before),
                         jax.tree.leaves(after), strict=True):
        np.testing.assert_allclose(p0 - p1, g, rtol=1e-4, atol=3e-7)
    plain, plain_m = _plain(accum_steps)
    assert not _equal(after, plain)
    # The metrics stay the unweighted losses the controllers read.
    for k in ("loss", "domain_loss_sum", "domain_tokens", "tokens"):
        np.testing.assert_allclose(metrics[k], plain_m[k], rtol=1e-6)
    nll, _ = _nll(before, BATCH)
    want = np.bincount(BATCH["domain_ids"].ravel(),
                       weights=(np.asarray(nll) * BATCH["loss_weights"]).ravel(),
                       minlength=DOMAINS)
    np.testing.assert_allclose(metrics["domain_loss_sum"], want, rtol=1e-5)


def test_reference_model_gives_the_clipped_excess_per_domain():
    """The reference runs in the same step without gradients: the update is unchanged and
    domain_excess_sum is Σ max(nll - reference nll, 0) per domain."""
    after, metrics = _step(BATCH, reference=True)
    plain, plain_m = _plain(1)
    assert _equal(after, plain)
    _, initial, _, reference_params = _setup()
    nll, _ = _nll(initial.params, BATCH)
    ref_nll, _ = _nll(jax.device_get(reference_params), BATCH)
    excess = np.maximum(np.asarray(nll) - np.asarray(ref_nll), 0) * BATCH["loss_weights"]
    want = np.bincount(BATCH["domain_ids"].ravel(), weights=excess.ravel(), minlength=DOMAINS)
    np.testing.assert_allclose(metrics["domain_excess_sum"], want, rtol=1e-5, atol=1e-6)
    assert want.min() > 0  # two random models: every domain has some excess
    np.testing.assert_array_equal(metrics["domain_loss_sum"], plain_m["domain_loss_sum"])


# --------------------------------------------------------------------------- the update rule

NAMES = ["a", "b", "c"]


def test_update_matches_a_hand_computed_step():
    alpha = [0.5, 0.3, 0.2]
    excess = [0.1, 0.4, 0.0]
    eta, c = 1.0, 1e-3
    raw = [a * math.exp(eta * x) for a, x in zip(alpha, excess)]  # 0.5525.., 0.4475.., 0.2
    want = [(1 - c) * r / sum(raw) + c / 3 for r in raw]
    got = np.exp(doremi.update(np.log(alpha), excess, eta, c))
    np.testing.assert_allclose(got, want, rtol=1e-13)
    assert got[1] > 0.3 and got[2] < 0.2  # weight moves to the domain with the larger excess

    # The source does the same from per-domain sums and token counts.
    source = doremi.DoReMi(NAMES, [0.2, 0.3, 0.5], step_size=2.0, smoothing=0.0)
    source.observe(0, np.array([0.3, 1.2, 0.0]), np.array([3.0, 4.0, 5.0]))  # λ = .1, .3, 0
    raw = [math.exp(2.0 * x) for x in (0.1, 0.3, 0.0)]
    np.testing.assert_allclose(np.exp(source.log_alpha), [r / sum(raw) for r in raw],
                               rtol=1e-13)


def test_equal_excess_is_a_fixed_point():
    uniform = np.log(np.full(3, 1 / 3))
    for c in (0.0, 1e-3, 0.5):
        np.testing.assert_allclose(np.exp(doremi.update(uniform, [0.7] * 3, 1.0, c)), [1 / 3] * 3,
                                   rtol=1e-14)
    # Without smoothing any α is a fixed point of equal excess losses.
    alpha = np.array([0.6, 0.3, 0.1])
    np.testing.assert_allclose(np.exp(doremi.update(np.log(alpha), [2.0] * 3, 1.0, 0.0)), alpha,
                               rtol=1e-14)


def test_smoothing_keeps_every_domain_above_c_over_k():
    got = np.exp(doremi.update(np.log(np.full(3, 1 / 3)), [50.0, 0.0, 0.0], 1.0, 0.3))
    np.testing.assert_allclose(got, [0.7 + 0.1, 0.1, 0.1], rtol=1e-12)
    assert got.sum() == pytest.approx(1.0, abs=1e-15)


def test_absent_domains_keep_their_previous_excess():
    source = doremi.DoReMi(NAMES, [1 / 3] * 3, step_size=1.0, smoothing=1e-3)
    assert np.array_equal(source.propose(0, None), source.sampling)
    source.observe(0, np.array([0.3, 0.6, 0.0]), np.array([3.0, 2.0, 0.0]))
    np.testing.assert_allclose(source.excess, [0.1, 0.3, 0.0])
    source.observe(1, np.array([0.0, 0.8, 0.5]), np.array([0.0, 4.0, 5.0]))
    np.testing.assert_allclose(source.excess, [0.1, 0.2, 0.1])  # a keeps 0.1
    want = doremi.update(doremi.update(np.log(np.full(3, 1 / 3)), [0.1, 0.3, 0.0], 1.0, 1e-3),
                         [0.1, 0.2, 0.1], 1.0, 1e-3)
    np.testing.assert_allclose(source.log_alpha, want, rtol=1e-14)
    # Token weights of a step are α of that step over the sampling weights; the output mixture
    # averages α over the steps.
    source.propose(1, None)
    np.testing.assert_allclose(source.token_weights(1), np.exp(source.log_alpha) * 3)
    np.testing.assert_allclose(list(source.output_weights().values()),
                               (np.full(3, 1 / 3) + np.exp(source.log_alpha)) / 2)
    # loam.mixing.online.output passes the weights log of the steps trained.
    np.testing.assert_allclose(list(source.output_weights(np.zeros((1, 3))).values()),
                               [1 / 3] * 3)
    state = json.loads(json.dumps(source.state_dict()))
    again = doremi.DoReMi(NAMES, [1 / 3] * 3)
    again.load_state_dict(state)
    assert again.state_dict() == source.state_dict()


@pytest.mark.parametrize("field,value,match", [
    ("step_size", 0.0, "step_size=0.0 must be > 0"),
    ("step_size", -1.0, "step_size=-1.0 must be > 0"),
    ("smoothing", 1.0, r"smoothing=1.0 must lie in \[0, 1\)"),
    ("smoothing", -0.1, r"smoothing=-0.1 must lie in \[0, 1\)"),
])
def test_bad_hyperparameters(field, value, match):
    with pytest.raises(ValueError, match=match):
        doremi.DoReMi(NAMES, [1 / 3] * 3, **{field: value})


# --------------------------------------------------------------------------- real runs

DOREMI_CONFIG = """
from loam.configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.mixing.method = "doremi"
    c.mixing.doremi = dict(reference={reference!r}, step_size=1.0, smoothing=1e-3)
    return c
"""
RUN = [*SMALL, "--config.checkpoint_every=5"]  # 12 steps; checkpoints at 5, 10, 12


def _doremi_config(directory: Path, reference) -> str:
    path = directory / "doremi_config.py"
    path.write_text(DOREMI_CONFIG.format(reference=str(reference)))
    return str(path)


def _config(reference, **doremi_fields):
    """A resolved DoReMi config of the miniature run, for in-process checks."""
    from loam import run as run_lib
    c = default.get_config("size=nano,steps=12,seq_len=64,batch_size=8")
    c.mixing.method = "doremi"
    c.mixing.doremi = {"reference": str(reference), **doremi_fields}
    return run_lib.resolve_config(c)[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("doremi") / "reference"
    run_train(workdir, *SMALL, "--config.data.weights=proportional", devices=1)
    return workdir


@pytest.fixture(scope="module")
def doremi_run(reference):
    workdir = reference.parent / "doremi"
    run_train(workdir, *RUN, devices=1, base=[],
              config=_doremi_config(reference.parent, reference))
    return workdir


@pytest.mark.e2e
def test_doremi_run_moves_its_domain_weights(reference, doremi_run):
    recs = records(doremi_run)
    assert sorted(recs) == list(range(1, 13))
    ref_weights = records(reference)[1]["mixture_weights"]
    alphas = [recs[s]["doremi_weights"] for s in sorted(recs)]
    for s in sorted(recs):  # sampling stays the reference's (proportional) mixture
        assert recs[s]["mixture_weights"] == pytest.approx(ref_weights, rel=1e-12)
    # α starts uniform; steps 0 and 1 use it (feedback delay); then the excess losses move it.
    assert alphas[0] == alphas[1] == pytest.approx({d: 0.2 for d in alphas[0]}, rel=1e-12)
    assert len({json.dumps(a) for a in alphas}) >= 10
    assert max(abs(v - 0.2) for v in alphas[-1].values()) > 0.01
    meta = json.loads(next((doremi_run / "checkpoints" / "12").rglob("meta/metadata"))
                      .read_text())
    state = meta["data"]["source_state"]
    assert len(state["history"]) == 12 and state["reference_step"] == 12
    np.testing.assert_allclose(state["history"][-1], list(alphas[-1].values()), rtol=0)
    # The proxy trains against the reference: its excess over the reference is what moved α.
    assert min(state["excess"]) >= 0 and max(state["excess"]) > 0
    # The output mixture is the average of α over the run, as a static config loam.train runs.
    output = json.loads((doremi_run / "output_mixture.json").read_text())
    assert output["mixing"]["method"] == "static"
    mean = {d: float(np.mean([a[d] for a in alphas])) for d in alphas[0]}
    assert output["data"]["weights"] == pytest.approx(mean, rel=1e-12)
    # The schedule plot has α's panel between the sampling weights and the learning rate.
    from matplotlib import image
    heights = [image.imread(run / "schedule.png").shape[0] for run in (reference, doremi_run)]
    assert heights == [550, 800]


@pytest.mark.e2e
def test_killed_doremi_run_resumes_bit_exactly(reference, doremi_run, tmp_path):
    killed = tmp_path / "killed"
    config = _doremi_config(tmp_path, reference)
    cmd = [sys.executable, "-m", "loam.train", f"--config={config}", f"--workdir={killed}", *RUN]
    kill_after(cmd, killed, 7, env(1))
    assert max(losses(killed)) < 12, "the run finished before it could be killed"
    run_train(killed, *RUN, devices=1, base=[], config=config)
    want, got = records(doremi_run), records(killed)
    assert sorted(got) == sorted(want)
    for s in want:  # the same floats, not just close
        assert got[s]["loss"] == want[s]["loss"], s
        assert got[s]["doremi_weights"] == want[s]["doremi_weights"], s
        assert got[s]["loss_per_domain"] == want[s]["loss_per_domain"], s


@pytest.mark.e2e
def test_bad_references_are_refused_before_training(reference, tmp_path):
    def refused(ref, match, **fields):
        with pytest.raises(ValueError, match=match):
            weights_lib.source_from_config(_config(ref, **fields))

    refused(tmp_path / "nowhere", "is not a loam run directory")
    refused("", "reference is empty")
    refused(reference, "unknown key", eta=1.0)
    refused(reference, "step_size=0 must be > 0", step_size=0)
    refused(reference, r"smoothing=1 must lie in \[0, 1\)", smoothing=1)

    no_ckpt = tmp_path / "no_checkpoints"
    no_ckpt.mkdir()
    shutil.copy(reference / "config.json", no_ckpt / "config.json")
    refused(no_ckpt, "has no checkpoint")

    def edited(name, edit):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "checkpoints").symlink_to(reference / "checkpoints")
        saved = json.loads((reference / "config.json").read_text())
        edit(saved)
        (directory / "config.json").write_text(json.dumps(saved))
        return directory

    other_sources = edited("other_sources", lambda c: c["data"].update(
        sources=c["data"]["sources"][:4], domains=[]))
    refused(other_sources, "reference was trained with data.sources=")
    tokenizer = edited("other_tokenizer", lambda c: c["data"].update(
        tokenizer=str(tmp_path / "other.model")))
    refused(tokenizer, "reference was trained with data.tokenizer=")
    online = edited("online", lambda c: c.update(mixing={"method": "greedy_loss"}))
    refused(online, "DoReMi's reference trains on constant weights")

    # Through the CLI: one error line, exit 1, nothing written.
    out = tmp_path / "out"
    proc = run_train(out, *RUN, "--config.mixing.doremi.smoothing=-0.5", devices=1, base=[],
                     config=_doremi_config(tmp_path, reference), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "smoothing=-0.5 must lie in [0, 1)" in proc.stderr
    assert not (out / "config.json").exists()


SWARM_SCRIPT = """
import json, sys
from loam.configs import default
from loam.mixing import swarm as sw

c = default.get_config("size=nano,steps=12,seq_len=64,batch_size=8")
c.optim.warmup_steps = 2
c.log_every, c.checkpoint_every, c.eval_every, c.keep_checkpoints = 1, 5, 1000, 5
c.eval_tokens, c.eval_batch_size = 1024, 16
doremi = {"method": "doremi", "doremi": {"reference": sys.argv[2]}}
members = [sw.Member("uniform", seed=0, name="eta1", mixing=doremi),
           sw.Member("uniform", seed=0, name="eta4",
                     mixing={**doremi, "doremi": {"reference": sys.argv[2], "step_size": 4.0}}),
           sw.Member("uniform", seed=0, name="odm", mixing={"method": "odm"})]
sw.train_swarm(c, members, sys.argv[1], eval_domains=["code"], verbose=False)
"""


@pytest.mark.e2e
def test_a_swarm_member_running_doremi_equals_the_single_run(reference, doremi_run, tmp_path):
    """DoReMi members (η = 1 and 4) and an ODM member in one swarm: the reference runs in the
    swarm's compiled step, member 0 matches the single DoReMi run (loss and α), the member with
    η = 4 moves α further, and the ODM member learns from its own losses as usual."""
    import subprocess

    script = tmp_path / "swarm.py"
    script.write_text(SWARM_SCRIPT)
    out = tmp_path / "swarm"
    subprocess.run([sys.executable, str(script), str(out), str(reference)], env=env(1),
                   check=True, timeout=600, capture_output=True)
    single, swarm = records(doremi_run), records(out)
    assert sorted(swarm) == sorted(single)
    names = list(single[1]["doremi_weights"])
    for s in single:
        np.testing.assert_allclose(swarm[s]["loss"][0], single[s]["loss"], rtol=2e-5)
        np.testing.assert_allclose([swarm[s]["doremi_weights"][0][d] for d in names],
                                   [single[s]["doremi_weights"][d] for d in names], rtol=1e-4)
        assert swarm[s]["doremi_weights"][2] is None  # the ODM member reports no α
    spread = [max(abs(v - 0.2) for v in swarm[12]["doremi_weights"][i].values()) for i in (0, 1)]
    assert spread[1] > spread[0]
    odm_weights = [swarm[s]["mixture_weights"][2] for s in sorted(swarm)]
    assert len({json.dumps(w) for w in odm_weights}) > 2
    # The swarm's checkpoint holds each DoReMi member's state, its reference step included.
    meta = json.loads(next((out / "checkpoints" / "12").rglob("meta/metadata")).read_text())
    assert [d["source_state"].get("reference_step") for d in meta["data"][:2]] == [12, 12]


@pytest.mark.e2e
def test_a_swarm_refuses_doremi_members_with_different_references(reference, tmp_path):
    from loam.mixing import swarm as sw
    other = tmp_path / "other_reference"
    shutil.copytree(reference, other)
    c = default.get_config("size=nano,steps=12,seq_len=64,batch_size=8")
    c.optim.warmup_steps = 2
    members = [sw.Member("uniform", mixing={"method": "doremi",
                                            "doremi": {"reference": str(r)}})
               for r in (reference, other)]
    swarm = sw.Swarm(c, members, build_streams=True)
    with pytest.raises(ValueError, match="different references"):
        swarm.train_step(swarm.init(), swarm.batch(0))


@pytest.mark.e2e
def test_iterated_doremi_trains_each_reference_on_the_previous_output(tmp_path, capsys):
    from loam.mixing import doremi_rounds
    workdir = tmp_path / "rounds"
    flags = ["--config.model.size=nano", "--config.data.seq_len=32", "--config.data.batch_size=8",
             "--config.steps=4", "--config.optim.warmup_steps=1", "--config.eval_tokens=256",
             "--config.checkpoint_every=4", "--config.eval_every=4"]
    doremi_rounds.main(["x", f"--config={default.__file__}", f"--workdir={workdir}",
                        "--rounds=2", *flags])
    result = json.loads((workdir / "rounds.json").read_text())
    r1, r2 = result["rounds"]
    proportional = json.loads((workdir / "round1" / "reference" / "config.json").read_text())
    assert proportional["data"]["weights"] == pytest.approx(r1["reference_weights"], rel=1e-12)
    assert r2["reference_weights"] == pytest.approx(r1["output_weights"], rel=1e-12)
    ref2 = json.loads((workdir / "round2" / "reference" / "config.json").read_text())
    assert ref2["data"]["weights"] == pytest.approx(r1["output_weights"], rel=1e-12)
    proxy2 = json.loads((workdir / "round2" / "proxy" / "config.json").read_text())
    assert proxy2["mixing"]["doremi"]["reference"] == str(workdir / "round2" / "reference")
    for r in (r1, r2):
        moved = 0.5 * sum(abs(r["output_weights"][d] - r["reference_weights"][d])
                          for d in r["output_weights"])
        assert r["total_variation"] == pytest.approx(moved) and moved > 0
    # A rerun trains nothing and writes the same rounds.
    stamp = (workdir / "round2" / "proxy" / "metrics.jsonl").stat().st_mtime_ns
    doremi_rounds.main(["x", f"--config={default.__file__}", f"--workdir={workdir}",
                        "--rounds=2", *flags])
    assert (workdir / "round2" / "proxy" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert json.loads((workdir / "rounds.json").read_text()) == result
