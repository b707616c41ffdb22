"""Token-proportional sampling: each domain weighted by its prepared training tokens, whatever
``config.data.weights`` says (the natural mixture of the corpus; DoReMi's default reference).
A baseline of the ``config.mixing.method`` axis, beside ``stratified``:

    python -m loam.train --config loam/configs/default.py --config.mixing.method=proportional ...
"""

from __future__ import annotations

from collections.abc import Sequence

from loam.data.schedules import ConstantWeights
from loam.mixing.online.stratified import recipe_source


def make_source(config, domains: Sequence[str]) -> ConstantWeights:
    return recipe_source(config, domains, "proportional", "proportional")
