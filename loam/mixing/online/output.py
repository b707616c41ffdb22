"""The output mixture of an adaptive run: the static mixture the method recommends, written as a
config ``loam.train`` runs directly (typically on a larger model, as DoReMi and ODM transfer
theirs):

    python -m loam.train --config RUN/output_mixture.json --config.model.size=small --workdir ...

The weights are ``source.output_weights(weights_log)`` when the weight source defines it, else
the average of the realised weights over the run (DoReMi's output rule; ODM's natural output is
the same average, the mixture the run actually trained on).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from loam import hooks as hooks_lib
from loam import paths
from loam import run as run_lib
from loam.data import recipes
from loam.workdir import write_json

FILENAME = "output_mixture.json"


def output_weights(stream, steps: int) -> dict[str, float]:
    """The output mixture of the first ``steps`` steps of ``stream``'s weights log, by domain."""
    log = stream.weights_log(int(steps))
    custom = getattr(stream.source, "output_weights", None)
    if custom is not None:
        w = custom(log)
        if isinstance(w, Mapping):
            w = [w.get(d, 0.0) for d in stream.names]
    elif len(log):
        w = log.mean(axis=0)
    else:
        w = stream.weights_at(0)
    w = recipes.validate_weights(np.asarray(w, np.float64), stream.names)
    return {d: float(x) for d, x in zip(stream.names, w)}


def write_output_mixture(workdir, config, stream) -> paths.epath.Path:
    """Writes ``<workdir>/output_mixture.json``: the run's config with its weights fixed to the
    output mixture of the run's ``config.steps`` steps (``mixing.method = "static"``, no
    stages). Returns its path."""
    c = run_lib.copy_config(config)
    with c.unlocked():
        del c.data["weights"]  # a recipe string becomes a dict
        c.data.weights = output_weights(stream, int(config.steps))
        c.data.stages = []
        if "mixing" not in c:
            c.mixing = {}
        c.mixing.method = "static"
    return write_json(paths.Path(workdir) / FILENAME, json.loads(c.to_json_best_effort()),
                      indent=2, sort_keys=True)


class OutputMixture(hooks_lib.Hook):
    """Writes the output mixture when the run has trained all its steps (not when it is
    preempted or fails: a partial trajectory is not the method's answer)."""

    def __init__(self, workdir, config, stream, enabled: bool = True):
        self.workdir, self.config, self.stream = workdir, config, stream
        self.steps, self.enabled = int(config.steps), enabled

    def on_end(self, step):
        if self.enabled and step >= self.steps:
            write_output_mixture(self.workdir, self.config, self.stream)
