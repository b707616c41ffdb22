"""``seqio:<task>``: a registered seqio Task, named as a T5X user names it, read as text.

Options, in the order a T5X launch applies them: ``modules`` (module names to import: where the
task is registered), ``gin_files`` and ``gin_bindings`` (parsed with gin-config after the
imports, like ``--gin_file`` and ``--gin.NAME=VALUE``, so they configure the task's gin-
configurable functions), then ``split`` (the task's split, default ``train``), ``feature`` (the
text feature, default ``targets``), ``id_field`` (default ``id`` when the task has that
feature), ``objective`` (see below). Gin bindings hold while the task's dataset is built and
are then restored, so sources with different bindings read as each would alone.

**What is read:** the task's text before tokenization: its data source, then the preprocessors
that come before ``seqio.preprocessors.tokenize`` (or ``tokenize_and_append_eos``). Loam
tokenizes with the run's tokenizer and applies an objective itself.

**The task's objective:** the preprocessors after tokenization say what the task trains.
Loam's own tasks (``loam.<domain>.<objective>``) and the steps it recognises by function name
(``span_corruption``, ``prefix_lm``, ``ul2_objective`` ...) give the objective the run must use
(`required_objective`; the trainer refuses a different ``config.data.objective``). Steps that
only frame the token stream (EOS, concatenating, splitting into lengths) impose nothing: loam
chunks and packs documents itself, and the run's objective applies. Any other step after
tokenization is refused, because loam cannot apply it; option ``objective`` then says what to
train: ``"config"`` (the run's ``config.data.objective``) or an objective name (required).

Units: a task whose data source is a tfds dataset is read per file shard (prepared datasets
only: nothing is downloaded); a file data source (TFRecords, text lines ...) per file; any other
source (e.g. ``seqio.FunctionDataSource``) as one unit. Document ids: the id feature, else
``<unit key>:<n>``, n counting the unit's examples from 0.

seqio (and TensorFlow) are the ``[seqio]`` extra, imported only when a seqio source is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from loam.data import objectives
from loam.data import sources as sources_lib
from loam.data.corpora import CorpusError
from loam.data.sources import Source, Unit
from loam.data.sources import tfds as tfds_kind

try:  # gin-config comes with the [seqio] extra; only gin_files / gin_bindings need it
    import gin
except ImportError:
    gin = None

OPTIONS = frozenset({"modules", "gin_files", "gin_bindings", "split", "feature", "id_field",
                     "objective"})
TOKENIZE_STEPS = frozenset({"tokenize", "tokenize_and_append_eos"})
# After tokenization: steps that only frame the token stream (loam chunks and packs documents).
FRAMING_STEPS = frozenset({
    "append_eos", "append_eos_after_trim", "reduce_concat_tokens", "split_tokens",
    "split_tokens_to_inputs_length", "split_tokens_to_targets_length",
    "split_tokens_to_random_length", "select_random_chunk", "chunk_documents",
})
# After tokenization: steps that are an objective loam has, by function name.
OBJECTIVE_STEPS = {
    "span_corruption": "span_corruption",
    "prefix_lm": "prefix_lm",
    "ul2_objective": "ul2",
}
CONFIG_OBJECTIVE = "config"
_EXTRA = "seqio sources need the [seqio] extra: pip install 'loam[seqio]'"
_LOCK = threading.RLock()


@dataclasses.dataclass(frozen=True)
class SeqioUnit(Unit):
    """Shard `shard` of `num_shards` of the task's split; for a tfds data source, examples
    [start, stop) of tfds split `tfds_split`."""

    shard: int = 0
    num_shards: int = 1
    tfds_split: str = ""
    start: int = 0
    stop: int = 0


def _seqio():
    try:
        import seqio
    except ImportError:
        raise CorpusError(_EXTRA) from None
    return seqio


def _where(source: Source) -> str:
    return f"source {source.describe()} of domain {source.domain!r}"


def _strings(source: Source, key: str) -> list[str]:
    value = source.option(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CorpusError(f"{_where(source)}: option {key!r} must be a list of strings, got "
                          f"{value!r}")
    return value


def validate(source: Source) -> None:
    where = _where(source)
    if not source.target or any(c.isspace() for c in source.target):
        raise CorpusError(f"{where}: {source.target!r} is not a seqio task name")
    for key in ("modules", "gin_files", "gin_bindings"):
        _strings(source, key)
    for key in ("split", "feature", "id_field"):
        value = source.option(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise CorpusError(f"{where}: option {key!r} must be a non-empty string, got {value!r}")
    objective = source.option("objective")
    if objective is not None and objective not in (CONFIG_OBJECTIVE, *objectives.OBJECTIVES):
        raise CorpusError(f"{where}: option 'objective' must be {CONFIG_OBJECTIVE!r} (the run's "
                          "config.data.objective) or one of "
                          f"{', '.join(objectives.OBJECTIVES)}, got {objective!r}")


# ---------------------------------------------------------------------------------------------
# The task, as a T5X launch would see it: modules imported, gin files and bindings parsed.

@contextlib.contextmanager
def _configured(source: Source):
    """Within: the source's modules imported and its gin files and bindings in effect (the
    previous bindings come back on exit)."""
    with _LOCK:
        for name in _strings(source, "modules"):
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise CorpusError(f"{_where(source)}: cannot import module {name!r} named in "
                                  f"option 'modules' ({e}); make it importable (install its "
                                  "package or add its directory to PYTHONPATH)") from None
        files, bindings = _strings(source, "gin_files"), _strings(source, "gin_bindings")
        if not files and not bindings:
            yield
            return
        if gin is None:
            raise CorpusError(f"{_where(source)}: gin_files and gin_bindings need gin-config: "
                              "pip install 'loam[seqio]'")
        # gin keeps one global configuration; it is saved and restored around this source.
        saved = {key: dict(args) for key, args in gin.config._CONFIG.items()}
        try:
            try:
                with gin.unlock_config():
                    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
            except (ValueError, SyntaxError, OSError, ImportError) as e:
                why = " ".join(str(e).split())
                raise CorpusError(
                    f"{_where(source)}: gin files {files} / bindings {bindings} do not parse: "
                    f"{why}. A binding names a configurable of an imported module: list that "
                    "module in option 'modules'") from None
            yield
        finally:
            gin.config._CONFIG.clear()
            gin.config._CONFIG.update(saved)


def _lookup(source: Source):
    seqio = _seqio()
    name = source.target
    registered = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    if name not in registered and name.startswith("loam."):
        from loam.data import tasks  # noqa: F401 -- registers loam's own tasks
        registered = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    if name not in registered:
        close = difflib.get_close_matches(name, sorted(registered), n=5, cutoff=0.6)
        raise CorpusError(
            f"{_where(source)}: no seqio task named {name!r}"
            + (f" (close: {', '.join(close)})" if close else "")
            + "; list the module that registers it in option 'modules' (as T5X imports it), "
            "or register it with loam.data.tasks.register_sources")
    provider = seqio.get_mixture_or_task(name)
    if not isinstance(provider, seqio.Task):
        members = ", ".join(t.name for t in provider.tasks)
        raise CorpusError(f"{_where(source)}: {name!r} is a seqio Mixture, not a Task; make one "
                          f"domain per task ({members}) and set the mixture with the run's "
                          "weights")
    return provider


def _name(step: Any) -> str:
    return _seqio().utils.function_name(step)


def _split_at_tokenize(source: Source, task) -> tuple[list, list]:
    """(the steps before tokenization, the steps after it), placeholders dropped."""
    seqio = _seqio()
    steps = [p for p in task.preprocessors if not isinstance(p, seqio.CacheDatasetPlaceholder)]
    names = [_name(p) for p in steps]
    cut = next((i for i, n in enumerate(names) if n in TOKENIZE_STEPS), None)
    if cut is None:
        raise CorpusError(f"{_where(source)}: seqio task {task.name!r} has no tokenize step "
                          f"(preprocessors: {', '.join(names) or 'none'}); loam reads a task's "
                          "text before seqio.preprocessors.tokenize, so the task must have one")
    return steps[:cut], steps[cut + 1:]


def _step_objective(step) -> str | None:
    """The loam objective a post-tokenization step applies, '' for a framing step, None if
    unknown."""
    name = _name(step)
    if name == "apply_objective":  # loam.data.tasks
        objective = getattr(step, "keywords", {}).get("objective")
        return getattr(objective, "name", None)
    if name in FRAMING_STEPS:
        return ""
    for prefix, objective in OBJECTIVE_STEPS.items():
        if name == prefix or name.startswith(prefix + "_"):
            return objective
    return None


def _objective(source: Source, task) -> str | None:
    _, after = _split_at_tokenize(source, task)
    found = {_name(s): _step_objective(s) for s in after}
    unknown = [n for n, o in found.items() if o is None]
    known = sorted({o for o in found.values() if o})
    option = source.option("objective")
    if len(known) > 1:
        raise CorpusError(f"{_where(source)}: seqio task {task.name!r} applies several "
                          f"objectives after tokenization ({', '.join(known)}); loam trains one "
                          "per domain")
    if known:
        if option is not None and option != known[0]:
            raise CorpusError(
                f"{_where(source)}: seqio task {task.name!r} trains {known[0]}, but option "
                f"'objective' says {option!r}; remove the option (or read a task with that "
                "objective)")
        if unknown:
            raise CorpusError(
                f"{_where(source)}: seqio task {task.name!r} also applies {', '.join(unknown)} "
                f"after tokenization, which loam cannot apply with {known[0]}; register a task "
                "without them")
        return known[0]
    if unknown and option is None:
        raise CorpusError(
            f"{_where(source)}: seqio task {task.name!r} applies {', '.join(unknown)} after "
            "tokenization, which loam cannot apply: loam reads the task's text before "
            "tokenization and trains it with the run's config.data.objective. To do that, set "
            f"option objective: {CONFIG_OBJECTIVE!r} on this source (or an objective name, "
            f"{', '.join(objectives.OBJECTIVES)}, to require it); or read a task without them")
    return None if option in (None, CONFIG_OBJECTIVE) else option


def required_objective(source: Source) -> str | None:
    """The objective a run must train `source` with (a key of ``objectives.OBJECTIVES``), or
    None when the run's ``config.data.objective`` applies. None for every kind but seqio.
    CorpusError for a task whose post-tokenization steps loam cannot honour (the message names
    them and the fix)."""
    if source.kind != "seqio":
        return None
    with _configured(source):
        return _objective(source, _lookup(source))


# ---------------------------------------------------------------------------------------------
# Reading

def _split(source: Source, task) -> str:
    split = source.option("split", "train")
    splits = list(task.source.splits)
    if split not in splits:
        raise CorpusError(f"{_where(source)}: seqio task {task.name!r} has no split {split!r} "
                          f"(splits: {', '.join(map(str, splits)) or 'none'}); set option "
                          "'split'")
    return split


def _tfds_builder(source: Source, data_source, split: str):
    """The prepared builder behind a TfdsDataSource's split, opened without seqio's loader
    (which would download and prepare a missing dataset)."""
    name, data_dir = data_source.tfds_dataset.get_split_params(split)
    try:
        if name:
            return tfds_kind._builder(name, None, data_dir)
        b = tfds_kind._tfds().builder_from_directory(data_dir)
    except CorpusError as e:
        raise CorpusError(f"{_where(source)}: the data of seqio task {source.target!r}: {e}"
                          ) from None
    except Exception as e:  # noqa: BLE001 -- tfds raises many kinds; one message
        raise CorpusError(f"{_where(source)}: cannot open the tfds dataset of seqio task "
                          f"{source.target!r} in {data_dir} ({e})") from None
    if not b.is_prepared():
        raise CorpusError(f"{_where(source)}: the tfds dataset in {data_dir} is not prepared")
    return b


def _tfds_split(data_source, split: str) -> str:
    """The tfds split (or slice) a TfdsDataSource reads for the task's `split`."""
    map_split = getattr(data_source.tfds_dataset, "_map_split", None)
    return str(map_split(split)) if map_split is not None else split


def units(source: Source) -> list[Unit]:
    seqio = _seqio()
    with _configured(source):
        task = _lookup(source)
        _objective(source, task)  # refuse a task loam cannot honour before any work
        split = _split(source, task)
        data = task.source
        out: list[SeqioUnit]
        if isinstance(data, seqio.TfdsDataSource):
            b = _tfds_builder(source, data, split)
            tfds = tfds_kind._tfds()
            spec = tfds.core.ReadInstruction.from_spec(_tfds_split(data, split))
            out = [SeqioUnit(source, i, f"{split}:{s}[{lo}:{hi}]", None, 0, 1, s, lo, hi)
                   for i, (s, lo, hi) in enumerate(
                       tfds_kind.shard_ranges(b, spec.to_absolute(b.info.splits)))]
        elif isinstance(data, seqio.FileDataSource):
            files = list(data.list_shards(split))
            out = [SeqioUnit(source, i, f"{split}:{os.path.basename(str(f))}", None, i,
                             len(files)) for i, f in enumerate(files)]
        else:
            out = [SeqioUnit(source, 0, split, None)]
        if out:  # a missing or non-text feature fails here, before any work
            _features(source, task, _text_dataset(source, task, out[0]).element_spec)
    return list(out)


def _features(source: Source, task, element_spec) -> tuple[str, str | None]:
    tf = _tf()
    feature = source.option("feature", "targets")
    names = ", ".join(sorted(element_spec))
    if feature not in element_spec:
        raise CorpusError(f"{_where(source)}: seqio task {task.name!r} has no feature {feature!r} "
                          f"before tokenization (features: {names}); set option 'feature'")
    spec = element_spec[feature]
    if getattr(spec, "dtype", None) != tf.string or spec.shape.rank != 0:
        raise CorpusError(f"{_where(source)}: feature {feature!r} of seqio task {task.name!r} is "
                          f"not text before tokenization ({spec}); set option 'feature'")
    id_field = source.option("id_field")
    if id_field is not None and id_field not in element_spec:
        raise CorpusError(f"{_where(source)}: seqio task {task.name!r} has no id feature "
                          f"{id_field!r} (features: {names}); set option 'id_field' or remove it")
    if id_field is None and "id" in element_spec:
        id_field = "id"
    return feature, id_field


def _tf():
    try:
        import tensorflow as tf
    except ImportError:
        raise CorpusError(_EXTRA) from None
    return tf


def _text_dataset(source: Source, task, unit: SeqioUnit):
    """The unit's examples through the task's steps before tokenization (a tf.data.Dataset);
    call with the source configured."""
    seqio = _seqio()
    before, _ = _split_at_tokenize(source, task)
    split = _split(source, task)
    data = task.source
    if unit.tfds_split:
        b = _tfds_builder(source, data, split)
        tfds = tfds_kind._tfds()
        ds = b.as_dataset(
            split=tfds.core.ReadInstruction(unit.tfds_split, from_=unit.start, to=unit.stop,
                                            unit="abs"),
            shuffle_files=False,
            read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False))
    else:
        shard = (seqio.ShardInfo(index=unit.shard, num_shards=unit.num_shards)
                 if unit.num_shards > 1 else None)
        ds = data.get_dataset(split=split, shuffle=False, seed=None, shard_info=shard)
    # Random steps (rare before tokenization) get fixed seeds: the same text every time.
    with seqio.utils.map_seed_manager(0):
        for step in before:
            step = seqio.utils.add_kwargs_to_transform(
                step, sequence_length=None, output_features=task.output_features)
            ds = step(ds)
    return ds


def read_unit(unit: Unit) -> Iterator[tuple[str, str]]:
    assert isinstance(unit, SeqioUnit), unit
    source = unit.source
    with _configured(source):
        task = _lookup(source)
        ds = _text_dataset(source, task, unit)
        feature, id_field = _features(source, task, ds.element_spec)
        ds = ds.map(lambda ex: {k: ex[k] for k in {feature, id_field} - {None}})
    for n, ex in enumerate(ds.as_numpy_iterator()):
        what = f"{_where(source)}: {unit.key} example {n}"
        doc_id = tfds_kind.as_id(ex[id_field], what) if id_field else f"{unit.key}:{n}"
        yield doc_id, tfds_kind.as_text(ex[feature], what)


def fingerprint(source: Source) -> str:
    """The task's data (a tfds dataset's files, a file source's files, a loam source's own
    fingerprint; else the data source's description), its steps before tokenization and the
    gin files' contents."""
    seqio = _seqio()
    h = hashlib.sha256()
    for path in _strings(source, "gin_files"):
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                h.update(f.read())
    with _configured(source):
        task = _lookup(source)
        before, _ = _split_at_tokenize(source, task)
        h.update(("\n".join(_name(s) for s in before) + "\n").encode())
        data = task.source
        split = _split(source, task)
        loam_source = _loam_source(data)
        if loam_source is not None:
            h.update(sources_lib.fingerprint(loam_source).encode())
        elif isinstance(data, seqio.TfdsDataSource):
            b = _tfds_builder(source, data, split)
            for path in sorted(b.data_path.iterdir(), key=lambda p: p.name):
                h.update(f"{path.name}\t{path.stat().length}\n".encode())
        elif isinstance(data, seqio.FileDataSource):
            tf = _tf()
            for f in data.list_shards(split):
                h.update(f"{f}\t{tf.io.gfile.stat(f).length}\n".encode())
        else:
            h.update(repr(data).encode())
    return h.hexdigest()


def _loam_source(data_source) -> Source | None:
    """The loam Source behind a task registered by loam.data.tasks.register_sources."""
    return getattr(data_source, "loam_source", None)
