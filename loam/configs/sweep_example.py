"""An example sweep: learning rate x seed on the nano model, for trying the sweep commands.

    python -m loam.sweep --config loam/configs/sweep_example.py --workdir runs/lr_sweep --list
    python -m loam.sweep --config loam/configs/sweep_example.py:steps=50 --workdir runs/lr_sweep

Axes are a list; each entry is one axis {key: [values]} and the runs are their product. Keys in
one entry vary together: {"params": [...], "optim.lr": [...]} pairs each size with its own rate.
"""

import ml_collections

from loam.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = default.parse_arg(arg, steps=200)
    c = ml_collections.ConfigDict()
    c.base = default.get_config(f"size=nano,steps={a.steps},seq_len=128,batch_size=16")
    c.base.eval_tokens = 8192
    c.base.eval_every = c.base.checkpoint_every = 1000
    c.warmup_fraction = 0.1
    c.axes = [
        {"optim.lr": [1e-3, 3e-3, 1e-2]},
        {"seed": [0, 1]},
    ]
    return c
