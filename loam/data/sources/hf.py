"""``hf:<path>``: a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (a ``Dataset``
or a ``DatasetDict``), local or at a URL its filesystem package reads. It is opened with
``datasets.load_from_disk``: nothing is downloaded (a hub dataset is saved first:
``datasets.load_dataset(name, split=...).save_to_disk(path)``, the user's explicit download).

Options: ``split`` (required for a DatasetDict: which of its datasets; for a Dataset saved from
one split, it may repeat that split's name), ``text_field`` (default ``text``), ``id_field``
(default ``id`` when the dataset has that column; an ``id_field`` set explicitly must exist).

Units: fixed row ranges of `ROWS_PER_UNIT` rows, in row order, so the units (and the output
shards) depend only on the dataset's length. Document ids: the id column (integers become
strings); without one, ``<split>:<row>`` (``<row>`` for a Dataset saved without a split name).
A null text is an empty document; a text that is not a string is an error.

``datasets`` is the ``[hf]`` extra (``pip install 'loam[hf]'``), imported only when an hf source
is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from typing import Any

from loam.data.corpora import CorpusError
from loam.data.sources import Source, Unit

OPTIONS = frozenset({"split", "text_field", "id_field"})
ROWS_PER_UNIT = 100_000
_BATCH = 1024
_EXTRA = "hf sources need the Hugging Face datasets library: pip install 'loam[hf]'"


@dataclasses.dataclass(frozen=True)
class RowsUnit(Unit):
    """Rows [start, stop) of the dataset (of its split `split_name` for a DatasetDict)."""

    split_name: str | None = None
    start: int = 0
    stop: int = 0


def _datasets():
    try:
        import datasets
    except ImportError:
        raise CorpusError(_EXTRA) from None
    return datasets


def _where(source: Source) -> str:
    return f"source {source.describe()} of domain {source.domain!r}"


def validate(source: Source) -> None:
    for key in ("split", "text_field", "id_field"):
        value = source.option(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise CorpusError(f"{_where(source)}: option {key!r} must be a non-empty string, "
                              f"got {value!r}")


def open_dataset(source: Source):
    """(the Dataset, its split name or None); CorpusError naming the fix on a bad path or
    split."""
    datasets = _datasets()
    where = _where(source)
    try:
        loaded = datasets.load_from_disk(source.target)
    except FileNotFoundError as e:
        raise CorpusError(
            f"{where}: {source.target} is not a dataset saved with datasets' save_to_disk ({e}); "
            "save one there with `dataset.save_to_disk(path)` (a hub dataset: "
            "`datasets.load_dataset(name, split=...).save_to_disk(path)`)") from None
    split = source.option("split")
    if isinstance(loaded, datasets.DatasetDict):
        names = ", ".join(sorted(loaded)) or "none"
        if split is None:
            raise CorpusError(f"{where}: {source.target} is a DatasetDict (splits: {names}); "
                              "set option 'split' to the one to read")
        if split not in loaded:
            raise CorpusError(f"{where}: the DatasetDict at {source.target} has no split "
                              f"{split!r} (splits: {names}); set option 'split' to one of them")
        return loaded[split], split
    own = str(loaded.split) if loaded.split is not None else None
    if split is not None and split != own:
        raise CorpusError(f"{where}: {source.target} is a single Dataset"
                          + (f" (split {own!r})" if own else " without splits")
                          + f", not a DatasetDict with split {split!r}; remove option 'split'")
    return loaded, own


def _columns(source: Source, ds) -> tuple[str, str | None]:
    columns = list(ds.column_names)
    shown = ", ".join(columns)
    text_field = source.option("text_field", "text")
    if text_field not in columns:
        raise CorpusError(f"{_where(source)}: the dataset has no column {text_field!r} "
                          f"(columns: {shown}); set option 'text_field'")
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise CorpusError(f"{_where(source)}: column {text_field!r} holds "
                          f"{ds.features[text_field]}, not text; set option 'text_field' to a "
                          "string column")
    id_field = source.option("id_field")
    if id_field is not None and id_field not in columns:
        raise CorpusError(f"{_where(source)}: the dataset has no id column {id_field!r} "
                          f"(columns: {shown}); set option 'id_field' to one of them, or remove "
                          "it for row-number ids")
    if id_field is None and "id" in columns:
        id_field = "id"
    return text_field, id_field


def units(source: Source) -> list[Unit]:
    ds, split = open_dataset(source)
    _columns(source, ds)
    n = len(ds)
    prefix = f"{split}:" if split else ""
    return [RowsUnit(source, i, f"{prefix}rows[{lo}:{min(lo + ROWS_PER_UNIT, n)}]", None, split,
                     lo, min(lo + ROWS_PER_UNIT, n))
            for i, lo in enumerate(range(0, n, ROWS_PER_UNIT))]


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise CorpusError(f"{what}: the text is {type(value).__name__}, not a string; set option "
                      "'text_field' to a string column")


def _id(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise CorpusError(f"{what}: the id is {type(value).__name__ if value is not None else 'null'}"
                      ", not a string or an integer; set option 'id_field' to another column, "
                      "or remove it for row-number ids")


def read_unit(unit: Unit) -> Iterator[tuple[str, str]]:
    assert isinstance(unit, RowsUnit), unit
    source = unit.source
    ds, split = open_dataset(source)
    text_field, id_field = _columns(source, ds)
    if unit.stop > len(ds):
        raise CorpusError(f"{_where(source)}: the dataset has {len(ds)} rows, fewer than when "
                          "its units were listed; it changed while being read")
    columns = [text_field] + ([id_field] if id_field and id_field != text_field else [])
    rows = ds.select_columns(columns).select(range(unit.start, unit.stop))
    prefix = f"{split}:" if split else ""
    row = unit.start
    for batch in rows.iter(batch_size=_BATCH):
        texts = batch[text_field]
        ids = batch[id_field] if id_field else [None] * len(texts)
        for text, doc_id in zip(texts, ids):
            what = f"{_where(source)}: row {row}"
            yield (_id(doc_id, what) if id_field else f"{prefix}{row}"), _text(text, what)
            row += 1


def fingerprint(source: Source) -> str:
    """datasets' own fingerprint of the data (saved with it, changed by every transform), its
    length and columns, and the names and sizes of its Arrow files."""
    ds, split = open_dataset(source)
    h = hashlib.sha256(f"{split}\n{ds._fingerprint}\n{len(ds)}\n{ds.column_names}\n".encode())
    for f in ds.cache_files:
        name = f.get("filename", "")
        size = os.path.getsize(name) if name and os.path.exists(name) else -1
        h.update(f"{os.path.basename(name)}\t{size}\n".encode())
    return h.hexdigest()
