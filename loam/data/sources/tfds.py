"""``tfds:<name>[:<version>]``: a tensorflow-datasets dataset the user has prepared, locally or in
a bucket (``gs://...``). Nothing is downloaded or generated: a dataset that is not prepared in
its data dir is an error that says how to prepare it.

Options: ``split`` (default ``train``; tfds split syntax, e.g. ``train[:10%]`` or
``train+validation``), ``data_dir`` (the tfds data dir; default tfds' own, ``$TFDS_DATA_DIR``
or ``~/tensorflow_datasets``), ``feature`` (the text feature, default ``text``), ``id_field``
(the id feature), ``version`` (instead of ``:<version>`` in the target). ``<name>`` may carry a
config, ``c4/en:3.0.1``.

Units: one per file shard of the split, read alone as the absolute example range the shard
holds (``tfds.core.ReadInstruction``), so units are independent and their order is the split's
file order (``shuffle_files=False``); a sliced split gives the parts of the shards it covers.
Texts are the feature's bytes decoded as UTF-8. Document ids: the ``id_field`` feature if set;
else the dataset's ``id`` or ``doc_id`` feature if it has one (loam's own tfds datasets carry
``doc_id``, so reading one back gives the corpus' ids); else ``<split>:<index>``, the example's
position in its tfds split.

tensorflow-datasets is the ``[seqio]`` extra; it is imported only when a tfds source is read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator
from typing import Any

from loam.data import corpora
from loam.data.corpora import CorpusError
from loam.data.sources import Source, Unit

OPTIONS = frozenset({"split", "data_dir", "feature", "id_field", "version"})
DEFAULT_ID_FEATURES = ("id", "doc_id")
_EXTRA = "tfds sources need tensorflow-datasets: pip install 'loam[seqio]'"


@dataclasses.dataclass(frozen=True)
class TfdsUnit(Unit):
    """Examples [start, stop) of tfds split `tfds_split` (one file shard, or the part of one a
    sliced split covers)."""

    tfds_split: str = ""
    start: int = 0
    stop: int = 0


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise CorpusError(_EXTRA) from None
    return tfds


def _where(source: Source) -> str:
    return f"source {source.describe()} of domain {source.domain!r}"


def name_and_version(source: Source) -> tuple[str, str | None]:
    name, _, version = source.target.partition(":")
    option = source.option("version")
    if option is not None and version and str(option) != version:
        raise CorpusError(f"{_where(source)}: version {version!r} in the target and option "
                          f"'version' {option!r} differ; give the version once")
    return name, (version or (str(option) if option is not None else None))


def validate(source: Source) -> None:
    where = _where(source)
    name, version = name_and_version(source)
    if not name or any(c.isspace() for c in name):
        raise CorpusError(f"{where}: {source.target!r} is not a tfds dataset name; write "
                          "'tfds:<name>[/<config>][:<version>]', e.g. 'tfds:c4/en:3.0.1'")
    if version is not None and not all(p.isdigit() for p in version.split(".")):
        raise CorpusError(f"{where}: version {version!r} is not 'MAJOR.MINOR.PATCH'")
    for key in ("split", "data_dir", "feature", "id_field"):
        value = source.option(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise CorpusError(f"{where}: option {key!r} must be a non-empty string, got {value!r}")


def _prepare_hint(name: str, data_dir: str) -> str:
    domain = name.split("/")[0].split(":")[0].removeprefix("loam_")
    if name.startswith("loam_") and domain in corpora.DOMAIN_NAMES:
        return f"`python -m loam.data.tfds_builders --data_dir {data_dir} {domain}`"
    return (f"`tfds build {name.split(':')[0]} --data_dir {data_dir}` (or your builder's "
            "download_and_prepare()), or point option 'data_dir' at the directory holding it")


def builder(source: Source):
    """The prepared tfds builder of `source`; CorpusError if it is not prepared there."""
    return _builder(*name_and_version(source), source.option("data_dir"))


@functools.cache
def _builder(name: str, version: str | None, data_dir: str | None):
    tfds = _tfds()
    full = f"{name}:{version}" if version else name
    shown_dir = data_dir or str(tfds.core.constants.DATA_DIR)
    missing = CorpusError(
        f"tfds dataset {full!r} is not prepared in {shown_dir}; loam never downloads or "
        f"generates it: prepare it first with {_prepare_hint(full, shown_dir)}")
    try:
        b = tfds.builder(full, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise missing from None
    except (ValueError, AssertionError, FileNotFoundError) as e:
        # A registered builder asked for a version it does not define, a bad config name ...
        raise CorpusError(f"tfds dataset {full!r} in {shown_dir}: {e}") from None
    if not b.is_prepared():
        _builder.cache_clear()  # a later call may find it prepared
        raise missing
    return b


def _split_infos(source: Source):
    b = builder(source)
    spec = source.option("split", "train")
    tfds = _tfds()
    try:
        instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(b.info.splits)
    except (ValueError, KeyError, AssertionError) as e:
        available = ", ".join(sorted(b.info.splits)) or "none"
        raise CorpusError(f"{_where(source)}: split {spec!r} is not in tfds dataset "
                          f"{b.info.full_name} (splits: {available}): {e}; set option "
                          "'split' to one of them") from None
    return b, instructions


def _features(source: Source) -> tuple[str, str | None]:
    """(text feature, id feature or None), checked against the dataset's features."""
    b = builder(source)
    features = b.info.features
    names = sorted(features.keys())
    feature = source.option("feature", "text")
    if feature not in features:
        raise CorpusError(f"{_where(source)}: tfds dataset {b.info.full_name} has no text feature "
                          f"{feature!r} (features: {', '.join(names)}); set option 'feature'")
    if not _is_text(features[feature]):
        raise CorpusError(f"{_where(source)}: feature {feature!r} of {b.info.full_name} is not "
                          f"text ({features[feature]!r}); set option 'feature' to a text feature")
    id_field = source.option("id_field")
    if id_field is not None:
        if id_field not in features:
            raise CorpusError(f"{_where(source)}: tfds dataset {b.info.full_name} has no id "
                              f"feature {id_field!r} (features: {', '.join(names)}); set option "
                              "'id_field' to one of them, or remove it for '<split>:<index>' ids")
        return feature, id_field
    return feature, next((f for f in DEFAULT_ID_FEATURES if f in features), None)


def _is_text(feature: Any) -> bool:
    """A scalar string feature (``tfds.features.Text`` or a string ``Tensor``)."""
    return getattr(feature, "shape", None) == () and getattr(
        getattr(feature, "tf_dtype", None), "name", None) == "string"


def shard_ranges(b, instructions) -> list[tuple[str, int, int]]:
    """(tfds split, start, stop) per file shard (or the part of one) the instructions cover."""
    out = []
    for ins in instructions:
        info = b.info.splits[ins.splitname]
        first = 0 if ins.from_ is None else ins.from_
        last = info.num_examples if ins.to is None else ins.to
        lo = 0
        for length in info.shard_lengths:
            hi = lo + length
            start, stop = max(lo, first), min(hi, last)
            if start < stop:
                out.append((ins.splitname, start, stop))
            lo = hi
    return out


def units(source: Source) -> list[Unit]:
    b, instructions = _split_infos(source)
    _features(source)  # fail here, before any work, on a missing feature
    return [TfdsUnit(source, i, f"{split}[{start}:{stop}]", None, split, start, stop)
            for i, (split, start, stop) in enumerate(shard_ranges(b, instructions))]


def read_examples(b, split: str, start: int, stop: int, features: list[str]):
    """Examples [start, stop) of `split`, only `features` decoded, in file order."""
    tfds = _tfds()
    ds = b.as_dataset(
        split=tfds.core.ReadInstruction(split, from_=start, to=stop, unit="abs"),
        shuffle_files=False,
        decoders=tfds.decode.PartialDecoding({f: True for f in features}),
        read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False))
    return tfds.as_numpy(ds)


def as_text(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{what}: text is not UTF-8 ({e}); re-encode the data as UTF-8 "
                              "or choose another feature") from None
    if isinstance(value, str):
        return value
    raise CorpusError(f"{what}: expected text, got {type(value).__name__}; choose a text "
                      "feature")


def as_id(value: Any, what: str) -> str:
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, bytes):
        return as_text(value, what)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise CorpusError(f"{what}: the id must be a string or an integer, got "
                      f"{type(value).__name__}; set option 'id_field' to another feature")


def read_unit(unit: Unit) -> Iterator[tuple[str, str]]:
    assert isinstance(unit, TfdsUnit), unit
    source = unit.source
    b = builder(source)
    feature, id_feature = _features(source)
    wanted = [feature] + ([id_feature] if id_feature and id_feature != feature else [])
    for offset, ex in enumerate(read_examples(b, unit.tfds_split, unit.start, unit.stop, wanted)):
        index = unit.start + offset
        what = f"tfds {b.info.full_name} {unit.tfds_split} example {index}"
        doc_id = (as_id(ex[id_feature], what) if id_feature
                  else f"{unit.tfds_split}:{index}")
        yield doc_id, as_text(ex[feature], what)


def fingerprint(source: Source) -> str:
    """The dataset's metadata (dataset_info.json, features.json ...: split sizes, shard lengths,
    checksums) and the names and sizes of its files."""
    b = builder(source)
    h = hashlib.sha256(f"{b.info.full_name}\n".encode())
    for path in sorted(b.data_path.iterdir(), key=lambda p: p.name):
        h.update(f"{path.name}\t{path.stat().length}\n".encode())
        if path.name.endswith(".json"):
            h.update(path.read_bytes())
    return h.hexdigest()
