"""The continual-pretraining experiment: paired differences, the observed critical ratio and the
table from its rows (by hand), bad arguments, and the command end to end at its tiniest size
(pretraining, the infinite schedule's anneal branch, continuations with and without replay,
scratch, the CMR sweep and fit, the report files, and a rerun that trains nothing)."""

from __future__ import annotations

import json
import math

import pytest

from loam.experiments import continual as ct


def _rows():
    rows = []
    for seed, (g0, g25, f0, f25) in enumerate([(0.5, 0.4, 0.30, 0.10), (0.6, 0.55, 0.25, 0.12),
                                               (0.4, 0.41, 0.20, 0.05)]):
        for replay, gain, forget in ((0.0, g0, f0), (0.25, g25, f25)):
            rows.append({"arm": ct._arm("cosine", replay), "seed": seed, "schedule": "cosine",
                         "replay": replay, "gain": gain, "forgetting": forget,
                         "gap_depth": forget / 2, "recovery_step": None if seed == 2 else 4,
                         "new_loss": 3.0 - gain, "old_loss": 3.0 + forget})
        rows.append({"arm": "scratch", "seed": seed, "schedule": "cosine", "replay": None,
                     "new_loss": 2.6, "old_loss": 3.1})
    return rows


def test_paired_differences_and_summary_by_hand():
    rows = _rows()
    p = ct.paired(rows, "cosine_replay25", "cosine_replay0", "forgetting")
    diffs = [0.10 - 0.30, 0.12 - 0.25, 0.05 - 0.20]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert p["seeds"] == 3 and p["diff"] == pytest.approx(mean) and p["se"] == pytest.approx(se)
    summary = ct.summarise(rows)
    e = summary["cosine_replay25"]
    assert e["vs_no_replay"]["forgetting"]["diff"] == pytest.approx(mean)
    assert e["vs_scratch"]["old_loss"]["diff"] == pytest.approx(
        (3.10 - 3.1 + 3.12 - 3.1 + 3.05 - 3.1) / 3)
    assert e["recovery_step"]["n"] == 2 and e["unrecovered_seeds"] == 1
    table = ct.tables(summary, None, {"new": "code", "seeds": 3, "size": "hand"})
    assert f"{mean:+.4f} ± {se:.4f}" in table and "(1 seed(s) not recovered)" in table
    text = ct.summary_text(summary, None)
    assert "cosine, 25% replay: less forgetting than no replay" in text


def test_observed_critical_ratio_by_hand():
    # Rises 0.01, 0.03, 0.09 at shares 0.5, 0.75, 1.0: the tolerance 0.05 is crossed a third of
    # the way from 0.75 to 1.0.
    assert ct.observed_cmr([1.0, 0.5, 0.75], [0.09, 0.01, 0.03], 0.05) == pytest.approx(
        0.75 + 0.25 / 3)
    assert ct.observed_cmr([0.5, 1.0], [0.01, 0.02], 0.05) == 1.0  # every share is within
    assert ct.observed_cmr([0.5, 1.0], [0.2, 0.3], 0.05) == 0.0  # none is


@pytest.mark.parametrize("args,message", [
    (["--size", "huge"], "--size 'huge' is not one of tiny"),
    (["--replay", "0.5,1.0"], "fractions must lie in [0, 1)"),
    (["--schedules", "cosine,linear"], "choose among cosine, infinite"),
    (["--seeds", "1"], "--seeds must be >= 2"),
    (["--cmr_ratios", "0.5,1.0"], "needs 3 or more distinct shares"),
    (["--new", "poetry"], "not a bundled domain"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        ct.main(["--workdir", str(tmp_path / "out"), *args])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_the_experiment_end_to_end(tmp_path, capsys):
    args = ["--workdir", str(tmp_path), "--size", "tiny", "--schedules", "infinite",
            "--replay", "0.25", "--quiet"]
    ct.main(args)
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    summary = result["summary"]
    assert set(summary) == {"infinite_replay0", "infinite_replay25", "scratch"}
    e = summary["infinite_replay25"]
    for metric in ("gain", "forgetting", "gap_depth"):
        assert e[metric]["n"] == 2 and math.isfinite(e[metric]["mean"]), metric
        assert e["vs_no_replay"][metric]["seeds"] == 2
    # The rows are the runs' own evaluations: the gain is the anneal branch's new-domain loss
    # minus the continuation's final one.
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    row = next(r for r in runs if r["arm"] == "infinite_replay25" and r["seed"] == 1)
    final = json.loads((tmp_path / "continue" / "infinite_replay25_seed1" / "eval" /
                        "step_10.json").read_text())
    annealed = json.loads((tmp_path / "pretrain" / "infinite_annealed_seed1" / "eval" /
                           "step_8.json").read_text())
    assert row["gain"] == pytest.approx(annealed["per_domain"]["code"]["loss"]
                                        - final["per_domain"]["code"]["loss"])
    config = json.loads((tmp_path / "continue" / "infinite_replay25_seed1" /
                         "config.json").read_text())
    assert config["init"]["carry"] == "all" and config["init"]["step"] == 6
    assert config["optim"]["anneal_start"] == 8 and config["data"]["replay"]["fraction"] == 0.25
    gap = json.loads((tmp_path / "continue" / "infinite_replay25_seed1" /
                      "stability_gap.json").read_text())
    assert gap["first_step"] == 6 and gap["eval_steps"][:3] == [6, 7, 8]
    # The CMR sweep: every share at every budget, the fit (or why it failed), the comparison.
    cmr = result["cmr"]
    assert len(json.loads((tmp_path / "results.json").read_text())["cmr_points"]) == 3 * 5
    assert cmr["fit_budgets"] == [256.0 * k for k in range(1, 5)]
    assert 0.0 <= cmr["observed_cmr"] <= 1.0
    assert "predicted_cmr_budget_law" in cmr or "fit_error" in cmr
    md = (tmp_path / "results.md").read_text()
    assert "| infinite_replay25 |" in md and "### summary" in md
    for name in ("results.json", "results.md", "continual.png", "stability_gap.png",
                 "cmr.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    # A rerun finds every run finished and trains nothing.
    stamp = (tmp_path / "scratch" / "seed0" / "metrics.jsonl").stat().st_mtime_ns
    ct.main(args)
    assert (tmp_path / "scratch" / "seed0" / "metrics.jsonl").stat().st_mtime_ns == stamp
