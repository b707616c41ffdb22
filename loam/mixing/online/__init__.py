"""Online mixing controllers: weight sources that read the training losses.

One module per method, chosen by ``config.mixing.method = "<module>"``; each exports
``make_source(config, domains) -> loam.data.weights.WeightSource`` with ``adaptive = True``
(see ``loam.data.weights.source_from_config`` and ``FEEDBACK_DELAY``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loam.data import recipes


def settings(config, method: str, defaults: dict, hint: str = "") -> dict:
    """``config.mixing.<method>`` over ``defaults``; unknown keys refused in one line."""
    given = (config.get("mixing") or {}).get(method) or {}
    given = dict(given.to_dict() if hasattr(given, "to_dict") else given)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"config.mixing.{method} has unknown key(s) {unknown}; known: "
                         f"{sorted(defaults)}{hint}")
    return {**defaults, **given}


def initial_weights(config, domains: Sequence[str]) -> np.ndarray:
    """``config.data.weights`` over ``domains`` (a method's starting or base mixture)."""
    try:
        return recipes.config_weights(config, domains=domains)
    except ValueError as e:
        raise ValueError(f"config.data.weights={config.data.weights!r}: {e}") from None
