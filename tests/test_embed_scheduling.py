"""How a job spreads embedding over workers, and the layout of the local cluster it starts.

* The driver keeps one embedding task running and one queued on every embedding worker, each
  sent to the worker with the fewest unfinished ones, biggest slices first, and follows
  workers that join or leave (unit tests with a recording client; one real two-worker run).
* An embed-slot worker leaves one thread for the job's light tasks; torch gets the rest.
* The default LocalCluster is one worker per core (capped), each with one spare thread, and
  its workers profile only with ``cluster.profile``, at ``cluster.profile-cycle``.
"""

from __future__ import annotations

import itertools

import dask.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedfleet.pipeline import placement as placement_module
from embedfleet.pipeline.cluster import EMBED_SLOT, MAX_AUTO_WORKERS, connect, local_layout, worker_threads
from embedfleet.pipeline.embedding import Embedding
from embedfleet.pipeline.follow import Follower
from embedfleet.pipeline.job import Progress
from embedfleet.pipeline.jobdir import JobDir
from embedfleet.pipeline.placement import Placement
from embedfleet.pipeline.run import run_job
from embedfleet.pipeline.spec import build_job_spec
from embedfleet.frames.io import read_json
from tests import faults_helpers as fh


class RecordingClient:
    """Stands in for a distributed Client: records submissions, knows a set of workers."""

    def __init__(self, workers: dict[str, dict]):
        self.workers = workers
        self.submitted: list[dict] = []
        self._ids = itertools.count()

    def scheduler_info(self, n_workers: int = -1) -> dict:
        return {"workers": self.workers}

    def submit(self, fn, *args, workers=None, allow_other_workers=False, key=None, **kwargs):
        self.submitted.append({"key": key, "workers": workers, "loose": allow_other_workers,
                               "rows": args[2] - args[1]})
        return f"future-{next(self._ids)}"


def _slot_worker(threads: int = 2) -> dict:
    return {"nthreads": threads, "resources": {EMBED_SLOT: 1}}


def _embedding(tmp_path, client, fake_model, *, rows_per_slice: int):
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "a.txt").write_text("text")
    spec = build_job_spec(str(tmp_path / "source"), collection="kb", model=fake_model, data_dir=str(tmp_path / "data"))
    follower = Follower(client, priority=0, cancel=None, on_progress=None, progress=Progress(stage="chunking"))
    job_dir = JobDir(tmp_path / "job")
    job_dir.make()
    futures: dict = {}
    embedding = Embedding(spec, follower, futures, placement=Placement(client, spec.embedder), job_dir=job_dir,
                          write_kwargs={})
    embedding.rows_per_slice = rows_per_slice
    return embedding, futures


def _chunk_file(tmp_path, name: str, rows: int) -> str:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.table({"chunk_id": [f"{name}-{i}" for i in range(rows)]}), path)
    return str(path)


def _finish(embedding, futures, client, index: int) -> None:
    """Report the ``index``-th submitted embedding task as finished."""
    event = futures.pop(f"future-{index}")
    embedding.on_embedded(event.slot, {"rows": client.submitted[index]["rows"], "real_tokens": 1, "padded_tokens": 1,
                                    "precision": "fp32"})


def test_two_tasks_per_worker_spread_evenly_biggest_first(tmp_path, fake_model):
    client = RecordingClient({"tcp://a:1": _slot_worker(), "tcp://b:1": _slot_worker()})
    embedding, futures = _embedding(tmp_path, client, fake_model, rows_per_slice=10)
    embedding.add(_chunk_file(tmp_path, "first", 30))   # three slices of 10 rows
    embedding.add(_chunk_file(tmp_path, "small", 14))   # 10 and 4
    embedding.add(_chunk_file(tmp_path, "last", 30))    # three of 10

    # Four tasks on the cluster: two per worker, loosely pinned; the rest wait.
    assert len(client.submitted) == 4
    assert sorted(s["workers"][0] for s in client.submitted) == ["tcp://a:1"] * 2 + ["tcp://b:1"] * 2
    assert all(s["loose"] for s in client.submitted)
    assert len(embedding.waiting) == 4

    # A task finished on a worker: its replacement goes to that worker, and the biggest slices
    # go before the 4-row one, which was known earlier.
    for index in range(4):
        freed = client.submitted[index]["workers"][0]
        _finish(embedding, futures, client, index)
        assert client.submitted[4 + index]["workers"] == [freed]
    assert [s["rows"] for s in client.submitted[4:]] == [10, 10, 10, 4]
    assert max(embedding.placement.assigned.values()) == placement_module.TASKS_PER_EMBED_WORKER


def test_workers_that_join_get_work_and_a_cluster_with_none_still_gets_tasks(tmp_path, fake_model, monkeypatch):
    client = RecordingClient({})
    embedding, futures = _embedding(tmp_path, client, fake_model, rows_per_slice=5)
    embedding.add(_chunk_file(tmp_path, "part", 30))  # six slices
    # No embedding worker yet (a cluster scaling up from zero): tasks go anywhere, two at a time.
    assert [s["workers"] for s in client.submitted] == [None, None]

    client.workers = {"tcp://a:1": _slot_worker(), "tcp://b:1": _slot_worker()}
    monkeypatch.setattr(placement_module, "WORKERS_REFRESH_SECONDS", 0.0)
    _finish(embedding, futures, client, 0)
    placed = [s["workers"] for s in client.submitted[2:]]
    assert sorted(w[0] for w in placed) == ["tcp://a:1", "tcp://a:1", "tcp://b:1", "tcp://b:1"]
    # Resolved from the workers that joined: their embed slot, and torch on all threads but one.
    assert embedding.placement.resources == {EMBED_SLOT: 1} and embedding.placement.embedder.threads == 1


def test_tasks_are_not_pinned_when_some_workers_cannot_embed(tmp_path, fake_model):
    # A loose pin could let Dask run a GPU task on a CPU worker: the scheduler places them.
    gpu = {"nthreads": 1, "resources": {"GPU": 1}}
    client = RecordingClient({"tcp://gpu:1": gpu, "tcp://gpu:2": gpu, "tcp://cpu:1": {"nthreads": 1, "resources": {}}})
    embedding, futures = _embedding(tmp_path, client, fake_model, rows_per_slice=5)
    embedding.add(_chunk_file(tmp_path, "part", 50))  # ten slices
    assert [s["workers"] for s in client.submitted] == [None] * 4  # two per GPU worker
    assert not any(s["loose"] for s in client.submitted)


def test_a_worker_that_left_is_forgotten(tmp_path, fake_model, monkeypatch):
    client = RecordingClient({"tcp://a:1": _slot_worker(), "tcp://b:1": _slot_worker()})
    embedding, futures = _embedding(tmp_path, client, fake_model, rows_per_slice=5)
    embedding.add(_chunk_file(tmp_path, "part", 40))  # eight slices: four submitted
    on_b = [i for i, s in enumerate(client.submitted) if s["workers"] == ["tcp://b:1"]]
    on_a = [i for i, s in enumerate(client.submitted) if s["workers"] == ["tcp://a:1"]]
    del client.workers["tcp://b:1"]
    monkeypatch.setattr(placement_module, "WORKERS_REFRESH_SECONDS", 0.0)
    _finish(embedding, futures, client, on_b[0])  # b's task finished elsewhere (Dask moved it)
    assert set(embedding.placement.assigned) == {"tcp://a:1"}
    assert len(client.submitted) == 4, "a already has its two tasks"
    _finish(embedding, futures, client, on_b[1])
    assert len(client.submitted) == 4, "b's tasks free no slot of a"
    _finish(embedding, futures, client, on_a[0])
    assert [s["workers"] for s in client.submitted[4:]] == [["tcp://a:1"]]


def test_torch_gets_all_threads_but_the_spare_one_of_an_embed_slot_worker():
    def threads(*workers: dict) -> int | None:
        client = RecordingClient({f"tcp://w:{i}": w for i, w in enumerate(workers)})
        resources = {EMBED_SLOT: 1} if all((w.get("resources") or {}).get(EMBED_SLOT) for w in workers) else None
        return worker_threads(client, resources)

    assert threads(_slot_worker(2), _slot_worker(2)) == 1
    assert threads(_slot_worker(5)) == 4
    assert threads(_slot_worker(1)) == 1  # nothing to spare
    assert threads({"nthreads": 4, "resources": {}}) == 4  # no slot: tasks share the worker's threads
    assert threads() is None


def test_local_layout_is_one_worker_per_core_with_a_spare_thread():
    assert local_layout(cores=1) == (1, 2)
    assert local_layout(cores=2) == (2, 2)
    assert local_layout(cores=64) == (MAX_AUTO_WORKERS, 64 // MAX_AUTO_WORKERS + 1)
    assert local_layout(cores=2, workers=1) == (1, 3)
    assert local_layout(cores=2, threads_per_worker=4) == (2, 4)
    assert local_layout(cores=16, gpus=2) == (2, 8)  # --gpu: one worker per GPU, sharing the cores
    with dask.config.set({"embedfleet.cluster.workers": 3, "embedfleet.cluster.threads-per-worker": 1}):
        assert local_layout(cores=8) == (3, 1)


def _profile_cycle_ms(dask_worker) -> float | None:
    cycle = dask_worker.periodic_callbacks.get("profile-cycle")
    return cycle.callback_time if cycle is not None else None


@pytest.mark.parametrize(("profile", "cycle", "expected_ms"), [(None, None, None), (True, "10s", 10_000), (True, None, 1_000)])
def test_the_clusters_embedfleet_starts_profile_only_when_asked_at_the_configured_cycle(profile, cycle, expected_ms):
    # The profiler keeps 1,000 call trees: at Dask's 1 s an embedding worker's grew ~100 MiB in 17 minutes.
    settings = {"embedfleet.cluster.profile-cycle": cycle} | ({"embedfleet.cluster.profile": profile} if profile else {})
    with dask.config.set(settings), \
            connect(workers=1, threads_per_worker=1, dashboard_address=":0", backend="fake") as client:
        assert set(client.run(_profile_cycle_ms).values()) == {expected_ms}


@pytest.fixture
def two_worker_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None,
                      resources={EMBED_SLOT: 1}) as cluster, Client(cluster, set_as_default=False) as c:
        yield c


def test_a_job_embeds_on_every_worker_and_skips_the_duplicate_check_for_reader_ids(
    two_worker_client, tmp_path, fake_model
):
    source = tmp_path / "corpus"
    fh.make_corpus(source, documents=24, words=400, seed=5)
    with dask.config.set({"embedfleet.read.partition-bytes": 4000}):
        spec = build_job_spec(str(source), collection="kb", model=fake_model, data_dir=str(tmp_path / "data"),
                              chunk_size=48, chunk_overlap=8)
        result = run_job(spec, client=two_worker_client)
    assert result.status == "succeeded" and result.embedded == result.chunks > 0
    # File paths are unique ids and the collection is new: no duplicate check, no diff tasks.
    assert not JobDir(tmp_path / "data" / "jobs" / spec.job_id).diff.exists()
    sidecars = list((tmp_path / "data" / "jobs" / spec.job_id / "embeddings").glob("*.parquet.json"))
    pids = {read_json(p)["pid"] for p in sidecars}
    assert len(sidecars) > 2 and len(pids) == 2
    assert len(fh.read_chroma(f"chroma://{tmp_path / 'data'}/chroma", "local", "kb")) == result.chunks


def test_preload_loads_the_model_once_on_each_embedding_worker(fake_model):
    from embedfleet import config

    gpu = {"nthreads": 3, "resources": {"GPU": 1}}
    client = RecordingClient({"tcp://gpu:1": gpu, "tcp://gpu:2": gpu, "tcp://cpu:1": {"nthreads": 4, "resources": {}}})
    client.submit = lambda fn, spec, **kw: client.submitted.append({"spec": spec, **kw}) or f"future-{len(client.submitted)}"
    placement = Placement(client, config.embedder_spec(model=fake_model))
    warm = placement.preload(priority=7)
    # Only the GPU workers embed: one pinned, strict load each, with torch on all their threads.
    assert [s["workers"] for s in client.submitted] == [["tcp://gpu:1"], ["tcp://gpu:2"]]
    assert not any(s["allow_other_workers"] for s in client.submitted)
    assert {s["priority"] for s in client.submitted} == {7}
    assert warm.spec.threads == 3 and placement.resources == {"GPU": 1}
