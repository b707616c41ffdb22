"""tfds builders and seqio tasks over the bundled corpora (real data, real tfds datasets)."""

import importlib.util
import os

import numpy as np
import pytest

# These tests need the [seqio] extra (seqio, TensorFlow, tensorflow-datasets). seqio is looked up
# rather than imported: importing it loads TensorFlow into the whole test process at collection.
SEQIO_EXTRA = "needs the [seqio] extra: pip install -e '.[seqio]'"
if importlib.util.find_spec("seqio") is None:
    pytest.skip(SEQIO_EXTRA, allow_module_level=True)
tfds = pytest.importorskip("tensorflow_datasets", reason=SEQIO_EXTRA)

from etils import epath  # noqa: E402

from loam.data import corpora, objectives, tfds_builders  # noqa: E402
from loam.data import vocab as vocab_lib  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """All five domains built once per session into a private tfds dir (LOAM_TFDS_DIR)."""
    path = tmp_path_factory.mktemp("tfds")
    for domain in corpora.DOMAIN_NAMES:
        tfds_builders.build_domain(domain, data_dir=path)
    old = os.environ.get("LOAM_TFDS_DIR")
    os.environ["LOAM_TFDS_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LOAM_TFDS_DIR", None)
    else:
        os.environ["LOAM_TFDS_DIR"] = old


@pytest.fixture(scope="session")
def tasks(tfds_dir):
    from loam.data import tasks as tasks_module
    return tasks_module


def _corpus(domain, directory=None):
    return list(corpora.read_documents(corpora.corpus_path(domain, directory)))


# ----------------------------------------------------------------------------- builders


@pytest.mark.parametrize("domain", corpora.DOMAIN_NAMES)
def test_builder_splits_follow_is_validation(tfds_dir, domain):
    builder = tfds.builder(f"loam_{domain}", data_dir=str(tfds_dir))
    assert isinstance(builder, tfds_builders.BUILDERS[domain])
    assert str(builder.version) == "1.0.0" and builder.is_prepared()
    assert "1.0.0" in builder.RELEASE_NOTES
    docs = _corpus(domain)
    val = {i for i, (d, _) in enumerate(docs) if corpora.is_validation(d)}
    splits = builder.info.splits
    assert splits["train"].num_examples + splits["validation"].num_examples == len(docs)
    assert splits["validation"].num_examples == len(val) > 0
    seen = []
    for ex in builder.as_dataset(split="validation").as_numpy_iterator():
        i = int(ex["doc_index"])
        assert ex["doc_id"].decode() == docs[i][0] and ex["text"].decode() == docs[i][1]
        assert int(ex["domain_id"]) == corpora.DOMAIN_NAMES.index(domain)
        seen.append(i)
    assert sorted(seen) == sorted(val)
    assert builder.info.metadata["corpus_sha256"] == tfds_builders.corpus_sha256(
        corpora.corpus_path(domain))


def test_build_is_deterministic_and_guards_the_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    docs = [(f"doc/{i}", f"text number {i} " * (i % 5 + 1)) for i in range(80)]
    corpora.write_documents(corpora.corpus_path("literature", corpus), docs)
    b1 = tfds_builders.build_domain("literature", tmp_path / "a", corpus)
    b2 = tfds_builders.build_domain("literature", tmp_path / "b", corpus)
    n_val = sum(corpora.is_validation(d) for d, _ in docs)
    assert b1.info.splits["validation"].num_examples == n_val
    assert b1.info.splits["train"].num_examples == len(docs) - n_val
    rows = [[(e["doc_index"], e["text"]) for e in b.as_dataset(split="train").as_numpy_iterator()]
            for b in (b1, b2)]
    assert rows[0] == rows[1]
    # Same tfds dir, another corpus: refused with the command that fixes it.
    other = tmp_path / "other"
    corpora.write_documents(corpora.corpus_path("literature", other), docs[:40])
    with pytest.raises(ValueError, match="different corpus.*loam.data.tfds_builders"):
        tfds_builders.build_domain("literature", tmp_path / "a", other)


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(corpora.CorpusError, match="does not exist"):
        tfds_builders.build_domain("code", tmp_path / "tfds", tmp_path / "no_corpus")
    with pytest.raises(ValueError, match="unknown domain"):
        tfds_builders.build_domain("poetry", tmp_path / "tfds")


# ----------------------------------------------------------------------------- tasks


def test_every_task_yields_examples(tasks):
    import seqio
    for domain in corpora.DOMAIN_NAMES:
        for objective in tasks.OBJECTIVE_NAMES:
            task = seqio.get_mixture_or_task(f"loam.{domain}.{objective}")
            ds = task.get_dataset({"targets": 128}, split="validation", shuffle=False)
            examples = list(ds.take(2).as_numpy_iterator())
            assert len(examples) == 2
            for ex in examples:
                assert int(ex["domain_id"]) == corpora.DOMAIN_NAMES.index(domain)
                n = ex["targets"].shape[0] + (ex["inputs"].shape[0] if "inputs" in ex else 0)
                assert 0 < n <= 128 and ex["doc_index"] >= 0
                assert ("inputs" in ex) == (objective != "causal")
    mixture = seqio.get_mixture_or_task("loam.all.causal")
    assert sorted(t.name for t in mixture.tasks) == sorted(
        f"loam.{d}.causal" for d in corpora.DOMAIN_NAMES)
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates["loam.code.causal"] == tasks.train_text_bytes("code") > 0


def test_documents_are_chunked_not_truncated(tasks):
    """The chunks of a long document, in order, are its tokenization plus EOS."""
    import seqio
    vocab = vocab_lib.default_vocabulary()
    docs = _corpus("literature")
    index = max((i for i, (d, _) in enumerate(docs) if corpora.is_validation(d)),
                key=lambda i: len(docs[i][1]))
    ids = vocab.encode([docs[index][1]])[0] + [vocab_lib.EOS_ID]
    task = seqio.get_mixture_or_task("loam.literature.causal")
    ds = task.get_dataset({"targets": 64}, split="validation", shuffle=False)
    pieces = [(int(e["chunk_index"]), e["targets"]) for e in
              ds.filter(lambda e: e["doc_index"] == index).as_numpy_iterator()]
    assert len(pieces) == -(-len(ids) // 64) > 1
    assert [c for c, _ in pieces] == list(range(len(pieces)))
    assert np.concatenate([p for _, p in pieces]).tolist() == ids


def test_corruption_is_deterministic_per_example(tasks):
    import seqio
    task = seqio.get_mixture_or_task("loam.docs.span_corruption")

    def read():
        ds = task.get_dataset({"targets": 128}, split="validation", shuffle=False)
        return [(e["inputs"].tolist(), e["targets"].tolist())
                for e in ds.take(6).as_numpy_iterator()]
    first, second = read(), read()
    assert first == second
    assert len({tuple(t) for _, t in first}) > 1
    for inputs, targets in first:
        assert targets[-1] == vocab_lib.EOS_ID
        assert targets[0] == vocab_lib.sentinel_id(0)  # targets start with the first sentinel
        assert vocab_lib.sentinel_id(0) in inputs


def test_domain_and_document_survive_packing(tasks):
    vocab = vocab_lib.default_vocabulary()
    texts = {d: _corpus(d) for d in corpora.DOMAIN_NAMES}
    ds = tasks.get_dataset("loam.all.causal", 128, batch_size=8, split="validation")
    domains_seen, encoded = set(), {}
    for batch in ds.take(3).as_numpy_iterator():
        assert set(batch) == set(tasks.BATCH_FEATURES)
        assert all(v.shape == (8, 128) for v in batch.values())
        pad = batch["segment_ids"] == 0
        assert np.all(batch["doc_ids"][pad] == -1) and np.all(batch["loss_weights"][pad] == 0)
        assert np.all(batch["loss_weights"][~pad] == 1) and not batch["prefix"].any()
        for r in range(8):
            for s in set(batch["segment_ids"][r].tolist()) - {0}:
                at = batch["segment_ids"][r] == s
                domain, doc = set(batch["domain_ids"][r][at]), set(batch["doc_ids"][r][at])
                assert len(domain) == 1 and len(doc) == 1
                domain, doc = corpora.DOMAIN_NAMES[domain.pop()], doc.pop()
                domains_seen.add(domain)
                # The segment is a contiguous piece of that document's tokens.
                if (domain, doc) not in encoded:
                    encoded[domain, doc] = vocab.encode([texts[domain][doc][1]])[0] + [1]
                ids = encoded[domain, doc]
                seg = batch["targets"][r][at].tolist()
                assert any(ids[i:i + len(seg)] == seg for i in range(0, len(ids), 128))
                assert batch["positions"][r][at].tolist() == list(range(len(seg)))
                assert batch["inputs"][r][at].tolist() == [0] + seg[:-1]
    assert len(domains_seen) >= 2


def test_prefix_features_match_the_objective_contract(tasks):
    import seqio
    task = seqio.get_mixture_or_task("loam.dialogue.ul2")
    ex = next(task.get_dataset({"targets": 96}, split="validation",
                               shuffle=False).as_numpy_iterator())
    width = ex["inputs"].shape[0]
    tokens = np.concatenate([ex["inputs"], ex["targets"]])
    expect = objectives.example_features(
        {"tokens": tokens, "loss_mask": np.arange(tokens.shape[0]) >= width, "prefix_len": width})
    row = next(tasks.get_dataset("loam.dialogue.ul2", 96, batch_size=1, split="validation",
                                 pack=False).as_numpy_iterator())
    n = tokens.shape[0]
    for k, v in expect.items():
        np.testing.assert_array_equal(row[k][0, :n], v, err_msg=k)
        assert not row[k][0, n:].any(), k
    assert tokens[0] in objectives.MODE_IDS.values()  # UL2's mode token leads the prefix
    assert np.all(row["segment_ids"][0, :n] == 1) and np.all(row["doc_ids"][0, :n] >= 0)


def test_packed_prefix_rows_keep_each_examples_prefix(tasks):
    ds = tasks.get_dataset("loam.reference.span_corruption", 128, batch_size=2,
                           split="validation")
    batch = next(ds.as_numpy_iterator())
    assert batch["segment_ids"].max() > 1  # short entries: several examples per row
    for r in range(2):
        for s in set(batch["segment_ids"][r].tolist()) - {0}:
            at = batch["segment_ids"][r] == s
            pos, prefix = batch["positions"][r][at], batch["prefix"][r][at]
            width = int(prefix.sum()) - 1  # prefix covers positions 0..len(inputs)
            assert width > 0 and prefix.tolist() == (pos <= width).astype(int).tolist()
            assert batch["loss_weights"][r][at].tolist() == (pos >= width).astype(float).tolist()
            assert batch["targets"][r][at][-1] == vocab_lib.EOS_ID
            assert batch["targets"][r][at][width] == vocab_lib.sentinel_id(0)
            assert batch["domain_ids"][r][at].tolist() == [4] * int(at.sum())


def test_seqio_vocabulary_matches_loam_ids(tasks):
    loam_vocab = vocab_lib.default_vocabulary()
    seqio_vocab = tasks.ExactSentencePieceVocabulary(str(vocab_lib.MODEL_PATH),
                                                    extra_ids=vocab_lib.NUM_SENTINELS)
    task_vocab = tasks.vocabulary()
    code = _corpus("code")
    texts = ["In the beginning God created the heaven and the earth.",
             "def f(x):\n    return {'a': x ** 2}  # ünïcödé ✓ 12345",
             "HAMLET: To be, or not to be, that is the question.",
             # Whitespace runs: tensorflow-text's op segments these differently from
             # sentencepiece; the tasks' vocabulary must not.
             "        flag = key in d\n                        # using an anydbm\n",
             code[204][1], code[0][1]]
    for text in texts:
        ids = loam_vocab.encode([text])[0]
        assert seqio_vocab.encode(text) == ids
        assert task_vocab.encode(text) == ids
        assert task_vocab.encode_tf(text).numpy().tolist() == ids
    batch = task_vocab.encode_tf(texts[:2])
    assert batch.to_list() == loam_vocab.encode(texts[:2])
    assert seqio_vocab.vocab_size == task_vocab.vocab_size == vocab_lib.VOCAB_SIZE
    assert (task_vocab.eos_id, task_vocab.pad_id) == (vocab_lib.EOS_ID, vocab_lib.PAD_ID)


def test_unknown_task_name_is_a_clear_error(tasks):
    with pytest.raises(ValueError, match="no seqio task or mixture named 'loam.poetry.causal'.*"
                                         "register_tfds_source"):
        tasks.get_dataset("loam.poetry.causal", 64)


# ----------------------------------------------------------------------------- other tfds data


class _Notes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A small tfds dataset prepared elsewhere (its class is not registered: read from files)."""

    name = "loam_test_notes"
    VERSION = tfds.core.Version("2.0.0")
    pkg_dir_path = epath.Path(__file__).parent

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
            {"body": tfds.features.Text(), "n": np.int64}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 46)}

    def _generate_examples(self, lo, hi):
        for i in range(lo, hi):
            yield i, {"body": f"note {i}: " + "the quick brown fox " * (i % 7 + 1), "n": i}


def test_register_tfds_source(tasks, tmp_path):
    _Notes(data_dir=str(tmp_path)).download_and_prepare()
    names = tasks.register_tfds_source(
        "notes", "loam_test_notes:2.0.0", data_dir=tmp_path, text_key="body",
        splits={"train": "train", "validation": "test"})
    assert names == [f"loam.notes.{o}" for o in tasks.OBJECTIVE_NAMES]
    domain_id = tasks.EXTRA_DOMAINS["notes"]
    assert domain_id >= len(corpora.DOMAIN_NAMES)
    vocab = vocab_lib.default_vocabulary()
    texts = []
    for row in tasks.get_dataset("loam.notes.causal", 64, split="validation").as_numpy_iterator():
        real = row["segment_ids"] > 0
        assert np.all(row["domain_ids"][real] == domain_id)
        for s in set(row["segment_ids"].tolist()) - {0}:
            texts.append(vocab.decode(row["targets"][row["segment_ids"] == s]))
    assert sorted(texts) == sorted(
        f"note {i}: " + "the quick brown fox " * (i % 7 + 1) for i in range(40, 46))
    span = tasks.get_dataset("loam.notes.span_corruption", 64, batch_size=2, split="train")
    batch = next(span.as_numpy_iterator())
    assert batch["prefix"].any() and batch["loss_weights"].any()
    tasks.register_tfds_source("notes_bad", "loam_test_notes:2.0.0", data_dir=tmp_path,
                               text_key="text")
    with pytest.raises(ValueError, match="no text feature 'text'"):
        tasks.get_dataset("loam.notes_bad.causal", 64)
