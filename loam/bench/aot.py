"""Ahead-of-time compilation of the sharded train step for a TPU pod, on this CPU machine.

    python -m loam.bench.aot --topology v5e-256 --size 1b
    python -m loam.bench.aot --topology v5e-256 --size 8b --layouts fsdp,fsdp_tensor
    python -m loam.bench.aot --topology v5p-128 --size 8b --layouts fsdp
    python -m loam.bench.aot --topology v5e-8 --size nano --vocab 512 --seq_len 64 \\
        --backend cpu-fake

The step compiled is the run's own (``loam.step.make_train_step``: AdamW, clipping, z-loss,
per-domain sums, the state donated), over a Mesh of the topology's devices laid out as each
``--layouts`` entry says, with the logical rules of ``loam.model.sharding``. Its inputs are
``jax.ShapeDtypeStruct``s carrying their shardings, so no parameter is ever allocated: an 8B
model compiles for 256 chips in a few GB of host memory. For each layout it prints the compiler's
per-device memory (arguments, outputs, temporaries, the donated bytes that outputs reuse), the
FLOPs of one step on one device (``cost_analysis``; the scanned layer body is one loop), the
collectives in the compiled program (counted once each where they appear in its text, so one
inside the layer loop counts once), the custom kernels in it (``kernels``: Mosaic calls, e.g.
the splash attention's forward and backward passes under ``--attention_impl splash``), and
whether it fits the chip's memory. XLA's cost analysis
counts the body of the layer loop once, not once per layer, so ``flops_per_device`` is below
the model's count (``model_flops_per_device``, 6N + 12 L d T per token) by about the other
layers' share. The last line is one
JSON object: ``{"runs": [...], ...}``.

**TPU** (``--backend tpu``, the default): libtpu describes a pod slice without a TPU attached
(``jax.experimental.topologies.get_topology_desc``) and compiles for it with the TPU compiler:
the memory figures are the ones the slice would see, and a step that does not fit fails to
compile just as it would on the slice (reported here as ``fits: false`` with the compiler's
message). libtpu lives in its own environment, so the main one and CI never load it:

    python3 -m venv .venv-tpu
    .venv-tpu/bin/pip install -e . 'jax[tpu]==0.10.2'   # jax 0.10.2's pin: libtpu 0.0.42.*
    TPU_WORKER_HOSTNAMES=localhost .venv-tpu/bin/python -m loam.bench.aot --topology v5e-256 \\
        --size 8b

(the jax version is the main environment's; ``jax[tpu]`` pins the libtpu built for it).

**cpu-fake** (``--backend cpu-fake``): the same shardings over as many host CPU devices as the
topology has chips (``--xla_force_host_platform_device_count``, set here unless XLA_FLAGS already
names a count): the partitioned program and its collectives are real, but the memory is what
XLA:CPU allocates (other fusion and layouts than a TPU's), and a splash kernel is Pallas's
interpreter. Labelled ``backend: "cpu-fake"``.

``--compile_scaling`` also compiles the model's width at 4 and 24 layers and reports the ratio of
the two compile times (the layers are one ``nn.scan``, so depth should cost little compile time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from loam import step as st
from loam.model import sharding as shd
from loam.model import sizes
from loam.model.transformer import ATTENTION_IMPLS, LOSS_IMPLS, RESIDUALS, ModelConfig, Transformer

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as libtpu names it, and the memory of one of its devices."""

    name: str  # the Cloud TPU name: version-TensorCores
    topology_name: str  # libtpu's: version:chip grid
    chip_config: str  # "default" (one core per chip) or "megacore" (two cores act as one)
    devices: int
    device_memory_bytes: int  # HBM per chip (per megacore device on v4/v5p)


def _slice(version: str, grid: str, memory_gib: int) -> Topology:
    chips = math.prod(int(n) for n in grid.split("x"))
    cores = chips if version == "v5e" else 2 * chips  # Cloud TPU names count TensorCores
    return Topology(f"{version}-{cores}", f"{version}:{grid}",
                    "default" if version == "v5e" else "megacore", chips, memory_gib * GIB)


# HBM per chip: v5e 16 GiB, v4 32 GiB, v5p 95 GiB.
TOPOLOGIES = {t.name: t for t in (
    _slice("v5e", "2x4", 16), _slice("v5e", "4x4", 16), _slice("v5e", "8x8", 16),
    _slice("v5e", "16x16", 16),
    _slice("v4", "2x2x1", 32), _slice("v4", "2x2x4", 32), _slice("v4", "4x4x4", 32),
    _slice("v5p", "2x2x1", 95), _slice("v5p", "4x4x4", 95), _slice("v5p", "4x4x8", 95),
)}

# name -> (data, fsdp, tensor) as config.mesh takes them; -1: the devices the others leave.
LAYOUTS = {
    "data": (-1, 1, 1),         # parameters and optimizer state replicated on every device
    "fsdp": (1, -1, 1),         # every weight's embed axis sharded over all devices
    "fsdp_tensor": (1, -1, 4),  # FSDP across groups of 4 that split heads, MLP and vocabulary
    "data_fsdp": (2, -1, 1),    # two FSDP replicas
}


@dataclasses.dataclass(frozen=True)
class SizeDefaults:
    """What a --size compiles with unless flags say otherwise."""

    vocab: int
    tied: bool
    remat: bool
    dtype: str = "bfloat16"


# Llama 3's 128256-id vocabulary (3.2 1B ties its embeddings, 3 8B does not), each layer
# recomputed in the backward pass; bfloat16 compute on float32 weights and optimizer state.
SIZE_DEFAULTS = {"1b": SizeDefaults(128256, tied=True, remat=True),
                 "8b": SizeDefaults(128256, tied=False, remat=True)}
OTHER_SIZES = SizeDefaults(8192, tied=True, remat=False)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
NUM_DOMAINS = 5


class AotError(ValueError):
    """Bad input: the message names the problem and the fix."""


def topology_devices(topology: Topology, backend: str) -> list:
    """The slice's devices: described by libtpu (tpu) or the first host CPU devices (cpu-fake)."""
    if backend == "tpu":
        try:
            desc = topologies.get_topology_desc(platform="tpu",
                                                topology_name=topology.topology_name,
                                                chip_config_name=topology.chip_config)
        except Exception as e:  # libtpu absent, or unable to describe this slice
            raise AotError(
                f"libtpu could not describe {topology.name} ({topology.topology_name}): "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                ". Run this in an environment with libtpu (python3 -m venv .venv-tpu && "
                ".venv-tpu/bin/pip install -e . 'jax[tpu]==0.10.2'), or pass --backend cpu-fake"
            ) from None
        return list(desc.devices)
    devices = jax.devices("cpu")
    if len(devices) < topology.devices:
        raise AotError(f"--backend cpu-fake needs {topology.devices} CPU devices for "
                       f"{topology.name} but jax has {len(devices)}; set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={topology.devices} before jax "
                       "starts (python -m loam.bench.aot sets it when XLA_FLAGS names no count)")
    return devices[: topology.devices]


def model_config(size: str, vocab: int, tied: bool, remat: bool, dtype: str,
                 seq_len: int, loss_impl: str = "fused",
                 attention_impl: str = "manual", residuals: str = "dots") -> ModelConfig:
    return sizes.get_size(size, vocab, tied_embeddings=tied, remat=remat, dtype=dtype,
                          param_dtype="float32", max_len=seq_len, loss_impl=loss_impl,
                          attention_impl=attention_impl, residuals=residuals)


def abstract_batch(mesh, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The features a train batch carries, as shapes sharded like shard_batch places them."""
    sharding = shd.batch_sharding(mesh)
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_weights": jnp.float32,
              "segment_ids": jnp.int32, "positions": jnp.int32, "prefix": jnp.int32,
              "domain_ids": jnp.int32}
    return {k: jax.ShapeDtypeStruct((batch, seq_len), dt, sharding=sharding)
            for k, dt in dtypes.items()}


def lower_step(cfg: ModelConfig, mesh, seq_len: int, batch: int):
    """The train step lowered with abstract sharded inputs: (lowered, the inputs)."""
    model = Transformer(cfg)
    optimizer = st.make_optimizer(st.lr_schedule("cosine", 3e-4, 10_000, 100))
    state, shardings = st.abstract_state(model, optimizer, mesh, seq_len)
    step = st.make_train_step(model, optimizer, mesh, shardings, NUM_DOMAINS, z_loss=1e-4)
    inputs = (state, abstract_batch(mesh, batch, seq_len))
    with shd.activate(mesh):
        return step.jitted.lower(*inputs), inputs


def compile_step(cfg: ModelConfig, mesh, seq_len: int, batch: int):
    """The train step compiled for the mesh's devices, from abstract inputs only."""
    return lower_step(cfg, mesh, seq_len, batch)[0].compile()


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(tree))


def memory(compiled) -> dict[str, int]:
    """Per-device bytes: arguments and outputs (less the donated argument bytes the outputs
    reuse), temporaries and the program itself."""
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
           "generated_code": int(m.generated_code_size_in_bytes)}
    out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                    + out["generated_code"])
    return out


def flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # one entry per program in some jax versions
        cost = cost[0] if cost else {}
    value = (cost or {}).get("flops")
    return None if value is None else float(value)


def collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective the compiled program holds (async pairs counted once)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for name in _COLLECTIVE_RE.findall(hlo_text):
        counts[name] += 1
    return counts


# The TPU compiler's refusals: "Used 98.5G of 15.75G hbm" or "the total memory required for HLO
# temporaries (20.38G) exceeds available HBM (15.75G)".
_USED_OF = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_TEMPORARIES = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                          r"\(([\d.]+)([KMGT]?)\)")


def kernels(hlo_text: str) -> int:
    """Custom kernels compiled into the program (Pallas's Mosaic calls on a TPU: the splash
    attention's forward and backward passes), as opposed to ops XLA fuses by itself."""
    return len(re.findall(r'custom_call_target="tpu_custom_call"', hlo_text))


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def _out_of_memory(error: Exception, argument_bytes: int) -> dict | None:
    """What the TPU compiler's out-of-memory refusal says, or None for any other error.

    per_device_bytes is then the compiler's total when it states one, else the arguments'
    bytes (exact, from their shardings) plus the temporaries it reports: a lower bound."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out: dict[str, Any] = {"compile_error": " ".join(lines[:3])[:600],
                           "per_device_bytes": None, "arguments_bytes": argument_bytes}
    if found := _USED_OF.search(text):
        out["per_device_bytes"] = _bytes(found.group(1), found.group(2))
        out["compiler_available_bytes"] = _bytes(found.group(3), found.group(4))
    elif found := _TEMPORARIES.search(text):
        out["temporaries_bytes"] = _bytes(found.group(1), found.group(2))
        out["per_device_bytes"] = argument_bytes + out["temporaries_bytes"]
        out["per_device_bytes_is_lower_bound"] = True
        out["compiler_available_bytes"] = _bytes(found.group(3), found.group(4))
    return out


def layout_shape(name: str) -> tuple[int, int, int]:
    """(data, fsdp, tensor) of a named layout or of "DxFxT" (e.g. "2x-1x4")."""
    if name in LAYOUTS:
        return LAYOUTS[name]
    parts = name.split("x")
    try:
        if len(parts) != 3:
            raise ValueError
        data, fsdp, tensor = (int(p) for p in parts)
    except ValueError:
        raise AotError(f"unknown layout {name!r}; choose from {', '.join(LAYOUTS)} or give "
                       "data x fsdp x tensor sizes such as 2x-1x4 (-1: the devices left)"
                       ) from None
    return data, fsdp, tensor


def layout_mesh(name: str, devices: list, batch: int):
    data, fsdp, tensor = layout_shape(name)
    try:
        mesh = shd.make_mesh(data, fsdp, tensor, devices=devices)
    except ValueError as e:
        raise AotError(f"layout {name} {(data, fsdp, tensor)} on {len(devices)} devices: {e}"
                       ) from None
    if mesh.devices.size != len(devices):
        raise AotError(f"layout {name} {dict(mesh.shape)} uses {mesh.devices.size} of the "
                       f"{len(devices)} devices; choose sizes whose product is {len(devices)}")
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % rows:
        raise AotError(f"--batch {batch} is not divisible by data*fsdp={rows} of layout {name} "
                       f"{dict(mesh.shape)}; choose a multiple of {rows}")
    return mesh


def run_layout(cfg: ModelConfig, size: str, topology: Topology, backend: str, layout: str,
               devices: list, seq_len: int, batch: int, device_memory: int) -> dict:
    mesh = layout_mesh(layout, devices, batch)
    counts = sizes.count_params(cfg)
    run: dict[str, Any] = {
        "size": size, "topology": topology.name, "backend": backend, "layout": layout,
        "mesh": dict(mesh.shape), "devices": len(devices), "params": counts["total"],
        "vocab": cfg.vocab_size, "tied_embeddings": cfg.tied_embeddings, "n_layers": cfg.n_layers,
        "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": cfg.remat,
        "loss_impl": cfg.loss_impl, "attention_impl": cfg.attention_impl,
        "residuals": cfg.residuals,
        "seq_len": seq_len, "batch": batch, "device_memory_bytes": device_memory,
        # The 6N + 12 L d T count for the whole batch, without rematerialisation.
        "model_flops_per_step": sizes.flops_per_token(cfg, seq_len) * batch * seq_len,
    }
    run["model_flops_per_device"] = run["model_flops_per_step"] / len(devices)
    lowered, inputs = lower_step(cfg, mesh, seq_len, batch)
    try:
        compiled = lowered.compile()
    except Exception as e:
        oom = _out_of_memory(e, shard_bytes(inputs))
        if oom is None:
            raise
        run.update(oom, fits=False)
        return run
    mem = memory(compiled)
    text = compiled.as_text()
    run.update(memory=mem, per_device_bytes=mem["total"], fits=mem["total"] <= device_memory,
               flops_per_device=flops(compiled), collectives=collectives(text),
               kernels=kernels(text))
    return run


def compile_seconds(cfg: ModelConfig, mesh, seq_len: int, batch: int) -> float:
    t = time.perf_counter()
    compile_step(cfg, mesh, seq_len, batch)
    return time.perf_counter() - t


def _summary(run: dict) -> str:
    if "memory" not in run:
        used = run.get("per_device_bytes")
        at_least = "at least " if run.get("per_device_bytes_is_lower_bound") else ""
        return (f"{run['size']} {run['topology']} {run['layout']} {run['mesh']}: does not fit "
                f"({at_least}{'?' if used is None else f'{used / GIB:.2f}'} GiB of "
                f"{run['device_memory_bytes'] / GIB:.2f}): {run['compile_error'][:160]}")
    m = run["memory"]
    found = ", ".join(f"{k} {v}" for k, v in run["collectives"].items() if v) or "none"
    flop = run["flops_per_device"]
    return (f"{run['size']} {run['topology']} {run['layout']} {run['mesh']}: per device "
            f"{m['total'] / GIB:.2f} GiB (arguments {m['arguments'] / GIB:.2f}, temporaries "
            f"{m['temporaries'] / GIB:.2f}, outputs {m['outputs'] / GIB:.2f}, aliased "
            f"{m['aliased'] / GIB:.2f}) of {run['device_memory_bytes'] / GIB:.0f} GiB: "
            f"{'fits' if run['fits'] else 'does NOT fit'}; "
            f"{'?' if flop is None else f'{flop:.3e}'} FLOPs/step/device; collectives: {found}"
            f"; kernels: {run['kernels']}")


def _force_cpu_devices(count: int) -> None:
    """Ask XLA:CPU for ``count`` devices, unless XLA_FLAGS already chose (takes effect only if
    no jax backend has started yet, as in a fresh ``python -m``)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e-256", help=", ".join(TOPOLOGIES))
    parser.add_argument("--size", default="1b", help=", ".join(sizes.SIZE_NAMES))
    parser.add_argument("--layouts", default="data,fsdp,fsdp_tensor",
                        help=f"comma-separated: {', '.join(LAYOUTS)}, or DxFxT mesh sizes "
                             "such as 2x-1x4")
    parser.add_argument("--backend", default="tpu", choices=("tpu", "cpu-fake"))
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=0,
                        help="global batch in sequences (0: one per device)")
    parser.add_argument("--vocab", type=int, default=0, help="0: the size's default")
    parser.add_argument("--dtype", default="", help="compute type (default: bfloat16)")
    parser.add_argument("--loss_impl", default="fused", choices=LOSS_IMPLS,
                        help="the training loss: fused (chunked output projection and "
                        "cross-entropy, the default) or logits (the full logits)")
    parser.add_argument("--attention_impl", default="manual",
                        choices=[i for i in ATTENTION_IMPLS if i != "cudnn"],  # a GPU kernel
                        help="the attention core: manual (its own VJP, the default), xla "
                        "(the plain path under autodiff) or splash (the TPU's fused causal "
                        "kernel; seq_len a multiple of 128)")
    parser.add_argument("--residuals", default="dots", choices=RESIDUALS,
                        help="what the backward pass keeps of each layer without remat: the "
                        "weight matmuls' outputs (dots, the default) or everything (all)")
    parser.add_argument("--remat", default="", choices=("", "true", "false"),
                        help="rematerialise each layer in the backward pass (default: on for "
                             "1b and 8b)")
    parser.add_argument("--device_memory_bytes", type=int, default=0,
                        help="memory of one device (0: the topology's HBM)")
    parser.add_argument("--compile_scaling", action="store_true",
                        help="also compile 4 and 24 layers of the size's width (first layout)")
    args = parser.parse_args(argv)
    try:
        if args.topology not in TOPOLOGIES:
            raise AotError(f"unknown topology {args.topology!r}; choose one of "
                           f"{', '.join(TOPOLOGIES)}")
        topology = TOPOLOGIES[args.topology]
        layouts = [n for n in args.layouts.split(",") if n]
        if not layouts:
            raise AotError(f"--layouts names no layout; choose from {', '.join(LAYOUTS)} or "
                           "give data x fsdp x tensor sizes such as 2x-1x4 (comma-separated)")
        for name in layouts:
            layout_shape(name)
        if args.seq_len < 1 or args.batch < 0:
            raise AotError(f"--seq_len {args.seq_len} must be >= 1 and --batch {args.batch} "
                           ">= 0 (0: one sequence per device)")
        defaults = SIZE_DEFAULTS.get(args.size, OTHER_SIZES)
        remat = defaults.remat if not args.remat else args.remat == "true"
        cfg = model_config(args.size, args.vocab or defaults.vocab, defaults.tied, remat,
                           args.dtype or defaults.dtype, args.seq_len, args.loss_impl,
                           args.attention_impl, args.residuals)
        if args.backend == "cpu-fake":
            _force_cpu_devices(topology.devices)
        else:
            os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        devices = topology_devices(topology, args.backend)
        batch = args.batch or topology.devices
        for name in layouts:  # every layout checked before the first (long) compile
            layout_mesh(name, devices, batch)
    except ValueError as e:  # AotError, and ModelConfig's / get_size's own refusals
        print(f"error: {e}", file=sys.stderr)
        return 2
    device_memory = args.device_memory_bytes or topology.device_memory_bytes
    runs = []
    for name in layouts:
        run = run_layout(cfg, args.size, topology, args.backend, name, devices, args.seq_len,
                         batch, device_memory)
        runs.append(run)
        print(_summary(run), flush=True)
    summary: dict[str, Any] = {
        "runs": runs, "backend": args.backend, "topology": topology.name,
        "topology_name": topology.topology_name, "jax": jax.__version__}
    if args.backend == "tpu":
        summary["libtpu"] = metadata.version("libtpu")
    if args.compile_scaling:
        mesh = layout_mesh(layouts[0], devices, batch)
        seconds = {n: compile_seconds(dataclasses.replace(cfg, n_layers=n), mesh, args.seq_len,
                                      batch) for n in (4, 24)}
        summary["compile_scaling"] = {
            "size": args.size, "layout": layouts[0], "layers": [4, 24],
            "ratio_24_over_4": seconds[24] / seconds[4],
            "note": "compile time (lower + compile) of the same width at 4 and 24 layers, "
                    "measured in one process on a shared, loaded machine: the ratio only"}
        print(f"compile time, 24 layers / 4 layers: {seconds[24] / seconds[4]:.2f}", flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
