"""Trains a language model on a data mixture.

    python -m loam.train --config loam/configs/default.py --workdir runs/default \
        [--config.steps=200]

The run directory (a local path or gs://bucket/run, through loam.paths) receives the resolved
config, metrics.jsonl, TensorBoard events, orbax checkpoints and eval results. Restarting with
the same workdir resumes from the newest intact checkpoint and reproduces the uninterrupted run
exactly: the batch at step t is a pure function of (seed, config, t) and, for an online mixture,
of the weights log saved with the data position.

The loop is short on purpose: the compiled update (loam.step), the builders (loam.run) and the
hooks (loam.hooks) do the work; the next step is dispatched before the last step's metrics are
fetched.
"""

from __future__ import annotations

import math
import pathlib
import shutil
import signal
import time

import jax
import numpy as np

from loam import checkpoint as ckpt_lib
from loam import cli, paths, perf, wandb_logging
from loam import eval as eval_lib
from loam import hooks as hooks_lib
from loam import metrics as metrics_lib
from loam import run as run_lib
from loam import step as step_lib
from loam.data import curriculum
from loam.mixing.online import doremi, rounds
from loam.mixing.online.output import OutputMixture
from loam.model import sharding, sizes
from loam.workdir import LOCK_FILE, save_config, workdir_lock


class TrainingError(cli.UserError):
    """Stops a run with a message for the user; the exit code is non-zero."""


def _check_schedule_edit(saved, stream, start: int) -> dict | None:
    """Refuses a resume whose mixture schedule differs before `start`; returns the change if
    the edit only touches the future (it is logged), else None."""
    new = stream.source.describe()
    if saved is None or new is None or saved == new:
        return None
    step = curriculum.first_difference(saved, new, start, list(stream.names))
    if step is not None:
        raise TrainingError(
            f"the edited mixture schedule changes step {step}, before the resume step {start}: "
            "the past of a run cannot change. Edit only stages that start at or after step "
            f"{start}, or train into a new workdir")
    print(f"mixture schedule edited for steps >= {start}:\n  was {saved}\n  now {new}",
          flush=True)
    return {"schedule_before": saved, "schedule_after": new}


class Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary and exits.
    Installed before anything compiles, so a SIGTERM during the first compile is honoured too."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _has_checkpoints(directory: paths.epath.Path) -> bool:
    return any(p.name.isdigit() for p in paths.iterdir(directory))


def _check_resume(config, workdir: paths.epath.Path) -> None:
    """Refuses, before anything is written, a config that cannot continue the run in workdir."""
    if not paths.exists(workdir / "config.json"):
        return
    try:
        saved = run_lib.read_config(workdir)
    except run_lib.ConfigError:
        if _has_checkpoints(workdir / "checkpoints"):
            raise
        return  # a damaged config of a run that never saved a checkpoint: nothing to protect
    if not _has_checkpoints(workdir / "checkpoints"):
        return  # nothing trained yet: the new config simply replaces the old one
    problem = run_lib.resume_mismatch(saved, config)
    if problem:
        raise TrainingError(f"cannot resume {workdir}: {problem}")
    _check_lr_edit(saved, config, workdir)


# What moves an infinite schedule's learning rates, for naming an edit of the past.
_LR_FIELDS = ("optim.anneal_start", "optim.cooldown_steps", "optim.warmup_steps", "optim.lr",
              "optim.constant_lr_fraction", "optim.final_lr_fraction", "steps")


def _check_lr_edit(saved, config, workdir: paths.epath.Path) -> None:
    """An infinite schedule promises that only its future may be edited (a later anneal, more
    steps): a resume whose config changes the learning rate of an update the newest checkpoint
    has already taken (an anneal start or cooldown end moved before it) is refused."""
    if saved.optim.get("schedule") != "infinite" or config.optim.schedule != "infinite":
        return
    step = max(int(p.name) for p in paths.iterdir(workdir / "checkpoints") if p.name.isdigit())
    before = np.asarray(run_lib.lr_schedule(saved)(np.arange(step)))
    after = np.asarray(run_lib.lr_schedule(config)(np.arange(step)))
    changed = np.flatnonzero(~np.isclose(before, after, rtol=1e-6, atol=0.0))
    if changed.size == 0:
        return
    edits = ", ".join(f"{f} {run_lib._get(saved, f)} -> {run_lib._get(config, f)}"
                      for f in _LR_FIELDS if run_lib._get(saved, f) != run_lib._get(config, f))
    raise TrainingError(
        f"cannot resume {workdir}: the edited infinite schedule ({edits}) changes the learning "
        f"rate of update {int(changed[0])}, before the checkpoint's step {step}; a resumed run "
        f"may only edit the schedule's future: keep optim.anneal_start 0 or >= {step} and the "
        "warmup and cooldown as they were, or branch an anneal into a new workdir "
        "(loam/configs/anneal.py:from=DIR:STEP,steps=N)")


def train(config, workdir: paths.PathLike) -> dict | None:
    """Runs (or resumes) training; returns the final eval record ({"preempted_at": step} after
    a SIGTERM)."""
    preemption = Preemption()
    try:
        config, notes = run_lib.resolve_config(config)
        wandb_logging.check(config)  # on, but wandb not installed: refused here
        # A store orbax cannot write checkpoints to is refused before anything is created.
        ckpt_lib.check_directory(workdir)
        # A start from another run (config.init) is checked against it here, before anything
        # is created; a run resuming its own checkpoints keeps the init it started with.
        resuming = _has_checkpoints(paths.Path(workdir) / "checkpoints")
        config = run_lib.resolve_init(config, workdir, resuming=resuming)
        created = paths.is_local(workdir) and not paths.exists(workdir)
        run = paths.mkdir(workdir)
        try:
            with workdir_lock(run):
                _check_resume(config, run)
                return _train(config, run, notes, preemption)
        except BaseException:
            if created:
                _remove_if_unused(run)
            raise
    finally:
        preemption.restore()


def _remove_if_unused(run) -> None:
    """A run directory this command created and that holds no file but its lock (a config
    error found while building the model or data): removed, so a failed start leaves nothing
    behind. One holding anything else (metrics, a checkpoint) is kept."""
    root = pathlib.Path(run)
    if all(p.is_dir() or p.name == LOCK_FILE for p in root.rglob("*")):
        shutil.rmtree(root, ignore_errors=True)


def _train(config, workdir: paths.epath.Path, notes: list,
           preemption: Preemption) -> dict | None:
    is_main = jax.process_index() == 0
    for note in notes:
        print(f"note: {note}", flush=True)

    model = run_lib.build_model(config)
    mesh = run_lib.build_mesh(config)
    stream = run_lib.build_stream(config, jax.process_index(), jax.process_count())
    optimizer = run_lib.build_optimizer(config)
    state, shardings = step_lib.init_state(model, optimizer, jax.random.PRNGKey(config.seed),
                                           mesh, config.data.seq_len, config.data.batch_size)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    try:
        start, schedule_change, hook_state = 0, None, None
        restored = checkpointer.restore_latest(ckpt_lib.abstract_like(state, shardings))
        if restored is not None:
            state, meta = restored
            start = int(meta["step"])
            schedule_change = _check_schedule_edit(meta.get("schedule"), stream, start)
            stream.load_state(meta["data"])  # checks the position; restores an online log
            hook_state = meta.get("hooks")
            print(f"resumed from checkpoint at step {start}", flush=True)
        elif config.get("init") is not None and config.init.checkpoint:
            state, start, hook_state = _start_from(config, stream, state, shardings)
        # DoReMi's reference model, at the step the run started with (restored with the source).
        reference = (doremi.load_reference(stream.source, mesh, config.data.seq_len)
                     if isinstance(stream.source, doremi.DoReMi) else None)
        # Everything is validated: only now does the run directory change.
        if is_main:
            save_config(workdir, config)
        return _loop(config, workdir, model, mesh, stream, state, shardings, optimizer,
                     checkpointer, start, schedule_change, hook_state, preemption, reference)
    finally:
        checkpointer.wait()
        checkpointer.close()


def _start_from(config, stream, state, shardings):
    """(state, start step, hook state) of a run started from another run's checkpoint."""
    init = config.init
    state, start, meta = run_lib.restore_init(config, state, shardings)
    hook_state = None
    if meta is not None:  # carry=all: the source's data position too, when the data is the same
        try:
            stream.load_state(meta["data"])
            hook_state = meta.get("hooks")
        except ValueError:
            if stream.source.adaptive:
                raise TrainingError(
                    f"init.carry=all from {init.source} step {init.step}: an online mixing "
                    "method continues only over the source run's data and mixture, which this "
                    "config changes; keep them, or carry params or params+opt") from None
            print(f"note: this config's data differs from the source run's: its steps "
                  f"{start}.. read this config's mixture at those steps", flush=True)
    print(f"started from {init.source} step {init.step} (init.carry={init.carry}) at step "
          f"{start}", flush=True)
    return state, start, hook_state


def _token_weight_table(stream, num_domains: int):
    """step -> per-domain loss multipliers indexed by domain id (1 for domains the source does
    not weight), or None when the weight source reweights no tokens."""
    weights_of = getattr(stream.source, "token_weights", None)
    if weights_of is None:
        return None
    ids = dict(zip(stream.names, (int(i) for i in stream.domain_ids)))
    cols = [ids[d] for d in stream.source.domains]

    def table(step: int) -> np.ndarray:
        out = np.ones(num_domains, np.float32)
        out[cols] = weights_of(step)
        return out
    return table


def _reference_step(config, model, optimizer, mesh, shardings, reference: doremi.Reference):
    """(state, batch) -> (state, metrics) with the reference model run in the same step."""
    step = step_lib.make_train_step(
        model, optimizer, mesh, shardings, run_lib.num_domains(config),
        z_loss=config.optim.z_loss, accum_steps=config.optim.accum_steps,
        reference_model=reference.model, reference_shardings=reference.shardings)

    def train_step(state, batch):
        return step(state, batch, reference.params)
    return train_step


def _rounds_hook(config, workdir, model, mesh, stream, is_main: bool):
    """The hook that runs a rounds source's rounds (Aioli, Skill-it), or None."""
    source = stream.source
    if not isinstance(source, rounds.RoundsSource):
        return None
    return rounds.Rounds(source, source.make_lab(config, model, mesh), workdir / "rounds.json",
                         enabled=is_main)


def _loop(config, workdir, model, mesh, stream, state, shardings, optimizer, checkpointer,
          start, schedule_change, hook_state, preemption, reference=None) -> dict | None:
    is_main = jax.process_index() == 0
    steps = int(config.steps)
    train_step = (run_lib.build_train_step(config, model, optimizer, mesh, shardings)
                  if reference is None else
                  _reference_step(config, model, optimizer, mesh, shardings, reference))
    batch_sharding = sharding.batch_sharding(mesh)
    global_shape = (config.data.batch_size, config.data.seq_len)
    token_weight_table = _token_weight_table(stream, run_lib.num_domains(config))

    def device_batch(step: int):
        local = stream.batch(step)  # proposes the step's weights (and token weights)
        if token_weight_table is not None:
            local = dict(local, token_weights=token_weight_table(step)[local["domain_ids"]])
        return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v),
                                                          global_shape)
                for k, v in local.items()}

    evaluator = eval_lib.Evaluator(model, mesh, config, stream=stream)
    writer = metrics_lib.MetricWriter(workdir, "train", enabled=is_main)
    eval_writer = metrics_lib.MetricWriter(workdir, "eval", jsonl="eval.jsonl", enabled=is_main)
    model_cfg = model.cfg
    counts = sizes.count_params(model_cfg)
    if is_main:
        print(f"model {config.model.size}: {counts['total']:,} parameters "
              f"({counts['non_embedding']:,} non-embedding); mesh {dict(mesh.shape)}; "
              f"steps {start}->{steps}", flush=True)
    hooks = hooks_lib.Hooks([
        hooks_lib.MixtureFeedback(
            stream, "domain_loss_sum" if reference is None else "domain_excess_sum")
        if stream.source.adaptive else None,
        hooks_lib.MetricLogger(writer, stream, steps, config.log_every,
                               sizes.flops_per_token(model_cfg, config.data.seq_len),
                               perf.matmul_peak_flops() * jax.device_count(), start),
        hooks_lib.SchedulePlot(workdir / "schedule.png", stream, run_lib.lr_schedule(config),
                               steps, enabled=is_main),
        hooks_lib.CurvesPlot(workdir, enabled=is_main),
        hooks_lib.Profile(workdir, config.profile_steps, steps)
        if config.get("profile_steps") else None,
        OutputMixture(workdir, config, stream, enabled=is_main)
        if stream.source.adaptive else None,
        _rounds_hook(config, workdir, model, mesh, stream, is_main),
        hooks_lib.StabilityGap(workdir, run_lib.first_step(config),
                               (config.data.get("replay") or {}).get("domains") or [],
                               enabled=is_main)
        if config.get("eval_dense") and int(config.eval_dense.until) > 0 else None,
        wandb_logging.WandbLogger(config, workdir, writer)
        if is_main and wandb_logging.enabled(config) else None,
    ])
    hooks.on_restore(start, hook_state)
    if schedule_change and is_main:
        writer.write(start, {"event": "schedule_changed", **schedule_change})

    def after_step(step: int, metrics) -> None:
        m = jax.device_get(metrics)
        loss = float(m["loss"])
        if not math.isfinite(loss):
            good = checkpointer.steps()
            raise TrainingError(
                f"loss became non-finite ({loss}) at step {step}. The last good checkpoint "
                f"(step {good[-1] if good else 'none'}) is kept in {workdir / 'checkpoints'}. "
                "Lower optim.lr, raise optim.warmup_steps or tighten optim.clip_norm, then "
                "rerun the same command to resume from that checkpoint.")
        hooks.after_step(step, m)

    def save(step_no: int, force: bool = False):
        checkpointer.save(step_no, state, {"step": step_no, "data": stream.state_dict(step_no),
                                           "seed": int(config.seed),
                                           "schedule": stream.source.describe(),
                                           "hooks": hooks.on_save(step_no),
                                           "init": (config.init.to_dict()
                                                    if config.get("init") else None)},
                        force=force)
        writer.flush()  # the metrics of every saved step are durable (uploaded, on a store)

    def evaluate(step_no: int) -> dict:
        t = time.time()
        record = evaluator.run(state.params, step_no, eval_writer)
        hooks.on_eval(step_no, record)
        if is_main and step_no != steps:
            downstream = "".join(f"; {name} acc {m['acc']:.3f} (chance {m['chance']:.3f})"
                                 for name, m in record.get("downstream", {}).items()
                                 if "acc" in m and "chance" in m)
            print(f"eval at step {step_no}: mean loss {record['loss_domain_mean']:.3f}"
                  f"{downstream} ({time.time() - t:.0f}s)", flush=True)
        return record

    last_eval, pending, step_no = None, None, start
    try:
        if start == run_lib.first_step(config) and run_lib.eval_due(config, start, steps):
            evaluate(start)  # the model the run starts with: where a stability gap is measured
        for step in range(start, steps):
            hooks.before_step(step, state)
            state, metrics = train_step(state, device_batch(step))
            if pending is not None:
                after_step(*pending)
            pending = (step, metrics)
            step_no = step + 1
            boundary = step_no % config.checkpoint_every == 0 or step_no == steps
            eval_now = run_lib.eval_due(config, step_no, steps)
            if boundary or eval_now or preemption.requested:
                after_step(*pending)
                pending = None
            if boundary or preemption.requested:
                save(step_no, force=preemption.requested)
            if eval_now:
                if is_main and step_no == steps:
                    print("final evaluation...", flush=True)
                last_eval = evaluate(step_no)
            if preemption.requested:
                checkpointer.wait()
                print(f"\nSIGTERM: saved checkpoint at step {step_no}; rerun the same command "
                      "to resume.", flush=True)
                return {"preempted_at": step_no}
        if pending is not None:
            after_step(*pending)
        if start >= steps:
            last_eval = evaluate(steps)
    finally:
        hooks.on_end(step_no)
        writer.close()
        eval_writer.close()
    if is_main and last_eval:
        print(eval_lib.format_table(last_eval), flush=True)
    return last_eval


def _define_flags(flags):
    flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has checkpoints).")
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs "
                        "(jax.distributed); not needed on TPU VMs, where it is discovered.")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                      "auto-detection (TPU VM slices, SLURM).")


def _run(config, flags) -> None:
    if flags.coordinator:
        jax.distributed.initialize(flags.coordinator, flags.num_processes, flags.process_id)
    elif flags.distributed:
        jax.distributed.initialize()
    train(config, flags.workdir)


def main(argv=None):
    cli.config_main(_run, define_flags=_define_flags, argv=argv)


if __name__ == "__main__":
    main()
