"""Weights & Biases logging (config.wandb) in offline mode: the history in the offline run's
transaction log (read with wandb's own record protobuf) holds the values of metrics.jsonl and
eval.jsonl at their steps; a resumed run continues the same W&B run; config.wandb without wandb
installed, or with a bad mode, is refused before anything is written."""

import json
import struct
import sys
import zlib

import pytest

pytest.importorskip("wandb", reason="needs the [wandb] extra")

from loam import train as train_lib  # noqa: E402
from loam.configs import default  # noqa: E402

BLOCK = 32768  # the transaction log's block size (LevelDB's log format)


def read_records(path) -> list:
    """The records of an offline run's .wandb file: a ':W&B' header, then LevelDB log blocks
    of (crc32, length, type) chunks, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"bad checksum at {pos}"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(run_dir) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in read_records(next(run_dir.glob("run-*.wandb"))):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item}
            out.setdefault(int(r.history.step.num), {}).update(items)
    return out


def config(steps: int):
    c = default.get_config("runlocal")
    c.steps = steps
    c.eval_every = 2
    c.checkpoint_every = 2
    c.eval_tokens = 256
    c.mesh.data = 1
    with c.ignore_type():  # a recipe name replaced by per-domain weights
        c.data.weights = {"literature": 3, "dialogue": 1, "code": 1, "docs": 1,
                          "reference": 1}
    c.wandb.project = "loam-test"
    return c


def read_jsonl(path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.mark.e2e
def test_offline_run_holds_the_metrics_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    train_lib.train(config(4), workdir)
    (first,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    got = history(first)
    train_records = [r for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
    eval_records = read_jsonl(workdir / "eval.jsonl")
    assert sorted(got) == [1, 2, 3, 4] == [r["step"] for r in train_records]
    for r in train_records:
        logged = got[r["step"]]
        assert logged["train/loss"] == pytest.approx(r["loss"], rel=1e-12)
        assert logged["train/lr"] == pytest.approx(r["lr"], rel=1e-12)
        for d, w in r["mixture_weights"].items():
            assert logged[f"train/mixture_weights/{d}"] == pytest.approx(w)
            assert logged[f"train/loss_per_domain/{d}"] == pytest.approx(r["loss_per_domain"][d])
    assert r["mixture_weights"]["literature"] == pytest.approx(3 / 7)
    assert [r["step"] for r in eval_records] == [2, 4]
    for r in eval_records:
        logged = got[r["step"]]
        assert logged["eval/loss_domain_mean"] == pytest.approx(r["loss_domain_mean"])
        for d, v in r["per_domain"].items():
            assert logged[f"eval/per_domain/{d}/bits_per_byte"] == pytest.approx(
                v["bits_per_byte"])
    # The run's resolved config is the W&B run's config.
    runs = [r.run for r in read_records(next(first.glob("run-*.wandb")))
            if r.WhichOneof("record_type") == "run"]
    logged_config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert logged_config["steps"] == 4 and logged_config["wandb"]["project"] == "loam-test"

    # Resumed with more steps: the same W&B run id, the new steps only.
    train_lib.train(config(6), workdir)
    second = [p for p in (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
              if p != first]
    assert len(second) == 1 and second[0].name.endswith(first.name.rsplit("-", 1)[1])
    later = history(second[0])
    assert sorted(later) == [5, 6]
    steps = {r["step"]: r for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}
    assert later[6]["train/loss"] == pytest.approx(steps[6]["loss"], rel=1e-12)
    assert later[6]["eval/loss_domain_mean"] == pytest.approx(
        read_jsonl(workdir / "eval.jsonl")[-1]["loss_domain_mean"])


def test_wandb_config_without_wandb_installed_or_with_a_bad_mode_is_refused(
        tmp_path, monkeypatch, capsys):
    args = ["train", "--config", "loam/configs/default.py:runlocal",
            "--config.wandb.project=p"]

    def refused(workdir, *extra) -> str:
        with pytest.raises(SystemExit) as e:
            train_lib.main([*args, f"--workdir={workdir}", *extra])
        assert e.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        assert not workdir.exists()  # refused before anything is written
        return err[0]

    err = refused(tmp_path / "a", "--config.wandb.mode=sometimes")
    assert "config.wandb.mode='sometimes'" in err and "'offline'" in err
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    err = refused(tmp_path / "b")
    assert "wandb is not installed" in err and "pip install -e '.[wandb]'" in err
