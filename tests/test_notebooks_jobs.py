"""notebooks/job-service.ipynb runs top to bottom with the real model on a LocalCluster it starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "job-service.ipynb"


def test_job_service_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits the environment: a scratch data dir, and no config from the caller's job database.
    monkeypatch.setenv("EMBEDFLEET_NOTEBOOK_DATA", str(tmp_path / "nb-data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DASK_EMBEDFLEET__JOBS__DATABASE_URL", raising=False)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "\n".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "refused:" in outputs and "remaining today: 998" in outputs  # bob's queued 2-chunk job holds 2
    assert "succeeded" in outputs and "oncall.md" in outputs
    assert (tmp_path / "nb-data" / "jobs.db").exists()
    assert os.environ.get("EMBEDFLEET_NOTEBOOK_DATA") == str(tmp_path / "nb-data")
