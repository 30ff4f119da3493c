"""``embedfleet search`` on an existing collection: ONNX Runtime where an export exists, the same hits as torch.

One module-wide collection of real text indexed with the real model through ``--backend
onnx``, which leaves the model's ONNX export in the data dir's model cache, as any onnx run
does. Searches then embed the query with that export, without importing torch, and must rank
and score exactly as the sentence-transformers (torch) backend does.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import embedfleet
from embedfleet.cli import main
from tests import faults_helpers as fh

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # the real model is exported and runs on the session cluster

QUERIES = ["how do I rotate a log file", "restore a backup from a snapshot", "reset my password"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory, client):
    from tests.conftest import SAMPLE_DOCS

    root = tmp_path_factory.mktemp("search")
    docs = root / "docs"
    for rel, text in SAMPLE_DOCS.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(text, encoding="utf-8")
    fh.make_corpus(docs / "more", documents=3, words=200, seed=5)
    data_dir = root / "data"
    outcome = CliRunner().invoke(main, [
        "index", str(docs), "--collection", "kb", "--backend", "onnx", "--data-dir", str(data_dir),
        "--scheduler", client.scheduler.address, "--json",
    ])
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    assert json.loads(outcome.stdout)["embedded"] > 0
    return data_dir


def _hits(data_dir, query):
    return [(h.chunk_id, round(h.score, 6)) for h in embedfleet.search(query, collection="kb", data_dir=str(data_dir), k=5)]


def test_search_uses_the_export_and_matches_torch(collection, monkeypatch):
    from embedfleet.embedders import cache, onnx

    cache.clear()
    fast = {q: _hits(collection, q) for q in QUERIES}
    assert [type(m).__name__ for m in cache._models.values()] == ["OnnxEmbedder"]

    cache.clear()
    monkeypatch.setattr(onnx, "find_export", lambda *a, **k: None)  # as if no export existed
    slow = {q: _hits(collection, q) for q in QUERIES}
    assert [type(m).__name__ for m in cache._models.values()] == ["SentenceTransformerEmbedder"]
    cache.clear()
    for q in QUERIES:
        assert [c for c, _ in fast[q]] == [c for c, _ in slow[q]], q
        for (_, a), (_, b) in zip(fast[q], slow[q]):
            assert abs(a - b) < 1e-4, (q, a, b)


def test_search_in_a_fresh_process_imports_no_torch_or_dask(collection):
    env = fh.cli_env()
    script = (
        "import json, sys\n"
        "from embedfleet.cli import main\n"
        f"main(['search', {QUERIES[0]!r}, '--collection', 'kb', '--data-dir', {str(collection)!r}, '--json'],"
        " standalone_mode=False)\n"
        # dask.config is imported (config is built on it); dask's graph machinery is not.
        "heavy = ('torch', 'sentence_transformers', 'transformers', 'distributed', 'dask.dataframe', 'dask.array',"
        " 'sqlalchemy', 'pandas', 'pyarrow')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []
    hits = json.loads(done.stdout)
    assert [h["chunk_id"] for h in hits] == [c for c, _ in _hits(collection, QUERIES[0])]
    assert hits[0]["doc_id"] == "guide/logging.md"
