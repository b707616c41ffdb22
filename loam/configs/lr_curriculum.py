"""Curriculum × learning-rate schedule, after "How Learning Rate Decay Wastes Your Best Data in
Curriculum-Based LLM Pretraining": the same documents in random or ascending-quality order, under a
constant, a fully decaying or a moderately decaying learning rate.

    python -m loam.train --config loam/configs/lr_curriculum.py:order=asc,lr=moderate,seed=1 ...
    python -m loam.experiments.lr_curriculum --workdir runs/lrcur     # the whole grid

Each domain is restricted to the same pseudo-random subset of its documents (the bundled `random`
column), sized so that a run reads it about once; `order=asc` streams that subset in ascending order of
the heuristic `quality` column, `order=random` shuffles it.
"""

from loam.configs import default

LR = {  # schedule, final LR as a fraction of the peak
    "constant": ("constant", 1.0),
    "cosine": ("cosine", 0.0),
    "moderate": ("cosine", 0.3),
}


def _subsets(c) -> dict[str, float]:
    """Per domain, the fraction of documents a run reads about once (5% slack, so the ordered
    stream ends at its best documents rather than wrapping round to its worst)."""
    from loam.data import tokenized

    per_domain = c.steps * c.data.batch_size * c.data.seq_len / len(c.data.domains)
    return {d: min(1.0, 1.05 * per_domain / tokenized.load(d).train.num_tokens)
            for d in c.data.domains}


def get_config(arg: str | None = None):
    a = default.parse_arg(arg, order="random", lr="constant", seed=0, steps=300, size="micro")
    if a.order not in ("random", "asc") or a.lr not in LR:
        raise ValueError(f"order must be random|asc and lr one of {sorted(LR)}; got {arg!r}")
    c = default.get_config(f"size={a.size},steps={a.steps},seq_len=128,batch_size=16")
    c.seed = a.seed
    c.optim.lr = 3e-3
    c.optim.warmup_steps = max(1, a.steps // 10)
    c.optim.schedule, c.optim.final_lr_fraction = LR[a.lr]
    keep = {d: f"random:0.0:{f:.4f}" for d, f in _subsets(c).items()}
    order = {d: "quality:asc" for d in c.data.domains} if a.order == "asc" else {}
    c.data.stages = [dict(name="all", start=0, weights="uniform", keep=keep, order=order)]
    c.checkpoint_every = max(1, a.steps // 12)
    c.keep_checkpoints = 4
    c.eval_every = a.steps
    c.eval_tokens = 16384
    return c
