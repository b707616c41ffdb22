"""The ahead-of-time compile check on the fake 8-device CPU mesh (no libtpu needed)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from loam.bench import aot
from loam.model import sizes

TOY = ["--topology", "v5e-8", "--size", "nano", "--vocab", "512", "--seq_len", "16",
       "--backend", "cpu-fake"]


@pytest.mark.e2e  # the command's main(), through a real compile
def test_fsdp_step_compiles_with_real_memory_flops_and_collectives(capsys):
    assert aot.main([*TOY, "--layouts", "fsdp"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["backend"] == "cpu-fake" and summary["topology"] == "v5e-8"
    (run,) = summary["runs"]
    assert run["backend"] == "cpu-fake" and run["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert run["size"] == "nano" and run["dtype"] == "bfloat16" and run["batch"] == 8
    m = run["memory"]
    assert m["arguments"] > 0 and m["outputs"] > 0 and m["temporaries"] > 0
    assert run["per_device_bytes"] == m["total"] == (
        m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["generated_code"])
    assert run["device_memory_bytes"] == 16 * 2**30
    assert run["fits"] is (run["per_device_bytes"] <= run["device_memory_bytes"])
    # The state (float32 parameters and two Adam moments) is sharded eight ways: each device
    # holds about an eighth of it, far from the replicated whole.
    params = sizes.count_params(sizes.get_size("nano", 512))["total"]
    assert params == run["params"]
    state_bytes = 3 * 4 * params
    assert state_bytes / 8 <= m["arguments"] < state_bytes / 4
    assert m["aliased"] >= state_bytes / 8  # the donated state is updated in place
    # FSDP gathers each weight before use and reduces the gradients across devices.
    c = run["collectives"]
    assert c["all-gather"] > 0 and c["all-reduce"] + c["reduce-scatter"] > 0
    assert 0 < run["flops_per_device"] and 0 < run["model_flops_per_device"]
    assert run["kernels"] == 0  # the manual attention is XLA ops; splash adds Mosaic kernels
    assert "fsdp" in out[-2] and "fits" in out[-2]  # the human-readable line per layout


@pytest.mark.parametrize("args, message", [
    (["--topology", "v9-1"], "unknown topology 'v9-1'; choose one of v5e-8"),
    (["--size", "huge"], "unknown model size 'huge'"),
    (["--layouts", "fsdp,pipeline"], "unknown layout 'pipeline'"),
    (["--layouts", "3x-1x1"], "the fixed sizes \\(3\\) must divide the device count"),
    (["--layouts", "2x2x1"], "uses 4 of the 8 devices"),
    (["--layouts", "fsdp", "--batch", "12"], "--batch 12 is not divisible by data\\*fsdp=8"),
    (["--dtype", "float16"], "dtype='float16' is not a supported float type"),
    (["--topology", "v5e-256"], "needs 256 CPU devices .*xla_force_host_platform_device_count=256"),
])
def test_bad_input_is_refused_in_one_line_before_compiling(capsys, args, message):
    assert aot.main([*TOY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None,
                    reason="libtpu is installed here: the TPU backend works")
def test_tpu_backend_without_libtpu_names_the_environment_to_install(capsys):
    args = [*TOY[:-2], "--backend", "tpu", "--layouts", "fsdp"]
    assert aot.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "libtpu could not describe v5e-8" in err and ".venv-tpu" in err
    assert "--backend cpu-fake" in err
