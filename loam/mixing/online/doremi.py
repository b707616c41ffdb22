"""DoReMi (Xie et al. 2023): domain weights from Group DRO of a proxy model against a reference.

    # the reference: an ordinary run on the reference weights (token-proportional here)
    python -m loam.train --config loam/configs/default.py --config.data.weights=proportional \
        --workdir runs/reference
    # the proxy (a config file setting mixing.method="doremi", mixing.doremi.reference=DIR)
    python -m loam.train --config my_doremi.py --workdir runs/doremi

The proxy samples its batches with the reference's weights p (so its weights log is that constant
distribution) and keeps domain weights α, uniform at first. Every step, in one compiled step, the
reference model's per-token loss is computed without gradients beside the proxy's, and

    λ_d = mean over domain d's tokens of max(loss_proxy - loss_reference, 0)
          (a domain absent from the batch keeps its previous λ_d; 0 before it is first seen)
    α'  = softmax(log α + η λ)                        exponentiated gradient, in log space
    α   = (1 - c) α' + c / K                          smoothing towards uniform

while the proxy's loss is reweighted per token by α_d / p_d (``step.update``'s token_weights),
so its expected gradient is that of Σ_d α_d · loss_d. Like any online mixture, the α of step t
is the one reached after the losses of steps <= t - 1 - FEEDBACK_DELAY. The output mixture is
the average of α over the run (``output_weights``); metrics.jsonl gets ``doremi_weights`` (the α
of the step) on every logged step.

Hyperparameters: ``config.mixing.doremi = dict(reference=DIR, step_size=1.0, smoothing=1e-3)``;
the reference's newest checkpoint is used, and a resumed run keeps the one it started with.
``config.data.weights`` is not read: the proxy samples with the weights the reference trained on.
In a swarm (``loam.mixing.swarm``), DoReMi members sharing one reference run it beside every
member in the swarm's compiled step (e.g. four values of η in one step).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np

from loam import paths
from loam import run as run_lib
from loam import step as step_lib
from loam.data import catalog as catalog_lib
from loam.data import recipes
from loam.data import weights as weights_lib
from loam.data.schedules import ConstantWeights, WeightSource
from loam.mixing import online
from loam.model.transformer import Transformer

DEFAULTS = {"reference": "", "step_size": 1.0, "smoothing": 1e-3}


def update(log_alpha: np.ndarray, excess: np.ndarray, step_size: float,
           smoothing: float) -> np.ndarray:
    """One DoReMi step on the log domain weights: exponentiated gradient with the per-domain
    excess losses, normalised, then mixed with the uniform distribution."""
    z = np.asarray(log_alpha, np.float64) + step_size * np.asarray(excess, np.float64)
    z = z - (z.max() + np.log(np.sum(np.exp(z - z.max()))))
    alpha = (1.0 - smoothing) * np.exp(z) + smoothing / len(z)
    return np.log(alpha)


class DoReMi(WeightSource):
    adaptive = True
    # What the proxy learns from: a per-domain sum the step computes only with the reference.
    feedback_metric = "domain_excess_sum"
    feedback_hint = ("; DoReMi runs its reference model inside the compiled step of "
                     "python -m loam.train or of a swarm (loam.mixing.swarm)")

    def __init__(self, domains: Sequence[str], sampling, step_size: float = 1.0,
                 smoothing: float = 1e-3, reference: str = "", reference_step: int = 0):
        super().__init__(domains)
        if not (math.isfinite(float(step_size)) and float(step_size) > 0):
            raise ValueError(f"config.mixing.doremi.step_size={step_size} must be > 0 (the "
                             "paper's η is 1)")
        if not 0.0 <= float(smoothing) < 1.0:
            raise ValueError(f"config.mixing.doremi.smoothing={smoothing} must lie in [0, 1) "
                             "(the paper's c is 1e-3)")
        self.sampling = recipes.validate_weights(sampling, self.domains)
        self.step_size, self.smoothing = float(step_size), float(smoothing)
        self.reference, self.reference_step = str(reference), int(reference_step)
        k = len(self.domains)
        self.log_alpha = np.full(k, -np.log(k))
        self.excess = np.zeros(k)
        self.history: list[np.ndarray] = []  # α of every step proposed so far, in step order

    # -- the weight source

    def observe(self, step, loss_sums, tokens):
        """``loss_sums`` are the step's per-domain sums of clipped excess loss."""
        seen = tokens > 0
        self.excess = np.where(seen, np.divide(loss_sums, np.where(seen, tokens, 1.0)),
                               self.excess)
        self.log_alpha = update(self.log_alpha, self.excess, self.step_size, self.smoothing)

    def propose(self, step, history):
        if step != len(self.history):
            raise RuntimeError(f"DoReMi was asked for step {step} after {len(self.history)} "
                               "steps; steps are proposed once each, in order")
        self.history.append(np.exp(self.log_alpha))
        return self.sampling

    def alpha_at(self, step: int) -> np.ndarray:
        """The domain weights α the proxy's loss of ``step`` is weighted with."""
        if not 0 <= step < len(self.history):
            raise ValueError(f"DoReMi's weights of step {step} are not known yet; the stream "
                             "proposes a step's weights when its batch is built")
        return self.history[step]

    def token_weights(self, step: int) -> np.ndarray:
        """Per-domain loss multipliers of ``step``: α_d / p_d (0 for a domain never sampled)."""
        p = self.sampling
        return np.divide(self.alpha_at(step), p, out=np.zeros_like(p), where=p > 0)

    def plotted_weights(self):
        """(label, step -> α in the order of ``domains``): the schedule plot's extra panel."""
        return "DoReMi domain weights α", self.alpha_at

    def load_reference(self, mesh, seq_len: int) -> Reference:
        """The reference model at ``reference_step``, laid out on ``mesh``."""
        return load_reference(self, mesh, seq_len)

    def metrics_at(self, step: int) -> dict:
        return {"doremi_weights": dict(zip(self.domains, map(float, self.alpha_at(step))))}

    def output_weights(self, weights_log=None) -> dict[str, float]:
        """DoReMi's output mixture: the average of α over the steps of ``weights_log`` (the
        stream's log of the steps trained, as ``loam.mixing.online.output`` passes it; only its
        length is read), default every step proposed so far."""
        rows = self.history if weights_log is None else self.history[:len(weights_log)]
        if not rows:
            raise ValueError("DoReMi has proposed no step yet; train before asking for its output")
        mean = np.mean(np.stack(rows), axis=0)
        return dict(zip(self.domains, map(float, mean / mean.sum())))

    # -- state

    def state_dict(self):
        return {"log_alpha": [float(x) for x in self.log_alpha],
                "excess": [float(x) for x in self.excess],
                "history": [[float(x) for x in row] for row in self.history],
                "reference_step": self.reference_step}

    def load_state_dict(self, state: Mapping):
        k = len(self.domains)
        if len(state["log_alpha"]) != k:
            raise ValueError(f"DoReMi state has {len(state['log_alpha'])} domains, the config "
                             f"{k}; the domains changed since it was saved")
        self.log_alpha = np.array(state["log_alpha"], np.float64)
        self.excess = np.array(state["excess"], np.float64)
        self.history = [np.array(row, np.float64) for row in state["history"]]
        self.reference_step = int(state["reference_step"])


# --------------------------------------------------------------------------- the reference run

def check_reference(config, domains: Sequence[str], reference: str) -> tuple[np.ndarray, int]:
    """(the weights the reference run sampled with, in the order of ``domains``; its newest
    checkpoint step), after checking that it can serve as the reference of ``config``: same
    sources, tokenizer, vocabulary and domains, constant weights, and a checkpoint."""
    field = f"config.mixing.doremi.reference={reference!r}"
    if not reference:
        raise ValueError("config.mixing.doremi.reference is empty: set it to the workdir of a "
                         "finished reference run (python -m loam.train ... "
                         "--config.data.weights=proportional --workdir DIR)")
    workdir = paths.Path(reference)
    if not paths.exists(workdir / "config.json"):
        raise ValueError(f"{field}: {workdir} is not a loam run directory (no config.json); "
                         "train the reference there first with python -m loam.train")
    saved = run_lib.read_config(workdir)
    ref = ml_collections.ConfigDict(run_lib.comparable(json.loads(saved.to_json_best_effort())))
    ref_data = json.loads(ref.to_json_best_effort())["data"]
    data = run_lib.comparable(json.loads(config.to_json_best_effort()))["data"]
    for name in ("sources", "tokenizer"):
        if json.dumps(ref_data[name]) != json.dumps(data[name]):
            raise ValueError(f"{field}: the reference was trained with data.{name}="
                             f"{ref_data[name]!r}, this run has {data[name]!r}; the reference "
                             "must see the same data through the same tokenizer: train a "
                             "reference with this run's data settings")
    ref_vocab = catalog_lib.for_config(ref).vocab_size
    vocab = catalog_lib.for_config(config).vocab_size
    if ref_vocab != vocab:
        raise ValueError(f"{field}: the reference's vocabulary has {ref_vocab} entries, this "
                         f"run's {vocab}; retrain the reference with this run's tokenizer")
    ref_domains = catalog_lib.mixture_domains(ref)
    if list(ref_domains) != list(domains):
        raise ValueError(f"{field}: the reference trained on the domains {ref_domains}, this run "
                         f"on {list(domains)}; set config.data.domains to the same list")
    try:
        ref_source = weights_lib.source_from_config(ref)
    except ValueError as e:
        raise ValueError(f"{field}: the reference's weights cannot be rebuilt: {e}") from None
    if not isinstance(ref_source, ConstantWeights):
        method = (ref.get("mixing") or {}).get("method", "static")
        raise ValueError(f"{field}: the reference was trained with mixing.method={method!r}"
                         f"{' and data.stages' if ref.data.get('stages') else ''}, not constant "
                         "weights; DoReMi's reference trains on constant weights "
                         "(config.data.weights, or mixing.method=proportional or stratified)")
    sampling = np.array([ref_source.weights[ref_source.domains.index(d)] for d in domains])
    steps = run_lib.checkpoint_steps(workdir)
    if not steps:
        raise ValueError(f"{field}: the reference run has no checkpoint in "
                         f"{workdir / 'checkpoints'}; let it finish (rerun its command to resume)")
    return sampling, steps[-1]


def make_source(config, domains: Sequence[str]) -> DoReMi:
    settings = online.settings(config, "doremi", DEFAULTS)
    # Hyperparameters first: a bad η or c is reported without touching the reference.
    DoReMi(domains, np.ones(len(domains)), settings["step_size"], settings["smoothing"])
    sampling, step = check_reference(config, domains, str(settings["reference"]))
    return DoReMi(domains, sampling, settings["step_size"], settings["smoothing"],
                  str(settings["reference"]), step)


@dataclasses.dataclass
class Reference:
    """The reference model and its parameters, laid out on the proxy's mesh."""
    model: Transformer
    params: object
    shardings: object


def load_reference(source: DoReMi, mesh, seq_len: int) -> Reference:
    """The reference's parameters at the source's reference step, sharded like the proxy's
    (by the same logical rules) on ``mesh``."""
    params, run, _ = run_lib.load_params(source.reference, source.reference_step,
                                         devices=list(mesh.devices.flat))
    run.close()
    cfg = run.model.cfg
    # Rotary positions have no table: the reference reads the proxy's sequences, however long.
    model = Transformer(dataclasses.replace(cfg, max_len=max(cfg.max_len, int(seq_len))))
    _, shardings = step_lib.abstract_state(model, run_lib.build_optimizer(run.config), mesh,
                                           int(seq_len))
    return Reference(model, jax.device_put(params, shardings.params), shardings.params)
