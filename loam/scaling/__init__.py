"""Scaling laws fitted to a table of runs: Chinchilla approaches 1-3 (laws.py), the CMR law of
continual pretraining (cmr.py) and data-constrained scaling (data_constrained.py).

Command line: python -m loam.scaling.fit.
"""

from loam.scaling.laws import (
    AllocationFit,
    Approach3Fit,
    Bootstrap,
    ChinchillaLaw,
    PowerLaw,
    ScalingFitError,
    bootstrap_chinchilla,
    fit_chinchilla,
    fit_envelope,
    fit_isoflop,
    group_budgets,
    initial_grid,
)

__all__ = [
    "AllocationFit", "Approach3Fit", "Bootstrap", "ChinchillaLaw", "PowerLaw", "ScalingFitError",
    "bootstrap_chinchilla", "fit_chinchilla", "fit_envelope", "fit_isoflop", "group_budgets",
    "initial_grid",
]
