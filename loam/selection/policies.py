"""Selection policies: which documents of a domain training reads, chosen by score columns.

    python -m loam.selection.policies --config FILE[:ARG]     # the selection's budget per domain

A run's ``config.data.selection`` gives each selected domain a policy over a score (one column,
or a weighted sum of z-scored columns) and optionally a column of repeat counts::

    c.data.selection = {
        "web": {"score": "quality", "policy": "top", "fraction": 0.3},
        "code": {"score": {"quality": 1.0, "ref_loss": -0.5}, "policy": "gumbel",
                 "tokens": 50_000_000, "temperature": 0.5, "repeat": "dup_repeat"},
        "books": {"score": "filters_pass", "policy": "threshold", "threshold": 1},
    }

* ``threshold``: the documents scoring at least ``threshold`` (with ``tokens``: the best of them
  up to that budget);
* ``top``: the best ``fraction`` of the documents, or the best documents up to ``tokens``;
* ``gumbel``: Gumbel top-k, the top of ``score / temperature`` plus Gumbel noise from ``seed``
  (default: the run's): near 0 it is ``top``, large it is a uniform sample;
* ``repeat``: each selected document ``round(w)`` times (``repeat_mode: "sample"``: ``floor`` or
  ``ceil`` of w, w in expectation, by systematic sampling from the seed), FineWeb-2's
  rehydration.

The stream reads the selection as a view (``loam.data.views``: the policies themselves live
there, since the data layer applies them), so a curriculum stage's ``keep``/``order`` ranks and
orders within it, and a run prints each selection's documents and tokens before it trains.
This module is their public face for scorers and users, and checks a selection against the
columns' current inputs.
"""

from __future__ import annotations

import numpy as np

from loam import cli
from loam import run as run_lib
from loam.data import columns as columns_lib
from loam.data.views import (  # noqa: F401  (the policies' public names)
    POLICIES,
    Selection,
    SelectionError,
    describe_summary,
    parse_selection,
    select_documents,
    selection_score,
    selection_summary,
    selections_from_config,
)
from loam.selection import base


def _columns(sel: Selection) -> list[str]:
    e = sel.entry
    names = [e["score"]] if isinstance(e["score"], str) else list(e["score"])
    return names + ([e["repeat"]] if "repeat" in e else [])


def current_inputs(catalog, domain: str, column_names) -> dict[str, dict]:
    """{scorer: its inputs() now} for the scorers that wrote these columns of a domain: what
    ``columns.load`` compares with the recorded ones (a changed target set or checkpoint makes
    a column stale)."""
    out: dict[str, dict] = {}
    for c in column_names:
        m = columns_lib.manifest(catalog, domain, c)
        if m is None or m["scorer"] in out:
            continue
        try:
            scorer = base.make(m["scorer"], m.get("params") or {})
        except base.ScorerError:
            continue  # a scorer this installation does not have: its columns are taken as is
        scorer.check(catalog)  # resolves a target named by a domain in this run's catalog
        out[m["scorer"]] = scorer.inputs()
    return out


def summaries(config) -> list[dict]:
    """Each selected domain's documents and tokens under ``config.data.selection``, with the
    columns checked against their scorers' current inputs."""
    catalog = run_lib.build_catalog(config)
    out = []
    for domain, sel in selections_from_config(config).items():
        split = catalog.split(domain, "train")
        docs, lengths = np.asarray(split.doc_index), np.asarray(split.lengths)
        inputs = current_inputs(catalog, domain, _columns(sel))

        def column(name: str, domain: str = domain, inputs: dict = inputs) -> np.ndarray:
            return columns_lib.load(catalog, domain, name, inputs=inputs)

        copies = select_documents(sel, domain, docs, lengths, column)
        out.append(selection_summary(sel, domain, docs, lengths, copies))
    return out


def main(argv=None):
    def run(config, flags):
        del flags
        found = summaries(config)
        if not found:
            print("config.data.selection is empty: every document of every domain is read")
        for s in found:
            print(describe_summary(s), flush=True)
        return found

    cli.quiet_logs()
    return cli.config_main(run, argv=argv)


if __name__ == "__main__":
    main()
