"""A staged curriculum: a uniform mixture, then an annealing mix on the last 20% of training.

    python -m loam.train --config loam/configs/curriculum.py --workdir runs/curriculum
    python -m loam.train --config loam/configs/curriculum.py:steps=2000 --workdir ...

The last stage starts at 80% of training whatever `steps` is, and inside it literature arrives in
ascending order of the heuristic `quality` column (bundled; recompute it with
`python -m loam.selection.score --scorer heuristic`) while code keeps only its best-scored half.
The learning rate follows warmup-stable-decay, whose decay also starts at 80%, so the annealing
data meets the decaying learning rate.
"""

from loam.configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.optim.schedule = "wsd"
    c.optim.decay_fraction = 0.2
    c.optim.final_lr_fraction = 0.0
    c.data.stages = [
        dict(name="main", start=0, weights="uniform"),
        dict(name="anneal", start="lr:decay",  # = 80% of steps under this schedule
             weights={"literature": 1, "dialogue": 1, "code": 3, "docs": 3, "reference": 1},
             order={"literature": "quality:asc"}, keep={"code": "quality:0.5:1.0"}),
    ]
    c.data.interpolate = False
    # Four checkpoints inside the annealing stage (the last 20%), for checkpoint averaging:
    # python -m loam.average --workdir DIR --last 4
    c.checkpoint_every = max(1, c.steps // 20)
    c.keep_checkpoints = 4
    return c
