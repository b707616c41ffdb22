"""The benchmarks run and print the JSON their readers rely on (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from loam.bench import swarm as bench_swarm
from loam.bench import train as bench_train
from loam.model import sizes

pytestmark = pytest.mark.e2e  # each test runs a whole benchmark command


def test_train_bench_prints_runs_json(capsys):
    assert bench_train.main(["--runs", "mini", "--steps", "1", "--dots"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run,) = last["runs"]
    for key in ("name", "params", "tokens_per_s", "mfu", "matmul_peak_flops", "compile_s",
                "step_time_median_s", "step_time_min_s", "step_time_max_s", "peak_rss_mb"):
        assert key in run, key
    cfg = sizes.get_size("mini", 8192, tied_embeddings=False)
    assert run["name"] == "mini" and run["params"] == sizes.count_params(cfg)["total"]
    assert run["tokens_per_s"] > 0 and 0 < run["mfu"] and run["matmul_peak_flops"] > 0
    assert run["loss_last"] < run["loss_first"]  # the step trains
    # --dots: the compiled step's matmuls, read from its HLO (the layer scan's and the loss
    # scan's bodies times their trip counts), execute exactly the model's matmul FLOPs (6N + 12
    # L d T, less the norm scales, which are parameters but no matmul) plus what the "dots"
    # residual policy recomputes in the backward pass: the attention core's two forward matmuls.
    tokens, seq = run["batch"] * run["seq_len"], run["seq_len"]
    norms = 2 * cfg.d_model * cfg.n_layers + cfg.d_model
    recompute = 4 * cfg.n_layers * cfg.d_model * seq
    assert run["matmul_flops_per_step"] == tokens * (
        sizes.flops_per_token(cfg, seq) - 6 * norms + recompute)
    assert run["matmul_flops_vs_model"] > 1
    assert run["dots_alone_s"] > 0 and run["step_time_after_dots_s"] > 0
    assert run["dots_alone_share"] == pytest.approx(
        2 * run["dots_alone_s"] / (run["step_time_median_s"] + run["step_time_after_dots_s"]))
    assert run["mfu_dots_alone"] == pytest.approx(
        run["flops_per_token"] * tokens / (run["dots_alone_s"] * last["matmul_peak_flops"]))
    slowest = run["slowest_dots"]
    assert 0 < len(slowest) <= run["distinct_dots"]
    assert [d["seconds"] for d in slowest] == sorted((d["seconds"] for d in slowest),
                                                     reverse=True)
    assert sum(d["seconds"] for d in slowest) <= run["dots_alone_s"] * (1 + 1e-9)


def test_train_bench_variants_take_xla_compiler_options():
    variant = bench_train._parse_variant(
        "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,"
        "scan_unroll=2")
    assert variant == {"xla_cpu_experimental_ynn_fusion_type":
                       "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE", "scan_unroll": 2}
    assert bench_train._parse_variant("xla_cpu_enable_fast_math=true,xla_cpu_max_isa=AVX2") == {
        "xla_cpu_enable_fast_math": True, "xla_cpu_max_isa": "AVX2"}
    with pytest.raises(ValueError, match="xla_"):
        bench_train._parse_variant("no_such_field=1")
    # The option reaches the compiler: with YNNPACK's fusions off the step has none of them.
    default = bench_train._Run("mini", 1)
    off = bench_train._Run("mini", 1, bench_train._parse_variant(
        "xla_cpu_experimental_ynn_fusion_type="))
    assert "__ynn_fusion" in default.compiled.as_text()
    assert "__ynn_fusion" not in off.compiled.as_text()
    assert off.first_loss == pytest.approx(default.first_loss, rel=1e-5)


def test_train_bench_refuses_an_unknown_xla_option_in_one_line(capsys):
    assert bench_train.main(["--runs", "mini", "--steps", "1", "--variants",
                             "xla_no_such_option=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("--variants: XLA refused the compiler options")
    assert "xla_no_such_option" in err and len(err.splitlines()) == 1


def test_train_bench_interleaves_variants_with_paired_ratios(capsys):
    assert bench_train.main(["--runs", "mini", "--steps", "3", "--interleave", "--variants",
                             "attention_impl=xla;attention_impl=manual"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    xla, manual = last["runs"]
    assert (xla["variant"], manual["variant"]) == ({"attention_impl": "xla"},
                                                   {"attention_impl": "manual"})
    assert xla["steps"] == manual["steps"] == 6  # two recorded steps a round
    assert xla["vs_first"]["rounds"] == manual["vs_first"]["rounds"] == 3
    assert xla["vs_first"]["step_time_ratio_median"] == 1.0
    assert manual["vs_first"]["step_time_ratio_median"] > 0
    assert manual["vs_first"]["step_time_ratio_se"] is not None
    # Same model, same batches, same numbers whichever attention computes them.
    assert abs(manual["loss_first"] - xla["loss_first"]) < 1e-4
    assert abs(manual["loss_last"] - xla["loss_last"]) < 1e-3
    # MFU is against the highest peak sampled in the process (before and after the model).
    assert len(last["matmul_peak_samples"]) == 2
    assert last["matmul_peak_flops"] == max(last["matmul_peak_samples"])
    for run in last["runs"]:
        assert run["mfu"] == pytest.approx(
            run["flops_per_token"] * run["tokens_per_s"] / last["matmul_peak_flops"])


def test_swarm_bench_matches_sequential_losses(capsys):
    """The rounds in this process (--in_process: the summary's arithmetic), then one side as
    the bench runs it by default, in a process of its own: the same losses."""
    bench_swarm.main(["--k", "2", "--size", "nano", "--seq_len", "32", "--batch_size", "8",
                      "--steps", "2", "--rounds", "2", "--in_process"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kw = dict(k=2, size="nano", seq_len=32, batch_size=8, steps=2, seed=0)
    here, alone = bench_swarm.side("map", **kw), bench_swarm._side_in_subprocess("map", **kw)
    assert alone["side"] == "map" and alone["member_shards"] == here["member_shards"] == 2
    assert alone["seconds"] > 0 and len(alone["losses"]) == 2
    assert alone["losses"] == pytest.approx(here["losses"], rel=1e-5)
    for key in ("k", "params_per_member", "swarm_tokens_per_s", "sequential_tokens_per_s",
                "speedup", "swarm_mfu", "sequential_mfu"):
        assert key in last, key
    assert last["k"] == 2
    # Both member loops measured; the summary is the faster one's.
    assert set(last["loops"]) == {"vmap", "map"}
    fastest = max(last["loops"], key=lambda loop: last["loops"][loop]["tokens_per_s"])
    assert last["member_loop"] == fastest
    assert last["speedup"] == last["loops"][fastest]["speedup"]
    assert last["default_is_fastest"] == (last["default_member_loop"] == fastest)
    # The timed steps ran in rounds, each side timed in every round.
    assert last["rounds"] == 2
    for loop in last["loops"].values():
        assert len(loop["round_speedups"]) == 2
        assert loop["min_round_speedup"] == min(loop["round_speedups"])
        assert min(loop["round_speedups"]) <= loop["speedup"] <= max(loop["round_speedups"])
    assert last["params_per_member"] == sizes.count_params(sizes.get_size("nano"))["non_embedding"]
    # Both sides trained the same members on the same batches: same losses.
    assert last["max_loss_difference"] < 1e-4


def test_mixing_bench_prints_overheads_and_the_probe_speedup(capsys):
    from loam.bench import mixing as bench_mixing
    assert bench_mixing.main(["--steps", "6", "--skip", "2", "--update_steps", "3",
                              "--probe_steps", "1", "--repeats", "1", "--seq_len", "32",
                              "--batch_size", "8", "--eval_tokens", "256",
                              "--methods", "doremi"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["methods"]) == {"static", "doremi"}  # the probe round is Aioli's
    for m in last["methods"].values():
        assert m["step_overhead"] > 0 and m["step_s"] > 0
    assert last["methods"]["static"]["step_overhead"] == 1.0
    assert last["aioli_probe_swarm_speedup"] > 0
    # Both sides trained the same probes on the same batches: the same held-out losses.
    assert last["aioli_probe_max_loss_difference"] < 1e-4
