"""Metric files: JSON lines and TensorBoard events, written without importing TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys


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
