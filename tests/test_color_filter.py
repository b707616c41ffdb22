"""CoLoR-Filter on the shared miniature run (a prior trained on the five-domain mix): the
conditional model fine-tuned from it by the scorer's preparation step on code files, then
unseen code files and Bible chapters scored through the Beam pipeline; the score's sign, its
definition on one document, the fine-tuned run reused, and the bad inputs."""

import json
import shutil

import numpy as np
import pytest

from loam import run as run_lib
from loam.configs import default
from loam.data import catalog as catalog_lib
from loam.data import columns as columns_lib
from loam.data import corpora
from loam.selection import base, pipeline
from loam.selection.color_filter import ColorFilter
from loam.selection.perplexity import DocumentLoss

pytestmark = pytest.mark.e2e

FINETUNE_STEPS = 8


def _write(path, docs):
    path.write_text("".join(json.dumps({"id": i, "text": t[:600]}) + "\n" for i, t in docs))


@pytest.fixture(scope="module")
def scored(reference_run, tmp_path_factory):
    """Fine-tunes on 'code_ft' (the starts of 24 code files), scores 'code' (12 other files)
    and 'literature' (12 chapters) in one pipeline."""
    root = tmp_path_factory.mktemp("color")
    code = [d for d in corpora.read_documents(corpora.corpus_path("code"))
            if len(d[1]) > 800][:36]
    lit = list(corpora.read_documents(corpora.corpus_path("literature")))[:12]
    _write(root / "code_ft.jsonl", code[:24])
    _write(root / "code.jsonl", code[24:])
    _write(root / "literature.jsonl", lit)
    c = default.get_config()
    c.data.sources = {d: f"jsonl:{root / d}.jsonl" for d in ("code_ft", "code", "literature")}
    c.data.prepared_dir = str(root / "prepared")
    catalog = catalog_lib.for_config(c)
    prior_before = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    scorer = base.make("color_filter", {"prior": str(reference_run), "target": "code_ft",
                                        "finetune_steps": FINETUNE_STEPS,
                                        "conditional_dir": str(root / "conditional")})
    results = pipeline.score(scorer, catalog, ["code", "literature"], num_workers=1)
    assert sorted(p.name for p in (reference_run / "checkpoints").iterdir()) == prior_before
    return root, catalog, scorer, results


def test_target_documents_score_higher(scored):
    _, catalog, scorer, results = scored
    color = {d: columns_lib.load(catalog, d, "color") for d in ("code", "literature")}
    assert all(np.isfinite(v).all() for v in color.values())
    # Fine-tuning on code files lowers the loss of other code files more than of the Bible.
    assert color["code"].mean() > color["literature"].mean() + 0.05, {
        d: float(v.mean()) for d, v in color.items()}
    m = results["code"]["manifest"]
    assert m["scorer"] == "color_filter" and set(m["columns"]) == set(ColorFilter.columns)
    assert m["inputs"]["prior"].startswith(str(scored[2]._prior()[0]) + "@12 ")
    assert "@8 (config.json sha256" in m["inputs"]["conditional"]
    assert m["inputs"]["target"].startswith("code_ft (")


def test_score_is_the_difference_of_two_losses(scored, reference_run):
    _, catalog, scorer, _ = scored
    cond_dir, step = scorer.conditional_run()
    split = catalog.split("literature", "train")
    index = int(np.asarray(split.doc_index)[3])
    doc_text = json.loads((scored[0] / "literature.jsonl").read_text().splitlines()[index])["text"]
    prior = DocumentLoss(str(reference_run), 12).loss(doc_text)[0]
    cond = DocumentLoss(cond_dir, step).loss(doc_text)[0]
    got = columns_lib.load(catalog, "literature", "color")[index]
    assert got == pytest.approx(prior - cond, abs=2e-5)
    assert columns_lib.load(catalog, "literature", "color_prior_loss")[index] == pytest.approx(
        prior, abs=2e-5)


def test_the_fine_tuned_run_is_reused(scored):
    root, catalog, scorer, _ = scored
    cond_dir, step = scorer.conditional_run()
    assert run_lib.checkpoint_steps(cond_dir) == [FINETUNE_STEPS]
    config = json.loads(open(f"{cond_dir}/config.json").read())
    assert config["init"]["carry"] == "params" and config["steps"] == FINETUNE_STEPS
    assert [name for name, _ in config["data"]["sources"]] == ["code_ft"]
    stamp = (root / "conditional").stat().st_mtime_ns, open(f"{cond_dir}/metrics.jsonl").read()
    again = base.make("color_filter", scorer.params())
    again.check(catalog)  # finds it: trains nothing
    assert again.conditional_run() == (cond_dir, step)
    assert ((root / "conditional").stat().st_mtime_ns,
            open(f"{cond_dir}/metrics.jsonl").read()) == stamp


def test_bad_inputs(scored, reference_run, tmp_path):
    _, catalog, scorer, _ = scored
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(reference_run / "config.json", empty / "config.json")
    with pytest.raises(base.ScorerError, match=r"has no checkpoints; train it"):
        base.make("color_filter", {**scorer.params(), "prior": str(empty)}).check(catalog)
    with pytest.raises(base.ScorerError, match=r"no config.json"):
        base.make("color_filter", {**scorer.params(), "prior": str(tmp_path)}).check(catalog)
    with pytest.raises(base.ScorerError, match=r"target 'docs'.*unknown|target 'docs'"):
        base.make("color_filter", {**scorer.params(), "target": "docs"}).check(catalog)
    with pytest.raises(base.ScorerError, match=r"needs --param prior"):
        base.make("color_filter", {"target": "code_ft"}).check(catalog)
