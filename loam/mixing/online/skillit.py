"""Skill-it (Chen et al. 2023, "Skill-it! A Data-Driven Skills Framework for Understanding and
Training Language Models"), online: the domains are skills related by a graph A, and every round
the mixture leans towards the skills whose training lowers the held-out losses that are highest.

    python -m loam.train --config loam/configs/default.py --config.mixing.method=skillit \
        [--config.mixing.skillit.graph=pairwise ...] --workdir ...

Every ``update_steps`` steps (a round at step T, from step 0), with K domains:

    L_T = held-out loss per domain of the parameters at T (``eval_tokens`` per domain)
    p  ∝ p₁ ⊙ exp(η · A · Σ_{the last w rounds' L})            (η = eta, w = window)

p₁ is ``config.data.weights`` (uniform by default). A[i, j] is how much training on skill i
helps skill j (row i: what i teaches), so A = I upweights the domains whose own loss is high.

The graph (``graph``): a K×K matrix (a list of rows, or that list as a JSON string), "identity",
or estimated at the first round from the parameters there (the estimate is kept in the state):

- "linear" (the paper's linear approximation): K probes, probe i trained ``graph_steps`` steps
  on domain i alone; A[i, j] = L_j(before) - L_j(probe i), negatives set to 0, the whole matrix
  divided by the mean of its diagonal (so that A = I and an estimated graph act on the same
  scale of η).
- "pairwise" (the paper's brute-force estimate): probes on each domain alone and on each pair
  half and half; A[j, j] = 1 and, for i ≠ j, A[i, j] = max(0, L_j(alone j) - L_j(pair i, j)) /
  (L_j(before) - L_j(alone j)): the share of j's own progress that adding i's data adds on top,
  at the same number of steps (the pair sees half as many of j's tokens).

From a freshly initialised model the probes mostly learn what all domains share (frequent
tokens), so an estimate at step 0 is close to a matrix of ones; ``start`` delays the first
round (and the estimate) for a run that should first train on p₁.

Hyperparameters (``config.mixing.skillit``): update_steps 50, start 0, eta 0.5, window 3,
graph "linear", graph_steps 20, eval_tokens 8192, probes "swarm" (see ``rounds``); η = 0.5 and
w = 3 are the paper's.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence

import numpy as np

from loam.data import recipes
from loam.mixing import online
from loam.mixing.online import rounds

DEFAULTS = {"update_steps": 50, "start": 0, "eta": 0.5, "window": 3, "graph": "linear",
            "graph_steps": 20, "eval_tokens": 8192, "probes": "swarm"}
ESTIMATES = ("linear", "pairwise")


def update(p1: np.ndarray, graph: np.ndarray, losses: np.ndarray, eta: float) -> np.ndarray:
    """p ∝ p₁ ⊙ exp(η A Σ_rows losses); ``losses`` [rounds in the window, K]."""
    p1 = np.asarray(p1, np.float64)
    z = eta * (np.asarray(graph, np.float64) @ np.asarray(losses, np.float64).sum(axis=0))
    z = np.where(p1 > 0, np.log(np.maximum(p1, 1e-300)) + z, -np.inf)
    w = np.exp(z - z[np.isfinite(z)].max())
    return w / w.sum()


def linear_graph(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """A from probes each trained on one domain: after[i] = losses of probe i."""
    a = np.maximum(np.asarray(before, np.float64)[None, :] - np.asarray(after, np.float64), 0.0)
    scale = float(np.mean(np.diag(a)))
    if scale <= 0:
        raise RuntimeError("no probe lowered its own domain's held-out loss, so the skills graph "
                           "cannot be estimated; raise config.mixing.skillit.graph_steps or give "
                           "the graph (--config.mixing.skillit.graph=identity)")
    return a / scale


def pair_mixtures(k: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The pairwise estimate's probes: each domain alone, then each pair half and half."""
    pairs = list(itertools.combinations(range(k), 2))
    rows = [np.eye(k)[i] for i in range(k)]
    for i, j in pairs:
        w = np.zeros(k)
        w[[i, j]] = 0.5
        rows.append(w)
    return np.stack(rows), pairs


def pairwise_graph(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """A from ``pair_mixtures``' probes (their held-out losses, in that order)."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    k = len(before)
    _, pairs = pair_mixtures(k)
    alone = after[:k]
    own = before - np.diag(alone)  # each domain's progress trained alone
    if np.any(own <= 0):
        bad = [int(i) for i in np.flatnonzero(own <= 0)]
        raise RuntimeError(f"training on domain(s) {bad} alone did not lower their held-out loss, "
                           "so the skills graph cannot be estimated; raise "
                           "config.mixing.skillit.graph_steps or give the graph")
    a = np.eye(k)
    for (i, j), losses in zip(pairs, after[k:]):
        a[i, j] = max(0.0, alone[j, j] - losses[j]) / own[j]
        a[j, i] = max(0.0, alone[i, i] - losses[i]) / own[i]
    return a


def parse_graph(graph, k: int) -> np.ndarray | str:
    """A given graph as a float64 K×K matrix, or the name of an estimate / "identity"."""
    if hasattr(graph, "to_dict"):
        graph = graph.to_dict()
    if isinstance(graph, str):
        name = graph.strip()
        if name == "identity":
            return np.eye(k)
        if name in ESTIMATES:
            return name
        try:
            graph = json.loads(name)
        except json.JSONDecodeError:
            raise ValueError(f"config.mixing.skillit.graph={graph!r}: give a K×K matrix (a list "
                             f"of {k} rows), 'identity', or an estimate "
                             f"({', '.join(ESTIMATES)})") from None
    try:
        a = np.asarray(graph, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"config.mixing.skillit.graph={graph!r} is not a matrix of numbers; "
                         f"give {k} rows of {k} numbers") from None
    if a.shape != (k, k):
        raise ValueError(f"config.mixing.skillit.graph has shape {a.shape}, the mixture has {k} "
                         f"domains; give a {k}×{k} matrix (row i: how much domain i helps each "
                         "domain)")
    if not np.all(np.isfinite(a)):
        raise ValueError("config.mixing.skillit.graph has NaN or infinite entries; give finite "
                         "numbers")
    return a


class SkillIt(rounds.RoundsSource):
    def __init__(self, domains: Sequence[str], initial, update_steps: int = 50, start: int = 0,
                 eta: float = 0.5, window: int = 3, graph="linear", graph_steps: int = 20,
                 eval_tokens: int = 8192, probes: str = "swarm"):
        super().__init__(domains)
        m = "skillit"
        self.round_steps = rounds.check_positive_int(m, "update_steps", update_steps)
        self.first_round = rounds.check_positive_int(m, "start", start, minimum=0)
        self.eta = rounds.check_number(m, "eta", eta, 0.0, np.inf, low_open=True,
                                       hint=" (the paper's η is 0.5)")
        self.window = rounds.check_positive_int(m, "window", window)
        self.graph_steps = rounds.check_positive_int(m, "graph_steps", graph_steps)
        self.eval_tokens = rounds.check_positive_int(m, "eval_tokens", eval_tokens)
        if probes not in rounds.PROBE_MODES:
            raise ValueError(f"config.mixing.skillit.probes={probes!r}; choose one of "
                             f"{', '.join(rounds.PROBE_MODES)}")
        self.probe_mode = probes
        parsed = parse_graph(graph, len(self.domains))
        self.estimate = parsed if isinstance(parsed, str) else ""
        self.graph: np.ndarray | None = None if isinstance(parsed, str) else parsed
        self.p1 = recipes.validate_weights(initial, self.domains)
        self.p = self.p1.copy()
        self.losses: list[list[float]] = []
        self.last_round = -1
        self.log: list[dict] = []

    def propose(self, step, history):
        return self.p

    def estimate_graph(self, lab) -> np.ndarray:
        k = len(self.domains)
        before = lab.heldout()
        if self.estimate == "linear":
            return linear_graph(before, lab.probes(np.eye(k), self.graph_steps))
        mixtures, _ = pair_mixtures(k)
        return pairwise_graph(before, lab.probes(mixtures, self.graph_steps))

    def run_round(self, step, lab):
        if self.graph is None:
            self.graph = self.estimate_graph(lab)
        self.apply_round(step, lab.heldout())

    def apply_round(self, step: int, losses: np.ndarray) -> None:
        assert self.graph is not None
        self.losses.append([float(x) for x in losses])
        window = np.array(self.losses[-self.window:], np.float64)
        self.p = update(self.p1, self.graph, window, self.eta)
        self.last_round = int(step)
        self.log.append({"step": int(step), "heldout": list(self.losses[-1]),
                         "weights": self.p.tolist()})

    def round_log(self):
        return [{"graph": None if self.graph is None else self.graph.tolist(),
                 "domains": self.domains}, *self.log]

    def state_dict(self):
        return {"p": self.p.tolist(), "losses": self.losses, "last_round": self.last_round,
                "graph": None if self.graph is None else self.graph.tolist(), "log": self.log}

    def load_state_dict(self, state: Mapping):
        p = np.array(state["p"], np.float64)
        if p.shape != (len(self.domains),):
            raise ValueError(f"skillit state has {p.size} domains, the config "
                             f"{len(self.domains)}; the domains changed since it was saved")
        self.p = p
        self.losses = [list(map(float, row)) for row in state["losses"]]
        self.last_round = int(state["last_round"])
        self.graph = None if state["graph"] is None else np.array(state["graph"], np.float64)
        self.log = list(state["log"])


def make_source(config, domains: Sequence[str]) -> SkillIt:
    s = online.settings(config, "skillit", DEFAULTS)
    rounds.check_run(config, "skillit")
    if config.optim.accum_steps != 1 and str(s["graph"]) in ESTIMATES:
        raise ValueError("an estimated skills graph is measured by probes trained as a swarm, "
                         "which does not accumulate gradients; set optim.accum_steps=1 or give "
                         "the graph")
    initial = online.initial_weights(config, domains)
    return SkillIt(domains, initial, **s)
