"""Where jobs run: an existing scheduler, a LocalCluster sized to the machine, or dask-cuda."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from embedfleet import config
from embedfleet.errors import BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)

__all__ = ["connect", "embed_resources", "worker_threads", "EMBED_SLOT"]

#: A resource each LocalCluster worker advertises once, so a worker runs one embedding task
#: at a time (using all its cores through torch) while its other threads read and chunk.
EMBED_SLOT = "embed-slot"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def connect(
    *,
    scheduler_address: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    gpu: bool | None = None,
    dashboard_address: str | None = None,
    backend: str | None = None,
    model: str | None = None,
) -> Iterator["distributed.Client"]:  # noqa: F821
    """Yield a Client: to ``scheduler_address`` if given (or configured), else a new local cluster.

    A local cluster's workers start importing the embedding backend (``backend``, else the
    configured one or ``model``'s) as they start: see :mod:`embedfleet.embedders.warm`.

    The default LocalCluster on an N-core machine is one worker process with N threads:
    one resident model that uses every core, instead of N models each using one core
    (measured ~0.78x of plain sentence-transformers on 2 cores with 2 single-thread workers).
    """
    from distributed import Client, LocalCluster

    address = scheduler_address or config.get("scheduler-address")
    if address:
        client = Client(address, set_as_default=False)
        logger.info("connected to %s; dashboard %s", address, client.dashboard_link)
        try:
            yield client
        finally:
            client.close()
        return

    use_gpu = config.get("cluster.gpu") if gpu is None else gpu
    n_workers = workers or config.get("cluster.workers") or 1
    threads = threads_per_worker or config.get("cluster.threads-per-worker") or max(1, _cores() // n_workers)
    dashboard = dashboard_address if dashboard_address is not None else config.get("cluster.dashboard-address")
    memory_limit = config.get("cluster.memory-limit")
    if n_workers < 1 or threads < 1:
        raise ConfigError("--workers and threads per worker must be at least 1")

    from embedfleet.embedders.warm import warm_imports

    plugin = warm_imports(backend=backend, model=model)
    warm = {"plugins": {plugin}} if plugin is not None else {}
    if use_gpu:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise BackendUnavailableError("--gpu", "gpu", str(exc)) from exc
        cluster = LocalCUDACluster(
            threads_per_worker=threads, dashboard_address=dashboard, resources={"GPU": 1}, silence_logs=logging.WARNING,
            **warm,
        )
    else:
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=dashboard,
            memory_limit=memory_limit,
            resources={EMBED_SLOT: 1},
            silence_logs=logging.WARNING,
            **warm,
        )
    client = Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def embed_resources(client) -> dict[str, float] | None:
    """The resources embedding tasks ask for on this cluster.

    ``GPU`` when any worker advertises a GPU (then only those workers embed); the embed slot
    when every worker has one; otherwise none — asking for a resource no worker has would
    leave the task waiting forever.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    resources = [w.get("resources", {}) or {} for w in workers]
    if any(r.get("GPU") for r in resources):
        return {"GPU": 1}
    if resources and all(r.get(EMBED_SLOT) for r in resources):
        return {EMBED_SLOT: 1}
    return None


def _eligible(client, resources: dict[str, float] | None) -> list[dict]:
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return [w for w in workers if not resources or all((w.get("resources") or {}).get(k) for k in resources)]


def embed_workers(client, resources: dict[str, float] | None) -> int:
    """How many workers can run embedding tasks at once."""
    return max(1, len(_eligible(client, resources)))


def worker_threads(client, resources: dict[str, float] | None) -> int | None:
    """Threads torch should use on an embedding worker: the threads the worker was given."""
    eligible = _eligible(client, resources)
    if not eligible:
        return None
    return max(1, min(int(w.get("nthreads", 1)) for w in eligible))
