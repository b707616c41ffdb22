"""Iterated DoReMi (Xie et al. 2023, "iterated DoReMi"): round r trains a reference on the
mixture round r - 1 output (round 1: ``--initial``, token-proportional by default), then a
DoReMi proxy against it; the proxy's output mixture (the average of its domain weights) is the
next round's reference mixture.

    python -m loam.mixing.doremi_rounds --config loam/configs/default.py[:ARGS] \
        --workdir runs/doremi --rounds 3 [--initial proportional] \
        [--config.mixing.doremi.step_size=1.0 ...]

Writes ``<workdir>/round<r>/reference`` and ``<workdir>/round<r>/proxy`` (ordinary loam.train
run directories; a finished one is not trained again, an interrupted one resumes), and
``<workdir>/rounds.json``: each round's reference mixture and output mixture, and how far the
output moved (total variation distance from the round's reference mixture; the paper stops when
the weights converge). The last round's ``proxy/output_mixture.json`` is the config to train a
larger model on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loam import cli
from loam import run as run_lib
from loam import train as train_lib
from loam.data import recipes
from loam.workdir import read_json, write_json


def _finished(workdir: Path, steps: int) -> bool:
    return (workdir / "eval" / f"step_{steps}.json").is_file()


def _train(config, workdir: Path) -> None:
    if not _finished(workdir, int(config.steps)):
        train_lib.train(config, workdir)
    if not _finished(workdir, int(config.steps)):
        raise cli.UserError(f"{workdir} stopped before its last step; rerun the same command "
                            "to resume it")


def iterate(config, workdir: Path, rounds: int, initial="proportional") -> dict:
    """Runs the rounds (skipping finished runs); returns and writes rounds.json. ``initial``:
    the first reference's weights (a recipe, a dict or one number per domain)."""
    if rounds < 1:
        raise cli.UserError(f"--rounds={rounds} must be >= 1")
    if (config.get("mixing") or {}).get("method", "static") not in ("static", "doremi"):
        raise cli.UserError(f"--config.mixing.method={config.mixing.method!r}: iterated DoReMi "
                            "sets the method itself (static references, doremi proxies); leave "
                            "it at static")
    if config.data.get("stages"):
        raise cli.UserError("iterated DoReMi trains references on constant weights; clear "
                            "config.data.stages")
    domains = run_lib.mixture_domains(config)
    weights = recipes.config_weights(config, initial, domains=domains)
    log = []
    for r in range(1, rounds + 1):
        ref_dir, proxy_dir = workdir / f"round{r}" / "reference", workdir / f"round{r}" / "proxy"
        ref = run_lib.copy_config(config)
        ref.mixing.method = "static"
        del ref.data["weights"]
        ref.data.weights = {d: float(w) for d, w in zip(domains, weights)}
        _train(ref, ref_dir)
        proxy = run_lib.copy_config(ref)
        proxy.mixing.method = "doremi"
        proxy.mixing.doremi.reference = str(ref_dir)
        _train(proxy, proxy_dir)
        output = read_json(proxy_dir / "output_mixture.json")["data"]["weights"]
        new = np.array([float(output[d]) for d in domains])
        log.append({"round": r, "reference_weights": dict(zip(domains, map(float, weights))),
                    "output_weights": dict(zip(domains, map(float, new))),
                    "total_variation": float(0.5 * np.abs(new - weights).sum()),
                    "reference": str(ref_dir), "proxy": str(proxy_dir)})
        print(f"round {r}: output {', '.join(f'{d} {w:.3f}' for d, w in zip(domains, new))} "
              f"(moved {log[-1]['total_variation']:.3f} from its reference mixture)",
              flush=True)
        weights = new
    result = {"domains": domains, "rounds": log,
              "final": str(workdir / f"round{rounds}" / "proxy" / "output_mixture.json")}
    write_json(workdir / "rounds.json", result, indent=2)
    return result


def _define_flags(flags):
    flags.DEFINE_string("workdir", None, "Directory of the rounds (created; resumed).")
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_integer("rounds", 2, "Rounds of reference + proxy.")
    flags.DEFINE_string("initial", "proportional", "The first reference's weights: a recipe "
                        "(proportional, uniform, temperature:T, ...) or a JSON dict.")


def _run(config, flags):
    initial = flags.initial
    if initial.strip().startswith("{"):
        try:
            initial = json.loads(initial)
        except json.JSONDecodeError as e:
            raise cli.UserError(f"--initial={flags.initial!r} is not valid JSON ({e.msg})"
                                ) from None
    iterate(config, Path(flags.workdir), flags.rounds, initial)


def main(argv=None):
    cli.config_main(_run, define_flags=_define_flags, argv=argv)


if __name__ == "__main__":
    main()
