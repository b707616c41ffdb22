"""Weight recipes: mixture weights computed from the domains' sizes, and their registry.

A recipe is named in a config as a string: "uniform", "proportional", "temperature:T" or
"unimax:MAX_EPOCHS" (``RECIPES``); ``recipe_weights`` turns such a string into weights. The
functions also work on their own: a dict of sizes in gives a dict out, an array in an array out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from loam.data import catalog as catalog_lib


def _as_array(sizes) -> tuple[list | None, np.ndarray]:
    if isinstance(sizes, Mapping):
        names = list(sizes)
        arr = np.array([float(sizes[k]) for k in names])
    else:
        names, arr = None, np.asarray(sizes, np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("no domains given; list at least one domain with its size")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"domain sizes must be finite and non-negative, got {arr}")
    return names, arr


def _like(names, arr):
    w = arr / arr.sum()
    return dict(zip(names, map(float, w))) if names is not None else w


def proportional(sizes):
    """Weights proportional to domain sizes (a dict in, a dict out; an array in, an array out)."""
    names, s = _as_array(sizes)
    if s.sum() <= 0:
        raise ValueError("all domain sizes are zero; proportional weights need some data")
    return _like(names, s)


def temperature(sizes, T: float):
    """Weights proportional to size^(1/T): T=1 is proportional, large T tends to uniform."""
    if not T > 0:
        raise ValueError(f"temperature must be positive, got {T}")
    names, s = _as_array(sizes)
    if s.sum() <= 0:
        raise ValueError("all domain sizes are zero; temperature weights need some data")
    return _like(names, np.where(s > 0, s / s.max(), 0.0) ** (1.0 / T))


def uniform(domains):
    """Equal weights; ``domains`` is a count or a list of names (then a dict is returned)."""
    if isinstance(domains, int):
        if domains < 1:
            raise ValueError("uniform weights need at least one domain")
        return np.full(domains, 1.0 / domains)
    domains = list(domains)
    if not domains:
        raise ValueError("uniform weights need at least one domain")
    return {d: 1.0 / len(domains) for d in domains}


def unimax(sizes, budget_tokens: float, max_epochs: float):
    """UniMax (Chung et al., 2023): spread the token budget uniformly over domains, but never
    more than ``max_epochs`` passes over any domain; what a capped domain cannot use is shared
    among the rest (smallest domains are settled first)."""
    if not budget_tokens > 0 or not max_epochs > 0:
        raise ValueError(f"unimax needs a positive budget and max_epochs, got {budget_tokens}, "
                         f"{max_epochs}")
    names, s = _as_array(sizes)
    alloc = np.zeros_like(s)
    remaining = float(budget_tokens)
    order = np.argsort(s, kind="stable")
    for k, i in enumerate(order):
        share = remaining / (len(s) - k)
        alloc[i] = min(share, s[i] * max_epochs)
        remaining -= alloc[i]
    if alloc.sum() <= 0:
        raise ValueError("unimax gave every domain zero tokens; the domains hold no data")
    return _like(names, alloc)


def validate_weights(weights, domains: Sequence[str]) -> np.ndarray:
    """Weights (a dict name->weight or one number per domain) as a normalised array in the order
    of ``domains``. Raises ValueError naming the problem and the fix."""
    domains = list(domains)
    if not domains:
        raise ValueError("the mixture has no domains; list at least one domain")
    if hasattr(weights, "to_dict"):
        weights = weights.to_dict()
    if isinstance(weights, Mapping):
        if not weights:
            raise ValueError("mixture weights are empty; give a weight for at least one of "
                             f"{domains}")
        unknown = [k for k in weights if k not in domains]
        if unknown:
            raise ValueError(f"mixture weights name {unknown}, which are not in the mixture's "
                             f"domains {domains}; fix the names or add those domains")
        w = np.array([float(weights.get(d, 0.0)) for d in domains])
    else:
        try:
            w = np.asarray(weights, np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"mixture weights {weights!r} are not numbers; give a dict "
                             "domain->weight or one number per domain") from None
        if w.size == 0:
            raise ValueError(f"mixture weights are empty; give one weight per domain {domains}")
        if w.size != len(domains):
            raise ValueError(f"got {w.size} mixture weights for {len(domains)} domains "
                             f"{domains}; give one weight per domain or a dict")
    total = float(w.sum())
    if total > 0 and math.isfinite(total) and float(w.min()) >= 0:  # the common, valid case
        return w / total
    if np.any(np.isnan(w)) or np.any(np.isinf(w)):
        raise ValueError(f"mixture weights contain NaN or infinity ({w.tolist()}); give finite "
                         "weights")
    if np.any(w < 0):
        raise ValueError(f"mixture weights must be non-negative, got {w.tolist()}; use 0 to "
                         "leave a domain out")
    if w.sum() <= 0:
        raise ValueError(f"mixture weights are all zero for {domains}; give at least one "
                         "domain a positive weight")
    return w / w.sum()


def domain_sizes(domains: Sequence[str], data_dir=None, catalog=None) -> np.ndarray:
    """Training tokens of each domain (preparing it on first use)."""
    catalog = catalog or catalog_lib.default(data_dir)
    return np.array([catalog.num_tokens(d, "train") for d in domains], np.float64)


# ----------------------------------------------------------------------------- the registry


class Recipe(NamedTuple):
    usage: str                 # how it is written in a config
    needs_sizes: bool
    make: Callable[[int, np.ndarray | None, str, float | None], np.ndarray]
    # make(number of domains, sizes, argument after ':', token budget) -> weights


def _unimax(n, sizes, arg, budget):
    if budget is None:
        raise ValueError("unimax needs the run's token budget (steps * batch_size * seq_len)")
    return unimax(sizes, budget, float(arg or 4.0))


RECIPES: dict[str, Recipe] = {
    "uniform": Recipe("uniform", False, lambda n, sizes, arg, budget: uniform(n)),
    "proportional": Recipe("proportional", True,
                           lambda n, sizes, arg, budget: proportional(sizes)),
    "temperature": Recipe("temperature:T", True,
                          lambda n, sizes, arg, budget: temperature(sizes, float(arg or 1.0))),
    "unimax": Recipe("unimax:MAX_EPOCHS", True, _unimax),
}


def recipe_weights(recipe: str, domains: Sequence[str], sizes=None,
                   budget_tokens: float | None = None, data_dir=None,
                   catalog=None) -> np.ndarray:
    """The weights (an array in the order of ``domains``) of a recipe string such as "uniform",
    "proportional", "temperature:2" or "unimax:4". ``sizes`` (training tokens per domain) are
    read from the corpora when a recipe needs them and none are given; ``budget_tokens`` is the
    run's token budget, which only unimax needs."""
    name, _, arg = str(recipe).partition(":")
    if name not in RECIPES:
        raise ValueError(f"{recipe!r} is not a recipe; use "
                         f"{', '.join(repr(r.usage) for r in RECIPES.values())}, a dict or a list")
    r = RECIPES[name]
    domains = list(domains)
    if r.needs_sizes:
        sizes = (domain_sizes(domains, data_dir, catalog) if sizes is None
                 else np.asarray(sizes, float))
        if sizes.shape != (len(domains),):
            raise ValueError(f"got {sizes.size} domain sizes for {len(domains)} domains")
    try:
        w = r.make(len(domains), sizes, arg, budget_tokens)
    except ValueError as e:
        raise ValueError(f"recipe {recipe!r}: {e}") from None
    return validate_weights(w, domains)


def config_weights(config, weights=None, domains: Sequence[str] | None = None) -> np.ndarray:
    """Weights of the run ``config`` as an array in the order of ``domains`` (default
    ``config.data.domains``). ``weights`` (default ``config.data.weights``) is a dict, a list or
    a recipe string; a recipe's token budget is the run's, steps * batch_size * seq_len."""
    data = config.data
    domains = list(catalog_lib.mixture_domains(config) if domains is None else domains)
    w = data.weights if weights is None else weights
    if isinstance(w, str):
        budget = int(config.steps) * int(data.batch_size) * int(data.seq_len)
        return recipe_weights(w, domains, budget_tokens=budget,
                              catalog=catalog_lib.for_config(config))
    return validate_weights(w, domains)
