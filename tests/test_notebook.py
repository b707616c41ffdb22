"""notebooks/quickstart.ipynb: committed clean, and executed end to end by a real kernel (nbclient)
at its smallest sizes, injected after its parameters cell as papermill does."""

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the [notebook] extra")
nbclient = pytest.importorskip("nbclient", reason="needs the [notebook] extra")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
DOMAINS = ["literature", "code", "reference"]
SMALLEST = {"SIZE": "nano", "STEPS": 6, "SEQ_LEN": 32, "BATCH_SIZE": 4, "EVAL_EVERY": 3,
            "EVAL_TOKENS": 256, "PROBE_ITEMS": 4, "MAX_NEW_TOKENS": 8, "PROXIES": 11,
            "PROXY_STEPS": 3, "DOMAINS": DOMAINS}


def test_notebook_is_committed_without_outputs_and_has_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    (params,) = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    defined = {line.split("=")[0].strip() for line in params.source.splitlines()
               if "=" in line and not line.startswith("#")}
    assert set(SMALLEST) <= defined


def lines_starting(outputs: list, prefix: str) -> list[str]:
    return [line[len(prefix):].strip() for o in outputs if o.get("output_type") == "stream"
            for line in o["text"].splitlines() if line.startswith(prefix)]


@pytest.mark.e2e
@pytest.mark.slow
def test_quickstart_runs_end_to_end_at_its_smallest_size(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = "\n".join(f"{k} = {v!r}" for k, v in SMALLEST.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        injected, metadata={"tags": ["injected-parameters"]}))
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]

    # The curves figure, drawn from the run's files and shown inline.
    run = tmp_path / "runs" / "quickstart"
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert any("image/png" in o.get("data", {}) for o in outputs)
    finished = json.loads((run / "eval.jsonl").read_text().splitlines()[0])
    assert finished["step"] == 3 and set(finished["per_domain"]) == set(DOMAINS)

    (sample,) = lines_starting(outputs, "sample:")
    text = json.loads(sample)
    assert text.startswith("And God said") and len(text) > len("And God said")

    (probes,) = lines_starting(outputs, "probe accuracies:")
    accuracies = json.loads(probes)
    assert set(accuracies) == set(DOMAINS)
    for m in accuracies.values():
        assert 0 <= m["acc"] <= 1 and m["chance"] == 0.25

    for name in ("regmix", "mixing_law"):
        (mixture,) = lines_starting(outputs, f"mixture {name}:")
        weights = json.loads(mixture)
        assert list(weights) == DOMAINS
        assert all(w >= 0 for w in weights.values())
        assert sum(weights.values()) == pytest.approx(1, abs=2e-3)  # rounded to 3 places
    report = json.loads((tmp_path / "runs" / "quickstart-mixsearch" / "report.json").read_text())
    assert report["num_proxies"] == SMALLEST["PROXIES"]
