"""GPU resource tags: embed tasks ask for ``GPU`` and run only where it is; other stages never ask.

The cluster has two worker processes, one advertising ``resources={"GPU": 1}`` (no real GPU is
needed: the fake embedder runs anywhere). A scheduler plugin records, for every task, the
worker that ran it and the resources it demanded, straight from the scheduler's task state.
"""

from __future__ import annotations

import pytest
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils import key_split

from embedfleet.pipeline.cluster import embed_resources, worker_threads
from embedfleet.pipeline.run import run_job
from embedfleet.pipeline.spec import build_job_spec
from tests.sink_servers import chroma_server  # noqa: F401  (pytest fixture)


class TaskPlacement(SchedulerPlugin):
    """Which worker each task was sent to, and with which resource restrictions."""

    name = "embedfleet-task-placement"

    def __init__(self):
        self.records: list[tuple[str, str, dict]] = []

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, stimulus_id=None, **kwargs) -> None:
        if finish == "processing":
            ts = self.scheduler.tasks[key]
            self.records.append((key_split(key), ts.processing_on.address, dict(ts.resource_restrictions or {})))


def _records(dask_scheduler):
    return dask_scheduler.plugins[TaskPlacement.name].records


@pytest.fixture
def gpu_and_cpu_client():
    from distributed import Client, Nanny, Scheduler, SpecCluster

    workers = {
        "cpu": {"cls": Nanny, "options": {"nthreads": 1}},
        "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster, set_as_default=False) as client:
        client.wait_for_workers(2)
        client.register_plugin(TaskPlacement())
        yield client


def test_embed_tasks_run_only_on_the_gpu_worker(gpu_and_cpu_client, chroma_server, data_dir, docs_dir, fake_model):
    client = gpu_and_cpu_client
    workers = client.scheduler_info(n_workers=-1)["workers"]
    gpu_worker = next(a for a, w in workers.items() if (w.get("resources") or {}).get("GPU"))
    assert embed_resources(client) == {"GPU": 1}
    assert worker_threads(client, {"GPU": 1}) == 1

    import dask.config

    # Small embed partitions: many embed tasks, each of which could have gone to either worker.
    with dask.config.set({"embedfleet.embed.chunks-per-partition": 2}):
        spec = build_job_spec(str(docs_dir), user="gpu", collection="kb", model=fake_model, data_dir=str(data_dir),
                              sink=chroma_server, chunk_size=16, chunk_overlap=2)
    result = run_job(spec, client=client)
    assert result.status == "succeeded" and result.embedded == result.chunks > 0

    records = client.run_on_scheduler(_records)
    by_prefix: dict[str, list[tuple[str, dict]]] = {}
    for prefix, worker, restrictions in records:
        by_prefix.setdefault(prefix, []).append((worker, restrictions))
    embeds = by_prefix.pop("embed")
    assert len(embeds) >= 4
    assert all(worker == gpu_worker for worker, _ in embeds)
    assert all(r == {"GPU": 1} for _, r in embeds)
    # A server sink takes parallel writes: the write tasks ran on the cluster too.
    assert "chunk" in by_prefix and "write" in by_prefix
    for prefix, placed in by_prefix.items():
        for _worker, restrictions in placed:
            assert "GPU" not in restrictions, f"{prefix} task demanded a GPU"


@pytest.mark.gpu
def test_real_gpu_grows_the_budget_and_embeds():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from embedfleet import config
    from embedfleet.embedders.sentence_transformers import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(config.embedder_spec(device="cuda", precision="auto"))
    assert embedder.precision in ("bf16", "fp16")
    assert embedder._device_batch_tokens(8192) >= 8192
    vectors, stats = embedder.embed_with_stats(["a GPU sentence"] * 64)
    assert vectors.shape == (64, 384) and stats.batch_tokens >= 8192
