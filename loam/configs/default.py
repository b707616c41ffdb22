"""The default job: a 3.1M-parameter model on the bundled five-domain mixture (≈1.2M tokens).

    python -m loam.train --config loam/configs/default.py --workdir runs/default
    python -m loam.train --config loam/configs/default.py:size=small,steps=5000 --workdir ...
    python -m loam.train --config loam/configs/default.py --config.steps=200 --workdir ...

The argument after ':' is a comma-separated list of key=value pairs (big_vision style);
`runlocal` shrinks everything for a smoke test.
"""

import ml_collections

from loam.data.corpora import DOMAIN_NAMES

RUNLOCAL = dict(size="nano", steps=20, seq_len=64, batch_size=8)


def parse_arg(arg: str | None, presets: dict | None = None,
              **defaults) -> ml_collections.ConfigDict:
    """'size=mini,steps=200,runlocal' -> ConfigDict with typed values (from the defaults).

    `presets` maps a switch (a bool argument such as `runlocal`) to argument values it sets;
    values given explicitly win over a preset, in any order: `runlocal,steps=50` is 50 steps.
    """
    explicit = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            explicit[key] = value.lower() in ("", "1", "true", "yes")
            continue
        try:
            explicit[key] = kind(value)
        except ValueError:
            raise ValueError(f"config argument {key}={value!r} is not a valid "
                             f"{kind.__name__}") from None
    out = ml_collections.ConfigDict(defaults)
    for switch, values in (presets or {}).items():
        if explicit.get(switch, defaults.get(switch)):
            out.update({k: v for k, v in values.items() if k not in explicit})
    out.update(explicit)
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, presets={"runlocal": RUNLOCAL}, size="tiny", steps=300, seq_len=256,
                  batch_size=16, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = a.steps

    c.model = ml_collections.ConfigDict()
    c.model.size = a.size
    # Explicit shape (e.g. from loam.model.sizes.pick_size in a scaling sweep); a nonzero field
    # replaces the named size's, 0 keeps it. n_kv_heads 0 with n_heads set means multi-head.
    c.model.d_model = 0
    c.model.n_layers = 0
    c.model.n_heads = 0
    c.model.n_kv_heads = 0
    c.model.mlp_dim = 0
    c.model.remat = False  # True: recompute each layer in the backward pass (less memory)
    c.model.tied_embeddings = False
    # Compute type. "bfloat16": mixed precision, i.e. bfloat16 matmuls and activations on
    # float32 weights and optimizer state, float32 norms, softmax, logits and loss.
    c.model.dtype = "float32"
    # The training loss: "fused" (the output projection and cross-entropy a chunk of positions at
    # a time, never the whole logits; loam/model/loss.py) or "logits" (the full logits, then the
    # loss). Equal within float rounding.
    c.model.loss_impl = "fused"
    # The attention core: "manual" (its own VJP, head-major batched matmuls;
    # loam/model/attention.py), "xla" (the plain einsum/softmax path under autodiff), "splash"
    # (TPU's fused causal kernel; causal objective only; interpreted, slowly, off TPU) or
    # "causal_blocks" (the manual core per block of attention_block query rows over the keys up
    # to the block's end, skipping the masked blocks above the diagonal; causal objective only).
    # Equal within float rounding.
    c.model.attention_impl = "manual"
    c.model.attention_block = 128
    # What the backward pass keeps of each layer's forward pass (unless remat): "dots" (the
    # weight matmuls' outputs; the rest is recomputed) or "all" (everything autodiff saves).
    c.model.residuals = "dots"

    c.data = ml_collections.ConfigDict()
    # Domain name -> source, in the order of the domain ids: "bundled:NAME", "jsonl:GLOB",
    # "parquet:GLOB", "text:GLOB", "tfds:NAME[:VERSION]", "hf:PATH", "seqio:TASK", or a dict
    # {"source": ..., options} (loam/data/sources/). Default: the five bundled corpora.
    c.data.sources = {name: f"bundled:{name}" for name in DOMAIN_NAMES}
    # The tokenizer: "bundled", a SentencePiece model file or a Hugging Face tokenizer.json.
    c.data.tokenizer = "bundled"
    # Where prepared token shards live; empty: $LOAM_CACHE_DIR/prepared or ~/.cache/loam/prepared.
    c.data.prepared_dir = ""
    c.data.domains = []  # the domains the mixture trains on, in order; empty: every source
    c.data.objective = "causal"
    # Per-domain weights, or a recipe: "proportional", "uniform", "temperature:T".
    c.data.weights = "uniform"
    c.data.seq_len = a.seq_len
    c.data.batch_size = a.batch_size
    c.data.dir = ""  # where bundled: sources are read; empty: $LOAM_DATA_DIR or the repository
    c.data.scores_dir = ""  # score columns (loam.selection.score); empty: next to the corpora
    # Curriculum stages (see loam/data/curriculum.py); empty: `weights` for the whole run.
    c.data.stages = []
    # Document selection per domain (loam/data/views.py): {domain: {"score": column or
    # {column: weight}, "policy": "threshold|top|gumbel", "fraction"/"tokens"/"threshold"/
    # "temperature": ..., "repeat": column}}; a stage's order/keep apply within it.
    c.data.selection = {}
    c.data.interpolate = False
    # Replay (continual pretraining): `fraction` (in [0, 1); 0: off) of every batch from the
    # old `domains`, shared by `weights` (a recipe or a dict); the other domains share the rest.
    c.data.replay = ml_collections.ConfigDict(
        {"fraction": 0.0, "domains": [], "weights": "proportional"})
    c.mixing = ml_collections.ConfigDict()
    # "static": data.weights or data.stages. Else a module of loam/mixing/online/: the baselines
    # "stratified" (uniform) and "proportional" (training tokens), or an online controller
    # ("odm", "doremi", "aioli", "skillit", "greedy_loss"), whose hyperparameters sit in the
    # block of its name.
    c.mixing.method = "static"
    c.mixing.odm = ml_collections.ConfigDict({"alpha": 0.9})  # EXP3 reward smoothing, in [0, 1)
    # DoReMi: the reference run's workdir (trained first with loam.train on the reference
    # weights), step size > 0, smoothing in [0, 1).
    c.mixing.doremi = ml_collections.ConfigDict(
        {"reference": "", "step_size": 1.0, "smoothing": 1e-3})
    # Aioli: a round of probes every update_steps (loam/mixing/online/aioli.py).
    c.mixing.aioli = ml_collections.ConfigDict(
        {"update_steps": 50, "start": 0, "probe_steps": 12, "one_hot": 0.5, "eta": 0.1,
         "normalize": True, "ema": 0.0, "accumulate": True, "eval_tokens": 8192,
         "probes": "swarm"})
    # Skill-it: graph "linear" | "pairwise" (estimated) | "identity" | a JSON K×K matrix.
    c.mixing.skillit = ml_collections.ConfigDict(
        {"update_steps": 50, "start": 0, "eta": 0.5, "window": 3, "graph": "linear",
         "graph_steps": 20, "eval_tokens": 8192, "probes": "swarm"})

    # Continual pretraining: start from another run's checkpoint, "DIR" (its newest) or
    # "DIR:STEP"; empty: from scratch. carry: "params" | "params+opt" (Adam's moments too; step
    # and schedule from 0) | "all" (the whole state: the step counter and schedule continue).
    c.init = ml_collections.ConfigDict({"checkpoint": "", "carry": "params"})

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-3
    c.optim.schedule = "cosine"  # cosine | wsd | constant | infinite
    c.optim.warmup_steps = 30
    c.optim.final_lr_fraction = 0.1
    c.optim.decay_fraction = 0.2  # wsd: length of the final decay
    # infinite: cosine cooldown from lr to constant_lr_fraction*lr over cooldown_steps after the
    # warmup, then constant; from step anneal_start (0: never) linear to final_lr_fraction*lr.
    c.optim.cooldown_steps = 0
    c.optim.constant_lr_fraction = 0.5
    c.optim.anneal_start = 0
    c.optim.weight_decay = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.clip_norm = 1.0
    c.optim.z_loss = 1e-4
    c.optim.accum_steps = 1

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.log_every = 1  # metrics.jsonl gets every step; the terminal every 10
    c.eval_every = 150
    # Dense early evaluation (the stability gap of continual runs): every `every` steps during
    # the first `until` steps of the run (from init.step for init.carry=all), and once before
    # the first step; `until` 0: off. stability_gap.json and .png are written at the end.
    c.eval_dense = ml_collections.ConfigDict({"every": 1, "until": 0})
    c.eval_tokens = 32768  # per domain; the held-out set is fixed by the config, not by time
    c.eval_batch_size = 16
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    # Downstream evaluators run at every eval (loam/evals/, one module per kind), e.g.
    # [{"kind": "probes"}, {"kind": "multiple_choice", "tasks": "tasks/*.jsonl"}].
    c.evals = []
    # Update numbers (1-based, as in metrics.jsonl) to trace with the JAX profiler, e.g. [5, 6]:
    # a trace from the first to the last in DIR/tensorboard/plugins/profile. Empty: none.
    c.profile_steps = []
    # Weights & Biases (the [wandb] extra): off while project is empty; mode online | offline |
    # disabled (empty: W&B's default); dir empty: $WANDB_DIR or the run directory
    # (loam/wandb_logging.py).
    c.wandb = ml_collections.ConfigDict(
        {"project": "", "entity": "", "name": "", "group": "", "mode": "", "dir": ""})

    if a.runlocal:  # size, steps, seq_len and batch_size come from RUNLOCAL (explicit args win)
        c.optim.warmup_steps = 5
        c.eval_every = c.checkpoint_every = 10
        c.eval_tokens = 2048
    return c
