"""The early-signal report: its statistics on hand-made curves, the report and its files from a
hand-made sweep directory, bad sweeps, and the report over a real sweep (2 seeds x 3
evaluations of the probes) checked against the runs' own eval files."""

import json
import math

import ml_collections
import numpy as np
import pytest
from scipy import stats

from loam import sweep
from loam import train as train_lib
from loam.configs import default
from loam.evals import signal


def test_monotonicity_spread_and_distance_on_hand_made_curves():
    steps = [10, 20, 30, 40, 50]
    assert signal.monotonicity(steps, [0.2, 0.3, 0.35, 0.5, 0.6]) == pytest.approx(1.0)
    assert signal.monotonicity(steps, [0.6, 0.5, 0.4, 0.3, 0.2]) == pytest.approx(-1.0)
    assert signal.monotonicity(steps, [0.25] * 5) == 0.0  # no trend, not NaN
    wiggly = [0.2, 0.3, 0.25, 0.4, 0.35]
    assert signal.monotonicity(steps, wiggly) == pytest.approx(0.8)  # ranks 1 3 2 5 4

    assert signal.spread([0.5, 0.7]) == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert math.isnan(signal.spread([0.5]))
    finals = [0.40, 0.44, 0.42]
    se = np.std(finals, ddof=1) / math.sqrt(3)
    assert signal.standard_error(finals) == pytest.approx(se)
    assert signal.distance_from_chance(finals, 0.25) == pytest.approx((0.42 - 0.25) / se)
    # Seeds that agree exactly: the binomial error over the items is the floor.
    same = [0.5, 0.5]
    assert signal.standard_error(same, items=100) == pytest.approx(math.sqrt(0.25 / 200))
    assert signal.distance_from_chance(same, 0.25, items=100) == pytest.approx(
        0.25 / math.sqrt(0.25 / 200))


def curve(values, start=100, every=100):
    return [(start + every * i, float(v)) for i, v in enumerate(values)]


def hand_made_runs():
    """Two configs x three seeds: 'learns' rises steadily with a little seed noise, 'flat'
    wanders at chance, 'noisy' rises but its seeds disagree by more than it rises."""
    rng = np.random.default_rng(0)
    runs = []
    for config in ("a", "b"):
        for seed in range(3):
            learns = np.linspace(0.3, 0.7, 6) + rng.normal(0, 0.005, 6)
            flat = 0.25 + rng.normal(0, 0.01, 6)
            noisy = np.linspace(0.3, 0.35, 6) + (seed - 1) * 0.2
            runs.append({"run_id": f"{config}{seed}", "seed": seed,
                         "config": json.dumps({"lr": config}),
                         "curves": {"t/learns": curve(learns), "t/flat": curve(flat),
                                    "t/noisy": curve(noisy)},
                         "chance": {"t/learns": 0.25, "t/flat": 0.25, "t/noisy": 0.25},
                         "n": {"t/learns": 200, "t/flat": 200, "t/noisy": 200}})
    return runs


def test_verdicts_name_the_criteria_a_metric_meets_or_misses():
    result = signal.report(hand_made_runs())
    rows = {r["metric"]: r for r in result["metrics"]}
    assert result["runs"] == 6 and result["configs"] == 2
    learns, flat, noisy = rows["t/learns"], rows["t/flat"], rows["t/noisy"]
    assert learns["signal"] and learns["monotonicity"] > 0.9
    assert learns["distance_from_chance"] > 10 and learns["spread"] < learns["progress"]
    assert learns["progress"] == pytest.approx(0.4, abs=0.03)
    assert [c["seeds"] for c in learns["per_config"]] == [[0, 1, 2], [0, 1, 2]]
    assert not flat["signal"]
    assert any(r.startswith("not monotonic") for r in flat["reasons"])
    assert any("chance" in r and r.startswith(("not clear", "below")) for r in flat["reasons"])
    assert not noisy["signal"] and noisy["monotonicity"] == pytest.approx(1.0)
    assert any(r.startswith("seed spread") and "not below" in r for r in noisy["reasons"])
    assert noisy["spread"] == pytest.approx(0.2)  # the seeds' final values 0.15, 0.35, 0.55


def write_fake_sweep(root, runs):
    """A sweep directory as loam.sweep leaves it: runs/<id>/{sweep_run.json, eval.jsonl}."""
    for r in runs:
        d = root / "runs" / r["run_id"]
        d.mkdir(parents=True)
        values = {**json.loads(r["config"]), "seed": r["seed"]}
        (d / "sweep_run.json").write_text(json.dumps({"run_id": r["run_id"], "values": values}))
        lines = []
        steps = [s for s, _ in next(iter(r["curves"].values()))]
        for i, step in enumerate(steps):
            tasks = {m.split("/")[1]: {"acc": c[i][1], "chance": r["chance"][m], "n": r["n"][m]}
                     for m, c in r["curves"].items()}
            mean = float(np.mean([t["acc"] for t in tasks.values()]))
            lines.append({"step": step, "per_domain": {},
                          "downstream": {"mc": {"acc": mean, "chance": 0.25, "tasks": tasks}}})
        (d / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_command_writes_the_table_and_json_into_the_sweep(tmp_path, capsys):
    runs = hand_made_runs()
    write_fake_sweep(tmp_path, runs)
    signal.main(["--sweep", str(tmp_path)])
    out = capsys.readouterr().out
    table = (tmp_path / "signal.md").read_text()
    assert table in out
    result = json.loads((tmp_path / "signal.json").read_text())
    rows = {r["metric"]: r for r in result["metrics"]}
    assert set(rows) == {"mc/acc", "mc/learns/acc", "mc/flat/acc", "mc/noisy/acc"}
    assert rows["mc/learns/acc"]["signal"] and not rows["mc/flat/acc"]["signal"]
    assert "| mc/learns/acc | 0.250 |" in table and "| yes |" in table and "| no |" in table
    # The evaluator's mean over tasks counts the items of all its tasks.
    assert signal._items(signal.read_sweep(tmp_path), "mc/acc") == 600


@pytest.mark.parametrize("case, message", [
    ("not_a_sweep", "is not a sweep directory (no runs/ in it)"),
    ("no_metrics", "has downstream metrics in its eval.jsonl"),
    ("one_seed", "more than one seed"),
    ("two_evals", "fewer than 3 evaluations"),
])
def test_bad_sweeps_are_refused_in_one_line(tmp_path, capsys, case, message):
    runs = hand_made_runs()
    if case == "no_metrics":
        (tmp_path / "runs" / "r").mkdir(parents=True)
        (tmp_path / "runs" / "r" / "eval.jsonl").write_text('{"step": 5, "per_domain": {}}\n')
    elif case == "one_seed":
        write_fake_sweep(tmp_path, [r for r in runs if r["seed"] == 0])
    elif case == "two_evals":
        for r in runs:
            r["curves"] = {m: c[:2] for m, c in r["curves"].items()}
        write_fake_sweep(tmp_path, runs)
    with pytest.raises(SystemExit) as e:
        signal.main(["--sweep", str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "signal.md").exists()


SWEEP_SEEDS = (0, 1)
DOMAINS = ("literature", "code")


def sweep_config():
    c = ml_collections.ConfigDict()
    c.base = default.get_config("size=nano,seq_len=32,batch_size=8,steps=6")
    c.base.optim.warmup_steps = 1
    c.base.eval_every = 2  # evaluations at steps 2, 4, 6
    c.base.checkpoint_every = 6
    c.base.eval_tokens = 256
    c.base.data.domains = list(DOMAINS)
    c.base.evals = [{"kind": "probes", "items": 8}]
    c.base.mesh.data = 1  # one device: the cheapest compilation
    c.axes = [{"seed": list(SWEEP_SEEDS)}]
    return c


@pytest.mark.e2e
def test_report_over_a_real_sweep_matches_its_eval_files(tmp_path, capsys):
    """Two seeds of one config, each evaluated three times; the runs are trained by loam.train
    in this process, in the directories and with the configs loam.sweep gives them."""
    root = tmp_path / "sweep"
    runs = sweep.expand(sweep_config())
    for run in runs:
        sweep.materialise(root, run)
        train_lib.train(ml_collections.ConfigDict(run.config), sweep.run_dir(root, run))
    assert all(sweep.is_finished(root, run) for run in runs)
    signal.main(["--sweep", str(root)])
    capsys.readouterr()
    result = json.loads((root / "signal.json").read_text())
    rows = {r["metric"]: r for r in result["metrics"]}
    assert set(rows) == {f"probes/{m}" for m in ("acc", "acc_norm")} | {
        f"probes/{d}/{m}" for d in DOMAINS for m in ("acc", "acc_norm")}
    # Recomputed from the runs' eval.jsonl, independently of the report's reader.
    evals = []
    for run in runs:
        lines = (sweep.run_dir(root, run) / "eval.jsonl").read_text().splitlines()
        evals.append([json.loads(l) for l in lines])
    assert [[r["step"] for r in e] for e in evals] == [[2, 4, 6]] * 2
    for metric, pick in [("probes/acc", lambda r: r["downstream"]["probes"]["acc"]),
                         ("probes/code/acc_norm",
                          lambda r: r["downstream"]["probes"]["domains"]["code"]["acc_norm"])]:
        row = rows[metric]
        curves = [[pick(r) for r in e] for e in evals]
        finals = [c[-1] for c in curves]
        rhos = [0.0 if np.ptp(c) == 0 else stats.spearmanr([2, 4, 6], c).statistic
                for c in curves]
        assert row["monotonicity"] == pytest.approx(np.mean(rhos))
        assert row["final_mean"] == pytest.approx(np.mean(finals))
        assert row["spread"] == pytest.approx(np.std(finals, ddof=1))
        assert row["progress"] == pytest.approx(np.mean([c[-1] - c[0] for c in curves]))
        assert row["chance"] == 0.25 and row["runs"] == 2
        assert row["per_config"][0]["seeds"] == list(SWEEP_SEEDS)
        missed = [r for r in row["reasons"] if r.startswith(("not ", "below ")) or
                  "not below" in r]
        assert len(row["reasons"]) == 3 and row["signal"] == (not missed)
    assert f"| probes/acc | 0.250 | {rows['probes/acc']['final_mean']:.3f} |" in (
        root / "signal.md").read_text()
