"""Plots a run writes next to its metrics (matplotlib, no display needed)."""

from __future__ import annotations

import io

import numpy as np

from loam import paths


def schedule_plot(path: paths.PathLike, domains, weights_at, lr_at, steps: int,
                  stage_starts=(), extra=None) -> paths.epath.Path:
    """Mixture weights (stacked) and learning rate against step, with stage boundaries.
    ``extra`` = (label, step -> weights per domain) adds a panel of other per-domain weights
    a method keeps beside the sampling mixture (DoReMi's domain weights α)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.unique(np.linspace(0, steps - 1, min(steps, 1000)).astype(int))
    w = np.stack([np.asarray(weights_at(int(s)), float) for s in xs])
    lr = np.array([float(lr_at(int(s))) for s in xs])
    panels = 3 if extra is not None else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 5.5 + 2.5 * (panels - 2)), sharex=True,
                             gridspec_kw={"height_ratios": [2] * (panels - 1) + [1]})
    ax_w, ax_lr = axes[0], axes[-1]
    ax_w.stackplot(xs, w.T, labels=list(domains), step="post")
    ax_w.set_ylabel("mixture weight")
    ax_w.set_ylim(0, 1)
    ax_w.legend(loc="upper left", fontsize=8, ncol=len(domains))
    if extra is not None:
        label, extra_at = extra
        e = np.stack([np.asarray(extra_at(int(s)), float) for s in xs])
        axes[1].stackplot(xs, e.T, labels=list(domains), step="post")
        axes[1].set_ylabel(label)
        axes[1].set_ylim(0, 1)
    ax_lr.plot(xs, lr, color="black")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    for s in stage_starts:
        if s > 0:
            for ax in axes:
                ax.axvline(s, color="grey", linestyle="--", linewidth=0.8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return paths.atomic_write(path, png.getvalue())  # one object on a store, whole locally
