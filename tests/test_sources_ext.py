"""Sources from other ecosystems on real data made from the bundled corpora: a tfds dataset built
here (``tfds:``), Hugging Face datasets saved to disk (``hf:``), seqio tasks registered here and
loam's own (``seqio:``), the seqio export of loam's sources, and their bad inputs."""

import functools
import importlib.util
import textwrap

import numpy as np
import pytest

from loam.data import corpora, sources
from loam.data.corpora import CorpusError

SEQIO_EXTRA = "needs the [seqio] extra: pip install -e '.[seqio]'"
HF_EXTRA = "needs the [hf] extra: pip install -e '.[hf]'"


def _docs(domain):
    return list(corpora.read_documents(corpora.corpus_path(domain)))


def _read(spec, domain="d", split=None):
    return list(sources.read_documents(sources.parse(domain, spec), split))


def _need_tf():
    # Looked up rather than imported at collection: TensorFlow loads only for these tests.
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip(SEQIO_EXTRA)
    return pytest.importorskip("tensorflow_datasets", reason=SEQIO_EXTRA)


# ----------------------------------------------------------------------------- tfds


SCENES = _docs("dialogue")[:240]


def _scenes_builder_class(tfds):
    from etils import epath

    class Scenes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Shakespeare scenes; test = every 8th, the rest train. Read back from its files only."""

        name = "loam_test_scenes"
        VERSION = tfds.core.Version("1.2.0")
        pkg_dir_path = epath.Path(__file__).parent

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return epath.Path(__file__)

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
                "play_text": tfds.features.Text(), "scene": tfds.features.Text(),
                "number": tfds.features.Scalar(dtype=np.int64)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(lambda i: i % 8),
                    "test": self._generate_examples(lambda i: not i % 8)}

        def _generate_examples(self, keep):
            for i, (doc_id, text) in enumerate(SCENES):
                if keep(i):
                    yield doc_id, {"play_text": text, "scene": doc_id, "number": i}
    return Scenes


@pytest.fixture(scope="module")
def scenes_tfds(tmp_path_factory):
    """(tfds data dir, builder): the scenes as a tfds dataset in 3 file shards per split."""
    tfds = _need_tf()
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = _scenes_builder_class(tfds)(data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        num_shards=3, try_download_gcs=False))
    return str(data_dir), builder


def test_tfds_source_reads_each_shard_alone(scenes_tfds):
    import tensorflow_datasets as tfds
    data_dir, builder = scenes_tfds
    spec = {"source": "tfds:loam_test_scenes:1.2.0", "data_dir": data_dir, "feature": "play_text"}
    source = sources.parse("scenes", spec)
    units = sources.units(source)
    lengths = builder.info.splits["train"].shard_lengths
    assert len(lengths) == 3 and len(units) == 3
    bounds = [sum(lengths[:i]) for i in range(4)]
    assert [u.key for u in units] == [f"train[{a}:{b}]" for a, b in zip(bounds, bounds[1:])]
    # Units read alone, concatenated: the split in tfds' file order; ids <split>:<index>.
    docs = [d for u in units for d in sources.read_unit(u)]
    files_in_order = tfds.ReadConfig(interleave_cycle_length=1)
    whole = [ex["play_text"].decode() for ex in builder.as_dataset(
        split="train", shuffle_files=False, read_config=files_in_order).as_numpy_iterator()]
    assert [t for _, t in docs] == whole
    assert [i for i, _ in docs] == [f"train:{n}" for n in range(len(whole))]
    train = sorted(t for i, (_, t) in enumerate(SCENES) if i % 8)
    assert sorted(whole) == train and _read(spec) == docs  # deterministic
    # The id feature; a sliced split spanning two splits; a fingerprint per read.
    by_id = _read({**spec, "id_field": "scene"})
    assert sorted(by_id) == sorted(d for i, d in enumerate(SCENES) if i % 8)
    sliced = sources.units(sources.parse("scenes", {**spec, "split": "train[50:120]+test[:5]"}))
    assert [u.key for u in sliced][-1] == "test[0:5]"
    assert sum(u.stop - u.start for u in sliced) == 75
    assert [d for u in sliced for d in sources.read_unit(u)][:70] == docs[50:120]
    assert sources.fingerprint(source) == sources.fingerprint(sources.parse("scenes", spec))
    assert sources.fingerprint(source) != sources.fingerprint(
        sources.parse("scenes", {**spec, "split": "test"}))


def test_tfds_source_reads_loams_own_tfds_export(tmp_path):
    """The bundled corpus -> tfds_builders -> tfds: source gives the corpus' training documents."""
    _need_tf()
    from loam.data import tfds_builders
    tfds_builders.build_domain("code", data_dir=tmp_path)
    docs = _read({"source": "tfds:loam_code", "data_dir": str(tmp_path), "id_field": "doc_id"})
    assert sorted(docs) == sorted(d for d in _docs("code") if not corpora.is_validation(d[0]))


def test_tfds_bad_inputs(scenes_tfds, tmp_path):
    data_dir, _ = scenes_tfds
    base = {"source": "tfds:loam_test_scenes", "data_dir": data_dir, "feature": "play_text"}
    cases = [
        ({**base, "data_dir": str(tmp_path)}, rf"not prepared in {tmp_path}.*tfds build"),
        ({"source": "tfds:loam_code", "data_dir": str(tmp_path)},
         "not prepared.*python -m loam.data.tfds_builders --data_dir"),
        ({**base, "split": "validation"}, "split 'validation'.*splits: test, train"),
        ({**base, "feature": "text"}, "no text feature 'text'.*play_text"),
        ({**base, "feature": "number"}, "'number' .* is not text"),
        ({**base, "id_field": "key"}, "no id feature 'key'"),
    ]
    for spec, message in cases:
        with pytest.raises(CorpusError, match=message):
            sources.units(sources.parse("scenes", spec))
    with pytest.raises(CorpusError, match="unknown option 'text_field'"):
        sources.parse("scenes", {**base, "text_field": "play_text"})


# ----------------------------------------------------------------------------- hf


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    datasets = pytest.importorskip("datasets", reason=HF_EXTRA)
    root = tmp_path_factory.mktemp("hf")
    docs = _docs("docs")
    plain = datasets.Dataset.from_dict({"text": [t for _, t in docs],
                                        "id": list(range(1000, 1000 + len(docs)))})
    plain.save_to_disk(str(root / "plain"))
    lit = _docs("literature")
    table = datasets.Dataset.from_dict({"body": [t for _, t in lit], "ref": [d for d, _ in lit],
                                        "chapter": list(range(len(lit)))})
    datasets.DatasetDict({"train": table.select(range(900)),
                          "test": table.select(range(900, len(lit)))}
                         ).save_to_disk(str(root / "dict"))
    return root, docs, lit


def test_hf_dataset_in_fixed_row_ranges(hf_dirs, monkeypatch):
    from loam.data.sources import hf as hf_kind
    root, docs, lit = hf_dirs
    monkeypatch.setattr(hf_kind, "ROWS_PER_UNIT", 500)
    source = sources.parse("docs", f"hf:{root / 'plain'}")
    assert [u.key for u in sources.units(source)] == ["rows[0:500]", "rows[500:1000]",
                                                      f"rows[1000:{len(docs)}]"]
    got = list(sources.read_documents(source))
    # Integer ids become strings; rows come in order.
    assert got == [(str(1000 + i), t) for i, (_, t) in enumerate(docs)]
    # A DatasetDict: the split chosen, another text field, the id column, or row-number ids.
    spec = {"source": f"hf:{root / 'dict'}", "split": "test", "text_field": "body"}
    assert _read({**spec, "id_field": "ref"}) == lit[900:]
    assert _read(spec) == [(f"test:{i}", t) for i, (_, t) in enumerate(lit[900:])]
    assert _read({**spec, "id_field": "chapter"})[0] == ("900", lit[900][1])
    fp = sources.fingerprint(source)
    assert fp == sources.fingerprint(sources.parse("docs", f"hf:{root / 'plain'}"))
    assert fp != sources.fingerprint(sources.parse("x", {**spec, "split": "train"}))


def test_hf_fingerprint_follows_the_data(hf_dirs, tmp_path):
    import datasets
    _, docs, _ = hf_dirs
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": [t for _, t in docs[:50]]}).save_to_disk(str(path))
    before = sources.fingerprint(sources.parse("d", f"hf:{path}"))
    datasets.Dataset.from_dict({"text": [t for _, t in docs[1:51]]}).save_to_disk(str(path))
    assert sources.fingerprint(sources.parse("d", f"hf:{path}")) != before


def test_hf_bad_inputs(hf_dirs, tmp_path):
    root, _, _ = hf_dirs
    cases = [
        (f"hf:{tmp_path / 'missing'}", "not a dataset saved with datasets' save_to_disk"),
        (f"hf:{root / 'dict'}", r"is a DatasetDict \(splits: test, train\); set option 'split'"),
        ({"source": f"hf:{root / 'dict'}", "split": "validation", "text_field": "body"},
         "no split 'validation'"),
        ({"source": f"hf:{root / 'dict'}", "split": "train"}, "no column 'text'.*body"),
        ({"source": f"hf:{root / 'dict'}", "split": "train", "text_field": "chapter"},
         "'chapter' holds .*int64.*not text"),
        ({"source": f"hf:{root / 'plain'}", "id_field": "key"}, "no id column 'key'"),
        ({"source": f"hf:{root / 'plain'}", "split": "train"}, "single Dataset.*remove option"),
    ]
    for spec, message in cases:
        with pytest.raises(CorpusError, match=message):
            _read(spec)


# ----------------------------------------------------------------------------- seqio


TASKS_MODULE = '''
"""seqio tasks over bundled dialogue scenes, as a T5X user registers them."""
import functools

import gin
import seqio
import tensorflow as tf

from loam.data import tasks as loam_tasks

FEATURES = {{"text": tf.io.FixedLenFeature([], tf.string),
            "id": tf.io.FixedLenFeature([], tf.string)}}
OUTPUT = {{"targets": seqio.Feature(loam_tasks.vocabulary(), add_eos=True)}}


@gin.configurable
def drop_short(ds, min_chars=0):
    return ds.filter(lambda ex: tf.strings.length(ex["text"]) >= min_chars)


def prefix_lm(ds):
    """The first half of each token sequence becomes the inputs."""
    def split(ex):
        half = tf.size(ex["targets"]) // 2
        return {{"inputs": ex["targets"][:half], "targets": ex["targets"][half:]}}
    return ds.map(split)


def mask_digits(ds):
    return ds.map(lambda ex: {{**ex, "targets": tf.where(ex["targets"] < 10, 0, ex["targets"])}})


def _add(name, *after):
    seqio.TaskRegistry.add(
        name,
        source=seqio.TFExampleDataSource({{"train": "{pattern}"}}, feature_description=FEATURES),
        preprocessors=[drop_short, functools.partial(seqio.preprocessors.rekey,
                                                     key_map={{"targets": "text", "id": "id"}}),
                       seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(), *after],
        output_features=OUTPUT, metric_fns=[])


_add("loam_test.scenes", seqio.preprocessors.append_eos)
_add("loam_test.scenes_prefix", prefix_lm)
_add("loam_test.scenes_masked", mask_digits)
'''


@pytest.fixture(scope="module")
def scenes_task(tmp_path_factory):
    """A module registering seqio tasks over 3 TFRecord files of scenes; (module name, docs)."""
    _need_tf()
    pytest.importorskip("seqio", reason=SEQIO_EXTRA)
    import tensorflow as tf
    root = tmp_path_factory.mktemp("seqio")
    for k in range(3):
        with tf.io.TFRecordWriter(str(root / f"scenes-{k:05d}.tfrecord")) as w:
            for doc_id, text in SCENES[k::3]:
                w.write(tf.train.Example(features=tf.train.Features(feature={
                    "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()])),
                    "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[doc_id.encode()])),
                })).SerializeToString())
    name = "loam_test_scene_tasks"
    (root / f"{name}.py").write_text(textwrap.dedent(
        TASKS_MODULE.format(pattern=str(root / "scenes-*.tfrecord"))))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield name


def test_seqio_task_text_before_tokenization_with_gin(scenes_task):
    from loam.data.sources import seqio as seqio_kind
    spec = {"source": "seqio:loam_test.scenes", "modules": [scenes_task]}
    units = sources.units(sources.parse("scenes", spec))
    assert [u.key for u in units] == [f"train:scenes-{k:05d}.tfrecord" for k in range(3)]
    expect = [d for k in range(3) for d in SCENES[k::3]]
    assert _read(spec) == expect  # ids from the task's "id" feature, file by file
    # The gin binding configures the task's own filter while it is read, and only then.
    bound = {**spec, "gin_bindings": ["drop_short.min_chars = 6000"]}
    assert _read(bound) == [d for d in expect if len(d[1]) >= 6000] != expect
    assert _read(spec) == expect
    assert sources.fingerprint(sources.parse("s", bound)) != sources.fingerprint(
        sources.parse("s", spec))
    # Framing steps after tokenization impose no objective; prefix_lm is recognised.
    assert seqio_kind.required_objective(sources.parse("s", spec)) is None
    prefix = {**spec, "source": "seqio:loam_test.scenes_prefix"}
    assert seqio_kind.required_objective(sources.parse("s", prefix)) == "prefix_lm"


def test_seqio_unknown_steps_after_tokenization(scenes_task):
    from loam.data.sources import seqio as seqio_kind
    spec = {"source": "seqio:loam_test.scenes_masked", "modules": [scenes_task]}
    message = ("applies mask_digits after tokenization.*reads the task's text before "
               "tokenization.*config.data.objective.*objective: 'config'")
    with pytest.raises(CorpusError, match=message):
        seqio_kind.required_objective(sources.parse("s", spec))
    with pytest.raises(CorpusError, match=message):
        sources.units(sources.parse("s", spec))
    accepted = {**spec, "objective": "config"}
    assert seqio_kind.required_objective(sources.parse("s", accepted)) is None
    assert len(_read(accepted)) == len(SCENES)
    assert seqio_kind.required_objective(
        sources.parse("s", {**spec, "objective": "ul2"})) == "ul2"


def test_seqio_task_over_a_prepared_tfds_dataset(scenes_tfds, tmp_path):
    """A TfdsDataSource task is read per file shard of the prepared dataset, never downloaded."""
    seqio = pytest.importorskip("seqio", reason=SEQIO_EXTRA)
    from loam.data import tasks
    data_dir, builder = scenes_tfds

    def add(name, tfds_dir):
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name, source=seqio.TfdsDataSource(
                "loam_test_scenes:1.2.0", tfds_data_dir=tfds_dir,
                splits={"train": "train[:100]", "validation": "test"}),
            preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={
                "targets": "play_text", "id": "scene"}), seqio.preprocessors.tokenize],
            output_features={"targets": seqio.Feature(tasks.vocabulary())}, metric_fns=[])
    add("loam_test.scenes_tfds", data_dir)
    spec = {"source": "seqio:loam_test.scenes_tfds", "split": "validation"}
    units = sources.units(sources.parse("s", spec))
    assert len(units) == len(builder.info.splits["test"].shard_lengths) == 3
    tfds_spec = {"source": "tfds:loam_test_scenes", "data_dir": data_dir, "split": "test",
                 "feature": "play_text", "id_field": "scene"}
    assert _read(spec) == _read(tfds_spec)
    train = _read({**spec, "split": "train"})
    assert train == _read({**tfds_spec, "split": "train[:100]"}) and len(train) == 100
    add("loam_test.scenes_elsewhere", str(tmp_path))
    with pytest.raises(CorpusError, match=f"not prepared in {tmp_path}"):
        sources.units(sources.parse("s", "seqio:loam_test.scenes_elsewhere"))
    assert not list(tmp_path.iterdir())  # nothing downloaded or generated


def test_seqio_reads_loams_own_tasks_back():
    """loam.<domain>.<objective> tasks (the seqio export) read back as their source's documents,
    with the task's objective required."""
    _need_tf()
    pytest.importorskip("seqio", reason=SEQIO_EXTRA)
    from loam.data.sources import seqio as seqio_kind
    span = sources.parse("code", {"source": "seqio:loam.code.span_corruption",
                                  "id_field": "doc_id"})
    assert seqio_kind.required_objective(span) == "span_corruption"
    assert seqio_kind.required_objective(sources.parse("c", "seqio:loam.code.causal")) == "causal"
    assert seqio_kind.required_objective(sources.parse("c", "bundled:code")) is None
    train = [d for d in _docs("code") if not corpora.is_validation(d[0]) and d[1].strip()]
    assert list(sources.read_documents(span)) == train
    with pytest.raises(CorpusError, match="option 'objective' says 'causal'"):
        seqio_kind.required_objective(sources.parse("c", {
            "source": "seqio:loam.code.span_corruption", "objective": "causal"}))


def test_seqio_export_of_any_source(hf_dirs):
    """register_sources: an hf: source becomes loam.<domain>.<objective> tasks whose documents,
    read back through seqio:, are the source's own, split as preparation splits them."""
    _need_tf()
    pytest.importorskip("seqio", reason=SEQIO_EXTRA)
    from loam.data import tasks
    root, docs, _ = hf_dirs
    hf_source = sources.parse("manual", f"hf:{root / 'plain'}")
    names = tasks.register_sources({"manual": hf_source}, mixture="manual_mix",
                                   objective_names=("causal", "prefix_lm"))
    assert names == ["loam.manual.causal", "loam.manual.prefix_lm"]
    for split in sources.SPLITS:
        back = _read({"source": "seqio:loam.manual.prefix_lm", "split": split,
                      "id_field": "doc_id"})
        assert back == [d for d in sources.read_documents(hf_source, split) if d[1].strip()]
    batch = next(tasks.get_dataset("loam.manual_mix.causal", 64, batch_size=2,
                                   split="validation").as_numpy_iterator())
    assert set(batch["domain_ids"][batch["segment_ids"] > 0].tolist()) == {0}


def test_seqio_bad_inputs(scenes_task):
    spec = {"source": "seqio:loam_test.scenes", "modules": [scenes_task]}
    cases = [
        ({"source": "seqio:loam_test.nowhere", "modules": [scenes_task]},
         "no seqio task named 'loam_test.nowhere'.*option 'modules'"),
        ("seqio:loam_test.scenes_unregistered_here", "no seqio task named"),
        ({**spec, "modules": ["no_such_module_xyz"]}, "cannot import module 'no_such_module_xyz'"),
        ({**spec, "gin_bindings": ["no_such_fn.x = 1"]}, "do not parse.*option 'modules'"),
        ("seqio:loam.all.causal", "is a seqio Mixture, not a Task.*loam.code.causal"),
        ({**spec, "split": "validation"}, "has no split 'validation' \\(splits: train\\)"),
        ({**spec, "feature": "inputs"}, "no feature 'inputs' before tokenization.*targets"),
        ({**spec, "id_field": "doc"}, "no id feature 'doc'"),
    ]
    for s, message in cases:
        with pytest.raises(CorpusError, match=message):
            sources.units(sources.parse("s", s))
    with pytest.raises(CorpusError, match="option 'objective' must be 'config'"):
        sources.parse("s", {**spec, "objective": "t5"})
