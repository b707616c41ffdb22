"""Curriculum × learning-rate schedule, after "How Learning Rate Decay Wastes Your Best Data in
Curriculum-Based LLM Pretraining": the same documents in random or ascending-quality order, under a
constant, a fully decaying or a moderately decaying learning rate, over several seeds. A sweep:

    python -m loam.sweep --config loam/configs/lr_curriculum.py --workdir runs/lrcur [--parallel 2]
    python -m loam.experiments.lr_curriculum --workdir runs/lrcur   # averages, table and plot
    python -m loam.sweep --config loam/configs/lr_curriculum.py:seeds=1,steps=60,size=nano ...

Each domain is restricted to the same pseudo-random subset of its documents (the bundled `random`
column), sized so that a run reads it about once; the `asc` stage streams that subset in ascending
order of the heuristic `quality` column, the `random` stage shuffles it. The fourth cell of the
grid (moderate decay + an average of the last 4 checkpoints) is made from the moderate runs by the
summary step.
"""

import ml_collections

from loam.configs import default
from loam.data import catalog as catalog_lib

LR = {  # schedule, final LR as a fraction of the peak
    "constant": ("constant", 1.0),
    "cosine": ("cosine", 0.0),
    "moderate": ("cosine", 0.3),
}
ORDERS = ("random", "asc")


def _subsets(c) -> dict[str, float]:
    """Per domain, the fraction of documents a run reads about once (5% slack, so the ordered
    stream ends at its best documents rather than wrapping round to its worst)."""
    catalog, domains = catalog_lib.for_config(c), catalog_lib.mixture_domains(c)
    per_domain = c.steps * c.data.batch_size * c.data.seq_len / len(domains)
    return {d: min(1.0, 1.05 * per_domain / catalog.num_tokens(d)) for d in domains}


def stages(c, order: str) -> list[dict]:
    """The single curriculum stage of a run reading the documents in `order` (its name)."""
    keep = {d: f"random:0.0:{f:.4f}" for d, f in _subsets(c).items()}
    by = {d: "quality:asc" for d in catalog_lib.mixture_domains(c)} if order == "asc" else {}
    return [dict(name=order, start=0, weights="uniform", keep=keep, order=by)]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = default.parse_arg(arg, seeds=3, steps=300, size="micro")
    if a.seeds < 1 or a.steps < 12:
        raise ValueError(f"need seeds >= 1 and steps >= 12 (4 checkpoints to average); got "
                         f"seeds={a.seeds}, steps={a.steps}")
    c = default.get_config(f"size={a.size},steps={a.steps},seq_len=128,batch_size=16")
    c.optim.lr = 3e-3
    c.optim.warmup_steps = max(1, a.steps // 10)
    c.data.stages = stages(c, "random")
    c.checkpoint_every = max(1, a.steps // 12)
    c.keep_checkpoints = 4
    c.eval_every = a.steps
    c.eval_tokens = 16384

    sweep = ml_collections.ConfigDict()
    sweep.base = c
    schedules, finals = zip(*LR.values())
    sweep.axes = [
        {"optim.schedule": list(schedules), "optim.final_lr_fraction": list(finals)},  # zipped
        {"data.stages": [stages(c, order) for order in ORDERS]},
        {"seed": list(range(a.seeds))},
    ]
    return sweep
