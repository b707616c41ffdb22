"""lm-evaluation-harness over a loam run: tasks defined by local YAML files over local JSONL
(multiple choice, generation, rolling log-likelihood) run through the harness's own
simple_evaluate with loam as its model, checked against loam's scorer and direct forward passes;
the command and its bad input. Uses the shared miniature run (conftest.reference_run: 12 steps,
context 64). Nothing is downloaded."""

import json
import math
import os
import shutil

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("lm_eval", reason="needs the [lmeval] extra")

from lm_eval.api.instance import Instance  # noqa: E402

from loam import evals, generate  # noqa: E402
from loam import step as step_lib  # noqa: E402
from loam.data import corpora  # noqa: E402
from loam.evals import harness  # noqa: E402


def held_out(domain: str, n: int) -> list[str]:
    docs = [t for i, t in corpora.read_documents(corpora.corpus_path(domain))
            if corpora.is_validation(i)]
    return docs[:n]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def task_yaml(tasks_dir, name: str, data, cache, body: str):
    (tasks_dir / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {cache}\ntest_split: test\n{body}")


UNTIL = ["\n", "."]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Task YAMLs over held-out text: multiple choice in loam's task-file format (the same file
    loam's multiple_choice evaluator reads), generation, and rolling log-likelihood."""
    root = tmp_path_factory.mktemp("harness_tasks")
    data, cache = root / "data", root / "hf_cache"
    data.mkdir()
    verses = held_out("literature", 1)[0].splitlines()[1:10]
    other = [l for t in held_out("code", 5) for l in t.splitlines() if len(l.strip()) > 8]
    mc = [{"context": verses[i], "choices": [other[i], verses[i + 1], "zq xv"], "gold": 1}
          for i in range(6)]
    write_jsonl(data / "next_verse.jsonl", mc)
    prompts = [held_out(d, 1)[0][:40] for d in ("literature", "dialogue", "code")]
    write_jsonl(data / "gen.jsonl", [{"prompt": p, "answer": "x"} for p in prompts])
    docs = [held_out("reference", 1)[0], held_out("literature", 2)[1][:700]]
    write_jsonl(data / "docs.jsonl", [{"text": t} for t in docs])
    tdir = root / "yaml"
    tdir.mkdir()
    task_yaml(tdir, "loam_mc", data / "next_verse.jsonl", cache,
              "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
              "doc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
              "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    task_yaml(tdir, "loam_gen", data / "gen.jsonl", cache,
              "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
              "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n"
              f"  until: {json.dumps(UNTIL)}\n  max_gen_toks: 16\n  do_sample: false\n"
              "metric_list:\n  - metric: exact_match\n")
    task_yaml(tdir, "loam_ppl", data / "docs.jsonl", cache,
              "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
              "metric_list:\n  - metric: bits_per_byte\n  - metric: word_perplexity\n")
    return {"dir": tdir, "mc": data / "next_verse.jsonl", "docs": docs, "prompts": prompts}


@pytest.fixture(scope="module")
def lm(reference_run):
    return harness.LoamLM(reference_run)


@pytest.fixture(scope="module")
def results(lm, tasks):
    return harness.evaluate(lm, ["loam_mc", "loam_gen", "loam_ppl"],
                            include_path=str(tasks["dir"]))


def direct_logprob(lm, ctx: list[int], cont: list[int]) -> float:
    """Sum of the continuation's log-probabilities by one plain forward pass (the training
    loss, step.token_nll) over context + continuation, one sequence alone; a context longer
    than the model's window loses its oldest tokens (the harness's truncation)."""
    L = lm.max_length
    seq = ((ctx or [lm.tokenizer.eos_id]) + cont)[-(L + 1):]
    n = len(seq) - 1
    pad = lambda a: np.pad(np.asarray(a, np.int32), (0, L - len(a)))[None]  # noqa: E731
    batch = {"inputs": pad(seq[:-1]), "targets": pad(seq[1:]), "segment_ids": pad([1] * n),
             "positions": pad(range(n)), "prefix": np.zeros((1, L), np.int32)}
    nll, _ = _token_nll(lm.model)(lm.params, batch)
    return -float(np.asarray(nll)[0, n - len(cont):n].sum())


_jitted: dict = {}


def _token_nll(model):
    if model not in _jitted:
        _jitted[model] = jax.jit(lambda p, b: step_lib.token_nll(p, model, b))
    return _jitted[model]


def test_multiple_choice_through_the_harness_is_loams_scoring(lm, tasks, results):
    got = results["results"]["loam_mc"]
    assert got["sample_len"] == 6 and 0 <= got["acc,none"] <= 1
    samples = results["samples"]["loam_mc"]
    assert len(samples) == 6
    for s in samples:
        doc = s["doc"]
        lls = [float(r[0][0]) for r in s["resps"]]
        # The harness's requests are loam's: context, then " " + choice, scored the same way.
        assert [a[1] for a in s["arguments"]] == [" " + c for c in doc["choices"]]
        for (context, cont), ll in zip(s["arguments"], lls):
            c, x = lm.scorer.split_tokens(context, cont)
            assert ll == pytest.approx(direct_logprob(lm, c, x), rel=1e-4, abs=1e-3)
        assert s["acc"] == float(np.argmax(lls) == doc["gold"])
    # The same JSONL through loam's own multiple_choice evaluator: the same accuracy.
    (mine,) = evals.build([{"kind": "multiple_choice", "tasks": str(tasks["mc"])}], lm.config)
    assert mine.run(lm.scorer)["tasks"]["next_verse"]["acc"] == pytest.approx(got["acc,none"])


def test_rolling_loglikelihood_is_the_documents_summed_token_loss(lm, tasks, results):
    samples = results["samples"]["loam_ppl"]
    by_text = {s["doc"]["text"]: float(s["resps"][0][0]) for s in samples}
    short, long = tasks["docs"]
    short_ids = lm.tokenizer.encode([short])[0]
    assert len(short_ids) < lm.max_length
    assert by_text[short] == pytest.approx(direct_logprob(lm, [], short_ids), rel=1e-4,
                                           abs=1e-3)
    # A document longer than the context: every token predicted once, in windows.
    long_ids = lm.tokenizer.encode([long])[0]
    windows = lm.rolling_windows(long)
    assert len(long_ids) > lm.max_length and len(windows) > 1
    assert [t for _, pred in windows for t in pred] == long_ids
    want = sum(direct_logprob(lm, c, x) for c, x in windows)
    assert by_text[long] == pytest.approx(want, rel=1e-4, abs=1e-2)
    nbytes = sum(len(t.encode()) for t in tasks["docs"])
    bpb = -sum(by_text.values()) / nbytes / math.log(2)
    assert results["results"]["loam_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-6)


def test_generate_until_stops_at_the_until_strings(reference_run, lm, tasks, results):
    sampler = generate.Sampler(reference_run)  # loam's own greedy decoding of the prompts
    full = dict(zip(tasks["prompts"], sampler.sample(tasks["prompts"], 16)))
    for s in results["samples"]["loam_gen"]:
        text = s["filtered_resps"][0]
        whole = full[s["doc"]["prompt"]]
        cut = whole
        for u in UNTIL:
            cut = cut.split(u)[0]
        assert text == cut and not any(u in text for u in UNTIL)
    # A stop string from the middle of each greedy continuation: cut right before it.
    requests, expected = [], []
    for i, (p, whole) in enumerate(full.items()):
        stop = whole[len(whole) // 2:len(whole) // 2 + 2]
        assert stop and stop in whole
        requests.append(Instance("generate_until", {}, (p, {"until": [stop],
                                                           "max_gen_toks": 16}), i))
        expected.append(whole[:whole.index(stop)])
    assert lm.generate_until(requests) == expected
    assert lm.generate_until([Instance("generate_until", {}, (p, {"max_gen_toks": 16}), 0)
                              for p in full]) == list(full.values())


@pytest.mark.e2e
def test_command_writes_results_and_refuses_bad_input(reference_run, tasks, results, tmp_path,
                                                      capsys):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    harness.main(["--workdir", str(run), "--tasks", "loam_mc,loam_ppl", "--include_path",
                  str(tasks["dir"]), "--limit", "4"])
    out = capsys.readouterr().out
    assert "loam_mc" in out and "acc" in out and "bits_per_byte" in out
    written = json.loads((run / "harness" / "step_12.json").read_text())
    assert written["step"] == 12 and set(written["results"]) == {"loam_mc", "loam_ppl"}
    assert written["results"]["loam_mc"]["sample_len"] == 4
    assert written["config"]["loam_step"] == 12
    samples = (run / "harness" / "step_12.loam_mc.samples.jsonl").read_text().splitlines()
    assert [json.loads(l)["resps"] for l in samples] == json.loads(json.dumps(
        [s["resps"] for s in results["samples"]["loam_mc"][:4]]))
    # A later evaluation of other tasks at the same step keeps the earlier ones.
    gen_only = {k: {"loam_gen": v["loam_gen"]} for k, v in results.items()
                if isinstance(v, dict) and "loam_gen" in v}
    harness.write_results(run, 12, gen_only)
    written = json.loads((run / "harness" / "step_12.json").read_text())
    assert set(written["results"]) == {"loam_mc", "loam_ppl", "loam_gen"}
    capsys.readouterr()

    def refused(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            harness.main(list(argv))
        assert e.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        return err[0]

    err = refused("--workdir", str(run), "--tasks", "loam_mcq", "--include_path",
                  str(tasks["dir"]))
    assert "unknown task 'loam_mcq'" in err and "loam_mc" in err and "--include_path" in err
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(run / "config.json", empty / "config.json")
    err = refused("--workdir", str(empty), "--tasks", "loam_mc", "--include_path",
                  str(tasks["dir"]))
    assert "no trained checkpoint" in err and "loam.train" in err
    assert not (empty / "harness").exists()
