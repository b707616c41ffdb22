"""The selection experiment: paired differences, tables and verdicts from rows (by hand), its
refusals, and the command end to end at its tiniest size (random and CoLoR-Filter on the target
comparison, the shared miniature run as the reference model): scores in the work directory's
own column store, every method at the same pooled budget, the report files, and a rerun that
trains nothing."""

from __future__ import annotations

import json
import math

import pytest

from loam.experiments import selection as sx


def _rows():
    rows = []
    for seed, (rand, color) in enumerate([(5.0, 4.9), (5.2, 5.0), (5.1, 5.1)]):
        for method, loss in (("random", rand), ("color", color)):
            rows.append({"experiment": "target", "method": method, "seed": seed,
                         "per_domain": {"docs": loss, "code": loss + 1.0},
                         "target_loss": loss, "pool_mean_loss": loss + 1.0,
                         "selected_tokens": {"code": 10 if method == "color" else 5,
                                             "literature": 0 if method == "color" else 5}})
    return rows


def test_paired_differences_tables_and_verdicts_by_hand():
    p = sx.paired(_rows(), "target", "color", "target_loss")
    diffs = [-0.1, -0.2, 0.0]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert p["seeds"] == 3
    assert p["diff"] == pytest.approx(mean) and p["se"] == pytest.approx(se)
    summary = sx.summarise(_rows())
    assert summary["budget"] == {}
    color = summary["target"]["color"]
    assert color["selected_share"] == {"code": 1.0, "literature": 0.0}
    assert color["per_domain_vs_random"]["code"]["diff"] == pytest.approx(mean)
    table = sx.tables(summary, "docs")
    assert f"| color | 3 | {5.0:.4f} | {mean:+.4f} ± {se:.4f} |" in table
    assert "| random | 3 |" in table and "(baseline)" in table
    # -0.1 ± 0.058: within two standard errors, said so
    (line,) = sx.verdicts(summary, "docs")
    assert "target / color" in line and "within 2 s.e. of random" in line
    rows = _rows()
    for r in rows:
        if r["method"] == "color":
            r["target_loss"] += 0.5
    (line,) = sx.verdicts(sx.summarise(rows), "docs")
    assert "worse than random beyond 2 s.e." in line


def test_bad_arguments_are_one_line(capsys, tmp_path):
    for args, words in ((["--methods", "random,lda"], "lda"),
                        (["--target", "web"], "not a domain"),
                        (["--seeds", "1"], "paired seeds"),
                        (["--experiments", "all"], "budget, target or both"),
                        (["--fraction", "1.5"], "(0, 1)")):
        with pytest.raises(SystemExit) as e:
            sx.main(["--workdir", str(tmp_path / "unused"), "--size", "tiny", *args])
        assert e.value.code != 0
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "unused").exists()


@pytest.mark.e2e
def test_the_experiment_end_to_end(reference_run, tmp_path, capsys):
    args = ["--workdir", str(tmp_path), "--size", "tiny", "--methods", "random,color",
            "--experiments", "target", "--prior", str(reference_run), "--quiet"]
    sx.main(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    target = result["summary"]["target"]
    assert set(target) == {"random", "color"}
    assert target["color"]["target_loss_vs_random"]["seeds"] == 2
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).is_file(), name
    # The scores live in the experiment's own column store; CoLoR-Filter's conditional model
    # was fine-tuned from the reference run on the target's training documents.
    for d in ("literature", "dialogue", "code", "reference"):
        m = json.loads(next((tmp_path / "prepared").glob(f"{d}-*/columns/color_filter.json"))
                       .read_text())
        assert m["params"]["prior"] == str(reference_run) and m["params"]["target"] == "docs:train"
    assert not list((tmp_path / "prepared").glob("docs-*/columns/color*"))
    assert list((tmp_path / "conditional").glob("*/run/checkpoints/2"))
    # Every method chose the same pooled budget (within one document's tokens): half the
    # pool's training tokens, the target left out of training.
    pool_tokens = sum(t for d, t in result["setup"]["train_tokens"].items() if d != "docs")
    rows = json.loads((tmp_path / "results.json").read_text())["runs"]
    for r in rows:
        chosen = sum(r["selected_tokens"].values())
        assert 0 < chosen <= 0.5 * pool_tokens
        cfg = json.loads((tmp_path / "runs" / "target" / f"{r['method']}_seed{r['seed']}"
                          / "config.json").read_text())
        assert "docs" not in dict(cfg["data"]["selection"])
        assert dict(cfg["data"]["weights"]).get("docs", 0.0) == 0.0
        assert cfg["seed"] == r["seed"]
    # A rerun finds every run and score finished and trains nothing.
    stamp = (tmp_path / "runs" / "target" / "color_seed0" / "metrics.jsonl").stat().st_mtime_ns
    sx.main(args)
    assert (tmp_path / "runs" / "target" / "color_seed0" / "metrics.jsonl").stat(
        ).st_mtime_ns == stamp
