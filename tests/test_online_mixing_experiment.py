"""The online-mixing experiment: paired differences and tables from its rows (by hand), and the
command end to end at a miniature size (proxies, output mixtures transferred to a model 10x
larger, the report files, and a rerun that trains nothing)."""

from __future__ import annotations

import json
import math

import pytest

from loam.experiments import online_mixing as om


def _rows():
    rows = []
    for seed, (strat, prop, odm) in enumerate([(5.0, 5.2, 4.9), (5.1, 5.2, 5.0),
                                               (4.9, 5.3, 4.9)]):
        for method, loss in (("stratified", strat), ("proportional", prop), ("odm", odm)):
            rows.append({"stage": "proxy", "method": method, "seed": seed, "mean_loss": loss,
                         "worst_loss": loss + 1.0, "worst_domain": "code", "per_domain": {}})
    return rows


def test_paired_differences_by_hand():
    p = om.paired(_rows(), "proxy", "odm", "stratified", "mean_loss")
    diffs = [-0.1, -0.1, 0.0]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert p["seeds"] == 3
    assert p["diff"] == pytest.approx(mean) and p["se"] == pytest.approx(se)
    summary = om.summarise(_rows())
    assert summary["proxy"]["odm"]["worst_loss_vs_proportional"]["diff"] == pytest.approx(
        ((4.9 - 5.2) + (5.0 - 5.2) + (4.9 - 5.3)) / 3)
    table = om.tables({**summary, "transfer": {}}, "nano", "tiny")
    assert "| odm | 3 |" in table and f"{mean:+.4f} ± {se:.4f}" in table


def test_bad_arguments_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        om.main(["--workdir", "unused", "--methods", "doremi"])
    assert e.value.code != 0
    assert "proportional" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        om.main(["--workdir", "unused", "--target", "micro"])
    assert "10x" in capsys.readouterr().err


@pytest.mark.e2e
def test_the_experiment_end_to_end(tmp_path, capsys):
    args = ["--workdir", str(tmp_path), "--seeds", "2", "--steps", "2", "--seq_len", "32",
            "--batch_size", "8", "--eval_tokens", "256", "--methods",
            "stratified,odm", "--quiet"]
    om.main(args)
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["setup"]["non_embedding_ratio"] >= 10
    for stage in ("proxy", "transfer"):
        assert set(result["summary"][stage]) == {"stratified", "odm"}
        assert result["summary"][stage]["odm"]["mean_loss_vs_stratified"]["seeds"] == 2
    for name in ("results.json", "results.md", "results.png", "weights.png"):
        assert (tmp_path / name).is_file(), name
    # The transferred ODM run trains on its proxy's output mixture.
    transfer = json.loads((tmp_path / "transfer" / "odm_seed1" / "config.json").read_text())
    output = json.loads((tmp_path / "proxy" / "odm_seed1" / "output_mixture.json").read_text())
    assert transfer["data"]["weights"] == output["data"]["weights"]
    assert transfer["model"]["size"] == "tiny"
    # A rerun finds every run finished and trains nothing.
    stamp = (tmp_path / "proxy" / "odm_seed0" / "metrics.jsonl").stat().st_mtime_ns
    om.main(args)
    assert (tmp_path / "proxy" / "odm_seed0" / "metrics.jsonl").stat().st_mtime_ns == stamp
