"""Weighted average of a run's last K checkpoints, written as a checkpoint eval reads like any
other.

    python -m loam.average --workdir DIR --last K [--weights 1,1,2,4] [--out DIR/avg_last4]

The output is a run directory (config.json + checkpoints/<last step>) holding the averaged
parameters, with the optimiser state and data position of the newest averaged checkpoint; so
`python -m loam.eval --workdir OUT` reports it. Weights are normalised; the default is uniform.

Nothing that exists is overwritten: the output is built in a temporary directory next to OUT and
renamed into place. An existing OUT is refused unless it is this command's own earlier output
(it holds `averaged.json`): the same average again is a no-op, a different one replaces it. On an
object store (gs://), where a rename is a copy of each object, `averaged.json` is written after
the rest is in place, so an output cut short is never taken for a finished one.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from loam import checkpoint as ckpt_lib
from loam import cli, paths
from loam import run as run_lib
from loam.workdir import UnreadableFile, read_json, write_json

MANIFEST = "averaged.json"
_OWN_FILES = {"config.json", MANIFEST, "checkpoints"}


class AverageError(cli.UserError):
    """An average that cannot be written where asked; the message names the fix."""


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


def _manifest(out: paths.epath.Path) -> dict | None:
    """The manifest of an earlier `loam.average` output in `out`, or None."""
    try:
        m = read_json(out / MANIFEST)
    except UnreadableFile:
        return None
    return m if isinstance(m, dict) and m.get("written_by") == "loam.average" else None


def check_out(workdir: paths.PathLike, out_dir: paths.PathLike,
              last: int | None = None) -> dict | None:
    """Refuses an --out that would overwrite anything average did not write; returns the
    manifest of its own earlier output there, if any."""
    ckpt_lib.check_directory(out_dir)
    run, out = paths.absolute(workdir), paths.absolute(out_dir)
    fresh = run / f"avg_last{last or 'K'}"
    if out == run or out in run.parents:
        raise AverageError(f"--out {out} is the run directory {run} or contains it; "
                           f"averaging never writes over a run. Use a new directory, e.g. "
                           f"--out {fresh}")
    if (run / "checkpoints") in out.parents or out == run / "checkpoints":
        raise AverageError(f"--out {out} is inside the run's checkpoints directory; choose a "
                           f"directory outside it, e.g. {fresh}")
    if not paths.exists(out):
        return None
    if not paths.is_dir(out):
        raise AverageError(f"--out {out} is an existing file; choose a new directory")
    manifest = _manifest(out)
    if manifest is None and paths.iterdir(out):
        raise AverageError(f"--out {out} already exists and was not written by loam.average "
                           "(no averaged.json in it); nothing was changed. Choose a new "
                           "directory, or remove it yourself if it is unwanted")
    return manifest


def average_checkpoints(workdir, last: int, weights=None, out=None) -> paths.epath.Path:
    workdir = paths.absolute(workdir)
    if last < 1:
        raise ValueError(f"--last must be at least 1, got {last}")
    weights = [1.0] * last if weights is None else [float(w) for w in weights]
    if len(weights) != last:
        raise ValueError(f"--weights has {len(weights)} values for --last {last}; give one per "
                         "checkpoint, oldest first")
    out = paths.absolute(out) if out else workdir / f"avg_last{last}"
    earlier = check_out(workdir, out, last)

    run = run_lib.open_run(os.fspath(workdir))
    try:
        steps = run.steps()
        if last > len(steps):
            raise ValueError(f"--last {last} but {workdir} holds only {len(steps)} "
                             f"checkpoint(s) {steps}; lower --last or keep more "
                             "(config.keep_checkpoints)")
        chosen = steps[-last:]
        record = {"written_by": "loam.average", "source": str(workdir), "steps": chosen,
                  "weights": weights}
        if earlier is not None and all(earlier.get(k) == v for k, v in record.items()):
            print(f"{out} already holds this average (steps {chosen}, weights {weights}); "
                  "nothing to do", flush=True)
            return out
        # Parameters alone for the older checkpoints; the newest whole (its optimizer state and
        # data position go with the average, so it resumes like any checkpoint).
        older = [run.checkpointer.restore_params(s, run.abstract.params) for s in chosen[:-1]]
        newest, newest_meta = run.checkpointer.restore(chosen[-1], run.abstract)
        params = average_params([*older, newest.params], weights)
        state = newest.replace(params=params)
        meta = dict(newest_meta, averaged_steps=chosen, averaging_weights=weights)
        meta.pop("fingerprint", None)
        _write(out, workdir, state, meta, chosen[-1], record, replace=earlier is not None)
    finally:
        run.close()
    print(f"averaged steps {chosen} with weights {weights} -> {out}", flush=True)
    return out


def _write(out, workdir, state, meta: dict, step: int, record: dict, replace: bool) -> None:
    """Builds the output next to `out` and renames it into place."""
    manifest_last = not paths.is_local(out)  # a rename there is a copy: the manifest commits
    paths.mkdir(out.parent)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    paths.mkdir(tmp)
    manifest = dict(record, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        paths.copy(workdir / "config.json", tmp / "config.json")
        writer = ckpt_lib.Checkpointer(tmp / "checkpoints", keep=1, async_save=False)
        writer.save(step, state, meta)
        writer.wait()
        writer.close()
        if not manifest_last:
            write_json(tmp / MANIFEST, manifest, indent=1)
        if replace:  # our own earlier output: keep anything else that was added to it
            old = out.parent / f".{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            paths.rename(out, old)
            paths.rename(tmp, out)
            if {p.name for p in paths.iterdir(old)} <= _OWN_FILES:
                paths.remove(old)  # only what an earlier average wrote
            else:
                print(f"note: the earlier average's directory held other files (e.g. its eval "
                      f"results); kept it as {old}", flush=True)
        else:
            if paths.exists(out):  # an empty directory: nothing to lose
                paths.remove(out)
            paths.rename(tmp, out)
        if manifest_last:
            write_json(out / MANIFEST, manifest, indent=1)
    except BaseException:
        try:
            paths.remove(tmp)  # the temporary directory this call created
        except OSError:
            pass
        raise


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--last", type=int, required=True)
    p.add_argument("--weights", default=None, help="comma-separated, oldest checkpoint first")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cli.quiet_logs()
    with cli.user_errors():
        try:
            weights = [float(x) for x in args.weights.split(",")] if args.weights else None
        except ValueError:
            cli.fail(f"--weights {args.weights!r}: give comma-separated numbers, oldest "
                     "checkpoint first, e.g. --weights 1,1,2,4")
        average_checkpoints(args.workdir, args.last, weights, args.out)


if __name__ == "__main__":
    main()
