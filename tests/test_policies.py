"""Selection policies (config.data.selection): budgets on the bundled domains' shipped columns,
Gumbel top-k's limits, combined columns, repeats realised in the stream, and the bad inputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from loam.data import catalog as catalog_lib
from loam.data import columns as columns_lib
from loam.data import objectives, views, weights
from loam.data import sources as sources_lib
from loam.data import stream as stream_lib

DOMAIN = "literature"


@pytest.fixture(scope="module")
def bundled():
    """The default catalog's literature domain: its training documents, their lengths and a
    reader of its shipped columns."""
    cat = catalog_lib.default()
    split = cat.split(DOMAIN, "train")
    docs, lengths = np.asarray(split.doc_index), np.asarray(split.lengths)
    return cat, docs, lengths, lambda c: columns_lib.load(cat, DOMAIN, c)


def pick(entry, bundled, seed=0):
    cat, docs, lengths, column = bundled
    sel = views.parse_selection(DOMAIN, entry, seed)
    copies = views.select_documents(sel, DOMAIN, docs, lengths, column)
    return sel, copies


def test_threshold_keeps_exactly_the_passing_documents(bundled):
    _, docs, lengths, column = bundled
    quality = column("quality")[docs]
    t = float(np.median(quality))
    sel, copies = pick({"score": "quality", "policy": "threshold", "threshold": t}, bundled)
    assert np.array_equal(copies > 0, quality >= t) and copies.max() == 1
    s = views.selection_summary(sel, DOMAIN, docs, lengths, copies)
    assert s["documents"] == int((quality >= t).sum())
    assert s["tokens"] == int(lengths[quality >= t].sum())
    assert s["share"] == pytest.approx(s["tokens"] / lengths.sum())
    # With a token budget: the best passing documents, as many as fit.
    budget = int(lengths[quality >= t].sum() // 3)
    _, capped = pick({"score": "quality", "policy": "threshold", "threshold": t,
                      "tokens": budget}, bundled)
    chosen = capped > 0
    assert chosen.sum() < (quality >= t).sum() and np.all(quality[chosen] >= t)
    assert lengths[chosen].sum() <= budget
    assert quality[chosen].min() >= quality[(quality >= t) & ~chosen].max()


def test_top_fraction_and_token_budget(bundled):
    _, docs, lengths, column = bundled
    quality = column("quality")[docs]
    _, copies = pick({"score": "quality", "policy": "top", "fraction": 0.25}, bundled)
    chosen = copies > 0
    assert chosen.sum() == round(0.25 * docs.shape[0])
    assert quality[chosen].min() >= quality[~chosen].max()
    budget = 200_000
    _, copies = pick({"score": "quality", "policy": "top", "tokens": budget}, bundled)
    chosen = copies > 0
    order = np.argsort(-quality, kind="stable")
    n = int(chosen.sum())
    assert set(np.flatnonzero(chosen)) == set(order[:n])
    assert lengths[chosen].sum() <= budget < lengths[order[:n + 1]].sum()


def test_gumbel_limits_top_k_and_uniform(bundled):
    _, docs, _, column = bundled
    quality = column("quality")[docs].astype(np.float64)
    top = pick({"score": "quality", "policy": "top", "fraction": 0.2}, bundled)[1]
    cold = pick({"score": "quality", "policy": "gumbel", "fraction": 0.2,
                 "temperature": 1e-9}, bundled)[1]
    assert np.array_equal(top, cold)
    # Hot: the selection is nearly independent of the score, and differs from seed to seed.
    k = int(top.sum())
    overlaps, means = [], []
    for seed in range(5):
        hot = pick({"score": "quality", "policy": "gumbel", "fraction": 0.2,
                    "temperature": 1e6}, bundled, seed)[1] > 0
        overlaps.append((hot & (top > 0)).sum())
        means.append(quality[hot].mean())
    expected = k * k / docs.shape[0]  # a uniform random subset's overlap with the top k
    assert abs(np.mean(overlaps) - expected) < 0.5 * expected
    assert abs(np.mean(means) - quality.mean()) < 0.25 * (quality[top > 0].mean()
                                                          - quality.mean())
    assert len({tuple(np.flatnonzero(pick({"score": "quality", "policy": "gumbel",
                                           "fraction": 0.2, "temperature": 1e6}, bundled,
                                          seed)[1])) for seed in range(3)}) == 3
    # Deterministic given the seed.
    a = pick({"score": "quality", "policy": "gumbel", "fraction": 0.2, "temperature": 0.05},
             bundled, 7)[1]
    b = pick({"score": "quality", "policy": "gumbel", "fraction": 0.2, "temperature": 0.05},
             bundled, 7)[1]
    assert np.array_equal(a, b)
    # A token budget: as many of the perturbed order's first documents as fit.
    _, _, lengths, _ = bundled
    g = pick({"score": "quality", "policy": "gumbel", "tokens": 100_000, "temperature": 0.05},
             bundled, 7)[1] > 0
    assert lengths[g].sum() <= 100_000 < lengths[g].sum() + lengths[~g].max()


def test_weighted_sum_of_z_scored_columns(bundled):
    _, docs, _, column = bundled
    q, w = column("quality")[docs].astype(np.float64), column("words")[docs].astype(np.float64)
    combined = 2.0 * (q - q.mean()) / q.std() - 1.0 * (w - w.mean()) / w.std()
    _, copies = pick({"score": {"quality": 2.0, "words": -1.0}, "policy": "top",
                      "fraction": 0.3}, bundled)
    chosen = copies > 0
    assert combined[chosen].min() >= combined[~chosen].max()


@pytest.mark.parametrize("entry, message", [
    ({"score": "quality", "policy": "best", "fraction": 0.5}, "unknown policy 'best'"),
    ({"score": "no_such_column", "policy": "top", "fraction": 0.5},
     "score column 'no_such_column' does not exist"),
    ({"score": "quality", "policy": "top", "tokens": 10**9},
     "budget of 1,000,000,000 tokens is larger than"),
    ({"score": "quality", "policy": "threshold", "threshold": 0.5, "tokens": 10**9},
     "tokens of the documents that pass the threshold"),
    ({"score": "quality", "policy": "top"}, "needs exactly one budget"),
    ({"score": "quality", "policy": "gumbel", "fraction": 0.5}, "needs 'temperature' > 0"),
    ({"score": "quality", "policy": "top", "fraction": 0.5, "budget": 3}, "unknown key(s)"),
])
def test_bad_selections_are_refused(bundled, entry, message):
    with pytest.raises(ValueError) as e:
        pick(entry, bundled)
    assert message in str(e.value)


# ----------------------------------------------------------------------------- in the stream

@pytest.fixture(scope="module")
def own_store(tmp_path_factory):
    """The bundled code domain prepared into a private directory, with two written columns:
    `rep` (1 or 2 copies, by document) and `partial` (NaN for every third document)."""
    root = tmp_path_factory.mktemp("prepared")
    cat = catalog_lib.Catalog({"code": sources_lib.parse("code", "bundled:code")}, "bundled",
                              prepared_dir=root)
    p = cat.prepared("code")
    n = int(p.manifest["records"])
    idx = np.arange(n)
    rep = np.where(idx % 2 == 0, 2.0, 1.0).astype(np.float32)
    partial = np.where(idx % 3 == 0, np.nan, idx).astype(np.float32)
    columns_lib.write(p, "test", {}, {}, {"rep": rep})
    columns_lib.write(p, "test2", {}, {}, {"partial": partial})
    return cat


def _epoch_tokens(cat, entry, seq_len=256, batch=16):
    """Per-document input tokens over the first epoch of the code domain under a selection."""
    sel = {"code": views.parse_selection("code", entry, 5)}
    stream = stream_lib.MixtureStream(["code"], objectives.get_objective("causal"),
                                      weights.constant({"code": 1.0}), seq_len, batch, seed=5,
                                      catalog=cat, selection=sel)
    rows = stream.packing(0, 0, stream._view(0, 0)).num_rows
    seen: dict[int, int] = {}
    got = 0
    step = 0
    while got < rows:
        ids = stream.batch(step)["doc_ids"][:rows - got]
        for d, c in zip(*np.unique(ids[ids >= 0], return_counts=True)):
            seen[int(d)] = seen.get(int(d), 0) + int(c)
        got += ids.shape[0]
        step += 1
    return seen, stream


def test_repeats_are_realised_in_the_stream(own_store, capsys):
    base = {"score": "quality", "policy": "top", "tokens": 40_000}
    plain, _ = _epoch_tokens(own_store, base)
    repeated, stream = _epoch_tokens(own_store, {**base, "repeat": "rep"})
    assert set(plain) == set(repeated) and len(plain) > 3
    assert {d: repeated[d] for d in plain} == {d: plain[d] * (2 if d % 2 == 0 else 1)
                                               for d in plain}
    out = capsys.readouterr().out
    (summary,) = stream.selection_summaries
    assert summary["copies"] > summary["documents"] and "selection code:" in out
    # Sampled repeats: deterministic, each document floor or ceil of its weight (here exact).
    sampled, _ = _epoch_tokens(own_store, {**base, "repeat": "rep", "repeat_mode": "sample"})
    assert sampled == repeated


def test_run_config_selection_composes_with_a_stage_and_prints_its_budget(capsys):
    from loam import run as run_lib
    from loam.configs import default

    c = default.get_config("runlocal")
    c.data.domains = ["literature", "code"]
    c.data.selection = {"literature": {"score": "quality", "policy": "top", "fraction": 0.5}}
    c.data.stages = [dict(name="a", start=0, weights="uniform",
                          order={"literature": "quality:asc"})]
    stream = run_lib.build_stream(c)
    out = capsys.readouterr().out
    cat = run_lib.build_catalog(c)
    docs = np.asarray(cat.split("literature", "train").doc_index)
    quality = columns_lib.load(cat, "literature", "quality")
    median = np.sort(quality[docs])[::-1][round(0.5 * docs.shape[0]) - 1]
    n = round(0.5 * docs.shape[0])
    assert f"selection literature: {n} of {docs.shape[0]} documents" in out
    # The stage orders the selected half ascending: the first documents are its worst ones,
    # never below the selection's cut.
    seen = [int(d) for t in range(3) for row, dom in zip(stream.batch(t)["doc_ids"],
                                                         stream.batch(t)["domain_ids"])
            if int(dom[0]) == cat.domain_id("literature") for d in row if d >= 0]
    assert seen
    assert quality[seen].min() >= median
    assert quality[seen[0]] <= np.percentile(quality[docs][quality[docs] >= median], 10)
    c.data.selection = {"poetry": {"score": "quality", "policy": "top", "fraction": 0.5}}
    with pytest.raises(views.SelectionError, match="unknown domain"):
        run_lib.build_stream(c)


def test_nan_scores_are_counted_and_refused(own_store):
    cat = own_store
    split = cat.split("code", "train")
    docs = np.asarray(split.doc_index)
    nan = int((docs % 3 == 0).sum())
    with pytest.raises(views.SelectionError,
                       match=f"{nan} of {docs.shape[0]} training documents of domain 'code' "
                             "have no value in column 'partial'"):
        stream_lib.MixtureStream(["code"], objectives.get_objective("causal"),
                                 weights.constant({"code": 1.0}), 64, 4, seed=0, catalog=cat,
                                 selection={"code": views.parse_selection(
                                     "code", {"score": "partial", "policy": "top",
                                              "fraction": 0.5})})


def test_a_column_whose_scorer_inputs_changed_is_stale(own_store, tmp_path, reference_run):
    from loam.configs import default
    from loam.selection import base, policies

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    scorer = base.make("model", {"workdir": str(run), "column": "ref_loss"})
    p = own_store.prepared("code")
    loss = columns_lib.doc_tokens(p).astype(np.float32)
    columns_lib.write(p, scorer.name, scorer.params(), scorer.inputs(), {"ref_loss": loss})
    c = default.get_config("runlocal")
    c.data.sources = {"code": "bundled:code"}
    c.data.prepared_dir = own_store.root
    c.data.selection = {"code": {"score": "ref_loss", "policy": "top", "fraction": 0.5}}
    (summary,) = policies.summaries(c)
    assert summary["documents"] == round(0.5 * summary["of_documents"])
    (run / "config.json").write_text((run / "config.json").read_text().replace(
        '"seed": ', '"seed": 1', 1))  # another reference model
    with pytest.raises(columns_lib.ColumnError, match="stale: the inputs of scorer 'model'"):
        policies.summaries(c)


def test_resuming_over_rescored_columns_is_refused(own_store):
    p = own_store.prepared("code")
    n = int(p.manifest["records"])
    columns_lib.write(p, "resume", {}, {}, {"resume": np.arange(n, dtype=np.float32)})

    def stream():
        sel = {"code": views.parse_selection("code", {"score": "resume", "policy": "top",
                                                      "fraction": 0.5})}
        return stream_lib.MixtureStream(["code"], objectives.get_objective("causal"),
                                        weights.constant({"code": 1.0}), 64, 4, seed=0,
                                        catalog=own_store, selection=sel)

    state = stream().state_dict(3)
    assert set(state["columns"]) == {"code"}
    stream().load_state(state)
    columns_lib.write(p, "resume", {}, {}, {"resume": -np.arange(n, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"score columns that select or order the documents of "
                                         r"domain\(s\) \['code'\] changed since step 3"):
        stream().load_state(state)
