"""Sampling: the cached decoder against full forward passes, the sampling rules, the command and
its bad input. Uses the shared miniature run (conftest.reference_run: 12 steps, context 64)."""

import functools
import itertools
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from loam import generate
from loam.data import corpora, vocab
from loam.model.transformer import init_cache

import helpers


@pytest.fixture(scope="module")
def sampler(reference_run):
    return generate.Sampler(reference_run)


def held_out_texts(domain: str, n: int) -> list[str]:
    """The first n held-out documents of a bundled domain."""
    docs = (text for doc_id, text in corpora.read_documents(corpora.corpus_path(domain))
            if corpora.is_validation(doc_id))
    return list(itertools.islice(docs, n))


def prompt_ids(sampler, domain: str, length: int, index: int = 0) -> list[int]:
    return sampler.tokenizer.encode([held_out_texts(domain, index + 1)[index]])[0][:length]


def full_logits(sampler, ids, bucket: int = 1) -> np.ndarray:
    """The plain forward pass (the training one) over these tokens; with bucket > 1, padded on
    the right to a multiple of it (causal attention: the padding changes no earlier position),
    which bounds the number of compilations."""
    n = len(ids)
    padded = list(ids) + [0] * (-n % bucket)
    return np.asarray(_forward(sampler.model)(sampler.params, jnp.asarray([padded])))[0, :n]


@functools.cache
def _forward(model):
    return jax.jit(lambda params, x: model.apply({"params": params}, x))


def test_cached_decoding_equals_full_recomputation(sampler):
    ids = prompt_ids(sampler, "literature", 60)
    full = full_logits(sampler, ids)
    apply = jax.jit(lambda p, x, c: sampler.model.apply({"params": p}, x, cache=c))
    cache = init_cache(sampler.model.cfg, 1, 64)
    pieces = []
    # A 20-token prefill, a 7-token chunk, then one token at a time, all through one cache.
    for start, stop in [(0, 20), (20, 27), *((i, i + 1) for i in range(27, 60))]:
        logits, cache = apply(sampler.params, jnp.asarray([ids[start:stop]]), cache)
        pieces.append(np.asarray(logits)[0])
    cached = np.concatenate(pieces)
    assert cached.shape == full.shape
    assert np.abs(cached - full).max() <= 1e-4
    assert int(cache["index"]) == 60 and bool(cache["valid"][0, :60].all())


def reference_greedy(sampler, ids, n):
    """Greedy decoding by full forward passes: the argmax at the last position, token by token."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(np.argmax(full_logits(sampler, seq, bucket=16)[-1])))
        if seq[-1] == sampler.tokenizer.eos_id:
            break
    return seq[len(ids):]


def test_greedy_continuation_is_argmax_of_full_forward_passes(sampler):
    prompts = [prompt_ids(sampler, "literature", 12), prompt_ids(sampler, "code", 5)]
    n = 16
    want = [reference_greedy(sampler, p, n) for p in prompts]
    eos = sampler.tokenizer.eos_id
    batched = generate.generate_tokens(sampler.model, sampler.params, prompts, n, eos_id=eos)
    alone = [generate.generate_tokens(sampler.model, sampler.params, [p], n, eos_id=eos)[0]
             for p in prompts]
    recomputed = generate.generate_tokens(sampler.model, sampler.params, prompts, n, eos_id=eos,
                                          use_cache=False)
    assert batched == want          # left-padded batch of different lengths
    assert alone == want
    assert recomputed == want       # the cache-free decoder
    assert all(len(w) >= 1 for w in want)


def test_sampling_rules():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1, 0.0]]))
    keys = jax.random.split(jax.random.key(0), 4000)

    def draws(**kw):
        s = generate.Sampling(**kw)
        fn = jax.jit(jax.vmap(lambda k: generate.sample_logits(logits, k, s)[0]))
        return np.asarray(fn(keys))

    assert set(draws(temperature=0.0).tolist()) == {0}
    assert set(draws(temperature=1.0, top_k=1).tolist()) == {0}
    assert set(draws(temperature=1.0, top_p=1e-6).tolist()) == {0}
    assert set(draws(temperature=1.0, top_k=3).tolist()) == {0, 1, 2}
    # top_p=0.5: 0.4 alone falls short, 0.4 + 0.3 reaches it; nothing after is kept.
    assert set(draws(temperature=1.0, top_p=0.5).tolist()) == {0, 1}
    freq = np.bincount(draws(temperature=1.0), minlength=5) / len(keys)
    np.testing.assert_allclose(freq, [0.4, 0.3, 0.2, 0.1, 0.0], atol=0.03)
    # A high temperature flattens the distribution, a low one sharpens it.
    assert np.bincount(draws(temperature=5.0), minlength=5)[3] > np.bincount(
        draws(temperature=0.3), minlength=5)[3]


def test_seeded_samples_repeat_and_differ_by_seed(sampler):
    text = held_out_texts("dialogue", 1)[0][:40]
    a = sampler.sample(text, 16, temperature=1.0, top_k=50, seed=1)
    b = sampler.sample(text, 16, temperature=1.0, top_k=50, seed=1)
    c = sampler.sample(text, 16, temperature=1.0, top_k=50, seed=2)
    assert a == b and a != c


def test_byte_fallback_prompt(sampler):
    text = "Naïve café — 世界 🙂"
    ids = generate.encode_prompt(sampler.tokenizer, text)
    assert sampler.tokenizer.decode(ids) == text
    assert any(sampler.tokenizer.piece(i).startswith("<0x") for i in ids)  # bytes of 🙂
    assert isinstance(sampler.sample(text, 4), str)


@pytest.mark.e2e
def test_command_prints_the_continuation(reference_run, sampler):
    prompt = "And God said"
    proc = subprocess.run([sys.executable, "-m", "loam.generate", f"--workdir={reference_run}",
                           f"--prompt={prompt}", "--max_new_tokens=8"],
                          env=helpers.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == prompt + sampler.sample(prompt, 8) + "\n"


def run_main(capsys, *args):
    with pytest.raises(SystemExit) as e:
        generate.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_workdir_without_checkpoints(reference_run, tmp_path, capsys):
    shutil.copy(reference_run / "config.json", tmp_path / "config.json")
    err = run_main(capsys, f"--workdir={tmp_path}", "--prompt=And")
    assert "no trained checkpoint" in err and "python -m loam.train" in err


def test_prompt_longer_than_context(reference_run, capsys):
    long_text = held_out_texts("literature", 1)[0]  # hundreds of tokens; the context is 64
    err = run_main(capsys, f"--workdir={reference_run}", f"--prompt={long_text}")
    assert "context is 64" in err and "shorten it" in err
    err = run_main(capsys, f"--workdir={reference_run}", "--prompt=And God said",
                   "--max_new_tokens=100")
    assert "ask for at most" in err
    err = run_main(capsys, f"--workdir={reference_run}", "--prompt=And", "--top_p=0")
    assert "top_p=0.0" in err


def test_prompt_the_tokenizer_cannot_encode(tmp_path):
    # A tokenizers file with no byte fallback, trained on English text: no token for "世".
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(held_out_texts("literature", 20), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    tokenizer = vocab.get_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}")
    assert generate.encode_prompt(tokenizer, "and God said") == tokenizer.encode(
        ["and God said"])[0]
    with pytest.raises(generate.GenerateError) as e:
        generate.encode_prompt(tokenizer, "God said 世界")
    assert "'世' (U+4E16" in str(e.value) and "no byte fallback" in str(e.value)


def test_notebook_call(sampler):
    texts = sampler.sample(["And God said", "def main("], 6)
    assert isinstance(texts, list) and len(texts) == 2
    greedy = [generate.generate_tokens(sampler.model, sampler.params,
                                       [sampler.tokenizer.encode([p])[0]], 6,
                                       eos_id=sampler.tokenizer.eos_id)[0]
              for p in ["And God said", "def main("]]
    assert texts == [sampler.tokenizer.decode(sampler.tokenizer.encode([p])[0] + g)[len(p):]
                     for p, g in zip(["And God said", "def main("], greedy)]


@pytest.mark.e2e
def test_bench_prints_json(capsys):
    from loam.bench import generate as bench

    bench.main(["--size=nano", "--context=32", "--prompt_len=8", "--rounds=1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "generate" and last["same_tokens"] is True
    assert last["tokens_per_s_cache"] > 0 and last["tokens_per_s_no_cache"] > 0
    assert last["cache_speedup"] > 0
