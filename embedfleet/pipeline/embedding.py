"""A job's embedding partitions and their writes, submitted as their inputs become known.

Inputs are chunk files (or the diff's part of one); each is cut into slices of
``rows_per_slice`` rows, one embed task per slice, named after the input and the slice index,
so a resumed job recognises what an earlier run embedded. Writes wait until
:meth:`Embedding.open_writes`: a streaming job embeds while it still chunks, but nothing
reaches the store before the source passed its checks (duplicates, deletions, quota).

Embedded stores (Chroma PersistentClient, Milvus Lite) have one writer, the driver's process:
their writes happen here, between embedding partitions that keep running on the cluster.
"""

from __future__ import annotations

import heapq
import logging
import time
from pathlib import Path
from typing import Any, Iterable

from embedfleet.errors import SinkError
from embedfleet.frames.io import (
    is_done,
    parquet_rows,
    read_json,
    sidecar,
    write_json_atomic,
)
from embedfleet.pipeline.follow import Embedded, Follower, Written
from embedfleet.pipeline.job import JobResult, JobSpec
from embedfleet.pipeline.jobdir import JobDir
from embedfleet.pipeline.placement import Placement
from embedfleet.tasks import stages

logger = logging.getLogger(__name__)

__all__ = ["Embedding", "embed_task_key", "EMBED_KEY_PREFIX", "TASK_RETRIES"]

# Task retries for worker-side errors (a worker lost mid-task is rescheduled by Dask anyway).
TASK_RETRIES = 2
#: Fewest chunks per embedding task: below this, per-task overhead and small batches cost more
#: than the finer progress and load balance buy.
MIN_ROWS_PER_SLICE = 64
#: Embedding tasks per embedding worker a job aims for, so a small job still shows progress and
#: keeps every worker busy.
SLICES_PER_WORKER = 8
EMBED_KEY_PREFIX = "embed-"


def embed_task_key(job_id: str, out_path: str | Path) -> str:
    """The Dask key of the task that embeds into ``out_path`` (its name on the dashboard; benchmarks match on it)."""
    return f"{EMBED_KEY_PREFIX}{job_id}-{Path(out_path).stem}"


def rows_per_slice(job_dir: JobDir, to_embed: int, most: int, workers: int) -> int:
    """Chunks per embedding task: up to ``most``, fewer for small jobs.

    Chosen once per job and recorded, so a resumed job (maybe on another cluster) slices its
    input exactly as before and recognises the partitions it already embedded.
    """
    if job_dir.embed_plan.exists():
        return int(read_json(job_dir.embed_plan)["rows_per_slice"])
    target = -(-to_embed // max(1, workers * SLICES_PER_WORKER))
    rows = max(1, min(most, max(MIN_ROWS_PER_SLICE, target)))
    write_json_atomic({"rows_per_slice": rows}, job_dir.embed_plan)
    return rows


def _write_partition(embeddings_path: str, **kwargs: Any) -> int | SinkError:
    """:func:`stages.write_stage`, with the store's final error returned instead of raised.

    The driver records it and lets embedding finish before failing the job.
    """
    try:
        return stages.write_stage(embeddings_path, **kwargs)
    except SinkError as exc:
        return exc


class Embedding:
    def __init__(self, spec: JobSpec, follower: Follower, futures: dict, *, placement: Placement, job_dir: JobDir,
                 write_kwargs: dict):
        self.spec, self.follower, self.futures = spec, follower, futures
        self.placement, self.job_dir = placement, job_dir
        self.write_kwargs = write_kwargs
        self.single_writer = False
        self.rows_per_slice: int | None = None
        self.out_paths: list[str] = []
        self.partitions_done = 0
        self.writes_open = False
        self.unwritten: list[int] = []
        self.write_error: SinkError | None = None
        self._this_run: set[int] = set()  # partitions embedded by this run, not an earlier one
        self.waiting: list[tuple[int, int, str, int, int]] = []  # heap of (-rows, slot, input, start, stop)
        # Statistics for the result.
        self.started: float | None = None
        self.last_embedded: float | None = None
        self.real_tokens = self.padded_tokens = 0
        self.tokens_sent = self.requests = 0
        self.precisions: set[str] = set()

    @property
    def partitions(self) -> int:
        return len(self.out_paths)

    def plan(self, expected_rows: int) -> None:
        self.rows_per_slice = rows_per_slice(self.job_dir, expected_rows, self.spec.chunks_per_partition,
                                             max(1, len(self.placement.workers)))

    def _slices(self, path: str) -> list[tuple[str, int, int]]:
        rows = parquet_rows(path)
        return [
            (str(self.job_dir.embedding_file(path, si)), start, min(rows, start + self.rows_per_slice))
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
            slot = len(self.out_paths)
            self.out_paths.append(out_path)
            if is_done(out_path):
                # Embedded by an earlier, interrupted run of this job: not embedded (nor charged)
                # again, but maybe not yet written.
                self.precisions.add(read_json(sidecar(out_path))["precision"])
                self.partitions_done += 1
                self._write(slot)
                continue
            self._this_run.add(slot)
            heapq.heappush(self.waiting, (start - stop, slot, path, start, stop))
        self._submit()

    def _submit(self) -> None:
        """Give each embedding worker its share of tasks (placement.py), biggest slices first,
        so the job does not end waiting on one worker's last big slice."""
        if self.waiting:
            self.placement.refresh_if_stale()
        while self.waiting:
            free, worker = self.placement.next_worker()
            if not free:
                return
            _, slot, path, start, stop = heapq.heappop(self.waiting)
            if self.started is None:
                self.started = time.perf_counter()
            out_path = self.out_paths[slot]
            future = self.follower.client.submit(
                stages.embed_stage, path, start, stop, out_path=out_path, embedder=self.placement.embedder,
                heading_context=self.spec.chunk.heading_context,
                key=embed_task_key(self.spec.job_id, out_path), priority=self.follower.priority,
                retries=TASK_RETRIES, pure=False, **self.placement.submit_options(worker),
            )
            self.futures[future] = Embedded(slot)
            self.placement.assign(slot, worker)

    def on_embedded(self, slot: int, value: dict) -> None:
        progress = self.follower.progress
        self.placement.release(slot)
        self._submit()
        progress.embedded += value["rows"]
        progress.tokens += value["real_tokens"]
        self.real_tokens += value["real_tokens"]
        self.padded_tokens += value["padded_tokens"]
        self.tokens_sent += value.get("tokens_sent", 0)
        self.requests += value.get("requests", 0)
        self.precisions.add(value["precision"])
        self.partitions_done += 1
        if progress.stage in ("embedding", "writing"):
            progress.partitions_done = self.partitions_done
            if self.partitions_done == self.partitions:
                progress.stage = "writing"  # what is left of the job is writes
        self.last_embedded = time.perf_counter()
        self._write(slot)

    def on_written(self, value: int | SinkError) -> None:
        if isinstance(value, SinkError):
            # The store gave up (after its retries). Embedding goes on, so what the job paid
            # the most for is on disk and a resume only writes; the job fails at the end.
            if self.write_error is None:
                # INFO: the job raises this error when embedding ends; said now, it would be said twice.
                logger.info("job %s: %s; embedding continues, writes stop", self.spec.job_id, value)
                self.write_error = value
            return
        self.follower.progress.written += value

    def open_writes(self) -> None:
        self.writes_open = True
        waiting, self.unwritten = self.unwritten, []
        for slot in waiting:
            self._write(slot)

    def _write(self, slot: int) -> None:
        if self.write_error is not None:
            return  # the store is failing: keep embedding, write nothing more (a resume writes)
        if not self.writes_open:
            self.unwritten.append(slot)
            return
        out_path = self.out_paths[slot]
        marker = str(self.job_dir.written_marker(out_path))
        if self.single_writer:
            self.on_written(_write_partition(out_path, marker=marker, **self.write_kwargs))
            return
        future = self.follower.client.submit(
            _write_partition, out_path, marker=marker, key=f"write-{self.spec.job_id}-{slot}",
            priority=self.follower.priority, pure=False, **self.write_kwargs,
        )
        self.futures[future] = Written(slot)

    def summarise(self, result: JobResult) -> None:
        progress = self.follower.progress
        if self.started is not None and self.last_embedded is not None:
            result.embed_seconds = self.last_embedded - self.started
        result.padding_efficiency = self.real_tokens / self.padded_tokens if self.padded_tokens else None
        result.precision = ",".join(sorted(self.precisions)) or None
        result.tokens_sent, result.requests = self.tokens_sent, self.requests
        if result.embed_seconds > 0 and progress.embedded:
            result.tokens_per_second = self.real_tokens / result.embed_seconds
            result.chunks_per_second = progress.embedded / result.embed_seconds
