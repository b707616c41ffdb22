"""Downstream evaluation: the scorer against the model's own loss, the probe suite built from
held-out documents, multiple-choice and cloze task files, bad entries, and the evaluators run by
loam.eval and during training (eval files, TensorBoard, the sweep's results table). Uses copies
of the shared miniature run (conftest.reference_run)."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from loam import eval as eval_lib
from loam import evals, sweep
from loam import run as run_lib
from loam import step as step_lib
from loam.data import corpora
from loam.evals import choices, probes
from loam.evals.scoring import Scorer

import helpers


@pytest.fixture(scope="module")
def scorer(reference_run):
    run = run_lib.open_run(reference_run)
    params = run.checkpointer.restore_params(run.steps()[-1], run.abstract.params)
    tokenizer = run_lib.build_catalog(run.config).tokenizer
    yield Scorer(run.model, params, tokenizer, run.mesh, rows=8), run
    run.close()


def held_out(domain: str) -> list[tuple[str, str]]:
    return [(i, t) for i, t in corpora.read_documents(corpora.corpus_path(domain))
            if corpora.is_validation(i)]


def test_scores_are_the_models_own_token_losses(scorer):
    """Packed requests score what the training loss (step.token_nll) gives each one alone."""
    sc, run = scorer
    texts = [t for d in ("literature", "code") for _, t in held_out(d) if len(t) > 400][:6]
    requests = [(t[:120], t[120:170]) for t in texts] + [("", texts[0][:40])]
    got = sc.loglikelihood(requests)
    L = sc.seq_len
    for (ctx, cont), score in zip(requests, got):
        c, x = sc.split_tokens(ctx, cont)
        seq = (c or [sc.tokenizer.eos_id]) + x
        seq = seq[-(L + 1):]
        n = len(seq) - 1
        pad = lambda a: np.pad(np.asarray(a, np.int32), (0, L - len(a)))[None]  # noqa: E731
        batch = {"inputs": pad(seq[:-1]), "targets": pad(seq[1:]),
                 "segment_ids": pad([1] * n), "positions": pad(range(n)),
                 "prefix": np.zeros((1, L), np.int32)}
        nll, _ = jax.jit(lambda p, b: step_lib.token_nll(p, run.model, b))(sc.params, batch)
        want = -float(np.asarray(nll)[0, n - score.tokens:n].sum())
        assert score.tokens == min(len(x), n)
        assert score.logprob == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_probes_are_deterministic_held_out_and_well_formed(reference_run):
    config = run_lib.read_config(reference_run)
    a = evals.build([{"kind": "probes", "items": 16}], config)[0].items
    b = probes.make({"name": "probes", "items": 16}, config, "here").items
    assert a == b and list(a) == list(corpora.DOMAIN_NAMES)
    train_texts = {d: "\n".join(t for i, t in corpora.read_documents(corpora.corpus_path(d))
                                if not corpora.is_validation(i)) for d in ("literature",)}
    for domain, items in a.items():
        assert len(items) == 16
        valid = "\n".join(t for _, t in held_out(domain))
        for item in items:
            assert len(item.requests) == 4 and 0 <= item.gold < 4
            context, gold = item.requests[item.gold]
            assert (context + gold).strip() in valid or (context + gold) in valid
            assert len({c for _, c in item.requests}) == 4  # distinct choices
        if domain in train_texts:  # passages come from held-out chapters, not training ones
            assert not any(item.requests[0][0] in train_texts[domain] for item in items)
    other = probes.make({"name": "p", "items": 16, "seed": 1}, config, "here").items
    assert other != a


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_multiple_choice_and_cloze_accuracies(scorer, tmp_path):
    sc, run = scorer
    verses = held_out("literature")[0][1].splitlines()[1:9]
    mc = [{"context": verses[i], "choices": [verses[i + 1], "zq xv", verses[0] + " and so on"],
           "gold": 0} for i in range(4)]
    mc.append({"query": "def main(", "choices": ["):", " banana split"], "gold": "):"})
    write_jsonl(tmp_path / "next_verse.jsonl", mc)
    cloze = [{"sentence": "In the beginning God created the _ and the earth.",
              "choices": ["heaven", "xylophone"], "gold": 0},
             {"text": "_ said unto Moses", "choices": ["And the LORD", "Qq"], "label": 0}]
    write_jsonl(tmp_path / "blanks.jsonl", cloze)
    built = evals.build([{"kind": "multiple_choice", "tasks": str(tmp_path / "next_*.jsonl")},
                         {"kind": "cloze", "tasks": str(tmp_path / "blanks.jsonl")}], run.config)
    got_mc, got_cloze = (e.run(sc) for e in built)
    task = got_mc["tasks"]["next_verse"]
    assert task["n"] == 5 and task["chance"] == pytest.approx((4 / 3 + 1 / 2) / 5)
    # The accuracy is the argmax of the scorer's log-likelihoods, item by item.
    want, want_norm = [], []
    for rec in mc:
        ctx = rec.get("context", rec.get("query"))
        s = np.array([x.logprob for x in sc.loglikelihood([(ctx, " " + c)
                                                            for c in rec["choices"]])])
        nbytes = np.array([len((" " + c).encode()) for c in rec["choices"]])
        gold = rec["gold"] if isinstance(rec["gold"], int) else rec["choices"].index(rec["gold"])
        want.append(np.argmax(s) == gold)
        want_norm.append(np.argmax(s / nbytes) == gold)
    assert task["acc"] == pytest.approx(np.mean(want))
    assert task["acc_norm"] == pytest.approx(np.mean(want_norm))
    assert got_mc["acc"] == task["acc"]
    blanks = got_cloze["tasks"]["blanks"]
    assert blanks["n"] == 2 and blanks["chance"] == 0.5 and 0 <= blanks["acc"] <= 1


@pytest.mark.parametrize("record, message", [
    ({"choices": ["a", "b"], "gold": 0}, "missing field 'context' or 'query'"),
    ({"context": "x", "choices": ["a", "b"], "gold": 2}, "gold index 2 is out of range for 2"),
    ({"context": "x", "choices": ["a", "b"], "gold": -1}, "gold index -1 is out of range"),
    ({"context": "x", "choices": ["a", "b"], "gold": "c"}, "gold 'c' is not one of the choices"),
    ({"context": "x", "choices": "ab", "gold": 0}, "field 'choices' must be a list"),
    ({"context": "x", "choices": ["a"], "gold": 0},
     "'choices' must be a list of at least two strings"),
    ({"context": "x", "choices": ["a", "b"]}, "missing field 'gold' or 'label'"),
])
def test_bad_task_files_are_refused_with_one_clear_message(tmp_path, record, message):
    config = run_lib.resolve_config(_config())[0]
    path = write_jsonl(tmp_path / "task.jsonl", [{"context": "a", "choices": ["x", "y"],
                                                  "gold": 1}, record])
    with pytest.raises(choices.TaskFileError, match="task.jsonl:2: " + message.replace(
            "(", r"\(").replace(")", r"\)")):
        evals.build([{"kind": "multiple_choice", "tasks": str(path)}], config)


def _config():
    from loam.configs import default
    return default.get_config("runlocal")


def test_bad_eval_entries(tmp_path):
    config = run_lib.resolve_config(_config())[0]
    cases = [([{"kind": "hellaswag"}], "unknown evaluator kind 'hellaswag'; known: cloze, "
                                       "multiple_choice, probes"),
             ([{"tasks": "x"}], "must be a dict with a 'kind'"),
             ([{"kind": "multiple_choice", "tasks": str(tmp_path / "none*.jsonl")}],
              "no task file matches"),
             ([{"kind": "probes", "itms": 3}], "unknown option(s) ['itms']"),
             ([{"kind": "probes", "domains": ["poetry"]}], "unknown domain 'poetry'"),
             ([{"kind": "probes"}, {"kind": "probes"}], "the name(s) ['probes'] repeat")]
    (tmp_path / "c.jsonl").write_text('{"text": "no blank", "choices": ["a", "b"], "gold": 0}\n')
    cases.append(([{"kind": "cloze", "tasks": str(tmp_path / "c.jsonl")}],
                  "must contain the blank '_' exactly once (found 0)"))
    (tmp_path / "j.jsonl").write_text('{"context": "a", \n')
    cases.append(([{"kind": "multiple_choice", "tasks": str(tmp_path / "j.jsonl")}],
                  "j.jsonl:1: not valid JSON"))
    for entries, message in cases:
        with pytest.raises(choices.EvalConfigError) as e:
            evals.build(entries, config)
        assert message in str(e.value), (entries, str(e.value))


def test_eval_cli_runs_the_evaluators_and_refuses_bad_tasks(reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    write_jsonl(tmp_path / "bad.jsonl", [{"context": "x", "choices": ["a", "b"], "gold": 5}])
    bad = subprocess.run(
        [sys.executable, "-m", "loam.eval", f"--workdir={run}", "--evals",
         json.dumps([{"kind": "multiple_choice", "tasks": str(tmp_path / "bad.jsonl")}])],
        env=helpers.env(1), capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "bad.jsonl:1: gold index 5 is out of range for 2 choices" in bad.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "loam.eval", f"--workdir={run}", "--step", "8", "--evals",
         '[{"kind": "probes", "items": 8}]'],
        env=helpers.env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "probes: acc" in proc.stdout
    rec = json.loads((run / "eval" / "step_8.json").read_text())
    probes_rec = rec["downstream"]["probes"]
    assert set(probes_rec["domains"]) == set(corpora.DOMAIN_NAMES)
    assert probes_rec["chance"] == 0.25 and 0 <= probes_rec["acc"] <= 1
    assert json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["downstream"]


def test_training_runs_the_configured_evaluators_and_profiler(reference_run, tmp_path):
    """A resumed copy trains two more steps; its evals hold the downstream metrics in the eval
    files, TensorBoard and the sweep's results-table columns, and it writes a profiler trace."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    write_jsonl(tmp_path / "t.jsonl", [{"context": "And God said", "choices": [
        " Let there be light", " import os"], "gold": 0}])
    entries = [{"kind": "probes", "items": 4},
               {"kind": "multiple_choice", "tasks": str(tmp_path / "t.jsonl")}]
    proc = helpers.run_train(run, "--config.steps=14", "--config.eval_every=13",
                             f"--config.evals={json.dumps(entries)}",
                             "--config.profile_steps=[13,14]")
    # The same run traces updates 13 and 14 with the JAX profiler (config.profile_steps).
    traces = list((run / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list(traces[0].parent.glob("perfetto_trace.json.gz"))
    assert "profiler trace of steps 13-14" in proc.stdout
    assert "; probes acc " in proc.stdout.split("eval at step 13: mean loss")[1].splitlines()[0]
    assert "probes: acc" in proc.stdout  # the final table
    assert (run / "eval" / "step_14.json").exists()
    rec = json.loads((run / "eval" / "step_13.json").read_text())
    assert set(rec["downstream"]) == {"probes", "multiple_choice"}
    assert rec["downstream"]["multiple_choice"]["tasks"]["t"]["n"] == 1
    last = json.loads((run / "eval.jsonl").read_text().splitlines()[-2])
    assert last["step"] == 13 and last["downstream"] == rec["downstream"]
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard" / "eval"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "downstream/probes/acc" in tags and "downstream/probes/domains/code/acc" in tags
    assert "downstream/multiple_choice/tasks/t/acc_norm" in tags
    columns = sweep.downstream_columns(rec)  # the results table prefixes them with eval/
    assert columns["probes/acc"] == rec["downstream"]["probes"]["acc"]
    assert columns["multiple_choice/t/acc_norm"] == rec["downstream"][
        "multiple_choice"]["tasks"]["t"]["acc_norm"]
    assert "eval at step 13" in eval_lib.format_table(rec)
    assert (run / "curves.png").exists()
