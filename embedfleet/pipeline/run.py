"""Run one job on a Dask cluster: read -> chunk -> diff -> embed -> write -> delete -> commit.

Every stage works partition by partition and writes its output atomically under the job's
directory (:mod:`embedfleet.pipeline.jobdir`), so running the same job again resumes it: a
partition whose output exists is not redone. The driver only moves paths and small counts;
documents, chunks and vectors stay on the workers and on disk, except for embedded stores
(Chroma PersistentClient, Milvus Lite), which must have one writer: the driver streams their
writes one embedding partition at a time while the cluster keeps embedding.

The driver submits plain tasks only, never a dask.dataframe graph: jobs run in threads beside
an in-process scheduler, and on Python 3.11 two threads building dask-expr graphs at once
deadlock on ``functools.cached_property``'s class-wide lock.

The pieces: :mod:`.follow` (following futures), :mod:`.placement` (which worker embeds),
:mod:`.embedding` (slices, resume, writes), :mod:`.incremental` (diff and commit).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from embedfleet.config import resolve_model_path
from embedfleet.errors import JobCancelled, JobError
from embedfleet.frames.io import (
    is_done,
    parquet_rows,
    read_json,
    sidecar,
    write_json_atomic,
)
from embedfleet.pipeline import incremental, unchanged
from embedfleet.pipeline.embedding import TASK_RETRIES, Embedding
from embedfleet.pipeline.follow import Chunked, Embedded, Follower, Written
from embedfleet.pipeline.job import JobResult, JobSpec, Progress, SkippedDocument
from embedfleet.pipeline.jobdir import JobDir
from embedfleet.pipeline.manifest import Manifest
from embedfleet.pipeline.placement import Placement
from embedfleet.pipeline.quality import start_quality_check
from embedfleet.pipeline.visibility import start_check
from embedfleet.sinks.base import CollectionInfo
from embedfleet.sinks.naming import physical_name
from embedfleet.sinks.registry import open_sink
from embedfleet.sinks.writer_lock import exclusive_writer
from embedfleet.tasks import stages

logger = logging.getLogger(__name__)

__all__ = ["run_job"]

#: How long a failed job waits for its store to finish opening before it lets go of the store.
OPENING_GRACE_SECONDS = 30.0


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
    # Taken before anything is read: an edit during the run then shows as a change next time.
    source_fingerprint = unchanged.fingerprint(spec)
    known = unchanged.run_unchanged(spec, source_fingerprint=source_fingerprint, on_progress=on_progress,
                                    before_embed=before_embed)
    if known is not None:
        return known
    progress = Progress(stage="reading")
    follower = Follower(client, priority=priority, cancel=cancel, on_progress=on_progress, progress=progress)
    result = JobResult(
        job_id=spec.job_id, status="succeeded", user=spec.user, sink=spec.sink.uri, collection=spec.collection
    )
    try:
        # A file-based store takes one writing process; held until the job commits.
        with exclusive_writer(spec.sink.uri):
            _JobRun(spec, follower, result, before_embed=before_embed, stream=stream).run()
    except JobCancelled:
        result.status = "cancelled"
        logger.info("job %s cancelled", spec.job_id)
    finally:
        result.seconds = time.perf_counter() - started
    result.documents, result.chunks = progress.documents, progress.chunks
    result.embedded, result.skipped, result.deleted = progress.embedded, progress.skipped, progress.deleted
    result.tokens = progress.tokens
    if result.status == "succeeded":
        write_json_atomic(result.to_dict(), JobDir(spec.job_dir).result)
        unchanged.record(spec, result, source_fingerprint)
    return result


class _JobRun:
    """One run of a job, stage by stage; each stage method leaves the state the next one needs."""

    def __init__(self, spec: JobSpec, follower: Follower, result: JobResult, *,
                 before_embed: Callable[[int], None] | None, stream: bool):
        self.spec, self.follower, self.result = spec, follower, result
        self.progress = follower.progress
        self.before_embed, self.stream = before_embed, stream
        self.job_dir = JobDir(spec.job_dir)
        self.collection = physical_name(spec.user, spec.collection)
        self.manifest = Manifest(spec.data_dir, spec.sink.uri, self.collection)
        self.futures: dict = {}  # every running task of the job -> its event
        self.chunk_stats: dict[int, dict] = {}

    def run(self) -> None:
        self._prepare()
        try:
            self._chunk()
            diff = self._diff()
            self.quality = start_quality_check(self.spec, self.follower, self.embedding.placement, self.non_empty,
                                               self.info, self.collection, chunks=self.progress.chunks,
                                               embeds=self.progress.chunks - self.progress.skipped)
            self._embed(diff)
        except BaseException as exc:
            self.follower.cancel_all(self.futures)
            # The store must not still be opening (maybe creating the collection) when this
            # job lets go of its writer lock: the next job would open it at the same time.
            concurrent.futures.wait([self.opening], timeout=OPENING_GRACE_SECONDS)
            if not isinstance(exc, (JobCancelled, JobError)):
                self._explain_failure()
            raise
        self.embedding.summarise(self.result)
        if self.embedding.write_error is not None:
            raise self.embedding.write_error
        if self.quality is not None:
            self.quality.finish(self.spec, self.follower, self.collection, self.result)
        self._delete(diff.stale)
        incremental.commit_manifest(self.spec, self.follower, self.manifest, self.non_empty, diff.manifest)
        if self.embedding.single_writer:
            stages.forget_collections()
        self._set_stage("done")

    def _explain_failure(self) -> None:
        """A task that failed on a worker that cannot see the source: the probe's one line says why."""
        try:
            self.visibility.verify(timeout=OPENING_GRACE_SECONDS)
        except JobError:
            raise
        except Exception:  # the probe could not answer either: the task's own error stands
            logger.debug("job %s: no answer from the visibility probe", self.spec.job_id, exc_info=True)

    def _set_stage(self, stage: str) -> None:
        self.progress.stage = stage  # type: ignore[assignment]
        self.follower.report()

    # --- before any task ----------------------------------------------------------------

    def _prepare(self) -> None:
        from embedfleet.datasets import plan_partitions
        from embedfleet.tasks.chunking import reserved_tokens, validate_for_model

        spec, client = self.spec, self.follower.client
        model = spec.embedder.model
        # Room for the chunk's own text: the model adds special tokens and the document prefix.
        self.max_tokens = model.max_seq_length - reserved_tokens(resolve_model_path(model.path),
                                                                 prefix=model.document_prefix)
        validate_for_model(spec.chunk, self.max_tokens, model_name=model.name, max_seq_length=model.max_seq_length)
        placement = Placement(client, spec.embedder)
        # Load the model on the embedding workers now, while the sink opens and the source is chunked.
        warm = placement.preload(priority=self.follower.priority)
        self.job_dir.make()
        write_json_atomic(json.loads(spec.to_json()), self.job_dir.spec)
        # Every worker must see the job dir and the source, or the job stops with one line: now,
        # before any task, on workers not yet known to see the data dir; else before any task's
        # result is used (a small job's read task then runs beside its probe).
        self.visibility = start_check(client, token_path=self.job_dir.visible, priority=self.follower.priority,
                                      source=spec.source.location if spec.source.kind != "builtin" else None)
        if self.visibility.gates:
            self.visibility.verify()
        self.info = info = CollectionInfo(model=model.name, dimensions=model.dimensions, metric=model.metric,
                                          precision=warm.precision(), backend=spec.embedder.backend)
        self.plan = plan_partitions(spec.source)
        check_plan_unchanged(self.plan, self.job_dir)
        self.chunk_paths = [str(self.job_dir.chunk_file(i)) for i in range(len(self.plan))]
        self.embedding = Embedding(
            spec, self.follower, self.futures, placement=placement, job_dir=self.job_dir,
            write_kwargs={"sink": spec.sink, "collection": self.collection, "info": info, "retry": spec.retry},
        )
        # The model guard: a collection made by another model stops the job as soon as the
        # store has opened (a second or so), before anything is written, not after an hour of
        # embedding. Opening takes a while (Chroma starts its engine), so it runs beside
        # reading, chunking and the first embedding tasks.
        self.opening = open_sink_in_thread(spec.sink, self.collection, info, allow_mixed=spec.allow_mixed)

    # --- read + chunk (and, when streaming, embed) ----------------------------------------

    def _chunk(self) -> None:
        spec, progress = self.spec, self.progress
        progress.partitions_total = len(self.plan)
        for i, path in enumerate(self.chunk_paths):
            if is_done(path):
                self._count_chunks(i, read_json(sidecar(path)))
        self._set_stage("chunking")
        # One task per partition: it reads and chunks it. ``futures`` holds the only
        # reference to each, so a finished one is released as soon as its stats are in, and a
        # worker lost later cannot make the scheduler redo it. The tokenizer's path is
        # resolved on the worker.
        self.futures.update({
            self.follower.client.submit(
                stages.read_chunk_stage, spec.source, self.plan[i], out_path=self.chunk_paths[i], chunk=spec.chunk,
                model_path=spec.embedder.model.path, max_tokens=self.max_tokens, on_error=spec.on_error,
                key=f"chunk-{spec.job_id}-{i}", priority=self.follower.priority, retries=TASK_RETRIES, pure=False,
            ): Chunked(i)
            for i in range(len(self.plan)) if i not in self.chunk_stats
        })
        # With nothing to diff against (a new collection, or mode full) every chunk is
        # embedded, so each chunk partition is embedded as soon as it exists instead of after
        # the whole source is chunked. Not when an exact quota check must come first.
        self.streaming = self.stream and (spec.mode == "full" or not self.manifest.files())
        if self.streaming:
            for i in sorted(self.chunk_stats):
                self._stream_embed(i)
        self.follower.follow(self.futures, self._on_done, until=lambda: len(self.chunk_stats) == len(self.plan))
        self.visibility.verify()  # also for a resumed job whose every partition was chunked before
        self.result.skipped_documents = [
            SkippedDocument(**s) for i in sorted(self.chunk_stats) for s in self.chunk_stats[i]["skipped_documents"]
        ]
        self.non_empty = [p for i, p in enumerate(self.chunk_paths) if self.chunk_stats[i]["chunks"]]

    def _count_chunks(self, i: int, stats: dict) -> None:
        self.chunk_stats[i] = stats
        self.progress.documents += stats["documents"]
        self.progress.chunks += stats["chunks"]
        self.progress.skipped_documents += len(stats["skipped_documents"])
        self.progress.partitions_done += 1

    def _stream_embed(self, i: int) -> None:
        if not self.chunk_stats[i]["chunks"]:
            return
        if self.embedding.rows_per_slice is None:
            known = [s["chunks"] for s in self.chunk_stats.values()]
            self.embedding.plan(round(sum(known) / len(known) * len(self.plan)))
        self.embedding.add(self.chunk_paths[i])

    def _on_done(self, event: Chunked | Embedded | Written, value: Any) -> None:
        self.visibility.verify()
        if self.opening.done():
            self.opening.result()  # a refused collection stops the job now, not when writes open
        if isinstance(event, Chunked):
            self._count_chunks(event.partition, value)
            if self.streaming:
                self._stream_embed(event.partition)
        elif isinstance(event, Embedded):
            self.embedding.on_embedded(event.slot, value)
        else:
            self.embedding.on_written(value)

    # --- diff, then the exact count -------------------------------------------------------

    def _diff(self) -> incremental.Diff:
        # Streamed embedding goes on meanwhile. (Streaming only happens when the diff embeds
        # everything: then it just finds stale chunks.)
        with self.follower.alongside(self.futures, self._on_done):
            diff = incremental.diff(
                self.spec, self.follower, self.manifest, self.non_empty, self.job_dir,
                protected=[s.doc_id for s in self.result.skipped_documents], store=self.opening.result,
                write_kwargs=self.embedding.write_kwargs,
            )
        to_embed = sum(parquet_rows(p) for p in diff.embed_inputs)
        if self.embedding.rows_per_slice is None:
            self.embedding.plan(to_embed)
        # A resumed job asks only for what is left: the partitions an earlier run of it
        # embedded are not embedded again (the job service charges any it has not charged yet).
        left = to_embed - self.embedding.rows_embedded_earlier(diff.embed_inputs)
        self.progress.chunks_to_embed = left
        self.progress.skipped = self.progress.chunks - to_embed
        if self.before_embed is not None:
            self.before_embed(left)
        self.follower.check_cancel()
        return diff

    # --- embed + write ----------------------------------------------------------------------

    def _embed(self, diff: incremental.Diff) -> None:
        if not self.streaming:
            for path in diff.embed_inputs:
                self.embedding.add(path)
        self.progress.stage = "embedding"
        self.progress.partitions_total = self.embedding.partitions
        self.progress.partitions_done = self.embedding.partitions_done
        self.embedding.single_writer = self.opening.result()
        self.embedding.open_writes()
        self.follower.report()
        self.follower.follow(self.futures, self._on_done)

    # --- delete stale chunks ----------------------------------------------------------------

    def _delete(self, stale: list[str]) -> None:
        self._set_stage("committing")
        if not stale:
            return
        kwargs = self.embedding.write_kwargs
        markers = [str(self.job_dir.deleted_marker(p)) for p in stale]
        if self.embedding.single_writer:
            for path, marker in zip(stale, markers):
                self.progress.deleted += stages.delete_stage(path, marker=marker, **kwargs)
                self.follower.report()
            return
        futures = {
            self.follower.client.submit(stages.delete_stage, path, marker=marker, key=f"delete-{self.spec.job_id}-{i}",
                                        priority=self.follower.priority, pure=False, **kwargs): i
            for i, (path, marker) in enumerate(zip(stale, markers))
        }

        def deleted(_i: int, n: int) -> None:
            self.progress.deleted += n

        self.follower.follow(futures, deleted)


def check_plan_unchanged(plan: list, job_dir: JobDir) -> None:
    """A resumed job must read the source as its first run did, or finished partitions would lie.

    The plan (files with sizes, byte ranges) is fingerprinted on the first run; if the source
    changed before a resume, the resume is refused rather than mixing two versions of it.
    """
    fingerprint = hashlib.sha256(repr(plan).encode()).hexdigest()
    if job_dir.plan.exists():
        if read_json(job_dir.plan)["fingerprint"] != fingerprint:
            raise JobError(
                f"the source changed since job {job_dir.job_id} started (files added, removed or resized), so it "
                "cannot be resumed consistently; submit a new job (it embeds only what changed)"
            )
        return
    write_json_atomic({"fingerprint": fingerprint, "partitions": len(plan)}, job_dir.plan)


def _open_sink(sink_spec, collection: str, info: CollectionInfo, allow_mixed: bool = False) -> bool:
    """Open (creating) the job's collection, checking its model and vector family (``allow_mixed``
    adds the job's family to it); whether the store takes a single writer.

    A single-writer store stays open: this process writes to it for the rest of the job.
    """
    sink = open_sink(sink_spec)
    try:
        sink.open(collection, info=info, create=True, allow_mixed=allow_mixed)
        return sink.single_writer
    finally:
        if not sink.single_writer:
            sink.close()


def open_sink_in_thread(sink_spec, collection: str, info: CollectionInfo, *,
                        allow_mixed: bool = False) -> concurrent.futures.Future:
    """:func:`_open_sink` in a thread of its own: the future says whether the store takes one writer."""
    return _in_thread(_open_sink, sink_spec, collection, info, allow_mixed)


def _in_thread(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the result
            future.set_exception(exc)

    threading.Thread(target=run, name="embedfleet-open-sink", daemon=True).start()
    return future
