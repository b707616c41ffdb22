"""Scores the documents of prepared domains and writes the values as columns next to them.

    python -m loam.selection.score --scorer heuristic                  # the bundled domains
    python -m loam.selection.score --scorer random --config FILE[:ARG] --domains web,code
    python -m loam.selection.score --scorer model --param workdir=RUN [--param step=N]
    python -m loam.selection.score --scorer NAME --runner DataflowRunner --project P ...

``--scorer`` names a registered scorer (``loam.selection.scorers``), ``--param key=value`` sets
its parameters (repeatable). The domains are the config's sources (default: the five bundled
corpora), prepared first if they are small. The pipeline (``loam.selection.pipeline``) runs on
Beam's DirectRunner with ``--num_workers`` local processes, or on another runner with its own
options (any flag this command does not define goes to Beam). Each domain's columns go into
its prepared directory (``loam.data.columns``), with a manifest and the scorer's report
(``columns/<scorer>.report.json``), which is also printed. Selections read them:
``config.data.selection`` and the ``order``/``keep`` of curriculum stages.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from loam import cli
from loam.data import catalog as catalog_lib
from loam.data import columns as columns_lib
from loam.data import prepare
from loam.selection import base, pipeline, scorers  # noqa: F401  (registers the scorers)
from loam.selection import columns as legacy

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.py")
_OWN_FLAGS = ("config", "scorer", "param", "domains", "runner", "num_workers", "prepared_dir",
              "workdir", "step", "column", "out")


def parse_params(items) -> dict:
    """``key=value`` strings -> {key: value}, values read as Python literals where they are
    one (numbers, booleans, lists), else kept as strings."""
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise base.ScorerError(f"--param {item!r} is not key=value")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this command's arguments, Beam's): the flags above (and --config.* overrides) stay."""
    return prepare.split_beam_args(argv, _OWN_FLAGS)


def _define_flags(flags):
    flags.DEFINE_string("scorer", None, "the scorer's registered name")
    flags.DEFINE_multi_string("param", [], "a scorer parameter as key=value (repeatable)")
    flags.DEFINE_string("domains", None, "comma-separated domains (default: every source)")
    flags.DEFINE_string("runner", "DirectRunner", "Beam runner: DirectRunner, DataflowRunner, "
                        "FlinkRunner, SparkRunner ...")
    flags.DEFINE_integer("num_workers", None, "DirectRunner: worker processes (default: one per "
                         "core); other runners: passed on as their --num_workers")
    flags.DEFINE_string("prepared_dir", None, "where the prepared domains are (default: "
                        "config.data.prepared_dir, else $LOAM_CACHE_DIR/prepared)")
    flags.DEFINE_string("workdir", None, "model scorer: the reference run (= --param workdir=)")
    flags.DEFINE_integer("step", None, "model scorer: its checkpoint step (= --param step=)")
    flags.DEFINE_string("column", None, "model scorer: the column's name (= --param column=)")
    flags.DEFINE_string("out", None, "also write DIR/<domain>.scores.npz (the format of the "
                        "bundled corpora's shipped columns; bundled sources only)")


def run(config, flags, beam_args=()):
    if not flags.scorer:
        raise base.ScorerError(f"--scorer is required; choose one of {_names()}")
    params = parse_params(flags.param)
    for key in ("workdir", "step", "column"):
        if getattr(flags, key) is not None:
            params[key] = getattr(flags, key)
    scorer = base.make(flags.scorer, params)
    if flags.prepared_dir:
        config.data.prepared_dir = flags.prepared_dir
    catalog = catalog_lib.for_config(config)
    domains = [d for d in (flags.domains or "").split(",") if d] or None
    results = pipeline.score(scorer, catalog, domains, runner=flags.runner,
                             num_workers=flags.num_workers, beam_args=beam_args)
    print("\n".join(pipeline.summary_lines(scorer, results)), flush=True)
    if flags.out:
        _export(catalog, results, flags.out)
    return results


def _export(catalog, results, out) -> None:
    for d, r in results.items():
        source = catalog.source(d)
        if source.kind != "bundled":
            raise base.ScorerError(f"--out writes the bundled corpora's scores format; domain "
                                   f"{d!r} is not a bundled source")
        cols = {c: columns_lib.load(catalog, d, c) for c in r["manifest"]["columns"]}
        path = legacy.write_columns(source.target, cols, out, source.option("data_dir"))
        print(f"{d:12s} -> {path}", flush=True)


def _names() -> list[str]:
    return sorted(base.SCORERS)


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    ours, beam_args = split_args(argv[1:])
    if not any(a == "--config" or a.startswith("--config=") for a in ours):
        ours = [f"--config={DEFAULT_CONFIG}", *ours]
    cli.quiet_logs()
    return cli.config_main(lambda config, flags: run(config, flags, beam_args),
                           define_flags=_define_flags, argv=[argv[0], *ours])


if __name__ == "__main__":
    main()
