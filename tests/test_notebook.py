"""Issue 5: notebooks/ppo_guard_tour.ipynb runs top to bottom (nbclient, this interpreter's ipykernel), writes
its figures, and its fault runs name the expected codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "ppo_guard_tour.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"


def test_tour_notebook_runs_and_names_the_planted_faults(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("PPO_GUARD_TOUR_OUT", str(out))  # the kernel inherits this process's environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend puts the figure in the notebook
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" resolves to this interpreter (jupyter_client swaps a bare `python` for sys.executable)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    found = json.loads((out / "findings.json").read_text())
    assert found == {"healthy": [], "detached_logits": ["PPG101"], "actor_not_in_optimizer": ["PPG001"],
                     "lr_tiny": ["PPG204"]}
    for name in ("metrics_side_by_side.png", "detached_logits_report.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 30_000, name
    assert "PPG101" in (out / "detached_logits_report.html").read_text()
    # the figure is shown in the notebook too, and the summaries are printed
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    for code in ("PPG101", "PPG001", "PPG204", "no finding in"):
        assert code in text, code
    assert len(list((out / "logs").glob("*/version_0/metrics.csv"))) == 4
