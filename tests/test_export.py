"""Hugging Face export and import: `transformers` (PyTorch, CPU, float32) loads the export and
computes loam's logits; a Llama checkpoint imports into a loam run that loads and trains; models
and checkpoints that do not map are refused, naming the feature. The tests that run
`transformers` need the [export] extra and are skipped without it."""

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import models, pre_tokenizers, trainers

from loam import export, generate
from loam import run as run_lib
from loam import train as train_lib
from loam.configs import default
from loam.data import corpora, vocab

DOMAINS = ("literature", "dialogue", "code", "docs", "reference")


def held_out_texts(domain: str, n: int) -> list[str]:
    docs = (text for doc_id, text in corpora.read_documents(corpora.corpus_path(domain))
            if corpora.is_validation(doc_id))
    return list(itertools.islice(docs, n))


def context_ids(tokenizer, domain: str, n: int = 64) -> list[int]:
    """n tokens of a domain's held-out documents, one after another."""
    ids: list[int] = []
    for text in held_out_texts(domain, 50):
        ids += tokenizer.encode([text])[0]
        if len(ids) >= n:
            return ids[:n]
    raise AssertionError(f"fewer than {n} held-out tokens in {domain}")


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    return pytest.importorskip("transformers")


def run_main(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        export.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()


def loam_logits(sampler_or_model, params, ids) -> np.ndarray:
    return np.asarray(sampler_or_model.apply({"params": params}, jnp.asarray(ids)))


# --------------------------------------------------------------------------- the tokenizer


def test_tokenizer_export_keeps_loam_ids():
    """The bundled SentencePiece model rebuilt as a `tokenizers` file gives loam's ids on held-out
    text of every domain, except where two segmentations have exactly the same score (runs of
    spaces in code), and decodes back to the text."""
    tokenizer = vocab.get_tokenizer("bundled")
    tok = export.hf_tokenizer(tokenizer)
    assert tok.get_vocab_size() == tokenizer.vocab_size == 8192
    assert tok.token_to_id("<extra_id_0>") == tokenizer.sentinel_id(0)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer._data)
    scores = np.array([p.score for p in proto.pieces])
    same = ties = 0
    for domain in DOMAINS:
        for text in held_out_texts(domain, 20):
            want = tokenizer.encode([text])[0]
            got = tok.encode(text, add_special_tokens=False).ids
            assert tok.decode(got) == text
            if got == want:
                same += 1
            else:
                ties += 1
                assert scores[got].sum() == pytest.approx(scores[want].sum(), abs=1e-3)
    assert same + ties >= 75 and same >= 0.85 * (same + ties), (same, ties)
    for text in ["Naïve café — 世界 🙂", "  two  spaces\tand\ttabs\n", "[NLU] x", ""]:
        assert tok.encode(text, add_special_tokens=False).ids == tokenizer.encode([text])[0]


# --------------------------------------------------------------------------- export


def test_export_loads_in_transformers_with_loam_logits(reference_run, tmp_path, hf):
    out = export.export(reference_run, tmp_path / "hf")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "generation_config.json", "loam_export.json",
                     "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    model = hf.AutoModelForCausalLM.from_pretrained(out, dtype="float32")
    model.eval()
    tok = hf.AutoTokenizer.from_pretrained(out)
    sampler = generate.Sampler(reference_run)
    # The context's worth of held-out tokens from each domain, through both models.
    ids = [context_ids(sampler.tokenizer, d) for d in DOMAINS]
    theirs = hf_logits(model, ids)
    ours = loam_logits(sampler.model, sampler.params, ids)
    diff = float(np.abs(theirs - ours).max())
    print(f"max |logits(transformers) - logits(loam)| = {diff:.2e} "
          f"(logits up to {np.abs(ours).max():.1f})")
    assert diff <= 1e-4
    # Greedy continuations agree; transformers' tokenizer gives loam's ids and text.
    prompt = "And God said unto Moses"
    prompt_ids = tok(prompt)["input_ids"]
    assert prompt_ids == sampler.tokenizer.encode([prompt])[0]
    import torch
    theirs_gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=20, do_sample=False,
                                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    ours_gen = generate.generate_tokens(sampler.model, sampler.params, [prompt_ids], 20,
                                        eos_id=sampler.tokenizer.eos_id)[0]
    assert theirs_gen[0, len(prompt_ids):].tolist() == ours_gen
    assert tok.decode(theirs_gen[0]) .startswith(prompt)


def _train(workdir, arg="runlocal", **overrides):
    config = default.get_config(arg)
    config.steps = 2
    config.checkpoint_every = 2
    config.eval_every = 1000
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    train_lib.train(config, workdir)
    return workdir


def test_tied_grouped_query_model_exports(tmp_path, hf):
    run = _train(tmp_path / "run", **{"model.tied_embeddings": True, "model.n_heads": 4,
                                      "model.n_kv_heads": 2})
    out = export.export(run, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 2
    from safetensors.numpy import load_file
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    model = hf.AutoModelForCausalLM.from_pretrained(out, dtype="float32")
    params, run_, _ = run_lib.load_params(run)
    ids = [context_ids(vocab.get_tokenizer("bundled"), "code")]
    assert np.abs(hf_logits(model, ids) - loam_logits(run_.model, params, ids)).max() <= 1e-4


def test_export_refuses_what_llama_cannot_express(tmp_path, capsys):
    run = _train(tmp_path / "prefix", **{"data.objective": "prefix_lm"})
    err = run_main(capsys, f"--workdir={run}", f"--out={tmp_path / 'hf'}")
    assert "data.objective='prefix_lm'" in err and "bidirectional prefix" in err
    assert not (tmp_path / "hf").exists()


def test_export_bad_input(reference_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    err = run_main(capsys, f"--workdir={reference_run}", f"--out={tmp_path / 'taken'}")
    assert "not an empty directory" in err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    empty = tmp_path / "untrained"
    empty.mkdir()
    (empty / "config.json").write_text((reference_run / "config.json").read_text())
    err = run_main(capsys, f"--workdir={empty}", f"--out={tmp_path / 'hf'}")
    assert "no trained checkpoint" in err


# --------------------------------------------------------------------------- import


def test_round_trip_import_loads_and_continues_pretraining(reference_run, tmp_path, capsys, hf):
    from helpers import losses

    out = export.export(reference_run, tmp_path / "hf")
    export.main(["--import", str(out), f"--workdir={tmp_path / 'imported'}"])
    assert "imported" in capsys.readouterr().out
    before, run_a, _ = run_lib.load_params(reference_run)
    after, run_b, step = run_lib.load_params(tmp_path / "imported")
    assert step == 0 and run_b.model.cfg == run_a.model.cfg
    flat_a = dict(_flatten(before))
    flat_b = dict(_flatten(after))
    assert flat_a.keys() == flat_b.keys()
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)  # bit for bit
    # Continual pretraining starts from the imported weights: the first step's loss is the
    # trained model's, far below that of the fresh model the reference run started from.
    config = run_lib.read_config(tmp_path / "imported")
    config.steps = 2
    train_lib.train(config, tmp_path / "imported")
    first = losses(tmp_path / "imported")[1]
    assert first < losses(reference_run)[1] - 0.5


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield prefix + k, np.asarray(v)


def _small_tokenizer(directory, size=400):
    """A byte-level BPE `tokenizers` file trained on held-out text (no sentinels of its own)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(
        [t for d in DOMAINS for t in held_out_texts(d, 5)],
        trainers.BpeTrainer(vocab_size=size, special_tokens=["<pad>", "</s>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(directory / "tokenizer.json"))
    return tok


def _llama(hf, directory, vocab_size, **overrides):
    import torch

    torch.manual_seed(0)
    config = hf.LlamaConfig(**{
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None, **overrides})
    model = hf.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, max_shard_size="200KB")  # sharded, with an index
    return model


def test_import_of_a_transformers_llama(tmp_path, hf, capsys):
    source = tmp_path / "llama"
    source.mkdir()
    tok = _small_tokenizer(source)
    model = _llama(hf, source, tok.get_vocab_size() + vocab.NUM_SENTINELS)
    assert (source / "model.safetensors.index.json").exists()
    # The run config: the default job on one small domain, whose preparation is quick.
    config = default.get_config("runlocal")
    config.data.sources = {"reference": "bundled:reference"}
    (tmp_path / "base.json").write_text(config.to_json())
    export.main(["--import", str(source), f"--workdir={tmp_path / 'run'}",
                 f"--config={tmp_path / 'base.json'}"])
    capsys.readouterr()
    params, run, _ = run_lib.load_params(tmp_path / "run")
    assert run.config.data.tokenizer == f"hf:{tmp_path / 'run' / 'tokenizer.json'}"
    ids = [tok.encode(t).ids[:64] for t in held_out_texts("literature", 2)]
    assert min(map(len, ids)) == 64
    diff = np.abs(hf_logits(model, ids) - loam_logits(run.model, params, ids)).max()
    assert diff <= 1e-4

    # Another vocabulary size: the bundled tokenizer has 8192 ids, the checkpoint 500.
    err = run_main(capsys, "--import", str(source), f"--workdir={tmp_path / 'other'}",
                   "--tokenizer=bundled")
    assert f"vocabulary has {tok.get_vocab_size() + 100} ids" in err and "8192" in err
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("overrides, named", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
     "rope scaling 'linear'"),
])
def test_import_refuses_what_loam_cannot_express(tmp_path, hf, capsys, overrides, named):
    source = tmp_path / "llama"
    _llama(hf, source, 356, **overrides)
    capsys.readouterr()  # transformers' progress bars
    err = run_main(capsys, "--import", str(source), f"--workdir={tmp_path / 'run'}")
    assert named in err and "cannot express" in err
    assert not (tmp_path / "run").exists()
