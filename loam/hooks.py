"""Loop hooks: what runs around the compiled step without living inside the loop.

The training loop (and the swarm's) calls each hook before every step with the training state
(online mixing rounds measure the model there), after every step with that step's metrics on
the host (per-domain loss sums and token counts of *every* step), after each evaluation, when a
checkpoint is saved (a hook may add its state to the checkpoint's metadata) and when one is
restored. Logging, token accounting, the schedule plot and the feedback that online mixing
controllers read are hooks; a new method adds a hook instead of a branch in the loop.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from loam import metrics as metrics_lib
from loam import paths, plot, plots


class Hook:
    """Every method is optional. ``name`` keys the hook's state in the checkpoint metadata."""

    name = ""

    def before_step(self, step: int, state: Any) -> None:
        """Before the batch of ``step`` is built, with the training state after ``step``
        updates (reading it waits for them). A hook may measure the model here (online mixing
        rounds); the state is donated to the step right after, so nothing may keep it."""

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        """``step`` is the 0-based index of the update whose host-side metrics these are;
        called once per step, in step order."""

    def on_eval(self, step: int, record: dict) -> None:
        """After an evaluation of the parameters at ``step`` (updates done)."""

    def on_save(self, step: int) -> dict | None:
        """State to store with the checkpoint of ``step`` (JSON-able), or None."""
        return None

    def on_restore(self, step: int, state: dict | None) -> None:
        """The state this hook stored with the checkpoint the run resumes from."""

    def on_end(self, step: int) -> None:
        """The loop stopped after ``step`` updates (finished, preempted or failed)."""


class Hooks(Hook):
    """A list of hooks called in order; itself a hook."""

    def __init__(self, hooks: Sequence[Hook | None]):
        self.hooks = [h for h in hooks if h is not None]
        names = [h.name for h in self.hooks if h.name]
        if len(set(names)) != len(names):
            raise ValueError(f"hook names repeat: {names}")

    def before_step(self, step, state):
        for h in self.hooks:
            h.before_step(step, state)

    def after_step(self, step, metrics):
        for h in self.hooks:
            h.after_step(step, metrics)

    def on_eval(self, step, record):
        for h in self.hooks:
            h.on_eval(step, record)

    def on_save(self, step):
        states = {h.name: h.on_save(step) for h in self.hooks if h.name}
        return {k: v for k, v in states.items() if v is not None}

    def on_restore(self, step, state):
        state = state or {}
        for h in self.hooks:
            h.on_restore(step, state.get(h.name) if h.name else None)

    def on_end(self, step):
        for h in self.hooks:
            h.on_end(step)


def domain_view(metrics: dict, domain_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(loss sums, tokens) of the stream's domains, in the stream's order, from step metrics
    whose per-domain vectors are indexed by global domain id."""
    ids = np.asarray(domain_ids)
    return (np.asarray(metrics["domain_loss_sum"], np.float64)[..., ids],
            np.asarray(metrics["domain_tokens"], np.float64)[..., ids])


class MixtureFeedback(Hook):
    """Hands every step's per-domain training losses to the stream's weight source (an online
    mixing controller); the stream decides when the source may see them (its feedback delay).

    A source may learn from another per-domain sum of the step's metrics (its
    ``feedback_metric``, e.g. DoReMi's excess loss); a loop passes ``metric`` when its step
    computes that sum, and a source whose sum the loop does not compute is refused here, before
    the first step.
    """

    def __init__(self, stream, metric: str = "domain_loss_sum"):
        self.stream, self.metric = stream, metric
        self.domain_ids = [int(i) for i in stream.domain_ids]
        wanted = getattr(stream.source, "feedback_metric", "domain_loss_sum")
        if wanted != metric:
            raise ValueError(
                f"the weight source {type(stream.source).__name__} learns from {wanted!r}, "
                f"which this training loop does not compute"
                f"{getattr(stream.source, 'feedback_hint', '')}")

    def after_step(self, step, metrics):
        loss_sums, tokens = domain_view(metrics, self.domain_ids)
        if self.metric != "domain_loss_sum":
            loss_sums = np.asarray(metrics[self.metric], np.float64)[..., self.domain_ids]
        self.stream.observe(step, loss_sums, tokens)


class MetricLogger(Hook):
    """metrics.jsonl + TensorBoard every ``log_every`` steps: loss per domain, learning rate,
    throughput and MFU, mixture weights, tokens consumed against the plan, and whatever the
    weight source reports of the step (its ``metrics_at(step)``, e.g. DoReMi's weights)."""

    def __init__(self, writer: metrics_lib.MetricWriter, stream, steps: int, log_every: int,
                 flops_per_token: float, peak_flops: float, start: int = 0):
        self.writer, self.stream = writer, stream
        self.steps, self.log_every = steps, log_every
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.domains = list(stream.names)
        self.domain_ids = [int(i) for i in stream.domain_ids]
        self.tokens_per_step = stream.batch_size * stream.seq_len
        self.progress = metrics_lib.Progress(steps, start, every=max(10, log_every))
        self.window_t, self.window_steps = time.time(), 0
        self._planned_at, self._planned = 0, np.zeros(len(self.domains))

    def planned_tokens(self, step: int) -> np.ndarray:
        """Token positions each domain should have had before ``step``: B·L·Σ_{s<step} w(s)."""
        if step < self._planned_at:
            self._planned_at, self._planned = 0, np.zeros(len(self.domains))
        for s in range(self._planned_at, step):
            self._planned = self._planned + self.tokens_per_step * self.stream.weights_at(s)
        self._planned_at = step
        return self._planned

    def after_step(self, step, m):
        self.window_steps += 1
        step_no = step + 1
        if step_no % self.log_every and step_no != self.steps:
            return
        now = time.time()
        tok_s = self.window_steps * self.tokens_per_step / max(now - self.window_t, 1e-9)
        self.window_t, self.window_steps = now, 0
        sums, tokens = domain_view(m, self.domain_ids)
        per_domain = {d: float(s / t) for d, s, t in zip(self.domains, sums, tokens) if t > 0}
        stats = self.stream.stats(step_no)
        loss = float(m["loss"])
        record = {
            "loss": loss, "loss_per_domain": per_domain, "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]), "tokens_per_s": tok_s,
            "mfu": self.flops_per_token * tok_s / self.peak,
            "mixture_weights": dict(zip(self.domains, map(float, self.stream.weights_at(step)))),
            "tokens_consumed": dict(zip(self.domains, map(int, stats["tokens"]))),
            "tokens_planned": dict(zip(self.domains, map(float, self.planned_tokens(step_no)))),
            "rows_consumed": dict(zip(self.domains, map(int, stats["rows"]))),
            "epochs_consumed": dict(zip(self.domains, map(float, stats["epochs"]))),
        }
        source_metrics = getattr(self.stream.source, "metrics_at", None)
        if source_metrics is not None:
            record.update(source_metrics(step))
        self.writer.write(step_no, record)
        self.progress.update(step_no, f"loss {loss:.3f} lr {record['lr']:.2e} {tok_s:,.0f} tok/s")


class SchedulePlot(Hook):
    """schedule.png: mixture weights and learning rate against step (and the per-domain
    weights a source plots beside them, its ``plotted_weights()``: DoReMi's α). A static source
    is drawn whole at the start; an adaptive one as realised so far, at every save and at the
    end."""

    def __init__(self, path: paths.PathLike, stream, lr_at, steps: int, enabled: bool = True):
        self.path, self.stream, self.lr_at, self.steps = paths.Path(path), stream, lr_at, steps
        self.enabled = enabled
        self.adaptive = bool(stream.source.adaptive)
        described = stream.source.describe() or {}
        self.stage_starts = [int(s["start"]) for s in described.get("stages", [])]
        if enabled and not self.adaptive:
            self._draw(steps)

    def _draw(self, upto: int):
        if self.enabled and upto > 0:
            extra = getattr(self.stream.source, "plotted_weights", None)
            plots.schedule_plot(self.path, self.stream.names, self.stream.weights_at, self.lr_at,
                                upto, self.stage_starts, extra() if extra else None)

    def on_save(self, step):
        if self.adaptive:
            self._draw(step)
        return None

    def on_end(self, step):
        if self.adaptive:
            self._draw(step)


class CurvesPlot(Hook):
    """curves.png: the run's per-domain training and held-out losses, realised mixture weights
    and downstream metrics (loam.plot), redrawn from its metrics.jsonl and eval.jsonl at every
    save and at the end."""

    def __init__(self, workdir: paths.PathLike, enabled: bool = True):
        self.workdir, self.enabled = paths.Path(workdir), enabled

    def _draw(self):
        if not (self.enabled and metrics_lib.jsonl_exists(self.workdir / "metrics.jsonl")):
            return
        try:
            plot.plot_runs([plot.read_curves(self.workdir)], self.workdir / "curves.png")
        except (OSError, ValueError) as e:  # a plot never stops (or masks the end of) a run
            print(f"warning: curves.png not drawn: {e}", flush=True)

    def on_save(self, step):
        self._draw()
        return None

    def on_end(self, step):
        self._draw()


class Profile(Hook):
    """A JAX profiler trace of the updates numbered ``steps`` (1-based, as in metrics.jsonl;
    from the first to the last listed) in DIR/tensorboard/plugins/profile/<time>/: the .xplane.pb
    that TensorBoard's profile plugin reads (``tensorboard --logdir DIR/tensorboard``) and
    perfetto_trace.json.gz for ui.perfetto.dev. Steps a resumed run has already passed are not
    traced."""

    def __init__(self, workdir: paths.PathLike, steps, total_steps: int):
        steps = list(steps) if isinstance(steps, (list, tuple)) else [steps]
        wanted = [int(s) for s in steps if isinstance(s, (int, float)) and not isinstance(
            s, bool) and float(s).is_integer()]
        if not steps or len(wanted) != len(steps) or any(
                s < 1 or s > total_steps for s in wanted):
            raise ValueError(f"profile_steps={list(steps)}: each must be an update number from "
                             f"1 to steps={total_steps}, e.g. --config.profile_steps='[5,6]'")
        self.first, self.last = min(wanted), max(wanted)
        self.dir = paths.Path(workdir) / "tensorboard"
        self.active = False

    def before_step(self, step, state):
        if step + 1 == self.first:
            jax.profiler.start_trace(str(self.dir), create_perfetto_trace=True)
            self.active = True

    def after_step(self, step, metrics):
        if self.active and step + 1 >= self.last:  # this step's results are on the host
            self._stop()

    def _stop(self):
        jax.profiler.stop_trace()
        self.active = False
        print(f"profiler trace of steps {self.first}-{self.last} in "
              f"{self.dir / 'plugins' / 'profile'}", flush=True)

    def on_end(self, step):
        if self.active:
            self._stop()


def stability_gap(records: Sequence[dict], first: int, old: Sequence[str] = ()) -> dict:
    """Per evaluated domain, from eval records (later records of a step win): the held-out
    loss at the run's first step, the worst (highest) loss after it and its step, the gap
    (worst - start) and the recovery step (the first evaluation after the worst whose loss is
    back at or below the start; None if none is)."""
    by_step = {int(r["step"]): r["per_domain"] for r in records if "per_domain" in r}
    steps = sorted(s for s in by_step if s >= first)
    out: dict[str, Any] = {"first_step": first, "eval_steps": steps, "old_domains": list(old),
                           "domains": {}}
    if first not in by_step:
        return out
    for d, start in by_step[first].items():
        curve = [(s, float(by_step[s][d]["loss"])) for s in steps if d in by_step[s]]
        later = [(s, x) for s, x in curve if s > first]
        if not later:
            continue
        worst_step, worst = max(later, key=lambda p: p[1])
        recovery = next((s for s, x in later if s > worst_step and x <= float(start["loss"])),
                        None)
        out["domains"][d] = {"start": float(start["loss"]), "worst_step": worst_step,
                             "worst_loss": worst, "gap": worst - float(start["loss"]),
                             "recovery_step": recovery, "curve": curve}
    return out


class StabilityGap(Hook):
    """stability_gap.json and stability_gap.png at the end of a run with dense early
    evaluation: the old domains' dip after the run's start and its recovery (``stability_gap``
    above), read from eval.jsonl, so a resumed run reports its whole history."""

    def __init__(self, workdir: paths.PathLike, first: int, old: Sequence[str] = (),
                 enabled: bool = True):
        self.dir, self.first, self.old = paths.Path(workdir), first, list(old)
        self.enabled = enabled

    def on_end(self, step):
        if not self.enabled or not paths.exists(self.dir / "eval.jsonl"):
            return
        report = stability_gap(metrics_lib.read_jsonl(self.dir / "eval.jsonl"), self.first,
                               self.old)
        paths.atomic_write(self.dir / "stability_gap.json", json.dumps(report, indent=2))
        if report["domains"]:
            self._plot(report)

    def _plot(self, report):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for d, r in report["domains"].items():
            xs, ys = zip(*r["curve"])
            line, = ax.plot(xs, ys, marker=".", label=d + (" (old)" if d in self.old else ""),
                            linewidth=2.0 if d in self.old else 1.0)
            ax.axhline(r["start"], color=line.get_color(), linestyle=":", linewidth=0.8)
            ax.plot([r["worst_step"]], [r["worst_loss"]], marker="v", color=line.get_color())
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss")
        ax.set_title("stability gap: loss from the run's start (dotted), worst (triangle)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        paths.atomic_write(self.dir / "stability_gap.png", png.getvalue())
