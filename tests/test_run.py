"""The builders' config checks (loam.run): what a run may change on resume, and what a config
must satisfy before anything is written."""

from __future__ import annotations

import ml_collections
import pytest

from loam import run as run_lib
from loam.configs import default


def test_resume_mismatch_names_the_field_and_allows_the_future_to_change():
    saved = default.get_config()
    new = default.get_config()
    new.steps, new.eval_every, new.mesh.fsdp = 600, 50, 2  # longer run, other cadence and mesh
    assert run_lib.resume_mismatch(saved, new) is None
    new.model.size = "mini"
    problem = run_lib.resume_mismatch(saved, new)
    assert problem.startswith("model.size was 'tiny'") and "new workdir" in problem
    other = default.get_config()
    other.mixing.method = "greedy_loss"
    assert run_lib.resume_mismatch(saved, other).startswith("mixing was")


def test_a_config_saved_before_mixing_existed_resumes_as_static():
    new = default.get_config()
    old = ml_collections.ConfigDict(new.to_dict())
    del old["mixing"]
    assert run_lib.resume_mismatch(old, new) is None
    new.mixing.method = "greedy_loss"
    assert run_lib.resume_mismatch(old, new).startswith("mixing was {'method': 'static'}")


@pytest.mark.parametrize("field, value, match", [
    ("steps", 0, "steps=0"), ("log_every", 0, "log_every=0"),
    ("optim.lr", float("nan"), "optim.lr=nan"), ("optim.lr", 0.0, "optim.lr=0.0 must be positive"),
    ("optim.accum_steps", 3, "divide data.batch_size=16"),
])
def test_resolve_config_refuses_what_cannot_run(field, value, match):
    c = default.get_config()
    node, _, key = field.rpartition(".")
    (c[node] if node else c)[key] = value
    with pytest.raises(run_lib.ConfigError, match=match):
        run_lib.resolve_config(c)


def test_resolve_config_clamps_a_warmup_longer_than_the_run_and_copies():
    c = default.get_config("steps=20")
    resolved, notes = run_lib.resolve_config(c)
    assert resolved.optim.warmup_steps == 2 and c.optim.warmup_steps == 30
    assert len(notes) == 1 and "warmup_steps=30 exceeds steps=20" in notes[0]
    assert run_lib.resolve_config(default.get_config())[1] == []


def test_save_config_keeps_every_edited_config(tmp_path):
    """An edited config moves the previous one aside, never over an older copy, even within
    one second; an unchanged config writes nothing."""
    import json

    from loam.workdir import save_config

    configs = [default.get_config(f"steps={s}") for s in (10, 20, 30)]
    for c in configs:
        save_config(tmp_path, c)
    save_config(tmp_path, configs[-1])  # unchanged: no new copy
    copies = sorted(tmp_path.glob("config.*.json"))
    assert len(copies) == 2
    assert sorted(json.loads(p.read_text())["steps"] for p in copies) == [10, 20]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 30


@pytest.mark.parametrize("field,usual,other,unknown,choices", [
    ("loss_impl", "fused", "logits", "chunked", "fused, logits"),
    ("attention_impl", "manual", "xla", "flash", "manual, xla, splash, causal_blocks"),
    ("residuals", "dots", "all", "some", "dots, all"),
])
def test_the_run_config_chooses_how_the_step_computes_and_refuses_an_unknown_way(
        field, usual, other, unknown, choices):
    config = default.get_config("size=nano,steps=10,seq_len=64,batch_size=8")
    assert getattr(run_lib.model_config(config), field) == usual
    config.model[field] = other
    assert getattr(run_lib.model_config(config), field) == other
    config.model[field] = unknown
    with pytest.raises(ValueError, match=f"{field}='{unknown}'; choose one of {choices}"):
        run_lib.model_config(config)
    # A run saved before the setting existed reads as the default: equal numbers either way.
    saved = default.get_config("size=nano,steps=10,seq_len=64,batch_size=8").to_dict()
    del saved["model"][field]
    assert run_lib.comparable(saved)["model"][field] == usual
