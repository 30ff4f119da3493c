"""Run one job on a Dask cluster: read -> chunk -> (diff) -> embed -> write -> commit.

Every stage works partition by partition and writes its output atomically under the job's
directory (``<data-dir>/jobs/<job-id>/``), so running the same job again resumes it: a
partition whose output exists is not redone. The driver only moves paths and small
counts; documents, chunks and vectors stay on the workers and on disk, except for embedded
stores (Chroma PersistentClient, Milvus Lite), which must have one writer: the driver
streams their writes one embedding partition at a time while the cluster keeps embedding.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import heapq
import itertools
import logging
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow.parquet as pq

from embedfleet.config import resolve_model_path
from embedfleet.embedders.cache import preload
from embedfleet.errors import (
    DuplicateDocumentError,
    EmbedfleetError,
    JobCancelled,
    JobError,
    MassDeleteRefused,
    SinkError,
)
from embedfleet.pipeline.cluster import embed_resources, embed_workers, worker_threads
from embedfleet.pipeline.job import JobResult, JobSpec, Progress, SkippedDocument
from embedfleet.pipeline.manifest import Manifest
from embedfleet.sinks.base import CollectionInfo
from embedfleet.sinks.naming import physical_name
from embedfleet.sinks.registry import open_sink
from embedfleet.sinks.writer_lock import exclusive_writer
from embedfleet.tasks import stages
from embedfleet.tasks.io import is_done, read_json, sidecar, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["run_job"]

# Task retries for worker-side errors (a worker lost mid-task is rescheduled by Dask anyway).
TASK_RETRIES = 2
POLL_SECONDS = 0.2
#: Embedding tasks kept on each embedding worker: one running, one queued behind it.
TASKS_PER_EMBED_WORKER = 2
#: How often a job looks for embedding workers that joined or left the cluster.
WORKERS_REFRESH_SECONDS = 5.0
#: How long a failed job waits for its store to finish opening before it lets go of the store.
OPENING_GRACE_SECONDS = 30.0
#: Stands for the worker of a task assigned to a worker that has since left.
_GONE = "<gone>"


class _Driver:
    """Submits a stage's tasks and follows them: progress, cancellation, first error."""

    def __init__(self, client, *, priority: int, cancel: threading.Event | None, on_progress, progress: Progress):
        self.client = client
        self.priority = priority
        self.cancel = cancel
        self.on_progress = on_progress
        self.progress = progress
        #: The job's long-running futures (embedding, writes) and their handler, followed too
        #: while the driver waits for something else (the duplicate check, the diff), so
        #: finished embedding tasks are replaced at once instead of after that wait.
        self.background: tuple[dict, Callable[[Any, Any], None]] | None = None
        # Futures arrive here as they finish (done callbacks), in place of polling with
        # ``distributed.wait(timeout=...)``: each of its time-outs left a TimeoutError whose
        # traceback held a list of every followed future until the garbage collector ran, so
        # finished chunk tasks stayed wanted and a lost worker made the scheduler redo them.
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._watched: set[str] = set()

    def report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(dataclasses.replace(self.progress))

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise JobCancelled("job cancelled")

    def follow(self, futures: dict, on_done: Callable[[Any, Any], None], *, until: Callable[[], bool] | None = None) -> None:
        """Wait for ``futures`` (future -> key), calling ``on_done(key, result)`` as each finishes.

        Finished futures are removed from ``futures``; ``on_done`` may add new ones, which are
        followed too. With ``until``, returns as soon as it is true, leaving the rest running
        (the caller follows them later or cancels them).
        """
        background, on_background = self.background or ({}, None)
        if background is futures:
            background = {}
        try:
            while futures and not (until is not None and until()):
                self.check_cancel()
                self._watch(futures, background)
                try:
                    future = self._finished.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                # One the job dropped (cancelled, or of a stage it has left) is in neither.
                if future in futures:
                    on_done(futures.pop(future), future.result())  # re-raises the task's error
                elif future in background:
                    on_background(background.pop(future), future.result())
                del future
                self.report()
        except BaseException:
            # Stop the rest of this stage's tasks: a cancelled or failed job must not keep the
            # cluster busy, and nothing half-done is left looking finished (outputs are atomic).
            self.cancel_all(futures)
            raise

    def _watch(self, *groups: dict) -> None:
        for pending in itertools.chain(*groups):
            if pending.key not in self._watched:
                self._watched.add(pending.key)
                pending.add_done_callback(self._finished.put)

    def cancel_all(self, futures: dict) -> None:
        if futures:
            self.client.cancel(list(futures), force=True)
            futures.clear()


def run_job(
    spec: JobSpec,
    *,
    client,
    priority: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
    before_embed: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    stream: bool = False,
) -> JobResult:
    """Run (or resume) ``spec`` on ``client``'s cluster and return its result.

    ``priority`` becomes the Dask priority of every task of the job. ``before_embed(n)`` is
    called once, after chunking, with the exact number of chunks about to be embedded; it
    may raise (e.g. QuotaExceeded) to stop the job before any embedding. With ``stream``, a
    job with nothing to diff against (a new collection, or mode ``full``) embeds each chunk
    partition as soon as it is chunked; ``before_embed`` is then called when chunking ends,
    and may still stop the job before anything is written. Setting ``cancel``
    cancels the job's tasks; the result then has status ``cancelled``. Other failures raise.
    """
    started = time.perf_counter()
    progress = Progress(stage="reading")
    driver = _Driver(client, priority=priority, cancel=cancel, on_progress=on_progress, progress=progress)
    result = JobResult(
        job_id=spec.job_id, status="succeeded", user=spec.user, sink=spec.sink.uri, collection=spec.collection
    )
    try:
        # A file-based store takes one writing process; held until the job commits.
        with exclusive_writer(spec.sink.uri):
            _run(spec, driver, result, before_embed, stream)
    except JobCancelled:
        result.status = "cancelled"
        logger.info("job %s cancelled", spec.job_id)
    finally:
        result.seconds = time.perf_counter() - started
    result.documents, result.chunks = progress.documents, progress.chunks
    result.embedded, result.skipped, result.deleted = progress.embedded, progress.skipped, progress.deleted
    result.tokens = progress.tokens
    if result.status == "succeeded":
        write_json_atomic(result.to_dict(), Path(spec.job_dir) / "result.json")
    return result


def _run(spec: JobSpec, driver: _Driver, result: JobResult, before_embed, stream: bool) -> None:
    from embedfleet.datasets import plan_partitions
    from embedfleet.tasks.chunking import reserved_tokens, validate_for_model

    client, progress = driver.client, driver.progress
    model = spec.embedder.model
    model_path = resolve_model_path(model.path)
    # Room for the chunk's own text: the model adds special tokens and the document prefix.
    max_tokens = model.max_seq_length - reserved_tokens(model_path, prefix=model.document_prefix)
    validate_for_model(spec.chunk, max_tokens, model_name=model.name, max_seq_length=model.max_seq_length)
    # Load the model on the embedding workers now, while the sink opens and the source is chunked.
    warm = preload(client, spec.embedder, priority=driver.priority)

    job_dir = Path(spec.job_dir)
    dirs = {name: job_dir / name for name in ("chunks", "embeddings", "written", "deleted")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_spec(spec), job_dir / "spec.json")

    collection_name = physical_name(spec.user, spec.collection)
    info = CollectionInfo(model=model.name, dimensions=model.dimensions, metric=model.metric, precision=warm.precision())
    manifest = Manifest(spec.data_dir, spec.sink.uri, collection_name)

    # --- read + chunk (and, when streaming, embed) ---------------------------------------
    plan = plan_partitions(spec.source)
    _check_plan_unchanged(plan, job_dir)
    chunk_paths = [str(dirs["chunks"] / f"part-{i:05d}.parquet") for i in range(len(plan))]
    progress.partitions_total = len(plan)
    todo = [i for i, path in enumerate(chunk_paths) if not is_done(path)]
    chunk_stats: dict[int, dict] = {i: read_json(sidecar(p)) for i, p in enumerate(chunk_paths) if is_done(p)}

    def count_chunks(stats: dict) -> None:
        progress.documents += stats["documents"]
        progress.chunks += stats["chunks"]
        progress.skipped_documents += len(stats["skipped_documents"])
        progress.partitions_done += 1

    for stats in chunk_stats.values():
        count_chunks(stats)
    progress.stage = "chunking"
    driver.report()

    resources = embed_resources(client)
    embedder = spec.embedder
    if embedder.threads is None:
        embedder = dataclasses.replace(embedder, threads=worker_threads(client, resources))
    futures: dict = {}  # every running task of the job -> (kind, index)
    embedding = _Embedding(spec, driver, futures, embedder=embedder, resources=resources, dirs=dirs,
                           collection=collection_name, info=info)
    # The model guard: a collection made by another model stops the job as soon as the store
    # has opened (a second or so), before anything is written, not after an hour of
    # embedding. Opening takes a while (Chroma starts its engine), so it runs beside reading,
    # chunking and the first embedding tasks.
    opening = _in_thread(_open_sink, spec.sink, collection_name, info)
    try:
        # Plain tasks, never a dask dataframe (see tasks/diff.py), one per partition: each
        # reads and chunks it. ``futures`` holds the only reference to each, so a finished one
        # is released as soon as its stats are in, and a worker lost later cannot make the
        # scheduler redo it. The tokenizer's path is resolved on the worker.
        futures.update({
            client.submit(stages.read_chunk_stage, spec.source, plan[i], out_path=chunk_paths[i], chunk=spec.chunk,
                          model_path=model.path, max_tokens=max_tokens, on_error=spec.on_error,
                          key=f"chunk-{spec.job_id}-{i}", priority=driver.priority, retries=TASK_RETRIES,
                          pure=False): ("chunk", i)
            for i in todo
        })

        # With nothing to diff against (a new collection, or mode full) every chunk is
        # embedded, so each chunk partition is embedded as soon as it exists instead of after
        # the whole source is chunked. Not when an exact quota check must come first.
        streaming = stream and (spec.mode == "full" or not manifest.files())

        def stream_embed(i: int) -> None:
            if not chunk_stats[i]["chunks"]:
                return
            if embedding.rows_per_slice is None:
                known = [s["chunks"] for s in chunk_stats.values()]
                embedding.plan(round(sum(known) / len(known) * len(plan)))
            embedding.add(chunk_paths[i])

        if streaming:
            for i in sorted(chunk_stats):
                stream_embed(i)

        def on_done(key: tuple[str, int], value: Any) -> None:
            kind, i = key
            if opening.done():
                opening.result()  # a refused collection stops the job now, not when writes open
            if kind == "chunk":
                chunk_stats[i] = value
                count_chunks(value)
                if streaming:
                    stream_embed(i)
            else:
                embedding.finished(kind, i, value)

        driver.follow(futures, on_done, until=lambda: len(chunk_stats) == len(plan))
        result.skipped_documents = [
            SkippedDocument(**s) for i in sorted(chunk_stats) for s in chunk_stats[i]["skipped_documents"]
        ]
        non_empty = [p for i, p in enumerate(chunk_paths) if chunk_stats[i]["chunks"]]
        driver.background = (futures, on_done)  # streamed embedding goes on meanwhile

        # --- diff against what the collection holds ---------------------------------------
        # (Streaming only happens when the diff embeds everything: it just finds stale chunks.)
        diff = _diff(spec, driver, manifest, non_empty, job_dir,
                     protected=[s.doc_id for s in result.skipped_documents], store=lambda: opening.result(),
                     write_kwargs=embedding.write_kwargs)
        driver.background = None
        embed_inputs, stale_paths = diff.embed_inputs, diff.stale
        to_embed = sum(pq.ParquetFile(p).metadata.num_rows for p in embed_inputs)
        if embedding.rows_per_slice is None:
            embedding.plan(to_embed)
        # A resumed job asks (and is charged) only for what is left: the partitions an
        # earlier run of it embedded were charged then; asking for them again could refuse
        # the resume on quota.
        left = to_embed - embedding.rows_embedded_earlier(embed_inputs)
        progress.chunks_to_embed = left
        progress.skipped = progress.chunks - to_embed
        if before_embed is not None:
            before_embed(left)
        driver.check_cancel()

        # --- embed + write --------------------------------------------------------------
        if not streaming:
            for path in embed_inputs:
                embedding.add(path)
        progress.stage = "embedding"
        progress.partitions_total, progress.partitions_done = embedding.partitions, embedding.partitions_done
        embedding.single_writer = opening.result()
        embedding.open_writes()
        driver.report()
        driver.follow(futures, on_done)
    except BaseException:
        driver.cancel_all(futures)
        # The store must not still be opening (maybe creating the collection) when this job
        # lets go of its writer lock: the next job would open it at the same time.
        concurrent.futures.wait([opening], timeout=OPENING_GRACE_SECONDS)
        raise
    embedding.summarise(result)
    if embedding.write_error is not None:
        raise embedding.write_error
    write_kwargs = embedding.write_kwargs
    single_writer = embedding.single_writer

    # --- delete stale chunks, then commit the manifest ---------------------------------
    progress.stage = "committing"
    driver.report()
    if stale_paths:
        delete_markers = [str(dirs["deleted"] / (Path(p).name + ".json")) for p in stale_paths]
        if single_writer:
            for path, marker in zip(stale_paths, delete_markers):
                progress.deleted += stages.delete_stage(path, marker=marker, **write_kwargs)
                driver.report()
        else:
            futures = {
                client.submit(
                    stages.delete_stage, path, marker=marker, key=f"delete-{spec.job_id}-{i}",
                    priority=driver.priority, pure=False, **write_kwargs
                ): i
                for i, (path, marker) in enumerate(zip(stale_paths, delete_markers))
            }

            def deleted(_i: int, n: int) -> None:
                progress.deleted += n

            driver.follow(futures, deleted)
    _commit_manifest(spec, driver, manifest, non_empty, diff.manifest)
    if single_writer:
        stages.forget_collections()
    progress.stage = "done"
    driver.report()


EMBED_KEY_PREFIX = "embed-"


def embed_task_key(job_id: str, out_path: str | Path) -> str:
    """The Dask key of the task that embeds into ``out_path`` (its name on the dashboard; benchmarks match on it)."""
    return f"{EMBED_KEY_PREFIX}{job_id}-{Path(out_path).stem}"


def _write_partition(embeddings_path: str, **kwargs: Any) -> int | SinkError:
    """:func:`stages.write_stage`, with the store's final error returned instead of raised.

    The driver records it and lets embedding finish before failing the job.
    """
    try:
        return stages.write_stage(embeddings_path, **kwargs)
    except SinkError as exc:
        return exc


def _open_sink(sink_spec, collection: str, info: CollectionInfo) -> bool:
    """Open (creating) the job's collection, checking its model; whether the store takes a single writer.

    A single-writer store stays open: this process writes to it for the rest of the job.
    """
    sink = open_sink(sink_spec)
    try:
        sink.open(collection, info=info, create=True)
        return sink.single_writer
    finally:
        if not sink.single_writer:
            sink.close()


def _in_thread(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the result
            future.set_exception(exc)

    threading.Thread(target=run, name="embedfleet-open-sink", daemon=True).start()
    return future


class _Embedding:
    """A job's embedding partitions and their writes, submitted as their inputs become known.

    Inputs are chunk Parquet files (or the diff's); each is cut into slices of
    ``rows_per_slice`` rows, one embed task per slice, named after the input and slice index
    so a resumed job recognises what an earlier run embedded. Writes wait until
    :meth:`open_writes`: a streaming job embeds while it is still chunking, but nothing reaches
    the store before the source passed its checks (duplicates, quota).
    """

    def __init__(self, spec: JobSpec, driver: _Driver, futures: dict, *, embedder, resources, dirs: dict,
                 collection: str, info: CollectionInfo):
        self.spec, self.driver, self.futures = spec, driver, futures
        self.embedder, self.resources, self.dirs = embedder, resources, dirs
        self.workers: list[str] = []
        self.write_kwargs = dict(sink=spec.sink, collection=collection, info=info, retry=spec.retry)
        self.single_writer = False
        self.rows_per_slice: int | None = None
        self.out_paths: list[str] = []
        self.partitions_done = 0
        self.writes_open = False
        self.unwritten: list[int] = []
        self.started: float | None = None
        self.last_embedded: float | None = None
        self.real_tokens = self.padded_tokens = 0
        self.precisions: set[str] = set()
        self._this_run: set[int] = set()  # partitions embedded by this run, not an earlier one
        self.waiting: list[tuple[int, int, str, int, int]] = []  # heap of (-rows, k, input, start, stop)
        # Embedding tasks assigned to each embedding worker and not finished yet; None stands
        # for "any embedding worker" when tasks are not pinned (see _track_workers).
        self.assigned: dict[str | None, int] = {}
        self.assigned_to: dict[int, str | None] = {}
        self._last_given: dict[str | None, int] = {}
        self._given = itertools.count()
        self._workers_seen = 0.0
        # A cluster with no worker yet (scaling up from zero) left the job's resources and
        # torch threads unresolved: they are resolved from the first workers that join.
        self._unresolved: bool | None = None  # decided by the first look at the cluster
        self._track_workers()
        self.write_error: SinkError | None = None

    @property
    def partitions(self) -> int:
        return len(self.out_paths)

    def plan(self, expected_rows: int) -> None:
        self.rows_per_slice = _rows_per_slice(Path(self.spec.job_dir), expected_rows, self.spec.chunks_per_partition,
                                              max(1, len(self.workers)))

    def _slices(self, path: str) -> list[tuple[str, int, int]]:
        rows = pq.ParquetFile(path).metadata.num_rows
        stem = Path(path).stem
        return [
            (str(self.dirs["embeddings"] / f"e-{stem}-{si:04d}.parquet"), start, min(rows, start + self.rows_per_slice))
            for si, start in enumerate(range(0, rows, self.rows_per_slice))
        ]

    def rows_embedded_earlier(self, paths: Iterable[str]) -> int:
        """Rows of ``paths`` embedded by an earlier, interrupted run of this job (not in this run)."""
        mine = set(self.out_paths[k] for k in self._this_run)
        return sum(
            read_json(sidecar(out))["rows"] for path in paths for out, *_ in self._slices(path) if is_done(out) and out not in mine
        )

    def add(self, path: str) -> None:
        """Embed ``path``'s slices (those not embedded by an earlier run) and write them when allowed."""
        for out_path, start, stop in self._slices(path):
            k = len(self.out_paths)
            self.out_paths.append(out_path)
            if is_done(out_path):
                # Embedded by an earlier, interrupted run of this job: not embedded (nor charged)
                # again, but maybe not yet written.
                self.precisions.add(read_json(sidecar(out_path))["precision"])
                self.partitions_done += 1
                self._write(k)
                continue
            self._this_run.add(k)
            heapq.heappush(self.waiting, (start - stop, k, path, start, stop))
        self._submit()

    def _submit(self) -> None:
        """Keep one embedding task running and one queued on every embedding worker, no more.

        Submitting all of them at once would not be faster, and would starve the job's other
        work: the scheduler holds back tasks without dependencies (reading, chunking, the
        duplicate check) from a worker whose slots are taken by tasks waiting for its embed
        slot. Each task goes to the worker with the fewest unfinished ones (a loose
        restriction: if that worker dies the task runs elsewhere); left to itself the
        scheduler placed both queued tasks on one worker while the other sat idle. The
        biggest slices go first, so the job does not end waiting on one worker's last big slice.
        """
        if self.waiting and time.monotonic() - self._workers_seen > WORKERS_REFRESH_SECONDS:
            self._track_workers()
        while self.waiting:
            # Fewest unfinished tasks; on a tie, the worker given one longest ago.
            worker = min(self.assigned, key=lambda w: (self.assigned[w], self._last_given.get(w, -1)))
            if self.assigned[worker] >= self._capacity(worker):
                return
            _, k, path, start, stop = heapq.heappop(self.waiting)
            if self.started is None:
                self.started = time.perf_counter()
            future = self.driver.client.submit(
                stages.embed_stage, path, start, stop, out_path=self.out_paths[k], embedder=self.embedder,
                key=embed_task_key(self.spec.job_id, self.out_paths[k]), priority=self.driver.priority,
                retries=TASK_RETRIES, resources=self.resources, workers=[worker] if worker else None,
                allow_other_workers=bool(worker), pure=False,
            )
            self.futures[future] = ("embed", k)
            self.assigned[worker] += 1
            self.assigned_to[k] = worker
            self._last_given[worker] = next(self._given)

    def _capacity(self, worker: str | None) -> int:
        return TASKS_PER_EMBED_WORKER * (1 if worker is not None else max(1, len(self.workers)))

    def _track_workers(self) -> None:
        """Follow the cluster's embedding workers as they come and go (adaptive clusters).

        Tasks are pinned only when every worker may embed: a loose pin lets Dask run a task on
        another worker when its own is gone or paused, which must never send a GPU task to a
        CPU worker. Otherwise the scheduler places them (key None), two per embedding worker.
        """
        client = self.driver.client
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if self._unresolved is None:
            self._unresolved = not workers
        if self._unresolved and workers:
            self.resources = embed_resources(client)
            if self.spec.embedder.threads is None:
                self.embedder = dataclasses.replace(self.embedder, threads=worker_threads(client, self.resources))
            self._unresolved = False
        eligible = embed_workers(client, self.resources, workers=workers)
        current = set(eligible) if eligible and len(eligible) == len(workers) else {None}
        gone = set(self.assigned) - current
        self.assigned = {w: self.assigned.get(w, 0) for w in current}
        for k, w in self.assigned_to.items():
            if w in gone:
                self.assigned_to[k] = _GONE  # finishing elsewhere now: frees no slot of a current worker
        self.workers = eligible
        self._workers_seen = time.monotonic()

    def finished(self, kind: str, k: int, value: Any) -> None:
        progress = self.driver.progress
        if kind == "write":
            if isinstance(value, SinkError):
                # The store gave up (after its retries). Embedding goes on, so what the job
                # paid the most for is on disk and a resume only writes; the job fails at the end.
                if self.write_error is None:
                    logger.error("job %s: %s; embedding continues, writes stop", self.spec.job_id, value)
                    self.write_error = value
                return
            progress.written += value
            return
        worker = self.assigned_to.pop(k)
        if worker in self.assigned:  # not a worker that has left since
            self.assigned[worker] -= 1
        self._submit()
        progress.embedded += value["rows"]
        progress.tokens += value["real_tokens"]
        self.real_tokens += value["real_tokens"]
        self.padded_tokens += value["padded_tokens"]
        self.precisions.add(value["precision"])
        self.partitions_done += 1
        if progress.stage in ("embedding", "writing"):
            progress.partitions_done = self.partitions_done
            if self.partitions_done == self.partitions:
                progress.stage = "writing"  # what is left of the job is writes
        self.last_embedded = time.perf_counter()
        self._write(k)

    def open_writes(self) -> None:
        self.writes_open = True
        waiting, self.unwritten = self.unwritten, []
        for k in waiting:
            self._write(k)

    def _write(self, k: int) -> None:
        if self.write_error is not None:
            return  # the store is failing: keep embedding, write nothing more (a resume writes)
        if not self.writes_open:
            self.unwritten.append(k)
            return
        out_path = self.out_paths[k]
        marker = str(self.dirs["written"] / (Path(out_path).name + ".json"))
        if self.single_writer:
            # An embedded store has one writer, this process: the write happens here, between
            # embedding partitions that keep running on the cluster.
            self.finished("write", k, _write_partition(out_path, marker=marker, **self.write_kwargs))
            return
        future = self.driver.client.submit(
            _write_partition, out_path, marker=marker, key=f"write-{self.spec.job_id}-{k}",
            priority=self.driver.priority, pure=False, **self.write_kwargs,
        )
        self.futures[future] = ("write", k)

    def summarise(self, result: JobResult) -> None:
        progress = self.driver.progress
        if self.started is not None and self.last_embedded is not None:
            result.embed_seconds = self.last_embedded - self.started
        result.padding_efficiency = self.real_tokens / self.padded_tokens if self.padded_tokens else None
        result.precision = ",".join(sorted(self.precisions)) or None
        if result.embed_seconds > 0 and progress.embedded:
            result.tokens_per_second = self.real_tokens / result.embed_seconds
            result.chunks_per_second = progress.embedded / result.embed_seconds


def json_spec(spec: JobSpec) -> dict:
    import json

    return json.loads(spec.to_json())


#: Fewest chunks per embedding task: below this, per-task overhead and small batches cost more
#: than the finer progress and load balance buy.
MIN_ROWS_PER_SLICE = 64
#: Embedding tasks per embedding worker a job aims for, so a small job still shows progress and
#: keeps every worker busy.
SLICES_PER_WORKER = 8


def _rows_per_slice(job_dir: Path, to_embed: int, most: int, workers: int) -> int:
    """Chunks per embedding task: up to ``most``, fewer for small jobs.

    Chosen once per job and recorded, so a resumed job (maybe on another cluster) slices its
    input exactly as before and recognises the partitions it already embedded.
    """
    recorded = job_dir / "embed-plan.json"
    if recorded.exists():
        return int(read_json(recorded)["rows_per_slice"])
    target = -(-to_embed // max(1, workers * SLICES_PER_WORKER))
    rows = max(1, min(most, max(MIN_ROWS_PER_SLICE, target)))
    write_json_atomic({"rows_per_slice": rows}, recorded)
    return rows


def _check_plan_unchanged(plan: list, job_dir: Path) -> None:
    """A resumed job must read the source as its first run did, or finished partitions would lie.

    The plan (files with sizes, byte ranges) is fingerprinted on the first run; if the source
    changed before a resume, the resume is refused rather than mixing two versions of it.
    """
    import hashlib

    fingerprint = hashlib.sha256(repr(plan).encode()).hexdigest()
    recorded = job_dir / "plan.json"
    if recorded.exists():
        if read_json(recorded)["fingerprint"] != fingerprint:
            raise JobError(
                f"the source changed since job {job_dir.name} started (files added, removed or resized), so it "
                "cannot be resumed consistently; submit a new job (it embeds only what changed)"
            )
        return
    write_json_atomic({"fingerprint": fingerprint, "partitions": len(plan)}, recorded)


def _check_manifest_unchanged(manifest: Manifest, job_dir: Path) -> None:
    """A resumed job must diff against the manifest its first run diffed against.

    Its embedding partitions are slices of that diff. Had another job committed to the
    collection in between, a new diff would give other slices under the same partition names:
    the resume would take partitions embedded from other chunks as done (chunks never embedded,
    yet in the manifest) and delete chunks the other job kept. Refused, like a changed source.
    A version this job committed itself (killed before recording it) is its own: allowed.
    """
    current = manifest.current
    name = current.name if current is not None else None
    recorded = job_dir / "diff.json"
    if not recorded.exists():
        write_json_atomic({"manifest": name}, recorded)
        return
    own = name is not None and (name == f"v-{job_dir.name}" or name.startswith(f"v-{job_dir.name}-"))
    if name != read_json(recorded)["manifest"] and not own:
        raise JobError(
            f"the collection changed since job {job_dir.name} started (another job committed to it), so it cannot "
            "be resumed consistently; submit a new job (it embeds only what changed)"
        )


@dataclasses.dataclass(frozen=True)
class _Diff:
    embed_inputs: list[str]  # chunk files, or the part of one the collection lacks
    stale: list[str]  # files of chunk ids to delete from the store
    manifest: list[str] | None  # the collection's next manifest; None: the job's chunk ids


def _diff(spec: JobSpec, driver: _Driver, manifest: Manifest, chunk_paths: list[str], job_dir: Path, *,
          protected: list[str], store: Callable[[], bool], write_kwargs: dict) -> _Diff:
    """What to embed, what to delete and the next manifest, for the job's mode (tasks/diff.py).

    Mode full compares with the ids the store holds, not the manifest, so it also repairs a
    lost or damaged manifest. Documents that could not be read now (``protected``) keep their
    chunks in the store and the manifest. Raises before anything is written or deleted when
    the source repeats a doc_id, or when the job would delete most of the collection.
    """
    from embedfleet.tasks import diff as diffing

    out = job_dir / "diff"
    done = out / "_SUCCESS.json"
    if spec.mode != "full":
        _check_manifest_unchanged(manifest, job_dir)
    if done.exists():
        return _Diff(**read_json(done))
    if out.exists():
        shutil.rmtree(out)  # what an interrupted diff left; its inputs may have changed since
    check_duplicates = spec.source.id_column is not None
    old = _store_ids(driver, out / "store", single_writer=store(), write_kwargs=write_kwargs) \
        if spec.mode == "full" else manifest.files()
    if not old and not check_duplicates:
        return _Diff(embed_inputs=chunk_paths, stale=[], manifest=None)

    client, job_id = driver.client, spec.job_id
    task = dict(priority=driver.priority, retries=TASK_RETRIES, pure=False)
    rows = {path: pq.ParquetFile(path).metadata.num_rows for path in [*old, *chunk_paths]}
    buckets = diffing.bucket_count(max(sum(rows[p] for p in old), sum(rows[p] for p in chunk_paths)))
    new = list(enumerate(chunk_paths))
    if buckets == 1:
        old_in, new_in = {0: old}, {0: new}
    else:
        old_in, new_in = {}, {}
        splits = {
            client.submit(diffing.split_stage, path, columns=columns, out_dir=str(out / side), tag=f"{n:05d}",
                          buckets=buckets, key=f"diff-split-{side}-{job_id}-{n}", **task): (side, n)
            for side, columns, paths in (("old", diffing.IDS.names, enumerate(old)), ("new", diffing.NEW_COLUMNS, new))
            for n, path in paths
        }

        def split(key: tuple[str, int], written: dict[int, str]) -> None:
            side, n = key
            for bucket, path in written.items():
                if side == "old":
                    old_in.setdefault(bucket, []).append(path)
                else:
                    new_in.setdefault(bucket, []).append((n, path))

        driver.follow(splits, split)
        # Each bucket's files in origin order, so a bucket's result does not depend on timing.
        old_in = {b: sorted(paths) for b, paths in old_in.items()}
        new_in = {b: sorted(pairs) for b, pairs in new_in.items()}

    counts: dict[int, dict] = {}
    driver.follow({
        client.submit(diffing.diff_bucket_stage, old_in.get(b, []), new_in.get(b, []), mode=spec.mode,
                      protected=tuple(protected), check_duplicates=check_duplicates, out_dir=str(out), bucket=b,
                      key=f"diff-{job_id}-{b}", **task): b
        for b in range(buckets)
    }, counts.__setitem__)
    duplicates = sorted(d for c in counts.values() for d in c["duplicates"])
    if duplicates:
        raise DuplicateDocumentError(duplicates)
    if spec.mode != "append":
        _check_mass_delete(spec, counts.values(), readable=driver.progress.documents)

    embed_inputs: dict[int, str] = {}
    selects = {}
    for n, path in new:
        fresh = {b: c["fresh"][n] for b, c in counts.items() if n in c["fresh"]}
        if spec.mode == "full" or sum(fresh.values()) == rows[path]:
            embed_inputs[n] = path
        elif fresh:
            embed_inputs[n] = str(out / "todo" / Path(path).name)
            ids = [str(out / "fresh" / f"{n:05d}-b{b:04d}.parquet") for b in sorted(fresh)]
            selects[client.submit(diffing.select_stage, path, ids, out_path=embed_inputs[n],
                                  key=f"diff-select-{job_id}-{n}", **task)] = n
    driver.follow(selects, lambda *_: None)
    result = _Diff(
        embed_inputs=[embed_inputs[n] for n in sorted(embed_inputs)],
        stale=sorted(str(p) for p in (out / "stale").glob("*.parquet")),
        manifest=sorted(str(p) for p in (out / "manifest").glob("*.parquet")),
    )
    write_json_atomic(dataclasses.asdict(result), done)
    return result


def _store_ids(driver: _Driver, out_dir: Path, *, single_writer: bool, write_kwargs: dict) -> list[str]:
    """The files of every id the job's collection holds (:func:`stages.store_ids_stage`)."""
    from embedfleet.tasks.diff import BUCKET_ROWS

    kwargs = dict(write_kwargs, out_dir=str(out_dir), rows_per_file=BUCKET_ROWS)
    if single_writer:
        return stages.store_ids_stage(**kwargs)  # an embedded store is read by its one process
    found: list[str] = []
    future = driver.client.submit(stages.store_ids_stage, **kwargs, priority=driver.priority, pure=False)
    driver.follow({future: None}, lambda _key, paths: found.extend(paths))
    return found


def _check_mass_delete(spec: JobSpec, counts: Iterable[dict], *, readable: int) -> None:
    """Stop a job that would delete most of its collection, or delete from an empty source.

    Counted in documents, not chunks: a changed document replaces its chunks and loses
    nothing. An unmounted share or a wrong path looks like a source whose documents were all
    removed; the user confirms with ``--allow-mass-delete`` if they were.
    """
    counts = list(counts)
    before = sum(c["documents_before"] for c in counts)
    gone = sum(c["documents_gone"] for c in counts)
    if not gone or spec.allow_mass_delete:
        return
    examples = ", ".join(sorted(e for c in counts for e in c["gone_examples"])[:3])
    confirm = "nothing was deleted; run again with --allow-mass-delete if they are really gone"
    if readable == 0:
        raise MassDeleteRefused(
            f"the source has no readable document, so this {spec.mode} run would delete all {gone} documents of "
            f"collection {spec.collection!r} (an unmounted share, or the wrong path?); {confirm}"
        )
    if gone > spec.max_delete_fraction * before:
        raise MassDeleteRefused(
            f"this {spec.mode} run would delete {gone} of the {before} documents of collection {spec.collection!r} "
            f"({gone / before:.0%}; e.g. {examples}), more than embedfleet.index.max-delete-fraction "
            f"({spec.max_delete_fraction:.0%}) allows; {confirm}"
        )


def _commit_manifest(spec: JobSpec, driver: _Driver, manifest: Manifest, chunk_paths: list[str],
                     next_manifest: list[str] | None) -> None:
    marker = Path(spec.job_dir) / "committed.json"
    if marker.exists():
        return
    version = manifest.new_version(spec.job_id)
    version.mkdir(parents=True, exist_ok=True)
    if next_manifest is not None:
        for i, path in enumerate(next_manifest):  # the diff wrote it
            shutil.copyfile(path, version / f"part-{i:05d}.parquet")
    elif chunk_paths:
        # The new manifest is this job's chunk ids: one small task per chunk file.
        futures = {
            driver.client.submit(stages.manifest_stage, path, out_path=str(version / f"part-{i:05d}.parquet"),
                                 key=f"manifest-{spec.job_id}-{i}", priority=driver.priority, pure=False): i
            for i, path in enumerate(chunk_paths)
        }
        driver.follow(futures, lambda *_: None)
    manifest.commit(version)
    write_json_atomic({"version": version.name}, marker)


def job_failed_message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, EmbedfleetError) else f"{type(exc).__name__}: {exc}"
