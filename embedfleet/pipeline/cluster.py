"""Where jobs run: an existing scheduler, a LocalCluster sized to the machine, or dask-cuda."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

import dask.config

from embedfleet import config
from embedfleet.errors import BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)

__all__ = ["connect", "start_local_workers", "local_layout", "embed_resources", "embed_workers", "worker_threads", "EMBED_SLOT"]

#: A resource each LocalCluster worker advertises once, so a worker runs one embedding task
#: at a time while its one other thread reads, chunks and runs the job's checks: torch gets
#: all the worker's threads but that one (:func:`worker_threads`).
EMBED_SLOT = "embed-slot"
#: Worker processes a default LocalCluster starts at most (one per core up to this): each
#: holds its own copy of the model.
MAX_AUTO_WORKERS = 8
#: What every worker imports to run a job's tasks (pandas and pyarrow with them), imported
#: once in the forkserver rather than by each worker at its first task (0.6 s each, measured).
TASK_MODULES = ("embedfleet.tasks.stages", "embedfleet.tasks.chunking")
#: The hash seed distributed's nanny gives its workers (distributed PR 8400).
NANNY_HASH_SEED = "6640"


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

    The default LocalCluster on an N-core machine is one worker process per core, up to
    :data:`MAX_AUTO_WORKERS` (then the cores are shared out), each with one thread for
    torch and one more for the job's light tasks, so that reading, chunking and the
    duplicate check never wait behind a multi-second embedding task. A small
    encoder's matmuls are too short for torch's intra-op threads to scale: on 2 cores,
    all-MiniLM-L6-v2 embeds 1.19x (fp32) and 1.16x (bf16) faster as two one-thread processes
    than as one two-thread process, and a process interrupted by other work (chunking, a
    store write) slows alone instead of stalling its sibling thread at every op's barrier.
    The cost is one resident model per process, hence the cap. (An early measurement of
    two one-thread workers at 0.78x was made before the worker's allocator was tuned,
    :func:`embedfleet.embedders.hardware.tune_allocator`.)
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
    gpus = _visible_gpus() if use_gpu else 0
    n_workers, threads = local_layout(workers=workers, threads_per_worker=threads_per_worker, gpus=gpus)
    dashboard = dashboard_address if dashboard_address is not None else config.get("cluster.dashboard-address")
    memory_limit = config.get("cluster.memory-limit")
    if n_workers < 1 or threads < 1:
        raise ConfigError("--workers and threads per worker must be at least 1")

    from embedfleet.embedders.warm import warm_imports

    plugin = warm_imports(backend=backend, model=model)
    warm = {"plugins": {plugin}} if plugin is not None else {}
    starting = _worker_profiling()
    if use_gpu:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise BackendUnavailableError("--gpu", "gpu", str(exc)) from exc
        start_cluster = functools.partial(
            LocalCUDACluster,
            threads_per_worker=threads, dashboard_address=dashboard, resources={"GPU": 1}, silence_logs=logging.WARNING,
            **warm,
        )
    else:
        starting.update(_forked_workers(plugin.modules if plugin is not None else ()))
        start_cluster = functools.partial(
            LocalCluster,
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=dashboard,
            memory_limit=memory_limit,
            resources={EMBED_SLOT: 1},
            silence_logs=logging.WARNING,
            **warm,
        )
    with dask.config.set(starting):  # each nanny passes the config it started with to its worker process
        cluster = start_cluster()
    client = Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _worker_profiling() -> dict:
    """Dask config for the profiler of the workers embedfleet starts (``cluster.profile``).

    Dask's profiler keeps one call tree per cycle, up to 1,000 (admin.low-level-log-length), in
    two histories, and an embedding worker's trees are deep: at Dask's 1 s cycle they held
    103 MiB per worker after 17 minutes; at 10 s a 45-minute job's workers still ended 30-45 MiB
    above their first quarter. Off by default, so a worker's memory is its model and its
    partitions; on, at 10 s, for the Profile page.
    """
    profiling = {"distributed.worker.profile.enabled": bool(config.get("cluster.profile"))}
    cycle = config.get("cluster.profile-cycle")
    if cycle is not None:
        profiling["distributed.worker.profile.cycle"] = cycle
    return profiling


def start_local_workers(*, scheduler_address: str | None = None, gpu: bool | None = None,
                        backend: str | None = None, model: str | None = None) -> None:
    """Start now what the workers of the cluster :func:`connect` will start (same arguments) fork from.

    For a CPU LocalCluster that is the forkserver (:func:`_forked_workers`), whose imports of
    distributed, the backend and the job's task modules take 3-5 s. Started before this
    process imports distributed and the job's own modules and starts the scheduler, the two
    overlap: on the 2-core test machine the forkserver of a ~500-chunk ``embedfleet index``
    began at 0.6 s instead of 1.4 s. Nothing to do for an existing scheduler or a GPU
    cluster. :func:`connect` does the same when it starts the cluster, so calling this
    first is only about time.
    """
    if scheduler_address or config.get("scheduler-address"):
        return
    if config.get("cluster.gpu") if gpu is None else gpu:
        return
    from embedfleet.embedders.registry import job_backend_modules

    _start_forkserver(job_backend_modules(backend=backend, model=model))


def _forked_workers(modules: tuple[str, ...]) -> dict:
    """Dask config that forks a LocalCluster's worker processes from one that has imported ``modules``.

    Spawned, every worker process imports distributed and then the backend (torch,
    transformers, sentence-transformers: ~5 s of CPU each on this project's 2-core test
    machine), all at once and beside the driver. A forkserver imports them once, before the
    first worker is forked; each worker starts with them imported (pages shared until
    written), so a new cluster's workers are ready for the model load with half the CPU
    spent. Only imports happen in the forkserver: no thread pool, model or CUDA context
    exists there to be forked.
    """
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        # distributed picks its own preload list on first use; ours replaces it (it is read
        # when the forkserver starts).
        get_mp_context()
    _start_forkserver(modules)
    return {"distributed.worker.multiprocessing-method": "forkserver"}


def _start_forkserver(modules: tuple[str, ...]) -> None:
    """Start this process's forkserver, importing distributed, ``modules`` and :data:`TASK_MODULES`
    (through :mod:`~embedfleet.pipeline.forkserver_preload`, without cyclic collections).

    It lives as long as this process and serves every cluster it starts: a later call finds
    it running and changes nothing. Every worker inherits its environment: this process's,
    with what a nanny sets before it starts a worker process (:func:`_nanny_pre_spawn_environ`),
    since ``OMP_NUM_THREADS``, ``MALLOC_TRIM_THRESHOLD_`` and ``PYTHONHASHSEED`` only act when
    a process or library starts.
    """
    import multiprocessing
    import multiprocessing.forkserver

    from embedfleet.pipeline import forkserver_preload

    # One preload module, which imports the rest with the garbage collector paused.
    multiprocessing.get_context("forkserver").set_forkserver_preload([forkserver_preload.__name__])
    preload = {forkserver_preload.MODULES_VARIABLE: ",".join(["distributed", *modules, *TASK_MODULES])}
    with _environ({**_nanny_pre_spawn_environ(), **preload}):
        multiprocessing.forkserver.ensure_running()


PRE_SPAWN_ENVIRON = "distributed.nanny.pre-spawn-environ"


def _pre_spawn_config() -> dict:
    """``distributed.nanny.pre-spawn-environ`` as distributed will see it, without importing distributed.

    ``import distributed`` adds the defaults of its own ``distributed.yaml`` under the config
    dask has already read (files, ``DASK_*`` variables, ``dask.config.set``); this reads the
    same file the same way, so the forkserver can start ~0.3 s before distributed is imported.
    """
    import importlib.util

    import yaml

    if "distributed" in sys.modules:
        return dask.config.get(PRE_SPAWN_ENVIRON)
    spec = importlib.util.find_spec("distributed")
    if spec is None or not spec.submodule_search_locations:
        return dask.config.get(PRE_SPAWN_ENVIRON, default={})
    defaults_file = Path(next(iter(spec.submodule_search_locations))) / "distributed.yaml"
    defaults = yaml.safe_load(defaults_file.read_text())
    return dask.config.merge(
        defaults["distributed"]["nanny"]["pre-spawn-environ"], dask.config.get(PRE_SPAWN_ENVIRON, default={})
    )


def _nanny_pre_spawn_environ() -> dict[str, str]:
    """The variables a distributed Nanny sets in its own process before it starts a worker
    process (``distributed.nanny.Nanny.__init__``): ``distributed.nanny.pre-spawn-environ``,
    where this process's own values win, and a fixed ``PYTHONHASHSEED`` so that every worker
    hashes alike."""
    environ = {key: os.environ.get(key, str(value)) for key, value in _pre_spawn_config().items() if value is not None}
    if environ.get("PYTHONHASHSEED") in (None, "0"):
        environ["PYTHONHASHSEED"] = NANNY_HASH_SEED
    return environ


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _visible_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    from distributed.diagnostics import nvml

    return nvml.device_get_count()


def local_layout(*, workers: int | None = None, threads_per_worker: int | None = None,
                 cores: int | None = None, gpus: int = 0) -> tuple[int, int]:
    """(worker processes, threads per worker) of the LocalCluster embedfleet starts.

    Arguments win over ``embedfleet.cluster.*`` config, which wins over the default: one
    worker per core up to :data:`MAX_AUTO_WORKERS`, each with its share of the cores for
    torch plus one thread for the job's light tasks (see :func:`connect`). With ``gpus``
    (a ``--gpu`` cluster: one worker per GPU, dask-cuda's choice) the workers share all the
    cores: the model runs on the GPU, the CPU threads read, chunk and tokenize.
    """
    cores = cores or _cores()
    threads = threads_per_worker or config.get("cluster.threads-per-worker")
    if gpus:
        return gpus, threads or max(1, cores // gpus)
    n_workers = workers or config.get("cluster.workers") or max(1, min(cores, MAX_AUTO_WORKERS))
    return n_workers, threads or max(1, cores // n_workers) + 1


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


def _eligible(client, resources: dict[str, float] | None, workers: dict[str, dict] | None = None) -> dict[str, dict]:
    workers = client.scheduler_info(n_workers=-1)["workers"] if workers is None else workers
    return {address: w for address, w in workers.items()
            if not resources or all((w.get("resources") or {}).get(k) for k in resources)}


def embed_workers(client, resources: dict[str, float] | None, *, workers: dict[str, dict] | None = None) -> list[str]:
    """Addresses of the workers that can run embedding tasks (of ``workers``, the scheduler's
    worker info, if the caller already has it)."""
    return sorted(_eligible(client, resources, workers))


def worker_threads(client, resources: dict[str, float] | None) -> int | None:
    """Threads torch should use on an embedding worker.

    The threads the worker was given, less one on a worker with an embed slot: that thread
    is the one that runs the rest of the job beside the worker's single embedding task.
    """
    eligible = _eligible(client, resources).values()
    if not eligible:
        return None

    def for_torch(w: dict) -> int:
        threads = int(w.get("nthreads", 1))
        spare = 1 if (w.get("resources") or {}).get(EMBED_SLOT) and threads > 1 else 0
        return threads - spare

    return max(1, min(for_torch(w) for w in eligible))
