"""Reading points tables (CSV or JSON) for the scaling-law fits."""

from __future__ import annotations

import csv
import json
import pathlib
import warnings

import numpy as np

from loam.scaling.parametric import ScalingFitError

COLUMN_ALIASES = {"Model Size": "N", "Training FLOP": "C", "Training Tokens": "D"}
RESULTS_FILE = "results.csv"


def read_rows(path) -> tuple[pathlib.Path, list[str], list[dict[str, str]]]:
  """(path, header, rows) of a points table: a CSV file, a JSON file (a list of objects, or an
  object whose "points" or "rows" is one), or a directory holding results.csv. Column aliases
  are applied and rows whose `status` is not "ok" are dropped with a warning."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / RESULTS_FILE
  if not path.is_file():
    raise ScalingFitError(f"no results table at {path}; pass --results a CSV or JSON file or a "
                          f"run directory containing {RESULTS_FILE}.")
  if path.suffix.lower() == ".json":
    try:
      data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ScalingFitError(f"{path} is not valid JSON ({e}); fix the file or pass a CSV.") \
          from None
    if isinstance(data, dict):
      data = data.get("points", data.get("rows"))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
      raise ScalingFitError(f"{path}: a JSON points file is a list of objects (one per run), "
                            'or an object with such a list under "points".')
    rows = [{str(k): "" if v is None else str(v) for k, v in r.items()} for r in data]
    keys: dict[str, None] = {}
    for r in rows:
      keys.update(dict.fromkeys(r))
    fields = list(keys)
  else:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      rows = list(reader)
      fields = list(reader.fieldnames or [])
  if not rows:
    raise ScalingFitError(f"{path} has no data rows; it needs a header and one row per run.")
  header = [COLUMN_ALIASES.get(c, c) for c in fields]
  rows = [{COLUMN_ALIASES.get(k, k): v for k, v in r.items()} for r in rows]

  if "status" in header:
    failed = [r for r in rows if (r.get("status") or "").strip().lower() != "ok"]
    if failed:
      warnings.warn(f"dropping {len(failed)} run(s) whose status is not 'ok' (failed runs).",
                    stacklevel=3)
    rows = [r for r in rows if (r.get("status") or "").strip().lower() == "ok"]
  return path, header, rows


def numeric_column(path, rows: list[dict[str, str]], name: str) -> np.ndarray:
  values = []
  for line, r in enumerate(rows, start=2):
    text = (r.get(name) or "").strip()
    try:
      values.append(float(text))
    except ValueError:
      raise ScalingFitError(f"{path}: column {name!r} of data row {line - 1} is {text!r}, not a "
                            "number; fix the value or mark the run with status != ok.") from None
  return np.array(values, np.float64)
