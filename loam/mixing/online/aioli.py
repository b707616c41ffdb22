"""Aioli (Chen et al. 2025, "Aioli: A Unified Optimization Framework for Language Model Data
Mixing"): every round, probes measure how training on each domain moves every domain's held-out
loss, and the mixture moves towards the domains that help most.

    python -m loam.train --config loam/configs/default.py --config.mixing.method=aioli \
        [--config.mixing.aioli.eta=0.1 ...] --workdir ...

A round at step T (every ``update_steps`` steps from ``start``), with K domains:

1. L0 = held-out loss per domain of the parameters at T.
2. LearnParams: K probes branch from the parameters and optimiser state at T; probe j trains
   ``probe_steps`` steps on the smoothed one-hot mixture w_j (``one_hot`` on domain j, the rest
   shared equally by the others), on the stream's batches of steps T, T+1, ...; then
   G[i, j] = L0_i - L_i(probe j), the drop of domain i's loss.
3. Un-smoothing: with W the matrix whose row j is w_j, G[i] = W · A[i], so A[i] = W⁻¹ G[i]
   (the effect of domain j's own tokens on domain i; A = G when ``one_hot`` = 1).
4. ``normalize``: A <- A - min(A) if min(A) < 0, then A <- A / ΣA (the released code's option,
   against rounds whose drops are large early in training swamping the rest).
5. Ā = (1 - ema) A + ema Ā_prev (Ā = A in the first round; ``ema`` = 0 keeps A alone).
6. ``accumulate`` (default): p <- p ⊙ exp(η · Σ_i Ā[i, :]) normalised, the update of the paper;
   else p = p₀ ⊙ exp(η · Σ_i Ā[i, :]), the variant of the released scripts (which pair it with
   ema 0.5). p₀ is ``config.data.weights`` (uniform by default), trained until the first round.

Where this differs from the paper and its code: the probes branch and are discarded (the code
trains the real model on the one-hot mixtures for a δ fraction of each round, in turn, each probe
starting where the previous one stopped), so the run's token budget is untouched and the probes
cost extra compute instead; all K probes train at once as a swarm of K members in one compiled
step, branching from the same point, so every column of G is measured from L0 (``lp_rounds`` > 1
sweeps of the code are ``probe_steps`` here). The held-out set is the run's validation split
(``eval_tokens`` per domain), the one the run is evaluated on, as in the code.

Hyperparameters (``config.mixing.aioli``): update_steps 50, start 0, probe_steps 12, one_hot 0.5,
eta 0.1, normalize True, ema 0.0, accumulate True, eval_tokens 8192, probes "swarm" (or
"sequential": the same probes one after another). The defaults for one_hot, eta and normalize are
those of the released scripts (arxiv/books/stackexchange, 160M).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from loam.data import recipes
from loam.mixing import online
from loam.mixing.online import rounds

DEFAULTS = {"update_steps": 50, "start": 0, "probe_steps": 12, "one_hot": 0.5, "eta": 0.1,
            "normalize": True, "ema": 0.0, "accumulate": True, "eval_tokens": 8192,
            "probes": "swarm"}


def probe_mixtures(k: int, one_hot: float) -> np.ndarray:
    """W: row j is the smoothed one-hot mixture of probe j."""
    if k == 1:
        return np.ones((1, 1))
    w = np.full((k, k), (1.0 - one_hot) / (k - 1))
    np.fill_diagonal(w, one_hot)
    return w


def learn_matrix(before: np.ndarray, after: np.ndarray, one_hot: float) -> np.ndarray:
    """A from the held-out losses before the probes [K] and after them [K probes, K domains]:
    G[i, j] = before[i] - after[j, i], un-smoothed through the probes' mixtures."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    g = before[:, None] - after.T
    if one_hot == 1.0:
        return g
    w = probe_mixtures(len(before), one_hot)
    return np.linalg.solve(w, g.T).T  # A[i] = W⁻¹ G[i] for every row i


def normalize_matrix(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    low = a.min()
    if low < 0:
        a = a - low
    total = a.sum()
    return a / total if total > 0 else a


def update(p: np.ndarray, p0: np.ndarray, a_bar: np.ndarray, eta: float,
           accumulate: bool) -> np.ndarray:
    """The mixture after a round, from the smoothed matrix Ā (float64, normalised)."""
    base = np.asarray(p if accumulate else p0, np.float64)
    z = np.log(np.maximum(base, 1e-300)) + eta * np.asarray(a_bar, np.float64).sum(axis=0)
    z = np.where(base > 0, z, -np.inf)
    w = np.exp(z - z[np.isfinite(z)].max())
    return w / w.sum()


class Aioli(rounds.RoundsSource):
    def __init__(self, domains: Sequence[str], initial, update_steps: int = 50, start: int = 0,
                 probe_steps: int = 12, one_hot: float = 0.5, eta: float = 0.1,
                 normalize: bool = True, ema: float = 0.0, accumulate: bool = True,
                 eval_tokens: int = 8192, probes: str = "swarm"):
        super().__init__(domains)
        m = "aioli"
        self.round_steps = rounds.check_positive_int(m, "update_steps", update_steps)
        self.first_round = rounds.check_positive_int(m, "start", start, minimum=0)
        self.probe_steps = rounds.check_positive_int(m, "probe_steps", probe_steps)
        k = len(self.domains)
        self.one_hot = rounds.check_number(
            m, "one_hot", one_hot, 1.0 / k if k > 1 else 0.0, 1.0, low_open=True,
            high_open=False, hint=f" (above 1/K = {1.0 / k:.3g}, or the probe mixtures cannot be "
            "told apart; the released scripts use 0.5)")
        self.eta = rounds.check_number(m, "eta", eta, 0.0, np.inf, low_open=True,
                                       hint=" (the step size; the released scripts use 0.1)")
        self.ema = rounds.check_number(m, "ema", ema, 0.0, 1.0)
        for key, value in (("normalize", normalize), ("accumulate", accumulate)):
            if not isinstance(value, bool):
                raise ValueError(f"config.mixing.aioli.{key}={value!r} must be True or False")
        self.normalize, self.accumulate = normalize, accumulate
        self.eval_tokens = rounds.check_positive_int(m, "eval_tokens", eval_tokens)
        if probes not in rounds.PROBE_MODES:
            raise ValueError(f"config.mixing.aioli.probes={probes!r}; choose one of "
                             f"{', '.join(rounds.PROBE_MODES)}")
        self.probe_mode = probes
        self.p0 = recipes.validate_weights(initial, self.domains)
        self.p = self.p0.copy()
        self.a_bar: np.ndarray | None = None
        self.last_round = -1
        self.log: list[dict] = []

    def propose(self, step, history):
        return self.p

    def run_round(self, step, lab):
        before = lab.heldout()
        after = lab.probes(probe_mixtures(len(self.domains), self.one_hot), self.probe_steps)
        self.apply_round(step, before, after)

    def apply_round(self, step: int, before: np.ndarray, after: np.ndarray) -> None:
        """The update of a round from its measurements (float64 numpy)."""
        a = learn_matrix(before, after, self.one_hot)
        used = normalize_matrix(a) if self.normalize else a
        self.a_bar = used if self.a_bar is None else (1 - self.ema) * used + self.ema * self.a_bar
        self.p = update(self.p, self.p0, self.a_bar, self.eta, self.accumulate)
        self.last_round = int(step)
        self.log.append({"step": int(step), "heldout": before.tolist(),
                         "probe_heldout": np.asarray(after).tolist(), "A": a.tolist(),
                         "weights": self.p.tolist()})

    def round_log(self):
        return [dict(r, domains=self.domains) for r in self.log]

    def metrics_at(self, step: int) -> dict:
        return {}

    def state_dict(self):
        return {"p": self.p.tolist(), "a_bar": None if self.a_bar is None else self.a_bar.tolist(),
                "last_round": self.last_round, "log": self.log}

    def load_state_dict(self, state: Mapping):
        p = np.array(state["p"], np.float64)
        if p.shape != (len(self.domains),):
            raise ValueError(f"aioli state has {p.size} domains, the config {len(self.domains)}; "
                             "the domains changed since it was saved")
        self.p = p
        self.a_bar = None if state["a_bar"] is None else np.array(state["a_bar"], np.float64)
        self.last_round = int(state["last_round"])
        self.log = list(state["log"])


def make_source(config, domains: Sequence[str]) -> Aioli:
    s = online.settings(config, "aioli", DEFAULTS)
    rounds.check_run(config, "aioli")
    if config.optim.accum_steps != 1:
        raise ValueError("config.mixing.method='aioli' trains its probes as a swarm, which does "
                         "not accumulate gradients; set optim.accum_steps=1")
    initial = online.initial_weights(config, domains)
    return Aioli(domains, initial, **s)
