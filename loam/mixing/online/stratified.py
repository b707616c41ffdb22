"""Stratified sampling: every domain of the mixture at the same weight, whatever
``config.data.weights`` says. With ``proportional`` it is the baseline online methods must beat
(Aioli found most do not), chosen through the same ``config.mixing.method`` axis:

    python -m loam.train --config loam/configs/default.py --config.mixing.method=stratified ...
"""

from __future__ import annotations

from collections.abc import Sequence

from loam import run as run_lib
from loam.data import recipes
from loam.data.schedules import ConstantWeights


def recipe_source(config, domains: Sequence[str], method: str, recipe: str) -> ConstantWeights:
    """Constant weights of ``recipe`` over the prepared ``domains`` (a static source: nothing is
    saved with checkpoints)."""
    if config.data.get("stages"):
        raise ValueError(f"config.mixing.method={method!r} gives constant {recipe} weights and "
                         "cannot follow config.data.stages; clear the stages "
                         "(--config.data.stages='[]') or use --config.mixing.method=static")
    weights = recipes.recipe_weights(recipe, domains, catalog=run_lib.build_catalog(config))
    return ConstantWeights(weights, domains)


def make_source(config, domains: Sequence[str]) -> ConstantWeights:
    return recipe_source(config, domains, "stratified", "uniform")
