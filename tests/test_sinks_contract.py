"""One contract, every store: Chroma (embedded and a real server), Milvus Lite, Parquet.

The suite is parametrised over the stores, a Milvus server among them (marker ``server``:
the 2.3.5 standalone server the session starts, or the one MILVUS_URI names). Each store is
opened once per module and each test uses its own collection, so the slow starts (the
servers, Milvus Lite) are paid once.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import uuid
from dataclasses import dataclass, replace
from importlib.metadata import EntryPoint

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from embedfleet.errors import CollectionMismatch, ConfigError, SinkError, UnknownBackendError
from embedfleet.sinks import registry
from embedfleet.sinks.base import CollectionInfo, QualityReport, Sink, SinkSpec, vector_family
from embedfleet.sinks.naming import physical_name
from embedfleet.sinks.registry import known_schemes, make_spec, open_sink
from embedfleet.frames.schemas import embeddings_schema
from tests.sink_servers import chroma_server, milvus_server, milvus_server_uri  # noqa: F401  (pytest fixtures)

DIM = 8
INFO = CollectionInfo(model="fake-a", dimensions=DIM, metric="cosine")


# -- frames -------------------------------------------------------------------------------


def make_frame(
    ids,
    vectors=None,
    *,
    texts=None,
    doc_ids=None,
    metadata=None,
    dim: int = DIM,
    seed: int = 0,
) -> pa.Table:
    n = len(ids)
    if vectors is None:
        vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    vectors = np.asarray(vectors, dtype=np.float32)
    return pa.Table.from_pydict(
        {
            "chunk_id": list(ids),
            "doc_id": list(doc_ids or [f"doc-{i // 3}" for i in range(n)]),
            "chunk_index": pa.array([i % 3 for i in range(n)], pa.int32()),
            "text": list(texts or [f"text of chunk {i}" for i in range(n)]),
            "start": pa.array([10 * i for i in range(n)], pa.int32()),
            "end": pa.array([10 * i + 9 for i in range(n)], pa.int32()),
            "n_tokens": pa.array([3] * n, pa.int32()),
            "metadata": list(metadata or [json.dumps({"source": "unit", "row": i}) for i in range(n)]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
        },
        schema=embeddings_schema(dim),
    )


def ids_of(n: int, prefix: str = "c") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


# -- stores -------------------------------------------------------------------------------


@dataclass
class Store:
    kind: str
    uri: str
    options: dict

    def sink(self, **options) -> Sink:
        return open_sink(make_spec(self.uri, {**self.options, **options}))


STORES = [
    "chroma-embedded",
    "chroma-server",
    "milvus-lite",
    "parquet",
    pytest.param("milvus-server", marks=pytest.mark.server),
]


@pytest.fixture(scope="module", params=STORES)
def store(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    if kind == "chroma-embedded":
        yield Store(kind, f"chroma://{root}/chroma", {})
    elif kind == "chroma-server":
        yield Store(kind, request.getfixturevalue("chroma_server"), {})
    elif kind == "milvus-lite":
        yield Store(kind, f"milvus://{root}/vectors.db", {})
    elif kind == "parquet":
        yield Store(kind, f"parquet://{root}/parquet", {})
    else:
        uri, options = request.getfixturevalue("milvus_server_uri")
        yield Store(kind, uri, options)


@pytest.fixture(scope="module")
def sink(store):
    with store.sink() as opened:
        yield opened


@pytest.fixture
def name(sink):
    """A fresh physical collection name, dropped after the test."""
    physical = physical_name("contract", f"t-{uuid.uuid4().hex[:10]}")
    yield physical
    if physical in sink.list_collections():
        sink.drop(physical)


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


# -- the contract ---------------------------------------------------------------------------


def test_upsert_is_idempotent(sink, name):
    coll = sink.open(name, info=INFO, create=True)
    frame = make_frame(ids_of(7))
    assert coll.upsert(frame) == 7
    assert coll.upsert(frame) == 7
    assert coll.count() == 7


def test_upsert_replaces_rows_by_id(sink, name):
    coll = sink.open(name, info=INFO, create=True)
    ids = ids_of(4)
    vectors = np.eye(DIM, dtype=np.float32)[:4]
    coll.upsert(make_frame(ids, vectors, texts=["old"] * 4))
    coll.upsert(make_frame(ids[:2], vectors[:2], texts=["new", "new"]))
    assert coll.count() == 4
    hits = {h.chunk_id: h.text for h in coll.query(vectors[0], 4)}
    assert hits[ids[0]] == "new" and hits[ids[1]] == "new" and hits[ids[2]] == "old"


def test_delete(sink, name):
    coll = sink.open(name, info=INFO, create=True)
    ids = ids_of(6)
    coll.upsert(make_frame(ids))
    assert coll.delete([ids[0], ids[3], "never-written"]) == 3
    assert coll.count() == 4
    assert coll.existing(ids) == set(ids) - {ids[0], ids[3]}
    assert coll.delete([]) == 0
    # A deleted id can come back.
    coll.upsert(make_frame(ids[:1]))
    assert coll.existing([ids[0]]) == {ids[0]}
    assert coll.count() == 5


def test_existing(sink, name):
    coll = sink.open(name, info=INFO, create=True)
    ids = ids_of(5)
    assert coll.existing(ids) == set()
    coll.upsert(make_frame(ids[:3]))
    assert coll.existing(ids) == set(ids[:3])
    assert coll.existing([]) == set()
    assert coll.existing([ids[0], ids[0], "x"]) == {ids[0]}


def test_iter_ids_lists_every_row_once_in_batches(sink, name):
    coll = sink.open(name, info=INFO, create=True)
    assert [t.num_rows for t in coll.iter_ids(3)] == []
    ids = ids_of(11)
    frame = make_frame(ids)
    coll.upsert(frame)
    coll.delete(ids[:2])
    batches = list(coll.iter_ids(3))
    assert all(0 < t.num_rows <= 3 for t in batches)
    listed = pa.concat_tables(batches)
    assert sorted(listed.column("chunk_id").to_pylist()) == sorted(ids[2:])
    doc_of = dict(zip(frame.column("chunk_id").to_pylist(), frame.column("doc_id").to_pylist()))
    assert {c: doc_of[c] for c in listed.column("chunk_id").to_pylist()} == dict(
        zip(listed.column("chunk_id").to_pylist(), listed.column("doc_id").to_pylist()))


def test_duplicate_ids_in_one_request(sink, name):
    coll = sink.open(name, info=INFO, create=True)
    vectors = np.eye(DIM, dtype=np.float32)[:3]
    assert coll.upsert(make_frame(["d1", "d2", "d1"], vectors, texts=["first", "other", "last"])) == 2
    assert coll.count() == 2
    (hit,) = coll.query(vectors[2], 1)
    assert (hit.chunk_id, hit.text) == ("d1", "last")  # the last row of an id wins
    assert coll.delete(["d2", "d2"]) == 2
    assert coll.existing(["d1", "d2"]) == {"d1"}


def test_query_top_k_order_and_scores(sink, name):
    coll = sink.open(name, info=INFO, create=True)
    # Vector i is at angle theta_i from the query, with a different length each: cosine
    # similarity is cos(theta_i) whatever the length, so the order is known exactly.
    angles = [0.05, 0.3, 0.6, 0.9, 1.2, 1.5, 2.0, 2.6]
    vectors = np.zeros((len(angles), DIM), dtype=np.float32)
    for i, theta in enumerate(angles):
        vectors[i, 0] = math.cos(theta) * (i + 1)
        vectors[i, 1] = math.sin(theta) * (i + 1)
    ids = [f"angle-{i}" for i in range(len(angles))]
    order = np.random.default_rng(1).permutation(len(ids))  # written in a scrambled order
    coll.upsert(make_frame([ids[i] for i in order], vectors[order]))
    query = np.zeros(DIM, dtype=np.float32)
    query[0] = 2.0
    hits = coll.query(query, 3)
    assert [h.chunk_id for h in hits] == ids[:3]
    assert [h.score for h in hits] == pytest.approx([math.cos(a) for a in angles[:3]], abs=1e-3)
    everything = coll.query(query, 50)
    assert [h.chunk_id for h in everything] == ids
    assert all(a.score >= b.score for a, b in zip(everything, everything[1:]))


def test_metadata_round_trip(sink, name):
    coll = sink.open(name, info=INFO, create=True)
    source_meta = {"source": "web", "page": 3, "weight": 0.5, "draft": True, "tags": ["a", "b"], "doc_id": "spoof"}
    frame = make_frame(
        ["m1"],
        [unit(np.arange(1, DIM + 1))],
        texts=["Grüße, 世界 — text survives"],
        doc_ids=["guide/intro.md"],
        metadata=[json.dumps(source_meta)],
    )
    coll.upsert(frame)
    (hit,) = coll.query(unit(np.arange(1, DIM + 1)), 1)
    assert hit.chunk_id == "m1"
    assert hit.doc_id == "guide/intro.md"  # the row's doc_id, never the metadata's
    assert hit.chunk_index == 0
    assert (hit.start, hit.end) == (0, 9)
    assert hit.text == "Grüße, 世界 — text survives"
    assert hit.score == pytest.approx(1.0, abs=1e-3)
    assert hit.metadata["source"] == "web"
    assert hit.metadata["page"] == 3
    assert hit.metadata["weight"] == pytest.approx(0.5)
    assert hit.metadata["draft"] is True
    assert json.loads(hit.metadata["tags"]) == ["a", "b"]  # non-scalars travel as JSON text
    assert "doc_id" not in hit.metadata


def test_model_guard_refuses_and_leaves_collection_alone(sink, name):
    coll = sink.open(name, info=INFO, create=True)
    coll.upsert(make_frame(ids_of(3)))
    other_model = CollectionInfo(model="fake-b", dimensions=DIM, metric="cosine")
    other_dim = CollectionInfo(model="fake-a", dimensions=DIM * 2, metric="cosine")
    for wrong in (other_model, other_dim):
        with pytest.raises(CollectionMismatch, match="fake-a"):
            sink.open(name, info=wrong, create=True)
    assert name in sink.list_collections()
    reopened = sink.open(name)
    assert reopened.info.model == "fake-a" and reopened.info.dimensions == DIM and reopened.info.metric == "cosine"
    assert reopened.count() == 3
    # The same model opens it fine (and does not recreate it).
    assert sink.open(name, info=INFO, create=True).count() == 3


FLOAT_FP32 = CollectionInfo(model="fake-a", dimensions=DIM, metric="cosine", precision="fp32", backend="sentence-transformers")
INT8_ONNX = CollectionInfo(model="fake-a", dimensions=DIM, metric="cosine", precision="int8", backend="onnx")


def test_vector_family_guard_and_allow_mixed(store, sink, name):
    coll = sink.open(name, info=FLOAT_FP32, create=True)
    coll.upsert(make_frame(ids_of(3)))
    assert coll.info.families == ("float",) and not coll.info.mixed
    # One family across backends and float precisions: bf16 on torch, fp32 on ONNX.
    for same in (replace(FLOAT_FP32, precision="bf16"), replace(FLOAT_FP32, backend="onnx")):
        assert sink.open(name, info=same, create=True).info.families == ("float",)
    with pytest.raises(CollectionMismatch) as refused:
        sink.open(name, info=INT8_ONNX, create=True)
    message = str(refused.value)
    assert "\n" not in message and "float" in message and "int8-onnx" in message and "--allow-mixed" in message
    with store.sink() as fresh:  # nothing was recorded by the refused open
        assert fresh.open(name).info.families == ("float",)

    mixed = sink.open(name, info=INT8_ONNX, create=True, allow_mixed=True)
    assert mixed.info.families == ("float", "int8-onnx") and mixed.info.mixed
    assert mixed.count() == 3
    mixed.upsert(make_frame(ids_of(2, prefix="q"), seed=1))
    with store.sink() as fresh:  # recorded in the store, not only in this connection
        reopened = fresh.open(name)
        assert reopened.info.families == ("float", "int8-onnx") and reopened.info.mixed
        assert (reopened.info.model, reopened.info.precision, reopened.info.backend) == ("fake-a", "fp32", "sentence-transformers")
        assert reopened.count() == 5
        # A family it holds now needs no permission (the workers of a mixed job open it so).
        assert fresh.open(name, info=INT8_ONNX, create=True).info.families == ("float", "int8-onnx")
        # Another int8 backend is a family of its own.
        with pytest.raises(CollectionMismatch, match="int8-openvino"):
            fresh.open(name, info=replace(INT8_ONNX, backend="openvino"), create=True)


def test_quality_report_is_stored_and_replaced(store, sink, name):
    coll = sink.open(name, info=INT8_ONNX, create=True)
    vectors = np.eye(DIM, dtype=np.float32)[:3]
    coll.upsert(make_frame(ids_of(3), vectors=vectors))
    assert coll.info.quality is None
    first = QualityReport(family="int8-onnx", samples=256, mean_cosine=0.987, min_cosine=0.951, top10_overlap=0.88,
                          job_id="job1")
    assert sink.record_quality(name, first).quality == first
    second = replace(first, mean_cosine=0.99, job_id="job2")
    sink.record_quality(name, second)
    with store.sink() as fresh:
        reopened = fresh.open(name, info=INT8_ONNX, create=True)
        assert reopened.info.quality == second
        assert reopened.info.families == ("int8-onnx",)
        assert (reopened.info.model, reopened.info.dimensions, reopened.info.metric) == ("fake-a", DIM, "cosine")
        # Recording changed no vector and not the metric: still cosine scores.
        hits = reopened.query(vectors[1] * 5, 2)
        assert hits[0].chunk_id == ids_of(3)[1] and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[1].score == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(SinkError, match="does not exist"):
        sink.record_quality(name + "_none", first)


def test_collections_recorded_before_families_derive_theirs():
    old = {"embedfleet_model": "fake-a", "embedfleet_dimensions": DIM, "embedfleet_metric": "cosine",
           "embedfleet_precision": "int8"}
    assert CollectionInfo.from_metadata(old).families == ("int8-onnx",)  # ONNX was the only quantizing backend
    assert CollectionInfo.from_metadata({**old, "embedfleet_precision": "bf16"}).families == ("float",)
    unknown = CollectionInfo.from_metadata({k: v for k, v in old.items() if k != "embedfleet_precision"})
    assert unknown.families == () and not unknown.mixed
    INT8_ONNX.check_compatible(unknown, collection="kb")  # nothing recorded to compare with: allowed
    assert vector_family("auto", "sentence-transformers") == "float"


def test_open_missing_collection(sink, name):
    with pytest.raises(SinkError, match="does not exist"):
        sink.open(name)
    with pytest.raises(SinkError):
        sink.open(name, create=True)  # creating needs the CollectionInfo
    assert name not in sink.list_collections()


def test_list_and_drop(sink, name):
    second = name + "_d2"
    sink.open(name, info=INFO, create=True).upsert(make_frame(ids_of(2)))
    sink.open(second, info=INFO, create=True)
    try:
        assert {name, second} <= set(sink.list_collections())
        sink.drop(second)
        listed = sink.list_collections()
        assert second not in listed and name in listed
        with pytest.raises(SinkError):
            sink.open(second)
        with pytest.raises(SinkError):
            sink.drop(second)
        assert sink.open(name).count() == 2
    finally:
        if second in sink.list_collections():
            sink.drop(second)


def test_query_on_small_and_empty_collections(sink, name):
    coll = sink.open(name, info=INFO, create=True)
    coll.upsert(make_frame(ids_of(2)))
    assert len(coll.query(np.ones(DIM), 10)) == 2


# -- store limits -------------------------------------------------------------------------


def _record_writes(store: Store, sink: Sink, coll, monkeypatch) -> list[int]:
    """Rows per write request the store receives (rows per part file for Parquet)."""
    sizes: list[int] = []
    if store.kind.startswith("chroma"):
        target = type(coll._collection)
        original = target.upsert

        def upsert(self, *args, **kwargs):
            sizes.append(len(kwargs["ids"]))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(target, "upsert", upsert)
    elif store.kind.startswith("milvus"):
        original = sink._client.upsert

        def upsert(collection_name, data, *args, **kwargs):
            sizes.append(len(data))
            return original(collection_name, data, *args, **kwargs)

        monkeypatch.setattr(sink._client, "upsert", upsert)
    return sizes


def test_batches_larger_than_the_store_limit_are_split(store, monkeypatch):
    with store.sink(**{"max-batch-size": 40}) as small:
        name = physical_name("contract", f"batch-{uuid.uuid4().hex[:8]}")
        try:
            coll = small.open(name, info=INFO, create=True)
            assert coll.max_batch_size == 40
            sizes = _record_writes(store, small, coll, monkeypatch)
            ids = ids_of(1100)
            assert coll.upsert(make_frame(ids)) == 1100
            if store.kind == "parquet":
                sizes = [pq.ParquetFile(p).metadata.num_rows for p in coll.parts()]
            assert sum(sizes) == 1100 and max(sizes) <= 40 and len(sizes) == math.ceil(1100 / 40)
            assert coll.count() == 1100
            # existing() batches its lookups too (Milvus: 512 ids per expression).
            assert coll.existing(ids + ids_of(50, prefix="missing")) == set(ids)
            assert coll.delete(ids[:600]) == 600
            assert coll.count() == 500
        finally:
            small.drop(name)


def test_real_store_limit_is_respected(store, sink, name):
    if store.kind.startswith("chroma"):
        limit = int(sink._client.get_max_batch_size())
        assert sink.open(name, info=INFO, create=True).max_batch_size == limit
        with store.sink(**{"max-batch-size": 10 * limit}) as oversized:
            # A configured size above the server's own limit is capped by it.
            assert oversized.open(name).max_batch_size == limit
    elif store.kind.startswith("milvus"):
        from embedfleet.sinks.milvus import estimate_row_bytes, plan_batches

        # The configured default stays under the 64 MiB gRPC message limit.
        assert sink.max_request_bytes <= 64 * 2**20
        # 2,000 rows of 60 kB text and 384-d vectors (~123 MB) planned, not written.
        row = estimate_row_bytes(dimensions=384, text_bytes=60_000, metadata_bytes=200, id_bytes=80)
        batches = list(plan_batches([row] * 2000, max_rows=sink.max_batch_size, max_bytes=sink.max_request_bytes))
        assert sum(b - a for a, b in batches) == 2000
        assert all((b - a) * row <= sink.max_request_bytes for a, b in batches)
        assert len(batches) == math.ceil(2000 * row / sink.max_request_bytes)
    else:
        coll = sink.open(name, info=INFO, create=True)
        assert coll.max_batch_size == 100_000  # rows per part file; Parquet itself has no request limit


# -- Milvus -------------------------------------------------------------------------------


MILVUS_STORES = ["milvus-lite", pytest.param("milvus-server", marks=pytest.mark.server)]
only_milvus = pytest.mark.parametrize("store", MILVUS_STORES, indirect=True)
only_parquet = pytest.mark.parametrize("store", ["parquet"], indirect=True)


@only_milvus
def test_milvus_request_bytes_split(store, monkeypatch):
    from embedfleet.sinks.milvus import estimate_row_bytes

    text = "x" * 1000
    row = estimate_row_bytes(dimensions=DIM, text_bytes=1000, metadata_bytes=len('{"source": "unit", "row": 10}'), id_bytes=6 + 5)
    budget = 3 * row + 10  # three rows per request
    with store.sink(**{"max-request-bytes": budget}) as small:
        name = physical_name("contract", f"bytes-{uuid.uuid4().hex[:8]}")
        try:
            coll = small.open(name, info=INFO, create=True)
            sizes = _record_writes(store, small, coll, monkeypatch)
            coll.upsert(make_frame(ids_of(10), texts=[text] * 10, doc_ids=["doc-0"] * 10))
            assert sizes == [3, 3, 3, 1]
            assert coll.count() == 10
        finally:
            small.drop(name)


@only_milvus
def test_milvus_text_longer_than_varchar_limit(store, sink, name):
    coll = sink.open(name, info=INFO, create=True)
    assert coll.text_max_length == 65535
    long_text = "é" * 40_000  # 80,000 UTF-8 bytes
    emoji_text = "a" + "🙂" * 20_000  # 4-byte characters: the cut must not split one
    vectors = np.eye(DIM, dtype=np.float32)[:3]
    coll.upsert(make_frame(["long", "emoji", "short"], vectors, texts=[long_text, emoji_text, "short"]))
    hits = {h.chunk_id: h for h in coll.query(vectors[0], 3)}
    stored = hits["long"].text
    assert len(stored.encode("utf-8")) <= 65535 and long_text.startswith(stored)
    assert len(stored) == 32767  # the longest whole-character prefix that fits
    assert hits["long"].metadata["text_truncated"] is True
    emoji_stored = hits["emoji"].text
    assert emoji_text.startswith(emoji_stored) and len(emoji_stored.encode("utf-8")) == 1 + 4 * (65534 // 4)
    assert hits["short"].text == "short" and "text_truncated" not in hits["short"].metadata


@only_milvus
def test_milvus_text_limit_is_the_collections_own(store, name):
    with store.sink(**{"text-max-length": 12}) as narrow:
        narrow.open(name, info=INFO, create=True)
    # Reopened with the default option, the field created with 12 bytes still rules.
    with store.sink() as default:
        coll = default.open(name)
        assert coll.text_max_length == 12
        coll.upsert(make_frame(["t"], texts=["ünïcödé€x"]))
        (hit,) = coll.query(np.ones(DIM), 1)
        assert hit.text == "ünïcödé" and hit.metadata["text_truncated"] is True
        default.drop(name)


def test_milvus_lite_is_single_writer_and_parquet_too(store, sink):
    expected = {"chroma-embedded": True, "chroma-server": False, "milvus-lite": True, "parquet": True, "milvus-server": False}
    assert sink.single_writer is expected[store.kind]


def test_milvus_uri_and_options_are_validated(tmp_path):
    from embedfleet.sinks.milvus import MilvusSink

    with pytest.raises(ConfigError, match="absolute path ending in .db"):
        MilvusSink(SinkSpec(uri="milvus:///tmp/not-a-db-file"))
    with pytest.raises(ConfigError, match="text-max-length"):
        MilvusSink(SinkSpec(uri=f"milvus://{tmp_path}/x.db", options=(("text-max-length", 70000),)))


def test_milvus_credentials_never_shown(monkeypatch):
    from embedfleet.sinks.milvus import _credentials

    spec = make_spec("milvus:///tmp/creds.db", {"token": "s3cr3t-token", "password": "hunter2"})
    assert "s3cr3t" not in repr(spec) and "hunter2" not in repr(spec)
    assert _credentials(spec) == {"token": "s3cr3t-token"}
    monkeypatch.setenv("MILVUS_USER", "root")
    monkeypatch.setenv("MILVUS_PASSWORD", "from-env")
    assert _credentials(make_spec("milvus:///tmp/creds.db")) == {"user": "root", "password": "from-env"}
    monkeypatch.delenv("MILVUS_PASSWORD")
    with pytest.raises(ConfigError, match="both user and password"):
        _credentials(make_spec("milvus:///tmp/creds.db"))


def test_truncate_utf8_cuts_at_character_boundaries():
    from embedfleet.sinks.milvus import truncate_utf8

    assert truncate_utf8("hello", 10) == ("hello", False)
    assert truncate_utf8("héllo", 2) == ("h", True)  # é is two bytes: not split
    assert truncate_utf8("🙂🙂", 7) == ("🙂", True)
    for limit in range(0, 12):
        cut, flagged = truncate_utf8("aé🙂b€", limit)
        assert "aé🙂b€".startswith(cut) and len(cut.encode()) <= limit
        assert flagged == (cut != "aé🙂b€")


def test_plan_batches():
    from embedfleet.sinks.milvus import plan_batches

    assert list(plan_batches([10] * 7, max_rows=3, max_bytes=1000)) == [(0, 3), (3, 6), (6, 7)]
    assert list(plan_batches([10, 10, 50, 10], max_rows=100, max_bytes=30)) == [(0, 2), (2, 3), (3, 4)]
    assert list(plan_batches([100, 5], max_rows=10, max_bytes=50)) == [(0, 1), (1, 2)]  # an oversized row goes alone
    assert list(plan_batches([], max_rows=3, max_bytes=10)) == []


# -- Chroma server: parallel writers ----------------------------------------------------------


def _write_from_process(uri: str, name: str, prefix: str, n: int) -> int:
    from embedfleet.sinks.registry import open_sink

    with open_sink(uri) as sink:
        coll = sink.open(name, info=INFO, create=True)
        written = 0
        for start in range(0, n, 50):
            written += coll.upsert(make_frame(ids_of(n, prefix)[start : start + 50], seed=start))
        return written


@pytest.mark.parametrize("store", ["chroma-server"], indirect=True)
def test_chroma_server_takes_parallel_writes_from_processes(store, sink, name):
    # Spawned, not forked: this process runs gRPC and Chroma threads.
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_write_from_process, [(store.uri, name, "p0-", 300), (store.uri, name, "p1-", 300)])
    assert results == [300, 300]
    assert sink.open(name).count() == 600


# -- Parquet layout -------------------------------------------------------------------------


@only_parquet
def test_parquet_layout_dedupes_and_compacts(store, sink, name):
    from embedfleet.sinks.parquet import read_collection

    coll = sink.open(name, info=INFO, create=True)
    ids = ids_of(6)
    coll.upsert(make_frame(ids, texts=["v1"] * 6))
    coll.upsert(make_frame(ids[:3], texts=["v2"] * 3, seed=5))
    coll.delete([ids[5]])
    directory = coll.path
    info = json.loads((directory / "_collection.json").read_text())
    assert info["info"]["embedfleet_model"] == "fake-a" and info["info"]["embedfleet_dimensions"] == DIM
    assert (directory / "_metadata").exists() and (directory / "_common_metadata").exists()

    # Raw readers see the log; the collection's reader sees one row per chunk, newest wins.
    assert len(pd.read_parquet(directory)) == 9
    live = read_collection(directory)
    assert live.schema == embeddings_schema(DIM)
    assert sorted(live.column("chunk_id").to_pylist()) == ids[:5]
    texts = dict(zip(live.column("chunk_id").to_pylist(), live.column("text").to_pylist()))
    assert texts == {ids[0]: "v2", ids[1]: "v2", ids[2]: "v2", ids[3]: "v1", ids[4]: "v1"}

    assert coll.compact() == 5
    frame = pd.read_parquet(directory)
    assert sorted(frame["chunk_id"]) == ids[:5] and frame.set_index("chunk_id")["text"].to_dict() == texts
    assert not list(directory.glob("_deletes-*"))
    # The _metadata summary lists exactly the part files: a dataset reads it without listing.
    dataset = pads.parquet_dataset(str(directory / "_metadata"))
    assert dataset.to_table().num_rows == 5
    assert coll.count() == 5 and coll.existing(ids) == set(ids[:5])
    # Milvus bulk-import layout: the Milvus sink's field names, embedding as list<float32>.
    part_schema = pq.read_schema(coll.parts()[0])
    assert part_schema.names == [
        "chunk_id", "doc_id", "chunk_index", "text", "start", "end", "n_tokens", "metadata", "embedding", "text_truncated"
    ]
    assert part_schema.field("embedding").type == pa.list_(pa.float32())


@only_parquet
def test_parquet_manifest_follows_the_parts(store, sink, name):
    coll = sink.open(name, info=INFO, create=True)
    for i in range(4):
        coll.upsert(make_frame(ids_of(5, prefix=f"r{i}-")))
    manifest = coll.path / "_metadata"
    assert pads.parquet_dataset(str(manifest)).to_table().num_rows == 20
    # As after a crash between a part's rename and the manifest update: the next write repairs it.
    pq.write_metadata(pq.read_schema(coll.parts()[0]), manifest)
    coll.upsert(make_frame(ids_of(5, prefix="r4-")))
    listed = pq.read_metadata(manifest)
    assert {listed.row_group(i).column(0).file_path for i in range(listed.num_row_groups)} == {
        p.name for p in coll.parts()
    }
    assert pads.parquet_dataset(str(manifest)).to_table().num_rows == 25


@pytest.mark.parametrize("store", ["parquet", "milvus-lite"], indirect=True)
def test_exact_search_matches_numpy_on_the_live_rows(store, sink, name):
    coll = sink.open(name, info=INFO, create=True)
    rng = np.random.default_rng(7)
    live: dict[str, np.ndarray] = {}
    for round_ in range(4):  # overlapping upserts and deletes spread over several files
        ids = [f"v{i:04d}" for i in rng.choice(400, size=150, replace=False)]
        vectors = rng.normal(size=(len(ids), DIM)).astype(np.float32)
        coll.upsert(make_frame(ids, vectors))
        live.update(zip(ids, vectors))
        gone = sorted(rng.choice(sorted(live), size=20, replace=False))
        coll.delete(gone)
        for chunk_id in gone:
            live.pop(chunk_id)
    assert coll.count() == len(live)
    query = rng.normal(size=DIM).astype(np.float32)
    ids = sorted(live)
    matrix = np.stack([live[i] for i in ids])
    scores = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
    expected = [ids[i] for i in np.argsort(-scores)[:10]]
    hits = coll.query(query, 10)
    assert [h.chunk_id for h in hits] == expected
    assert [h.score for h in hits] == pytest.approx(sorted(scores, reverse=True)[:10], abs=1e-4)


def test_milvus_extra_missing_names_the_extra(monkeypatch, tmp_path):
    from embedfleet.errors import BackendUnavailableError

    monkeypatch.setitem(__import__("sys").modules, "pymilvus", None)  # as if not installed
    with pytest.raises(BackendUnavailableError, match=r"embedfleet\[milvus\]"):
        open_sink(f"milvus://{tmp_path}/x.db")


@only_parquet
def test_parquet_ignores_unfinished_writes_and_compacts_automatically(store, name):
    with store.sink(**{"compact-after": 3}) as sink:
        coll = sink.open(name, info=INFO, create=True)
        (coll.path / ".tmp-crashed-part-000000000099.parquet").write_bytes(b"half a file")
        for i in range(3):
            coll.upsert(make_frame(ids_of(4), seed=i))
        assert coll.count() == 4
        coll.delete(ids_of(1))  # the fourth file: compaction runs
        assert len(coll.parts()) == 1
        assert not list(coll.path.glob(".tmp-*"))
        assert coll.count() == 3
        sink.drop(name)


@only_parquet
def test_parquet_refuses_paths_outside_the_root(store, sink):
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(SinkError):
            sink.open(bad, info=INFO, create=True)


@only_parquet
def test_parquet_checks_the_frame_schema(store, sink, name):
    from embedfleet.frames.schemas import SchemaMismatch

    coll = sink.open(name, info=INFO, create=True)
    with pytest.raises(SchemaMismatch, match="embedding"):
        coll.upsert(make_frame(["x"], dim=DIM * 2))


# -- registry -------------------------------------------------------------------------------


def test_unknown_scheme_lists_known_ones():
    with pytest.raises(UnknownBackendError) as caught:
        open_sink("qdrant://localhost:6333")
    message = str(caught.value)
    assert "qdrant" in message
    for scheme in ("chroma", "milvus", "parquet"):
        assert scheme in message
    with pytest.raises(ConfigError, match="not a URI"):
        make_spec("/just/a/path")


class _MemorySink(Sink):
    scheme = "memory"

    def open(self, name, *, info=None, create=False):  # pragma: no cover - never opened here
        raise NotImplementedError

    def list_collections(self):
        return ["from-entry-point"]

    def drop(self, name):  # pragma: no cover
        raise NotImplementedError


def test_entry_point_fallback(monkeypatch):
    point = EntryPoint(name="memory", value=f"{__name__}:_MemorySink", group="embedfleet.sinks")

    def entry_points(*, group):
        return [point] if group == "embedfleet.sinks" else []

    monkeypatch.setattr(registry, "entry_points", entry_points)
    assert "memory" in known_schemes()
    assert open_sink("memory://anywhere").list_collections() == ["from-entry-point"]


def test_registered_factory_wins(monkeypatch):
    monkeypatch.setitem(registry._SINKS, "memory", _MemorySink)
    assert isinstance(open_sink("memory://x"), _MemorySink)
    assert "memory" in known_schemes()
