"""Trains a language model on a data mixture.

    python -m loam.train --config loam/configs/default.py --workdir runs/default [--config.steps=200]

The run directory receives the resolved config, metrics.jsonl, TensorBoard events, orbax
checkpoints and eval results. Restarting with the same workdir resumes from the newest intact
checkpoint and reproduces the uninterrupted run exactly: the batch at step t is a pure function of
(seed, config, t), and the data position is saved with the parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from loam import checkpoint as ckpt_lib
from loam import eval as eval_lib
from loam import metrics as metrics_lib
from loam import perf, plots
from loam import step as step_lib
from loam.data import corpora, curriculum, mixture, objectives
from loam.data import vocab as vocab_lib
from loam.model import sharding, sizes
from loam.model.transformer import Transformer


class TrainingError(RuntimeError):
    """Stops a run with a message for the user; the exit code is non-zero."""


def build_model_config(config, vocab_size: int):
    cfg = sizes.get_size(config.model.size, vocab_size)
    shape = {k: int(config.model.get(k, 0) or 0)
             for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")}
    shape = {k: v for k, v in shape.items() if v > 0}
    if shape:  # head_dim and kv heads are re-derived from the new shape unless given
        if "n_heads" in shape and "n_kv_heads" not in shape:
            shape["n_kv_heads"] = shape["n_heads"]
        cfg = dataclasses.replace(cfg, head_dim=None, **shape)
    return dataclasses.replace(
        cfg, remat=config.model.remat, tied_embeddings=config.model.tied_embeddings,
        dtype=config.model.dtype, max_len=config.data.seq_len)


def build_stream(config, process_index: int = 0, process_count: int = 1):
    schedule = curriculum.schedule_from_config(config)
    return mixture.MixtureStream(
        domains=list(config.data.domains),
        objective=objectives.get_objective(config.data.objective),
        weights_schedule=schedule, seq_len=config.data.seq_len,
        batch_size=config.data.batch_size, seed=config.seed,
        data_dir=config.data.dir or None, scores_dir=config.data.get("scores_dir") or None,
        process_index=process_index, process_count=process_count)


def lr_schedule(config):
    o = config.optim
    return step_lib.lr_schedule(o.schedule, o.lr, config.steps, o.warmup_steps,
                                final_fraction=o.final_lr_fraction,
                                decay_fraction=o.decay_fraction)


def _save_config(config, workdir: Path):
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    path = workdir / "config.json"
    if path.exists() and json.loads(path.read_text()) != json.loads(text):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path.rename(workdir / f"config.{stamp}.json")  # keep the history of edited configs
    path.write_text(text)


def _check_schedule_edit(saved, stream, start: int, domains) -> dict | None:
    """Refuses a resume whose schedule differs before `start`; returns the change if the edit
    only touches the future (it is logged), else None."""
    new = curriculum.describe(stream.schedule)
    if saved is None or new is None or saved == new:
        return None
    step = curriculum.first_difference(saved, new, start, domains)
    if step is not None:
        raise ValueError(
            f"the edited mixture schedule changes step {step}, before the resume step {start}: "
            "the past of a run cannot change. Edit only stages that start at or after step "
            f"{start}, or train into a new workdir")
    print(f"mixture schedule edited for steps >= {start}:\n  was {saved}\n  now {new}",
          flush=True)
    return {"schedule_before": saved, "schedule_after": new}


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir: str | Path) -> dict:
    """Runs (or resumes) training; returns the final eval record."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        _save_config(config, workdir)

    vocab = vocab_lib.default_vocabulary()
    model_cfg = build_model_config(config, vocab.vocab_size)
    model = Transformer(model_cfg)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    stream = build_stream(config, jax.process_index(), jax.process_count())
    domains = list(config.data.domains)
    num_domains = len(corpora.DOMAIN_NAMES)  # batches carry global domain ids
    domain_ids = [int(i) for i in stream.domain_ids]

    schedule = lr_schedule(config)
    o = config.optim
    optimizer = step_lib.make_optimizer(schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                                        clip_norm=o.clip_norm)
    state, shardings = step_lib.init_state(model, optimizer, jax.random.PRNGKey(config.seed),
                                           mesh, config.data.seq_len, config.data.batch_size)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    start, schedule_change = 0, None
    restored = checkpointer.restore_latest(ckpt_lib.abstract_like(state, shardings))
    if restored is not None:
        state, meta = restored
        start = int(meta["step"])
        schedule_change = _check_schedule_edit(meta.get("schedule"), stream, start, domains)
        stream.check_state(meta["data"])  # the data position must be the one this config gives
        print(f"resumed from checkpoint at step {start}", flush=True)

    train_step = step_lib.make_train_step(model, optimizer, mesh, shardings, num_domains,
                                          z_loss=o.z_loss, accum_steps=o.accum_steps)
    batch_sharding = sharding.batch_sharding(mesh)
    global_shape = (config.data.batch_size, config.data.seq_len)

    def device_batch(step: int):
        local = stream.batch(step)
        return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v),
                                                          global_shape)
                for k, v in local.items()}

    evaluator = eval_lib.Evaluator(model, mesh, config, stream=stream)
    writer = metrics_lib.MetricWriter(workdir, "train", enabled=is_main)
    eval_writer = metrics_lib.MetricWriter(workdir, "eval", jsonl="eval.jsonl", enabled=is_main)
    flops_per_token = sizes.flops_per_token(model_cfg, config.data.seq_len)
    peak = perf.matmul_peak_flops() * jax.device_count()
    tokens_per_step = config.data.batch_size * config.data.seq_len
    counts = sizes.count_params(model_cfg)
    if is_main:
        print(f"model {config.model.size}: {counts['total']:,} parameters "
              f"({counts['non_embedding']:,} non-embedding); mesh {dict(mesh.shape)}; "
              f"steps {start}->{config.steps}", flush=True)

    if is_main:
        plots.schedule_plot(workdir / "schedule.png", domains, stream.weights_at, schedule,
                            config.steps, [s.start for s in getattr(stream.schedule, "stages", [])])
    if restored is not None and schedule_change and is_main:
        writer.write(start, {"event": "schedule_changed", **schedule_change})
    preemption = _Preemption()
    progress = metrics_lib.Progress(config.steps, start, every=max(10, config.log_every))
    last_eval = None
    pending = None  # (step, metrics on device): fetched after the next step is dispatched
    window_t, window_steps = time.time(), 0

    planned_memo = {0: np.zeros(len(domains))}

    def planned_positions(step_no: int) -> np.ndarray:
        """Token positions each domain should have had before step_no: B·L·Σ_{s<t} w(s)."""
        last = max(k for k in planned_memo if k <= step_no)
        acc = planned_memo[last]
        for s_ in range(last, step_no):
            acc = acc + tokens_per_step * stream.weights_at(s_)
        planned_memo.clear()
        planned_memo[step_no] = acc
        return acc

    def finish(step_done: int, metrics) -> None:
        nonlocal window_t, window_steps
        m = jax.device_get(metrics)
        loss = float(m["loss"])
        if not math.isfinite(loss):
            good = checkpointer.steps()
            raise TrainingError(
                f"loss became non-finite ({loss}) at step {step_done}. The last good checkpoint "
                f"(step {good[-1] if good else 'none'}) is kept in {workdir / 'checkpoints'}. "
                "Lower optim.lr, raise optim.warmup_steps or tighten optim.clip_norm, then "
                "rerun the same command to resume from that checkpoint.")
        window_steps += 1
        step_no = step_done + 1
        if step_no % config.log_every and step_no != config.steps:
            return
        now = time.time()
        tok_s = window_steps * tokens_per_step / max(now - window_t, 1e-9)
        window_t, window_steps = now, 0
        per_domain = {d: float(m["domain_loss_sum"][i] / m["domain_tokens"][i])
                      for d, i in zip(domains, domain_ids) if m["domain_tokens"][i] > 0}
        weights = stream.weights_at(step_done)
        stats = stream.stats(step_no)
        planned = planned_positions(step_no)
        record = {
            "loss": loss, "loss_per_domain": per_domain, "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]), "tokens_per_s": tok_s,
            "mfu": flops_per_token * tok_s / peak,
            "mixture_weights": {d: float(w) for d, w in zip(domains, weights)},
            "tokens_consumed": {d: int(t) for d, t in zip(domains, stats["tokens"])},
            "tokens_planned": {d: float(t) for d, t in zip(domains, planned)},
            "rows_consumed": {d: int(r) for d, r in zip(domains, stats["rows"])},
            "epochs_consumed": {d: float(e) for d, e in zip(domains, stats["epochs"])},
        }
        writer.write(step_no, record)
        progress.update(step_no, f"loss {loss:.3f} lr {record['lr']:.2e} {tok_s:,.0f} tok/s")

    def save(step_no: int, force: bool = False):
        checkpointer.save(step_no, state, {"step": step_no, "data": stream.state_dict(step_no),
                                           "seed": int(config.seed),
                                           "schedule": curriculum.describe(stream.schedule)},
                          force=force)

    try:
        step = start
        for step in range(start, config.steps):
            batch = device_batch(step)
            state, metrics = train_step(state, batch)
            if pending is not None:
                finish(*pending)
            pending = (step, metrics)
            step_no = step + 1
            boundary = step_no % config.checkpoint_every == 0 or step_no == config.steps
            if boundary or preemption.requested or step_no % config.eval_every == 0:
                finish(*pending)
                pending = None
            if boundary or preemption.requested:
                save(step_no, force=preemption.requested)
            if step_no % config.eval_every == 0 or step_no == config.steps:
                last_eval = evaluator.run(state.params, step_no, eval_writer)
            if preemption.requested:
                checkpointer.wait()
                print(f"\nSIGTERM: saved checkpoint at step {step_no}; rerun the same command "
                      "to resume.", flush=True)
                return {"preempted_at": step_no}
        if pending is not None:
            finish(*pending)
        if start >= config.steps:
            last_eval = evaluator.run(state.params, config.steps, eval_writer)
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        eval_writer.close()
        preemption.restore()
    if is_main and last_eval:
        print(eval_lib.format_table(last_eval), flush=True)
    return last_eval


def main(argv=None):
    from absl import app, flags
    from absl import logging as absl_logging
    from ml_collections import config_flags

    flags_ = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "Path to a get_config(arg) file, e.g. "
                                    "loam/configs/default.py[:arg]", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has checkpoints).")
    flags.mark_flags_as_required(["config", "workdir"])
    flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs "
                        "(jax.distributed); not needed on TPU VMs, where it is discovered.")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                      "auto-detection (TPU VM slices, SLURM).")

    def _main(_):
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes
        if flags_.coordinator:
            jax.distributed.initialize(flags_.coordinator, flags_.num_processes,
                                       flags_.process_id)
        elif flags_.distributed:
            jax.distributed.initialize()
        try:
            train(flags_.config, flags_.workdir)
        except (TrainingError, ValueError, FileNotFoundError) as e:
            print(f"\nerror: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
