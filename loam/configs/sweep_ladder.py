"""A miniature Chinchilla ladder on the bundled corpus: 4 model sizes x 3 IsoFLOP budgets.

    python -m loam.sweep --config loam/configs/sweep_ladder.py --workdir runs/ladder --parallel 2
    python -m loam.sweep --config loam/configs/sweep_ladder.py --workdir runs/ladder --fit

Sizes are non-embedding parameter targets (0.05M-0.4M, shapes from sizes.pick_size); for each
budget C every size trains on D = C / 6N tokens, so the small models see the most data. The
budgets are sized to finish in under an hour on two shared CPU cores, which makes the larger
models at the smallest budget very short runs: the fitted exponents demonstrate the workflow,
they are not a measurement of the field's. The holdout run is a larger model at a larger budget,
trained by the same command but kept out of results.csv; `--fit` predicts its loss from the law
fitted on the grid.

The argument scales the budgets: `loam/configs/sweep_ladder.py:scale=0.1` for a quick look.
"""

import ml_collections

from loam.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = default.parse_arg(arg, scale=1.0, lr=3e-3, seed=0)
    c = ml_collections.ConfigDict()
    c.base = default.get_config("size=nano,seq_len=128,batch_size=16")
    c.base.seed = a.seed
    c.base.optim.lr = a.lr
    c.base.log_every = 10
    c.base.eval_tokens = 8192  # per domain
    c.base.eval_every = c.base.checkpoint_every = 100
    c.base.mesh.data = 1
    c.warmup_fraction = 0.05
    c.axes = [
        {"flops": [a.scale * b for b in (4e10, 8e10, 1.6e11)]},
        {"params": [5e4, 1e5, 2e5, 4e5]},
    ]
    c.holdout = [{"params": 8e5, "flops": a.scale * 3.2e11}]
    return c
