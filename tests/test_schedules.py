"""Learning-rate schedules for continual training: re-warm + re-decay (cosine, WSD) with a run's
own peak and warmup, and the infinite schedule (warmup, cooldown, constant, optional anneal):
values at every phase boundary, extension without changing the past, the config builder, the
schedule plot, a trainer run logging exactly the schedule, and overlapping phases refused."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loam import plots
from loam import run as run_lib
from loam import step as st
from loam.configs import default

from helpers import run_train

PEAK, LEVEL, FINAL = 1.0, 0.5, 0.1


def infinite(steps=1000, warmup=100, cooldown=200, anneal_start=800, peak=PEAK):
    return st.lr_schedule("infinite", peak, steps, warmup, final_fraction=FINAL,
                          cooldown_steps=cooldown, constant_fraction=LEVEL,
                          anneal_start=anneal_start)


def lr(schedule, t) -> float:
    return float(schedule(t))


def test_rewarm_then_redecay_with_own_peak_and_warmup():
    """A continual run's cosine or WSD re-warms from its own step 0 to its own peak."""
    for kind in ("cosine", "wsd"):
        s = st.lr_schedule(kind, 2e-3, 200, 20, final_fraction=0.1, decay_fraction=0.25)
        assert lr(s, 0) == pytest.approx(2e-3 / 20)  # re-warm starts low, never at 0
        assert lr(s, 9) == pytest.approx(1e-3)
        assert lr(s, 19) == pytest.approx(2e-3) and lr(s, 20) == pytest.approx(2e-3)
        assert lr(s, 200) == pytest.approx(2e-4)
    cos = st.lr_schedule("cosine", 2e-3, 200, 20, final_fraction=0.1)
    assert lr(cos, 110) == pytest.approx(1.1e-3, rel=1e-5)  # cosine midpoint
    wsd = st.lr_schedule("wsd", 2e-3, 200, 20, final_fraction=0.1, decay_fraction=0.25)
    assert lr(wsd, 150) == pytest.approx(2e-3) and lr(wsd, 175) == pytest.approx(1.1e-3)


def test_infinite_values_at_phase_boundaries():
    s = infinite()
    assert lr(s, 0) == pytest.approx(PEAK / 100)
    assert lr(s, 49) == pytest.approx(PEAK / 2)
    assert lr(s, 99) == pytest.approx(PEAK)  # warmup ends at the peak
    assert lr(s, 100) == pytest.approx(PEAK)  # cooldown starts there
    assert lr(s, 200) == pytest.approx((PEAK + LEVEL) / 2, rel=1e-6)  # cosine midpoint
    assert lr(s, 300) == pytest.approx(LEVEL)  # cooldown ends at the constant level
    assert lr(s, 500) == lr(s, 799) == pytest.approx(LEVEL)  # constant phase
    assert lr(s, 800) == pytest.approx(LEVEL)  # annealing starts from the level
    assert lr(s, 900) == pytest.approx((LEVEL + FINAL) / 2, rel=1e-6)  # linear
    assert lr(s, 1000) == pytest.approx(FINAL)
    assert lr(s, 999) == pytest.approx(FINAL + (LEVEL - FINAL) / 200, rel=1e-5)
    values = np.asarray(jax.jit(s)(jnp.arange(1001)))
    assert np.all(np.diff(values[99:]) <= 1e-7)  # never rises after the warmup
    # Without annealing the constant phase runs to the end and beyond.
    no_anneal = infinite(anneal_start=0)
    assert lr(no_anneal, 999) == lr(no_anneal, 10**6) == pytest.approx(LEVEL)
    # Without a cooldown the constant phase starts right after the warmup.
    no_cooldown = infinite(cooldown=0)
    assert lr(no_cooldown, 99) == pytest.approx(PEAK) and lr(no_cooldown, 100) == LEVEL


def test_infinite_constant_phase_extends_without_changing_the_past():
    """More steps and a later anneal change nothing before the old anneal start."""
    t = jnp.arange(800)
    short = np.asarray(jax.jit(infinite(steps=1000, anneal_start=800))(t))
    longer = np.asarray(jax.jit(infinite(steps=5000, anneal_start=4000))(t))
    never = np.asarray(jax.jit(infinite(steps=5000, anneal_start=0))(t))
    np.testing.assert_array_equal(short, longer)
    np.testing.assert_array_equal(short, never)


def test_infinite_peak_may_be_traced():
    """A swarm member's peak is a traced value; the schedule scales with it."""
    values = jax.jit(jax.vmap(lambda p: infinite(peak=p)(900)))(jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(np.asarray(values), [0.3, 0.6], rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(anneal_start=250), r"anneal_start=250, before warmup \+ cooldown end .* overlap"),
    (dict(anneal_start=1000), "anneal_start=1000, at or after the last step"),
    (dict(anneal_start=1500), r"Set anneal_start in \[300, 1000\)"),
    (dict(cooldown=-1), "cooldown_steps=-1 must be >= 0"),
    (dict(anneal_start=0, cooldown=950), "never reaches its constant phase"),
])
def test_infinite_refuses_overlapping_phases(kwargs, match):
    with pytest.raises(ValueError, match=match):
        infinite(**kwargs)


@pytest.mark.parametrize("level,final,match", [
    (0.0, 0.0, r"constant_lr_fraction=0.0 must lie in \(0, 1\]"),
    (1.5, 0.0, r"constant_lr_fraction=1.5 must lie in \(0, 1\]"),
    (0.2, 0.5, "would raise the learning rate"),
])
def test_infinite_refuses_bad_levels(level, final, match):
    with pytest.raises(ValueError, match=match):
        st.lr_schedule("infinite", 1.0, 100, 10, final_fraction=final, cooldown_steps=10,
                       constant_fraction=level, anneal_start=50)


def _config(**optim):
    c = default.get_config("runlocal")
    c.steps = 100
    for k, v in optim.items():
        c.optim[k] = v
    return c


def test_config_builds_the_infinite_schedule():
    c = _config(schedule="infinite", lr=2e-3, warmup_steps=10, cooldown_steps=20,
                constant_lr_fraction=0.25, anneal_start=60, final_lr_fraction=0.05)
    s = run_lib.lr_schedule(c)
    assert lr(s, 9) == pytest.approx(2e-3)
    assert lr(s, 30) == pytest.approx(5e-4) and lr(s, 60) == pytest.approx(5e-4)
    assert lr(s, 100) == pytest.approx(1e-4)
    assert run_lib.build_optimizer(c) is not None


def test_config_refuses_overlap_naming_the_fields():
    c = _config(schedule="infinite", warmup_steps=10, cooldown_steps=50, anneal_start=40)
    with pytest.raises(run_lib.ConfigError, match=r"^config.optim: infinite schedule: .*"
                       r"anneal_start=40.*warmup_steps=10 \+ cooldown_steps=50 end at step 60"):
        run_lib.build_optimizer(c)


def test_config_saved_before_the_infinite_fields_builds_its_schedule():
    """Old run directories have no cooldown_steps etc.; their schedules are built as before."""
    c = _config(schedule="wsd")
    with c.unlocked():
        for k in ("cooldown_steps", "constant_lr_fraction", "anneal_start"):
            del c.optim[k]
    s = run_lib.lr_schedule(c)
    ref = st.lr_schedule("wsd", c.optim.lr, 100, c.optim.warmup_steps,
                         final_fraction=c.optim.final_lr_fraction,
                         decay_fraction=c.optim.decay_fraction)
    t = jnp.arange(101)
    np.testing.assert_array_equal(np.asarray(jax.jit(s)(t)), np.asarray(jax.jit(ref)(t)))


def test_schedule_plot_draws_the_infinite_schedule(tmp_path):
    s = infinite()
    out = plots.schedule_plot(tmp_path / "schedule.png", ["a", "b"], lambda t: [0.5, 0.5], s,
                              1000)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_trainer_logs_the_infinite_schedule_and_refuses_overlap(tmp_path):
    optim = ["--config.optim.schedule=infinite", "--config.optim.cooldown_steps=4",
             "--config.optim.constant_lr_fraction=0.5", "--config.optim.anneal_start=8",
             "--config.optim.final_lr_fraction=0.1"]
    run_train(tmp_path / "run", *optim, "--config.checkpoint_every=100")
    config = run_lib.read_config(tmp_path / "run")
    schedule = run_lib.lr_schedule(config)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(logged) == list(range(1, 13))
    for step, value in logged.items():  # the metric at step s is the rate of update s - 1
        assert value == pytest.approx(float(schedule(step - 1)), rel=1e-6), step
    assert logged[2] == pytest.approx(3e-3) and logged[7] == pytest.approx(1.5e-3)

    proc = run_train(tmp_path / "bad", *optim[:-2], "--config.optim.anneal_start=3",
                     check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: config.optim: infinite schedule") and "overlap" in err[-1]
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_a_curriculum_stage_may_start_at_the_anneal():
    """'lr:anneal' is the infinite schedule's anneal start, as 'lr:decay' is WSD's decay; a
    schedule without an annealing phase refuses it in one line."""
    from loam.data import curriculum

    stages = [dict(name="main", start=0, weights="uniform"),
              dict(name="cool", start="lr:anneal", weights={"code": 1.0})]
    c = _config(schedule="infinite", anneal_start=150, cooldown_steps=20)
    c.steps = 300
    c.data.stages = stages
    got = curriculum.stages_from_config(c)
    assert [s.start for s in got.stages] == [0, 150]
    c.optim.anneal_start = 250  # the stage moves with the anneal
    assert curriculum.stages_from_config(c).stages[1].start == 250
    for optim, words in (({"anneal_start": 0}, "never anneals (optim.anneal_start=0)"),
                         ({"schedule": "cosine"}, "'cosine' schedule has none")):
        c.optim.update(optim)
        with pytest.raises(curriculum.CurriculumError) as e:
            curriculum.stages_from_config(c)
        assert words in str(e.value) and "lr:anneal" in str(e.value)
        assert "\n" not in str(e.value)
