"""Hugging Face export and import: a loam run as a `transformers` Llama model, and back.

    python -m loam.export --workdir DIR --out HF_DIR [--step N]
    python -m loam.export --import HF_DIR --workdir NEW_RUN [--config FILE] [--tokenizer SPEC]

Export writes `config.json` (LlamaForCausalLM), `model.safetensors` (float32),
`generation_config.json` and the tokenizer (`tokenizer.json`, `tokenizer_config.json`), which
`transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` and `AutoTokenizer` load. loam's
transformer is a Llama: pre-norm RMSNorm (eps 1e-6), rotary embeddings on channel pairs
(i, i + K/2) (Llama's rotate_half), SwiGLU, grouped-query attention, no biases; tied embeddings
map to `tie_word_embeddings`. A run whose model Llama cannot express (a bidirectional prefix from
a prefix-LM, span-corruption or UL2 objective; a model field Llama has no equivalent of) is
refused, naming the feature. The tokenizer keeps loam's ids: its pieces, then the 100 sentinels
`<extra_id_99>` .. `<extra_id_0>`; encoding adds no BOS (loam's documents have none).

Import reads a local Llama-layout directory (config.json and safetensors weights, one file or
sharded with an index) and writes a loam run directory at step 0: the config (`--config`, default
loam's default job, with the checkpoint's shape; or, for a directory loam exported, the run's own
config), and a checkpoint of the weights with a fresh optimizer state, which `loam.run.load_params`
reads and `python -m loam.train --config NEW_RUN/config.json --workdir NEW_RUN` continues to
pretrain. The tokenizer is the checkpoint's `tokenizer.json` (copied into the run directory) unless
`--tokenizer` names another; its vocabulary (ids + 100 sentinels, or its own sentinels) must have
the checkpoint's size. Nothing existing is overwritten: the output directory must be new or empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, models, normalizers

from loam import checkpoint as ckpt_lib
from loam import cli
from loam import run as run_lib
from loam import step as step_lib
from loam.data import vocab as vocab_lib
from loam.model.transformer import ModelConfig, RMSNorm
from loam.workdir import save_config

NORM_EPS = RMSNorm.eps
MANIFEST = "loam_export.json"
WEIGHTS = "model.safetensors"
# ModelConfig fields and what each becomes in a Llama config (None: nothing to map; the field
# changes how loam computes, not what). A field not listed here is one this exporter does not
# know, and a run that sets it to anything but its default is refused.
_MAPPED = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
           "head_dim": "head_dim", "mlp_dim": "intermediate_size",
           "max_len": "max_position_embeddings", "tied_embeddings": "tie_word_embeddings",
           "rope_theta": "rope_theta", "remat": None, "dtype": None, "param_dtype": None,
           "loss_impl": None, "scan_unroll": None, "attention_impl": None,
           "residuals": None}
_CAUSAL_OBJECTIVES = ("causal",)


class ExportError(cli.UserError):
    """A model or checkpoint that cannot be exported or imported; the message names the feature."""


# --------------------------------------------------------------------------- export


def check_exportable(config, cfg: ModelConfig) -> None:
    """ExportError naming the first feature of the run a Llama model cannot express."""
    objective = config.data.get("objective", "causal")
    if objective not in _CAUSAL_OBJECTIVES:
        raise ExportError(
            f"the run was trained with data.objective={objective!r}, whose inputs carry a "
            "bidirectional prefix (attention that sees later prefix tokens); a Llama model's "
            "attention is causal only, so it would not compute what this model learned. Export "
            "runs trained with data.objective='causal'")
    defaults = ModelConfig()
    for field in dataclasses.fields(cfg):
        if field.name in _MAPPED:
            continue
        value = getattr(cfg, field.name)
        if value != getattr(defaults, field.name):
            raise ExportError(f"the model sets {field.name}={value!r}, which has no equivalent in "
                              "a Llama model; this exporter cannot express it")
    if cfg.param_dtype != "float32":
        raise ExportError(f"param_dtype={cfg.param_dtype!r}: the export writes float32 weights; "
                          "export a run with float32 parameters")


def llama_config(cfg: ModelConfig, tokenizer: vocab_lib.Tokenizer) -> dict:
    """The `transformers` LlamaConfig (as config.json) of a loam model."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len, "rms_norm_eps": NORM_EPS,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": cfg.tied_embeddings,
        "bos_token_id": None, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True, "dtype": "float32",
    }


def to_llama(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """loam parameters (layers stacked on a leading axis) -> Llama tensors ([out, in] linears)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
    layers = p["layers"]
    out = {"model.embed_tokens.weight": p["embedding"],
           "model.norm.weight": p["final_norm"]["scale"]}
    if not cfg.tied_embeddings:
        out["lm_head.weight"] = p["unembed"].T
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        attn, mlp = layers["attn"], layers["mlp"]
        out[pre + "self_attn.q_proj.weight"] = attn["query"][i].reshape(d, h * k).T
        out[pre + "self_attn.k_proj.weight"] = attn["key"][i].reshape(d, g * k).T
        out[pre + "self_attn.v_proj.weight"] = attn["value"][i].reshape(d, g * k).T
        out[pre + "self_attn.o_proj.weight"] = attn["out"][i].reshape(h * k, d).T
        out[pre + "mlp.gate_proj.weight"] = mlp["gate"][i].T
        out[pre + "mlp.up_proj.weight"] = mlp["up"][i].T
        out[pre + "mlp.down_proj.weight"] = mlp["down"][i].T
        out[pre + "input_layernorm.weight"] = layers["attn_norm"]["scale"][i]
        out[pre + "post_attention_layernorm.weight"] = layers["mlp_norm"]["scale"][i]
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def _sentinels() -> list[str]:
    return [f"<extra_id_{i}>" for i in reversed(range(vocab_lib.NUM_SENTINELS))]


def hf_tokenizer(tokenizer: vocab_lib.Tokenizer) -> tokenizers.Tokenizer:
    """A `tokenizers` Tokenizer with the ids of a loam tokenizer (its pieces, then the 100
    sentinels): a SentencePiece unigram model rebuilt piece for piece (scores, byte fallback,
    normalization, dummy prefix), or a tokenizers file as it is."""
    if isinstance(tokenizer, vocab_lib.HFTokenizer):
        tok = tokenizers.Tokenizer.from_str(Path(tokenizer.path).read_text())
        vocab = tok.get_vocab(with_added_tokens=True)
    elif isinstance(tokenizer, vocab_lib.Vocabulary):
        tok = _from_sentencepiece(tokenizer)
        vocab = tok.get_vocab(with_added_tokens=True)
    else:
        raise ExportError(f"tokenizer {tokenizer.spec}: unknown kind; the export handles "
                          "SentencePiece models and tokenizers files")
    base = max(vocab.values()) + 1
    own = all(vocab.get(s) == base - vocab_lib.NUM_SENTINELS + i
              for i, s in enumerate(_sentinels()))
    if not own:
        taken = [s for s in _sentinels() if s in vocab]
        if taken:
            raise ExportError(f"tokenizer {tokenizer.spec} already has {taken[0]} at id "
                              f"{vocab[taken[0]]}, not where loam puts its sentinels; it cannot "
                              "be exported with loam's ids")
        tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                                for s in _sentinels()])
    if tok.get_vocab_size(with_added_tokens=True) != tokenizer.vocab_size:
        raise ExportError(f"tokenizer {tokenizer.spec}: rebuilt with "
                          f"{tok.get_vocab_size(with_added_tokens=True)} ids, but loam uses "
                          f"{tokenizer.vocab_size}")
    return tok


def _from_sentencepiece(tokenizer: vocab_lib.Vocabulary) -> tokenizers.Tokenizer:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer._data)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)
        raise ExportError(f"tokenizer {tokenizer.spec} is a SentencePiece {kind} model; the export "
                          "rebuilds unigram models only (train one with python -m loam.data.vocab, "
                          "or use a tokenizers file)")
    tok = tokenizers.Tokenizer(models.Unigram(
        [(piece.piece, piece.score) for piece in proto.pieces], unk_id=trainer.unk_id,
        byte_fallback=trainer.byte_fallback))
    steps: list[Any] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True),
                  normalizers.Replace(tokenizers.Regex(" {2,}"), " ")]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    parts: list[Any] = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        parts.append(decoders.ByteFallback())
    parts.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        parts.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(parts)
    # Control and unknown pieces are special tokens (SentencePiece never produces them from
    # text); user-defined pieces stay ordinary vocabulary, matched whole like any piece.
    special = [p.piece for p in proto.pieces
               if p.type in (sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL,
                             sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN)]
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                            for s in special])
    return tok


def _token(tokenizer: vocab_lib.Tokenizer, i: int) -> str:
    return tokenizer.piece(i)  # type: ignore[attr-defined]


def tokenizer_files(tokenizer: vocab_lib.Tokenizer, max_len: int) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json for `transformers.AutoTokenizer`."""
    tok = hf_tokenizer(tokenizer)
    unk = next((t for t in ("<unk>", "[UNK]") if tok.token_to_id(t) is not None), None)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
              "eos_token": _token(tokenizer, tokenizer.eos_id),
              "pad_token": _token(tokenizer, tokenizer.pad_id), "unk_token": unk,
              "add_bos_token": False, "add_eos_token": False,
              "additional_special_tokens": _sentinels(),
              "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def _new_directory(path: str, flag: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{flag} {out} exists and is not an empty directory; nothing is "
                          "overwritten: choose a new directory")
    return out


def _write_atomically(out: Path, write) -> None:
    """Builds the directory next to `out` and renames it into place when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp's 0700, as any new directory would be
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(workdir, out, step: int | None = None) -> Path:
    """Writes a run's checkpoint (default: the newest) as a `transformers` Llama model."""
    out_dir = _new_directory(os.fspath(out), "--out")
    params, run, step = _load(workdir, step)
    try:
        cfg, config = run.model.cfg, run.config
        check_exportable(config, cfg)
        tokenizer = vocab_lib.get_tokenizer(config.data.get("tokenizer") or "bundled")
        files = tokenizer_files(tokenizer, cfg.max_len)
        tensors = to_llama(params, cfg)
    finally:
        run.close()
    save_file = _safetensors().save_file

    def write(tmp: Path):
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(llama_config(cfg, tokenizer), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
             "bos_token_id": None, "do_sample": False}, indent=2))
        for name, text in files.items():
            (tmp / name).write_text(text)
        (tmp / MANIFEST).write_text(json.dumps(
            {"workdir": os.path.abspath(os.fspath(workdir)), "step": step,
             "config": json.loads(config.to_json_best_effort())}, indent=2))

    _write_atomically(out_dir, write)
    return out_dir


def _safetensors():
    try:
        from safetensors import numpy as safetensors_numpy
    except ImportError:
        raise ExportError("python -m loam.export needs safetensors: pip install -e '.[export]'"
                          ) from None
    return safetensors_numpy


def _load(workdir, step):
    try:
        return run_lib.load_params(os.fspath(workdir), step, devices=jax.local_devices()[:1])
    except FileNotFoundError as e:
        if "no checkpoints" in str(e):
            raise ExportError(f"{e}: {workdir} has no trained checkpoint to export; train it "
                              "first (python -m loam.train --config FILE --workdir DIR)") from None
        raise


# --------------------------------------------------------------------------- import


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} not found: --import takes a directory with a Llama "
                          "config.json and safetensors weights") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e})") from None


def model_config_of(hf: dict) -> ModelConfig:
    """The loam ModelConfig of a Llama config.json; ExportError naming the first feature loam's
    transformer does not have."""
    kind = hf.get("model_type")
    if kind != "llama":
        raise ExportError(f"config.json has model_type={kind!r}; the import reads Llama "
                          "checkpoints (model_type 'llama', LlamaForCausalLM)")
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or d // heads)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    problems = [
        (hf.get("hidden_act", "silu") != "silu",
         f"hidden_act={hf.get('hidden_act')!r} (loam's MLP is SwiGLU: silu)"),
        (bool(hf.get("attention_bias")), "attention_bias=true (loam's attention has no biases)"),
        (bool(hf.get("mlp_bias")), "mlp_bias=true (loam's MLP has no biases)"),
        (rope_type != "default", f"rope scaling {rope_type!r} (loam's rotary is unscaled)"),
        (head_dim != d // heads, f"head_dim={head_dim} with hidden_size={d} and {heads} heads "
         "(loam's run configs derive head_dim = hidden_size / heads)"),
        (abs(theta - ModelConfig.rope_theta) > 1e-6,
         f"rope_theta={theta:g} (loam's run configs use {ModelConfig.rope_theta:g})"),
        (abs(float(hf.get("rms_norm_eps", NORM_EPS)) - NORM_EPS) > 1e-12,
         f"rms_norm_eps={hf.get('rms_norm_eps')} (loam's RMSNorm uses {NORM_EPS})"),
    ]
    for bad, what in problems:
        if bad:
            raise ExportError(f"the checkpoint's {what}: loam's transformer cannot express it, "
                              "so the import is refused")
    return ModelConfig(vocab_size=int(hf["vocab_size"]), d_model=d,
                       n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
                       n_kv_heads=int(hf.get("num_key_value_heads") or heads),
                       mlp_dim=int(hf["intermediate_size"]),
                       max_len=int(hf.get("max_position_embeddings", 2048)),
                       tied_embeddings=bool(hf.get("tie_word_embeddings", False)))


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a directory's safetensors weights (one file, or shards with an index)."""
    load_file = _safetensors().load_file
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (directory / WEIGHTS).exists():
        files = [WEIGHTS]
    else:
        raise ExportError(f"no safetensors weights in {directory} (model.safetensors or "
                          "model.safetensors.index.json); save the model with "
                          "save_pretrained(..., safe_serialization=True)")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        try:
            tensors.update(load_file(str(directory / name)))
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot read weights file {directory / name}: {cli.one_line(e)}"
                              ) from None
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise ExportError(f"{directory / name} is not a readable safetensors file "
                              f"({cli.one_line(e)})") from None
    return tensors


def from_llama(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Llama tensors -> loam parameters (the inverse of `to_llama`)."""
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ExportError(f"the checkpoint has no tensor {name!r}; is it a LlamaForCausalLM "
                              "checkpoint?")
        a = np.asarray(tensors[name], np.float32)
        if a.shape != shape:
            raise ExportError(f"tensor {name} has shape {a.shape}, but config.json implies {shape}")
        return a

    def stack(fn) -> np.ndarray:
        return np.stack([fn(f"model.layers.{i}.") for i in range(cfg.n_layers)])

    v = cfg.vocab_size
    params: dict[str, Any] = {
        "embedding": get("model.embed_tokens.weight", (v, d)),
        "final_norm": {"scale": get("model.norm.weight", (d,))},
        "layers": {
            "attn": {
                "query": stack(lambda p: get(p + "self_attn.q_proj.weight", (h * k, d)).T
                               .reshape(d, h, k)),
                "key": stack(lambda p: get(p + "self_attn.k_proj.weight", (g * k, d)).T
                             .reshape(d, g, k)),
                "value": stack(lambda p: get(p + "self_attn.v_proj.weight", (g * k, d)).T
                               .reshape(d, g, k)),
                "out": stack(lambda p: get(p + "self_attn.o_proj.weight", (d, h * k)).T
                             .reshape(h, k, d)),
            },
            "mlp": {
                "gate": stack(lambda p: get(p + "mlp.gate_proj.weight", (cfg.mlp_dim, d)).T),
                "up": stack(lambda p: get(p + "mlp.up_proj.weight", (cfg.mlp_dim, d)).T),
                "down": stack(lambda p: get(p + "mlp.down_proj.weight", (d, cfg.mlp_dim)).T),
            },
            "attn_norm": {"scale": stack(lambda p: get(p + "input_layernorm.weight", (d,)))},
            "mlp_norm": {"scale": stack(
                lambda p: get(p + "post_attention_layernorm.weight", (d,)))},
        },
    }
    if not cfg.tied_embeddings:
        params["unembed"] = get("lm_head.weight", (v, d)).T
    return params


def _import_config(source: Path, hf_cfg: ModelConfig, config_spec: str | None,
                   tokenizer: str | None, run_dir: Path) -> ml_collections.ConfigDict:
    manifest = source / MANIFEST
    if config_spec is None and manifest.exists():
        config = ml_collections.ConfigDict(_read_json(manifest)["config"])
    else:
        config = cli.load_config(config_spec or str(Path(__file__).parent / "configs/default.py"))
    with config.unlocked():
        m = config.model
        m.d_model, m.n_layers, m.n_heads = hf_cfg.d_model, hf_cfg.n_layers, hf_cfg.n_heads
        m.n_kv_heads, m.mlp_dim = hf_cfg.kv_heads, hf_cfg.mlp_dim
        m.tied_embeddings = hf_cfg.tied_embeddings
        config.data.seq_len = min(int(config.data.seq_len), hf_cfg.max_len)
        if tokenizer is not None:
            config.data.tokenizer = tokenizer
        elif not manifest.exists() or config_spec is not None:
            if not (source / "tokenizer.json").exists():
                raise ExportError(f"{source} has no tokenizer.json; name the checkpoint's "
                                  "tokenizer with --tokenizer SPEC (a tokenizers JSON file or a "
                                  "SentencePiece model)")
            config.data.tokenizer = f"hf:{run_dir / 'tokenizer.json'}"
    return config


def import_llama(source, workdir, config: str | None = None,
                 tokenizer: str | None = None) -> Path:
    """Writes a loam run directory (config.json, checkpoint at step 0) from a Llama checkpoint."""
    source = Path(source)
    if not source.is_dir():
        raise ExportError(f"--import {source} is not a directory; give the directory of a Llama "
                          "checkpoint (config.json, model.safetensors, tokenizer.json)")
    run_dir = _new_directory(os.fspath(workdir), "--workdir").absolute()
    hf = _read_json(source / "config.json")
    hf_cfg = model_config_of(hf)
    run_config = _import_config(source, hf_cfg, config, tokenizer, run_dir)
    copy_tokenizer = str(run_config.data.tokenizer) == f"hf:{run_dir / 'tokenizer.json'}"
    spec = f"hf:{source / 'tokenizer.json'}" if copy_tokenizer else run_config.data.tokenizer
    try:
        vocab_size = vocab_lib.get_tokenizer(spec).vocab_size
    except ValueError as e:
        raise ExportError(f"the tokenizer {spec}: {cli.one_line(e)}") from None
    if vocab_size != hf_cfg.vocab_size:
        raise ExportError(
            f"the checkpoint's vocabulary has {hf_cfg.vocab_size} ids but the tokenizer "
            f"{spec} gives {vocab_size} (its ids + {vocab_lib.NUM_SENTINELS} sentinels, unless "
            "it ends with its own <extra_id_*> tokens); import with the tokenizer the "
            "checkpoint was trained with (--tokenizer SPEC)")
    tensors = read_tensors(source)
    params = from_llama(tensors, hf_cfg)

    def write(tmp: Path):
        if copy_tokenizer:
            shutil.copy(source / "tokenizer.json", tmp / "tokenizer.json")
            # The run's config names the tokenizer at its final place; read it here for now.
            vocab_lib.get_tokenizer(f"hf:{tmp / 'tokenizer.json'}")
        _write_run(tmp, run_dir, run_config, params, copy_tokenizer)

    _write_atomically(run_dir, write)
    return run_dir


def _write_run(tmp: Path, run_dir: Path, config, params: dict, copy_tokenizer: bool) -> None:
    """config.json and a step-0 checkpoint (params, fresh optimizer state, data position)."""
    build = run_lib.copy_config(config)
    if copy_tokenizer:  # resolve against the copy while the directory is being built
        build.data.tokenizer = f"hf:{tmp / 'tokenizer.json'}"
    try:
        resolved, _ = run_lib.resolve_config(build)
    except run_lib.ConfigError as e:
        raise ExportError(f"the run config for the import: {e}") from None
    model = run_lib.build_model(resolved)
    mesh = run_lib.build_mesh(resolved)
    optimizer = run_lib.build_optimizer(resolved)
    state, shardings = step_lib.init_state(model, optimizer, jax.random.key(resolved.seed), mesh,
                                           resolved.data.seq_len, resolved.data.batch_size)
    expected = jax.tree_util.tree_map(lambda a: a.shape, state.params)
    got = jax.tree_util.tree_map(lambda a: a.shape, params)
    if expected != got:
        raise ExportError("the converted weights do not fit the model the run config builds "
                          f"({model.cfg}); the config's model fields disagree with config.json")
    state = dataclasses.replace(state, params=jax.device_put(params, shardings.params))
    stream = run_lib.build_stream(resolved)
    meta = {"step": 0, "data": stream.state_dict(0), "seed": int(resolved.seed),
            "schedule": stream.source.describe(), "hooks": None}
    checkpointer = ckpt_lib.Checkpointer(tmp / "checkpoints", async_save=False)
    try:
        checkpointer.save(0, state, meta, force=True)
    finally:
        checkpointer.close()
    if copy_tokenizer:
        resolved.data.tokenizer = f"hf:{run_dir / 'tokenizer.json'}"
    save_config(tmp, resolved)


# --------------------------------------------------------------------------- command


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True,
                   help="the run to export; with --import, the new run directory to write")
    p.add_argument("--out", help="export: the new Hugging Face model directory")
    p.add_argument("--step", type=int, default=None, help="export: checkpoint step (default: "
                   "newest)")
    p.add_argument("--import", dest="import_dir", metavar="HF_DIR",
                   help="import this Llama checkpoint directory into --workdir instead")
    p.add_argument("--config", default=None, help="import: the loam config to train it with "
                   "(default: the exported run's own, else loam/configs/default.py)")
    p.add_argument("--tokenizer", default=None, help="import: tokenizer spec (default: the "
                   "checkpoint's tokenizer.json)")
    args = p.parse_args(argv)
    cli.quiet_logs()
    with cli.user_errors():
        if args.import_dir is not None:
            if args.out is not None or args.step is not None:
                raise ExportError("--out and --step are export flags; an import writes "
                                  "--workdir")
            out = import_llama(args.import_dir, args.workdir, args.config, args.tokenizer)
            print(f"imported {args.import_dir} into {out} (step 0); continue pretraining with "
                  f"python -m loam.train --config {out / 'config.json'} --workdir {out}")
        else:
            if args.out is None:
                raise ExportError("--out DIR is required to export (or --import HF_DIR to "
                                  "import)")
            if args.config is not None or args.tokenizer is not None:
                raise ExportError("--config and --tokenizer are import flags; an export uses "
                                  "the run's own")
            out = export(args.workdir, args.out, args.step)
            print(f"exported {args.workdir} to {out}: load it with "
                  "transformers.AutoModelForCausalLM.from_pretrained and AutoTokenizer")


if __name__ == "__main__":
    main()
