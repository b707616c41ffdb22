"""RegMix and data-mixing laws on synthetic proxy results with a known optimum, the Dirichlet
sampler and epoch caps, the written proposal config, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loam.mixing import laws, regmix

DOMAINS = ["literature", "dialogue", "code", "docs", "reference"]
SHARES = np.array([0.3, 0.1, 0.25, 0.2, 0.15])


def test_dirichlet_sampler_centre_spread_and_caps():
    w = regmix.sample_mixtures(4000, SHARES, concentration=20.0, seed=0)
    assert w.shape == (4000, 5) and np.allclose(w.sum(1), 1.0) and (w >= 0).all()
    np.testing.assert_allclose(w.mean(0), SHARES, atol=0.01)  # centred on the token shares
    wide = regmix.sample_mixtures(4000, SHARES, concentration=1.0, seed=0)
    assert wide.std(0).mean() > 2 * w.std(0).mean()  # lower concentration spreads further
    np.testing.assert_array_equal(w, regmix.sample_mixtures(4000, SHARES, 20.0, seed=0))
    # Epoch caps: domain sizes, a budget and max_epochs bound each weight.
    sizes = np.array([3e6, 1e6, 2e6, 2e6, 2e6])
    upper = regmix.max_weights(sizes, budget_tokens=10e6, max_epochs=2.0)
    np.testing.assert_allclose(upper, [0.6, 0.2, 0.4, 0.4, 0.4])
    capped = regmix.sample_mixtures(500, SHARES, [0.5, 5.0], seed=1, upper=upper)
    assert (capped <= upper + 1e-12).all()
    assert capped[:, 1].max() > 0.15  # the caps bind: without them dialogue often exceeds 0.2
    regmix.check_epoch_caps(capped, sizes, 10e6, 2.0, DOMAINS)
    with pytest.raises(regmix.MixSearchError, match="exceed the epoch caps.*dialogue 0.500"):
        regmix.check_epoch_caps([[0.1, 0.5, 0.1, 0.1, 0.2]], sizes, 10e6, 2.0, DOMAINS)
    with pytest.raises(regmix.MixSearchError, match="Raise max_epochs or lower the budget"):
        regmix.max_weights(sizes, budget_tokens=100e6, max_epochs=2.0)
    with pytest.raises(regmix.MixSearchError, match="never met the epoch caps"):
        regmix.sample_mixtures(5, SHARES, 1000.0, seed=0, upper=[0.05, 0.05, 0.3, 0.3, 0.3])
    with pytest.raises(regmix.MixSearchError, match="concentration must be positive"):
        regmix.sample_mixtures(5, SHARES, 0.0, seed=0)


def bowl(R, centre):
    return 2.0 + 5.0 * np.sum((R - centre) ** 2, axis=1)


def test_gbdt_finds_an_interior_optimum_and_ranks_held_out_proxies():
    centre = np.array([0.15, 0.35, 0.2, 0.2, 0.1])
    R = regmix.sample_mixtures(200, SHARES, 3.0, seed=2)
    y = bowl(R, centre) + np.random.default_rng(0).normal(0, 0.005, len(R))
    fit = regmix.fit_regressor("lightgbm", R, y, holdout_fraction=0.25, seed=0)
    assert fit["spearman"] > 0.8 and len(fit["heldout"]) == 50
    candidates = regmix.sample_mixtures(100_000, SHARES, 3.0, seed=3)
    w, info = regmix.propose(fit["regressor"], candidates, top_k=100)
    assert info["candidates"] == 100_000
    assert np.abs(w - centre).sum() < 0.2, w
    assert bowl(w[None], centre)[0] < bowl(SHARES[None], centre)[0] - 0.1


def test_linear_regression_recovers_a_linear_target_and_its_corner():
    a = np.array([1.0, 3.0, 0.5, 2.0, 2.5])
    R = regmix.sample_mixtures(40, SHARES, 2.0, seed=4)
    y = R @ a
    fit = regmix.fit_regressor("linear", R, y, seed=0)
    assert fit["spearman"] > 0.99
    np.testing.assert_allclose(fit["regressor"].predict(R), y, atol=1e-9)
    upper = np.array([0.6, 1.0, 0.3, 1.0, 1.0])  # the best domain (code) is capped at 0.3
    candidates = regmix.sample_mixtures(100_000, SHARES, 1.0, seed=5, upper=upper)
    w, _ = regmix.propose(fit["regressor"], candidates, top_k=20)
    optimum = np.array([0.6, 0.0, 0.3, 0.0, 0.1])  # capped code, then literature, then the rest
    assert w @ a < SHARES @ a - 0.4
    assert w @ a - optimum @ a < 0.25 and (w <= upper + 1e-9).all()


def test_mixing_law_fit_recovers_parameters_and_optimum():
    rng = np.random.default_rng(0)
    D = 4
    t_true = rng.normal(0, 1.5, (D, D)) - 2.0 * np.eye(D)  # own domain data lowers own loss
    c_true, k_true = np.array([1.5, 2.0, 1.0, 2.5]), np.array([1.0, 0.8, 1.5, 0.6])
    R = regmix.sample_mixtures(48, np.full(D, 0.25), 2.0, seed=6)
    Y = c_true + k_true * np.exp(R @ t_true.T)
    fitted = laws.fit_laws(R, {f"d{i}": Y[:, i] + rng.normal(0, 1e-3, len(R)) for i in range(D)})
    test_R = regmix.sample_mixtures(200, np.full(D, 0.25), 1.0, seed=7)
    for i, law in enumerate(fitted.values()):
        true = c_true[i] + k_true[i] * np.exp(test_R @ t_true[i])
        assert np.max(np.abs(law.predict(test_R) - true)) < 0.05 * np.ptp(true) + 0.01, i
    upper = np.array([1.0, 1.0, 0.35, 1.0])
    candidates = regmix.sample_mixtures(100_000, np.full(D, 0.25), 1.0, seed=8, upper=upper)
    w, info = laws.propose(list(fitted.values()), candidates, upper=upper)
    def true_mean(r):
        return np.mean(c_true + k_true * np.exp(np.atleast_2d(r) @ t_true.T), axis=1)
    # The true optimum on the capped simplex, by projected descent on the true law.
    true_law = [laws.MixingLaw(c_true[i], k_true[i], tuple(t_true[i]), 0.0) for i in range(D)]
    optimum, _ = laws.optimize_mixture(true_law, candidates[:64], upper, steps=1500)
    assert (w <= upper + 1e-6).all() and abs(w.sum() - 1) < 1e-6
    assert np.abs(w - optimum).sum() < 0.1, (w, optimum)
    assert true_mean(w)[0] - true_mean(optimum)[0] < 0.01
    assert true_mean(w)[0] <= true_mean(candidates).min() + 1e-3


def test_capped_simplex_projection():
    upper = np.array([0.2, 0.5, 1.0])
    w = np.asarray(laws.project_capped_simplex(np.array([3.0, -1.0, 0.5]), upper))
    np.testing.assert_allclose(w, [0.2, 0.0, 0.8], atol=1e-5)


def test_bad_input_and_non_finite_proxies(tmp_path):
    R = regmix.sample_mixtures(30, SHARES, 2.0, seed=0)
    y = R @ np.arange(5.0)
    y[[3, 7]] = [np.nan, np.inf]
    with pytest.warns(UserWarning, match="2 proxies excluded"):
        ok, notes = regmix.finite_rows(R, y, [f"proxy-{i}" for i in range(30)])
    assert ok.sum() == 28 and "proxy-3" in notes[0] and "proxy-7" in notes[1]
    with pytest.raises(regmix.MixSearchError, match="only 6 usable proxies.*num_proxies"):
        regmix.fit_regressor("linear", R[:6], y[:6])
    with pytest.raises(regmix.MixSearchError, match="only 6 usable proxies"):
        laws.fit_law(R[8:14], y[8:14])
    with pytest.raises(regmix.MixSearchError, match="non-finite"):
        laws.fit_law(R, y)
    with pytest.raises(regmix.MixSearchError, match="unknown regressor 'svm'"):
        regmix.make_regressor("svm")
    with pytest.raises(regmix.MixSearchError, match="unknown target 'poetry'"):
        regmix.target_domains("poetry", DOMAINS, known=DOMAINS)
    assert regmix.target_domains("mean", DOMAINS[:3]) == DOMAINS[:3]
    # A target held out of the mixture:
    assert regmix.target_domains("code", DOMAINS[:2], known=DOMAINS) == ["code"]
    with pytest.raises(regmix.MixSearchError, match="no eval loss for \\['code'\\]"):
        regmix.target_values([{"docs": 1.0}], "code", DOMAINS)
    from loam.configs import default
    from loam.mixing import search
    bad = default.get_config("runlocal")
    del bad.data["weights"]
    bad.data.weights = {"code": float("nan"), "docs": 1.0}
    with pytest.raises(regmix.MixSearchError, match="must be finite"):
        search.write_proposal(tmp_path / "x.json", bad)
    assert not (tmp_path / "x.json").exists()


def test_written_proposal_is_a_json_train_config(tmp_path):
    """A proposal is the resolved target-size config, as JSON: `--config proposal.json` loads it
    (never generated Python)."""
    from loam import cli
    from loam.configs import regmix as regmix_config
    from loam.mixing import search

    search_config = regmix_config.get_config("runlocal")
    search_config.proxy.data.domains = ["code", "docs"]
    written = search._target_config(search_config, {"code": 0.7, "docs": 0.3})
    path = search.write_proposal(tmp_path / "proposals" / "regmix.json", written)
    assert path.suffix == ".json" and json.loads(path.read_text())["data"]["weights"] == {
        "code": 0.7, "docs": 0.3}
    c = cli.load_config(str(path))
    assert c.to_dict() == written.to_dict()
    t = search_config.target
    assert (c.steps, c.model.size, c.data.seq_len, c.optim.lr) == (t.steps, t.size, t.seq_len, t.lr)
    assert list(c.data.domains) == ["code", "docs"]
    from loam.data import weights
    sched = weights.source_from_config(c)
    np.testing.assert_allclose(sched.weights_at(0), [0.7, 0.3])


def test_mixsearch_rejects_bad_configs_before_training(tmp_path):
    from loam import mixsearch
    from loam.configs import regmix as regmix_config

    c = regmix_config.get_config("runlocal,target=poetry")
    with pytest.raises(regmix.MixSearchError, match="unknown target 'poetry'"):
        mixsearch.run(c, tmp_path / "a")
    c = regmix_config.get_config("runlocal")
    c.search.num_proxies = 5
    with pytest.raises(regmix.MixSearchError, match="only 5 usable proxies configured"):
        mixsearch.run(c, tmp_path / "b")
    c = regmix_config.get_config("runlocal")
    c.target.steps, c.search.max_epochs = 100_000, 0.5
    with pytest.raises(regmix.MixSearchError, match="cannot respect 0.5 epochs"):
        mixsearch.run(c, tmp_path / "c")
    assert not (tmp_path / "c" / "proxies").exists()
    c = regmix_config.get_config("runlocal")
    c.validate.mixtures = ["regmix", "best_guess"]
    with pytest.raises(regmix.MixSearchError, match=r"validate.mixtures names \['best_guess'\]"):
        mixsearch.run(c, tmp_path / "d")
    assert not (tmp_path / "d" / "proxies").exists()


@pytest.mark.e2e
def test_mixsearch_end_to_end_validates_and_resumes(tmp_path, capsys):
    """The whole loop on the bundled corpus (miniature sizes): proxies, fits, proposals written as
    configs, target-size validation with seeds, report and plots; a second call resumes."""
    from loam import mixsearch
    from loam.configs import regmix as regmix_config

    c = regmix_config.get_config("runlocal,seeds=2")
    report = mixsearch.run(c, tmp_path)
    rows = {r["mixture"]: r for r in report["proposals"]}
    assert {"regmix", "regmix_linear", "mixing_law", "uniform", "proportional",
            "temperature:3"} <= set(rows)
    for name in c.validate.mixtures:
        v = rows[name]["validated"]
        assert len(v["values"]) == 2 and all(np.isfinite(v["values"])), (name, v)
        # Untrained nano models sit near ln(8192) = 9.01; eight steps must already move them.
        assert 4.0 < v["mean"] < 9.0
    assert "validated" not in rows["regmix_linear"]  # not asked for
    # Seeds are paired across mixtures: same initialisation, different data.
    val = tmp_path / "validate" / "results.json"
    members = __import__("json").loads(val.read_text())["members"]
    assert len(members) == 2 * len(c.validate.mixtures)
    assert sorted({m["seed"] for m in members}) == [1000, 1001]
    text = (tmp_path / "report.md").read_text()
    assert "vs uniform (paired mean ± s.e.)" in text and "| uniform |" in text
    for f in ("report.json", "proxies.jsonl", "predicted_vs_observed.png", "proposals.png",
              "proposals/regmix.json", "proposals/mixing_law.json", "config.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    from loam import cli
    proposal = cli.load_config(str(tmp_path / "proposals" / "regmix.json"))
    assert dict(proposal.data.weights) == rows["regmix"]["weights"]
    assert proposal.model.size == c.target.size and proposal.steps == c.target.steps
    assert not list((tmp_path / "proposals").glob("*.py"))
    capsys.readouterr()
    again = mixsearch.run(c, tmp_path)  # resumes: every swarm is already finished
    out = capsys.readouterr().out
    assert "already finished" in out and "swarm step" not in out
    assert [r["weights"] for r in again["proposals"]] == [r["weights"] for r in report["proposals"]]
    assert ([r.get("validated") for r in again["proposals"]]
            == [r.get("validated") for r in report["proposals"]])
