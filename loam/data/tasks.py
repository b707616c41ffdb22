"""seqio Tasks and Mixtures: an export of loam's sources. Importing this module registers the
default ones.

``register_sources(sources)`` registers, for every source (``loam.data.sources``; e.g.
``sources.from_config(config)``), ``loam.<domain>.<objective>`` for each objective in
``OBJECTIVE_NAMES``, and the mixtures ``loam.all.<objective>`` (rates proportional to each
domain's training text size). A task's data source reads the source's documents with the very
reader, document ids and train/validation split (``sources.doc_split``) that preparation for
the trainer uses (``SourceDataSource``). Import registers the five bundled corpora
(``register_domain_tasks``); ``register_tfds_source`` registers a ``tfds:`` source. The trainer
does not read these tasks: it reads prepared token shards of the same sources. Naming such a
task as a source (``seqio:loam.code.span_corruption``) reads its documents back and requires its
objective (``loam.data.sources.seqio.required_objective``).

Pipeline of every task: the source's documents -> rekey (text -> targets; domain_id, doc_index,
doc_id kept) -> ``seqio.preprocessors.tokenize`` -> append EOS at the document's end and split the
document into chunks of ``objective.max_input_len(L)`` tokens (never truncated) -> the numpy
objective of ``loam.data.objectives`` (through ``tf.numpy_function``) with a seed derived from
(task seed, domain id, document, chunk index), so an example's corruption does not depend on the
order it is read in -> ``targets`` (causal) or ``inputs``/``targets`` (prefix objectives: the
bidirectional prefix and the predicted part).

One length per row: pass ``task_feature_lengths={"targets": L}`` for every objective; L is the
packed row length (inputs ++ targets of a prefix example fit in it). ``LoamFeatureConverter``
packs such examples into the house batch features (inputs, targets, loss_weights, segment_ids,
positions, prefix, domain_ids, doc_ids); ``get_dataset`` does it all in one call.

This module imports seqio and TensorFlow at module level; the rest of loam's data path imports
them only where a ``tfds:`` or ``seqio:`` source is read.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf

from loam.data import corpora, objectives, sources
from loam.data import vocab as vocab_lib
from loam.data.sources import tfds as tfds_kind

OBJECTIVE_NAMES: tuple[str, ...] = ("causal", "prefix_lm", "span_corruption", "ul2")
PREFIX_OBJECTIVES = frozenset({"prefix_lm", "span_corruption", "ul2"})
# Domain ids of sources registered with register_tfds_source (after the bundled domains').
EXTRA_DOMAINS: dict[str, int] = {}


def task_name(domain: str, objective: str) -> str:
    return f"loam.{domain}.{objective}"


def mixture_name(objective: str) -> str:
    return f"loam.all.{objective}"


# ----------------------------------------------------------------------------- output features


class ExactSentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """seqio's vocabulary whose TF encoder runs the Python sentencepiece library, like
    ``loam.data.vocab.Vocabulary`` and the mixture stream.

    TF's sentencepiece op (tensorflow-text) breaks ties between equal-score segmentations
    differently: runs of whitespace in code come out as e.g. [268, 283, 372] instead of
    [268, 372, 283]. Same text, different ids would make seqio tasks and the stream disagree.
    """

    def _encode_tf(self, s):
        s = tf.convert_to_tensor(s, tf.string)
        if s.shape.rank not in (0, 1):
            return super()._encode_tf(s)

        def encode(texts):
            texts = np.asarray(texts, dtype=object).reshape(-1)
            ids = self.tokenizer.EncodeAsIds([t.decode("utf-8") for t in texts])
            return (np.asarray([i for row in ids for i in row], np.int32),
                    np.asarray([len(row) for row in ids], np.int64))
        flat, lengths = tf.numpy_function(encode, [s], [tf.int32, tf.int64], stateful=False)
        flat = tf.ensure_shape(flat, [None])
        if s.shape.rank == 0:
            return flat
        return tf.RaggedTensor.from_row_lengths(flat, tf.ensure_shape(lengths, [None]))


@functools.cache
def vocabulary() -> ExactSentencePieceVocabulary:
    return ExactSentencePieceVocabulary(str(vocab_lib.MODEL_PATH),
                                        extra_ids=vocab_lib.NUM_SENTINELS)


@functools.cache
def output_features(objective: str) -> dict[str, seqio.Feature]:
    """targets (and inputs for prefix objectives) with the loam vocabulary; domain_id and
    doc_index ride along as integer features so that they survive seqio's Mixture filtering.
    EOS is placed by the chunking preprocessor at each document's end, not per feature."""
    vocab = vocabulary()
    tag = seqio.PassThroughVocabulary(size=0)
    feats = {"targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)}
    if objective in PREFIX_OBJECTIVES:
        feats = {"inputs": seqio.Feature(vocab, add_eos=False, dtype=tf.int32), **feats}
    feats["domain_id"] = seqio.Feature(tag, add_eos=False, dtype=tf.int32, rank=0)
    feats["doc_index"] = seqio.Feature(tag, add_eos=False, dtype=tf.int32, rank=0)
    return feats


# ----------------------------------------------------------------------------- preprocessors


def rekey_document(ds: tf.data.Dataset, text_key: str = "text", domain_id: int | None = None
                   ) -> tf.data.Dataset:
    """text -> targets; keeps domain_id, doc_index and doc_id (filled in for foreign sources:
    the given domain id, doc_index -1, doc_id ""). Drops whitespace-only documents."""
    def fn(ex):
        if text_key not in ex:
            raise ValueError(f"source examples have no text feature {text_key!r} (features: "
                             f"{sorted(ex)}); pass the right text_key")
        out = {"targets": ex[text_key]}
        out["domain_id"] = (tf.cast(ex["domain_id"], tf.int32) if "domain_id" in ex
                            else tf.constant(domain_id, tf.int32))
        out["doc_index"] = (tf.cast(ex["doc_index"], tf.int32) if "doc_index" in ex
                            else tf.constant(-1, tf.int32))
        out["doc_id"] = ex["doc_id"] if "doc_id" in ex else tf.constant("")
        return out
    # Whitespace-only documents carry nothing to learn; the mixture stream skips them too.
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).filter(
        lambda ex: tf.strings.length(tf.strings.strip(ex["targets"])) > 0)


def _row_length(sequence_length: Mapping[str, int] | None) -> int:
    if not sequence_length or not sequence_length.get("targets"):
        raise ValueError(
            "loam tasks need the row length to split documents into chunks: pass "
            "task_feature_lengths={'targets': L} (sequence_length for Task.get_dataset)")
    return int(sequence_length["targets"]) + int(sequence_length.get("inputs") or 0)


def chunk_documents(ds: tf.data.Dataset, sequence_length, objective: objectives.Objective
                    ) -> tf.data.Dataset:
    """Appends EOS to each tokenized document and splits it into consecutive chunks of at most
    ``objective.max_input_len(L)`` tokens, each tagged with its chunk_index."""
    chunk = objective.max_input_len(_row_length(sequence_length))

    def split(ex):
        tokens = tf.concat([ex["targets"], [vocab_lib.EOS_ID]], axis=0)
        starts = tf.range(0, tf.size(tokens), chunk)
        num = tf.size(starts)
        out = {k: tf.repeat(tf.expand_dims(v, 0), num, axis=0)
               for k, v in ex.items() if k != "targets"}
        out["targets"] = tf.RaggedTensor.from_row_starts(tokens, starts)
        out["chunk_index"] = tf.range(num, dtype=tf.int32)
        return out
    return ds.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _example_seed(task_seed: int, domain_id: int, doc_index: int, chunk_index: int,
                  tokens: np.ndarray) -> int:
    # Foreign sources have no document index (-1): the chunk's content stands in for it.
    doc_key = doc_index if doc_index >= 0 else (1 << 32) + zlib.crc32(tokens.tobytes())
    return int(objectives.derive_seeds(task_seed, max(domain_id, 0), doc_key, chunk_index))


def apply_objective(ds: tf.data.Dataset, objective: objectives.Objective, task_seed: int
                    ) -> tf.data.Dataset:
    """Runs the numpy objective on every chunk. Causal examples become ``targets``; prefix
    examples become ``inputs`` (the bidirectional prefix) and ``targets`` (the predicted part)."""
    prefix_objective = objective.name in PREFIX_OBJECTIVES

    def run(tokens, domain_id, doc_index, chunk_index):
        ex = objective.apply(tokens, _example_seed(task_seed, int(domain_id), int(doc_index),
                                                   int(chunk_index), tokens))
        p = ex["prefix_len"]
        # Tasks express the loss by the inputs/targets split, so it must be exactly that.
        if not np.array_equal(ex["loss_mask"], np.arange(ex["tokens"].shape[0]) >= p):
            raise ValueError(f"objective {objective.name}: loss_mask is not 'every position "
                             "after the prefix'; it cannot be expressed as inputs/targets")
        return ex["tokens"][:p], ex["tokens"][p:]

    def fn(ex):
        inputs, targets = tf.numpy_function(
            run, [ex["targets"], ex["domain_id"], ex["doc_index"], ex["chunk_index"]],
            [tf.int32, tf.int32], stateful=False)
        out = dict(ex)
        out["targets"] = tf.ensure_shape(targets, [None])
        if prefix_objective:
            out["inputs"] = tf.ensure_shape(inputs, [None])
        return out
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _preprocessors(objective_name: str, text_key: str = "text", domain_id: int | None = None,
                   seed: int = 0, **objective_kwargs):
    objective = objectives.get_objective(objective_name, **objective_kwargs)
    # The objective's own seed stream differs per objective and per task seed.
    task_seed = int(objectives.derive_seeds(seed, zlib.crc32(objective_name.encode())))

    return [
        functools.partial(rekey_document, text_key=text_key, domain_id=domain_id),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False, with_eos=False),
        functools.partial(chunk_documents, objective=objective),
        functools.partial(apply_objective, objective=objective, task_seed=task_seed),
    ]


# ----------------------------------------------------------------------------- sources


class SourceDataSource(seqio.FunctionDataSource):
    """The documents of a loam source (`loam.data.sources`) as a seqio data source: the reader,
    document ids and train/validation split that preparation for the trainer uses.

    Examples: ``text``, ``doc_id``, ``doc_index`` (the record's position in the source, every
    record counted, as in prepared shards) and ``domain_id``. Documents come in the source's
    order; seqio shuffles examples."""

    def __init__(self, source: sources.Source, domain_id: int):
        self.loam_source = source
        self.domain_id = domain_id
        super().__init__(dataset_fn=functools.partial(_documents, source, domain_id),
                         splits=sources.SPLITS)

    def __repr__(self):
        return f"SourceDataSource({self.loam_source}, domain_id={self.domain_id})"


_DOCUMENT_SIGNATURE = {
    "text": tf.TensorSpec([], tf.string), "doc_id": tf.TensorSpec([], tf.string),
    "doc_index": tf.TensorSpec([], tf.int64), "domain_id": tf.TensorSpec([], tf.int32)}


def _documents(source: sources.Source, domain_id: int, split: str, shuffle_files: bool,
               seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one order: the source's
    if split not in sources.SPLITS:
        raise ValueError(f"loam tasks have splits {sources.SPLITS}, not {split!r}")
    units = sources.units(source)  # a missing or malformed source fails here, not mid-stream

    def generate():
        index = 0
        for unit in units:
            for doc_id, text in sources.read_unit(unit):
                if sources.doc_split(unit, doc_id) == split:
                    yield {"text": text, "doc_id": doc_id, "doc_index": index,
                           "domain_id": domain_id}
                index += 1
    return tf.data.Dataset.from_generator(generate, output_signature=_DOCUMENT_SIGNATURE)


# ----------------------------------------------------------------------------- registration


def _add_task(name, source, objective, **kwargs) -> seqio.Task:
    seqio.TaskRegistry.remove(name)  # re-registering (a notebook, a new data dir) replaces
    return seqio.TaskRegistry.add(name, source=source, output_features=output_features(objective),
                                  preprocessors=_preprocessors(objective, **kwargs),
                                  metric_fns=[])


@functools.cache
def source_text_bytes(source: sources.Source, split: str = "train") -> int:
    """UTF-8 bytes of a source's documents in `split`: the mixture rate (≈ tokens, not
    documents, so a domain of many tiny entries is not over-weighted). Reads the source once."""
    return sum(len(t.encode()) for _, t in sources.read_documents(source, split))


def _bundled(domain: str, corpus_dir=None) -> sources.Source:
    spec = {"source": f"bundled:{domain}"}
    if corpus_dir:
        spec["data_dir"] = str(corpus_dir)
    return sources.parse(domain, spec)


def train_text_bytes(domain: str, corpus_dir=None) -> int:
    """`source_text_bytes` of a bundled domain's training split."""
    return source_text_bytes(_bundled(domain, corpus_dir))


def _text_rate(source: sources.Source, task) -> float:
    del task  # seqio passes it; the rate is computed (once) when a mixture is first read
    return float(source_text_bytes(source))


def register_sources(srcs: Mapping[str, sources.Source], *, seed: int = 0,
                     objective_names: tuple[str, ...] = OBJECTIVE_NAMES,
                     domain_ids: Mapping[str, int] | None = None,
                     mixture: str | None = "all") -> list[str]:
    """Registers (or replaces) ``loam.<domain>.<objective>`` for every source and objective,
    and the mixtures ``loam.<mixture>.<objective>`` over them, rates proportional to each
    domain's training text (`source_text_bytes`); ``mixture=None`` registers no mixture.

    Args:
      srcs: domain name -> Source, e.g. ``loam.data.sources.from_config(config)``.
      domain_ids: the id in ``domain_ids`` per domain; default the position in `srcs` (the ids
        a run with these sources gives its domains).
    Returns the task names.
    """
    ids = dict(domain_ids or {})
    parsed = {domain: sources.parse(domain, source) for domain, source in srcs.items()}
    names = []
    for position, (domain, source) in enumerate(parsed.items()):
        if "." in domain or domain == mixture:
            raise ValueError(f"domain {domain!r}: task names are 'loam.<domain>.<objective>', so "
                             f"a domain name has no '.' and is not {mixture!r}")
        data = SourceDataSource(source, ids.get(domain, position))
        for objective in objective_names:
            names.append(_add_task(task_name(domain, objective), data, objective,
                                   domain_id=data.domain_id, seed=seed).name)
    if mixture is not None:
        for objective in objective_names:
            name = f"loam.{mixture}.{objective}"
            seqio.MixtureRegistry.remove(name)
            seqio.MixtureRegistry.add(
                name, [(task_name(d, objective), functools.partial(_text_rate, s))
                       for d, s in parsed.items()])
    return names


def register_domain_tasks(corpus_dir=None, seed: int = 0) -> list[str]:
    """(Re-)registers the default export: ``loam.<domain>.<objective>`` over the five bundled
    corpora (read from `corpus_dir` if given, else as ``bundled:`` sources read) and the
    mixtures ``loam.all.<objective>``; import does this with the defaults."""
    return register_sources({d: _bundled(d, corpus_dir) for d in corpora.DOMAIN_NAMES},
                            seed=seed)


def register_tfds_source(name: str, tfds_name: str, data_dir=None, text_key: str = "text",
                         splits=None, domain_id: int | None = None, seed: int = 0,
                         objective_names=OBJECTIVE_NAMES) -> list[str]:
    """Registers ``loam.<name>.<objective>`` for every objective over the source
    ``tfds:<tfds_name>`` (see ``loam.data.sources.tfds``); the dataset must be prepared already
    (``tfds build``, or a bucket such as gs://.../c4 via ``data_dir``); nothing is downloaded.
    The same source in a run config: ``{"source": "tfds:<tfds_name>", "split": ..., "data_dir":
    ..., "feature": ...}``.

    Args:
      name: the domain name in task names (no dots).
      tfds_name: "dataset[/config][:version]", e.g. "c4/en:3.1.0".
      data_dir: the tfds data dir holding it (default: tfds' own).
      text_key: the text feature.
      splits: {"train": tfds split or slice, "validation": tfds split or slice}, e.g.
        {"train": "train", "validation": "validation[:1000]"} (an iterable of names maps each to
        itself). Default: "train", and "validation" if the dataset has that split; without a
        validation split, validation documents are chosen by a hash of the document id.
      domain_id: the id in ``domain_ids``; default the next id after the bundled domains and the
        sources already registered this way.
    Returns the task names.
    """
    if not name or "." in name:
        raise ValueError(f"source name {name!r} must be non-empty and have no '.'")
    if name in corpora.DOMAIN_NAMES:
        raise ValueError(f"{name!r} is a bundled domain; choose another name for the source")
    options = {"feature": text_key, **({"data_dir": str(data_dir)} if data_dir else {})}
    train = sources.parse(name, {"source": f"tfds:{tfds_name}", **options})
    if splits is None:
        available = tfds_kind.builder(train).info.splits
        splits = {"train": "train", **({"validation": "validation"}
                                       if "validation" in available else {})}
    elif not isinstance(splits, Mapping):
        splits = {k: k for k in splits}
    if set(splits) - {"train", "validation"} or "train" not in splits:
        raise ValueError(f"splits {dict(splits)}: give a 'train' and optionally a 'validation' "
                         "tfds split (or slice)")
    spec: dict = {"source": f"tfds:{tfds_name}", **options, "split": splits["train"]}
    if "validation" in splits:
        spec["validation"] = {"source": f"tfds:{tfds_name}", **options,
                              "split": splits["validation"]}
    if domain_id is None:
        domain_id = EXTRA_DOMAINS.get(name, len(corpora.DOMAIN_NAMES) + len(EXTRA_DOMAINS))
    EXTRA_DOMAINS[name] = domain_id
    return register_sources({name: sources.parse(name, spec)}, seed=seed,
                            objective_names=tuple(objective_names),
                            domain_ids={name: domain_id}, mixture=None)


def get_task_or_mixture(name: str):
    """seqio's provider, with an error that lists loam's names when the name is unknown."""
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        known = sorted(n for n in list(seqio.TaskRegistry.names()) + list(
            seqio.MixtureRegistry.names()) if n.startswith("loam."))
        raise ValueError(
            f"no seqio task or mixture named {name!r}; loam registers 'loam.<domain>.<objective>' "
            f"for the registered domains and objectives {list(OBJECTIVE_NAMES)}, and "
            f"'loam.all.<objective>' (known: {', '.join(known)}). Other data: "
            "loam.data.tasks.register_sources(loam.data.sources.from_config(config)), or "
            "register_tfds_source(name, tfds_name) for a tfds dataset"
        ) from None


# ----------------------------------------------------------------------------- feature converter


BATCH_FEATURES = ("inputs", "targets", "loss_weights", "segment_ids", "positions", "prefix",
                  "domain_ids", "doc_ids")


def _spec(dtype):
    return seqio.FeatureConverter.FeatureSpec(dtype=dtype)


class LoamFeatureConverter(seqio.FeatureConverter):
    """Packs loam task examples into the house batch features, domain and document per token.

    Task features: ``targets`` (and ``inputs`` for prefix objectives, concatenated in front and
    made the bidirectional prefix), scalar ``domain_id`` and ``doc_index``. Its one length,
    ``task_feature_lengths={"targets": L}``, is the row length. Outputs (all [L]): inputs
    (targets shifted right per segment, 0 as BOS), targets, loss_weights (float32, 0 on the prefix
    and padding), segment_ids, positions, prefix (positions 0..len(inputs) when there are inputs,
    as seqio's decoder_causal_attention), domain_ids, doc_ids (-1 on padding).

    seqio's own packing keeps only per-token features, so domain and document are broadcast to
    every token before packing.
    """

    TASK_FEATURES = {"targets": _spec(tf.int32)}
    MODEL_FEATURES = {k: _spec(tf.float32 if k == "loss_weights" else tf.int32)
                      for k in BATCH_FEATURES}
    PACKING_FEATURE_DTYPES: dict = {}

    def _convert_features(self, ds, task_feature_lengths):
        spec = ds.element_spec
        missing = {"domain_id", "doc_index"} - set(spec)
        if missing:
            raise ValueError(f"LoamFeatureConverter needs per-example {sorted(missing)}; use a "
                             "task registered by loam.data.tasks (or register_tfds_source)")
        length = task_feature_lengths["targets"]

        # seqio's packer takes a sequence's length to be its count of non-zero values, so every
        # per-token feature is shifted to be >= 1 on real tokens and shifted back after packing.
        def per_token(ex):
            tokens = ex["targets"]
            width = tf.size(ex["inputs"]) if "inputs" in ex else 0
            if "inputs" in ex:
                tokens = tf.concat([ex["inputs"], tokens], axis=0)
            pos = tf.range(tf.size(tokens))
            out = {
                "targets": tokens,  # never 0: id 0 is padding only
                "loss_weights": 1 + tf.cast(pos >= width, tf.int32),
                "prefix": 1 + tf.cast((pos <= width) & (width > 0), tf.int32),
                "domain_ids": tf.fill(tf.shape(tokens), 1 + ex["domain_id"]),
                "doc_ids": tf.fill(tf.shape(tokens), 2 + ex["doc_index"]),  # doc_index >= -1
            }
            if not self.pack:
                out["_positions"] = pos
            return out

        ds = ds.map(per_token, num_parallel_calls=tf.data.AUTOTUNE)
        lengths = {k: length for k in ds.element_spec}
        if self.pack:
            ds = seqio.utils.trim_and_pack_dataset(ds, lengths, self._use_custom_packing_ops)
        else:
            ds = seqio.utils.trim_and_pad_dataset(ds, lengths)

        def finish(ex):
            if self.pack:
                seg, pos = ex["targets_segment_ids"], ex["targets_positions"]
            else:
                seg, pos = tf.cast(ex["targets"] != 0, tf.int32), ex["_positions"]
            real = seg > 0
            inputs = seqio.utils.make_autoregressive_inputs(
                ex["targets"], sequence_id=seg if self.pack else None, bos_id=self.bos_id)

            def unshift(v, by, pad):
                return tf.where(real, v - by, tf.fill(tf.shape(v), pad))
            return {
                "inputs": unshift(inputs, 0, 0),  # no token leaks into padding
                "targets": ex["targets"],
                "loss_weights": tf.cast(unshift(ex["loss_weights"], 1, 0), tf.float32),
                "segment_ids": seg, "positions": pos,
                "prefix": unshift(ex["prefix"], 1, 0),
                "domain_ids": unshift(ex["domain_ids"], 1, 0),
                "doc_ids": unshift(ex["doc_ids"], 2, -1),
            }
        return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths):
        return {k: task_feature_lengths["targets"] for k in self.MODEL_FEATURES}


def get_dataset(name: str, seq_len: int, batch_size: int | None = None, split: str = "train",
                shuffle: bool = False, seed: int | None = None, num_epochs: int | None = 1,
                pack: bool = True) -> tf.data.Dataset:
    """Packed rows of a loam task or mixture in the house batch features (see
    LoamFeatureConverter); batched when batch_size is given."""
    provider = get_task_or_mixture(name)
    return seqio.get_dataset(provider, task_feature_lengths={"targets": seq_len},
                             feature_converter=LoamFeatureConverter(pack=pack),
                             dataset_split=split, shuffle=shuffle, seed=seed,
                             num_epochs=num_epochs, batch_size=batch_size)


register_domain_tasks()
