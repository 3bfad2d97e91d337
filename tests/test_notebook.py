"""The debugging notebook (docs/debugging_rollouts.ipynb) runs top to bottom on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "debugging_rollouts.ipynb"


@pytest.mark.slow
def test_debugging_notebook_executes(tmp_path, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # Run the kernel on this very interpreter (the project's venv), whatever kernels the machine has.
    spec_dir = tmp_path / "jupyter" / "kernels" / "deepeyes-test"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "deepeyes test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="deepeyes-test",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    html = [o["data"]["text/html"] for o in outputs if "data" in o and "text/html" in o["data"]]
    assert len(html) == 2 and "<details>" in html[0] and "class='tok'" in html[1]
    text = "".join(o.get("text", "") for o in outputs)
    assert "replay ok: True" in text and "max |logprob difference|" in text
