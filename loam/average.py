"""Weighted average of a run's last K checkpoints, written as a checkpoint eval reads like any other.

    python -m loam.average --workdir DIR --last K [--weights 1,1,2,4] [--out DIR/avg_last4]

The output is a run directory (config.json + checkpoints/<last step>) holding the averaged
parameters, with the optimiser state and data position of the newest averaged checkpoint; so
`python -m loam.eval --workdir OUT` reports it. Weights are normalised; the default is uniform.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from loam import checkpoint as ckpt_lib


def average_params(trees, weights) -> object:
    """sum_i w_i * tree_i / sum_i w_i, leaf by leaf, in float32 then cast back."""
    w = np.asarray(weights, np.float64)
    if w.shape != (len(trees),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"averaging weights {list(weights)} must be {len(trees)} finite, "
                         "non-negative numbers with a positive sum")
    w = (w / w.sum()).tolist()

    def avg(*leaves):
        acc = sum(wi * leaf.astype(np.float32) for wi, leaf in zip(w, leaves))
        return acc.astype(leaves[0].dtype)

    return jax.tree.map(avg, *trees)


def average_checkpoints(workdir, last: int, weights=None, out=None) -> Path:
    from loam import eval as eval_lib

    run = eval_lib.open_run(workdir)
    checkpointer = run["checkpointer"]
    steps = checkpointer.steps()
    if last < 1:
        raise ValueError(f"--last must be at least 1, got {last}")
    if last > len(steps):
        raise ValueError(f"--last {last} but {workdir} holds only {len(steps)} checkpoint(s) "
                         f"{steps}; lower --last or keep more (config.keep_checkpoints)")
    chosen = steps[-last:]
    weights = [1.0] * last if weights is None else list(weights)
    if len(weights) != last:
        raise ValueError(f"--weights has {len(weights)} values for --last {last}; give one per "
                         "checkpoint, oldest first")
    states, metas = zip(*(checkpointer.restore(s, run["abstract"]) for s in chosen))
    params = average_params([s.params for s in states], weights)
    state = states[-1].replace(params=params)
    out = Path(out or Path(workdir) / f"avg_last{last}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(Path(workdir) / "config.json", out / "config.json")
    writer = ckpt_lib.Checkpointer(out / "checkpoints", keep=1, async_save=False)
    meta = dict(metas[-1], averaged_steps=chosen, averaging_weights=weights)
    meta.pop("fingerprint", None)
    writer.save(chosen[-1], state, meta)
    writer.wait()
    writer.close()
    checkpointer.close()
    print(f"averaged steps {chosen} with weights {weights} -> {out}", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--last", type=int, required=True)
    p.add_argument("--weights", default=None, help="comma-separated, oldest checkpoint first")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from loam.eval import quiet_orbax
    quiet_orbax()
    try:
        weights = [float(x) for x in args.weights.split(",")] if args.weights else None
        average_checkpoints(args.workdir, args.last, weights, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
