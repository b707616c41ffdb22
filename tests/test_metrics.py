"""Metric files: JSON lines and TensorBoard events, written without importing TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_metric_writer_does_not_load_tensorflow(tmp_path):
    code = f"""
import json, sys
from loam import metrics
w = metrics.MetricWriter({str(tmp_path)!r})
w.write(3, {{"loss": 2.5, "loss_per_domain": {{"code": 1.25}}}})
w.close()
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator({str(tmp_path / "tensorboard" / "train")!r})
acc.Reload()
print(json.dumps({{"tf": "tensorflow" in sys.modules, "tags": sorted(acc.Tags()["scalars"]),
                  "loss": [(e.step, e.value) for e in acc.Scalars("loss")]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tf"] is False
    assert got["loss"] == [[3, 2.5]] and len(got["tags"]) == 2
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5


def test_a_failed_event_write_is_one_error_in_the_caller_and_no_thread_traceback(tmp_path):
    """TensorBoard writes events from a thread of its own. A write failing there (here: the event
    file turned into /dev/full, which refuses every write with ENOSPC) surfaces as OSError at the
    writer's next flush in the caller, where the command line makes it one `error:` line; the
    thread's own copy of the traceback is not printed."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    code = f"""
import errno, os, pathlib
from loam import metrics
w = metrics.MetricWriter({str(tmp_path)!r})
w.write(1, {{"loss": 2.5}})
w.flush()
(event,) = pathlib.Path({str(tmp_path / "tensorboard" / "train")!r}).iterdir()
event.unlink()
event.symlink_to("/dev/full")
w.write(2, {{"loss": 2.0}})
try:
    w.flush()
except OSError as e:
    print("raised", e.errno == errno.ENOSPC)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["raised", "True"], out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]
