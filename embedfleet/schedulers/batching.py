"""One run of a batch of coalesced jobs (:class:`BatchExecution`): one pipeline pass, a record each.

The dispatcher forms a batch from waiting ``append`` jobs of one (user, sink, collection) whose
options agree (:func:`embedfleet.pipeline.batch.coalescing_key`); the pass is
:func:`embedfleet.pipeline.batch.run_batch`. Every job keeps its own record, written as a
:class:`~embedfleet.schedulers.execution.JobExecution` writes it — stage and counts, lease,
charge for what its own embedding partitions hold, cancel, end — but for the whole batch in
one transaction per tick (:meth:`Ledger.heartbeat_many
<embedfleet.schedulers.ledger.Ledger.heartbeat_many>`), so a batch of 64 jobs costs the job
database what one job does.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from embedfleet.errors import EmbedfleetError, JobCancelled, StoreBusy
from embedfleet.schedulers.execution import (
    EmbeddedOnDisk,
    Runner,
    default_heartbeat_seconds,
    error_text,
    run_monitor,
    with_current_roots,
)
from embedfleet.schedulers.records import Claim, Counts

if TYPE_CHECKING:
    from embedfleet.pipeline.batch import BatchMember
    from embedfleet.pipeline.job import Progress
    from embedfleet.schedulers.service import JobService

__all__ = ["BatchExecution", "default_batch_runner"]

log = logging.getLogger(__name__)


def default_batch_runner(members, **kwargs) -> None:
    """:func:`embedfleet.pipeline.batch.run_batch`, imported when a batch first runs."""
    from embedfleet.pipeline.batch import run_batch

    run_batch(members, **kwargs)


@dataclasses.dataclass
class _Job:
    """What the execution keeps of one job of the batch."""

    claim: Claim
    member: BatchMember | None = None  # None: its spec could not be read
    embedded: EmbeddedOnDisk | None = None
    latest: Progress | None = None
    dirty: bool = False
    reported: int | None = None
    user_cancelled: bool = False
    lost: bool = False
    ended: bool = False


class BatchExecution:
    """One run of a batch: the pass, its monitor thread and each job's final record."""

    def __init__(self, service: JobService, claims: list[Claim], *, batch_id: str, client: Any,
                 runner: Runner | None = None, tick: float = 0.5, heartbeat_seconds: float | None = None):
        self.service = service
        self.ledger = service.ledger
        self.batch_id = batch_id
        self.client = client
        self.runner = runner or default_batch_runner
        self.tick = tick
        self.heartbeat_seconds = default_heartbeat_seconds() if heartbeat_seconds is None else heartbeat_seconds
        self.jobs = [_Job(claim) for claim in claims]
        self.cancel_event = threading.Event()  # the whole pass: the dispatcher stops
        self.shutting_down = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.statuses: dict[str, str] = {}

    @property
    def job_id(self) -> str:
        return self.batch_id

    @property
    def job_ids(self) -> list[str]:
        return [j.claim.id for j in self.jobs]

    def interrupt(self) -> None:
        """Stop the pass because the dispatcher stops: its jobs will be recorded interrupted."""
        self.shutting_down = True
        self.cancel_event.set()

    # -- callbacks handed to the pass ------------------------------------------------------------

    def _on_progress(self, job: _Job, progress: Progress) -> None:
        with self._lock:
            job.latest = dataclasses.replace(progress)
            job.dirty = True

    def _reserve(self, asks: list[tuple[BatchMember, int]]) -> list[BaseException | None]:
        jobs = {id(j.member): j for j in self.jobs if j.member is not None}
        return self.ledger.reserve_many([(jobs[id(m)].claim, int(n), jobs[id(m)].embedded.total()) for m, n in asks])

    # -- monitor ---------------------------------------------------------------------------------

    def _monitor(self) -> None:
        run_monitor(self._stop, self._sync, tick=self.tick, heartbeat_seconds=self.heartbeat_seconds,
                    what=f"batch {self.batch_id}")

    def _sync(self, *, heartbeat: bool) -> bool:
        """Flush every job's progress, heartbeat and charge in one transaction, or poll for
        cancels; True if the leases were renewed."""
        live = [j for j in self.jobs if j.member is not None and not j.lost and not j.ended]
        if not live:
            return heartbeat
        beats, taken = [], []
        with self._lock:
            for job in live:
                counts = Counts.from_progress(job.latest) if job.dirty and job.latest is not None else None
                job.dirty = False
                embedded = job.embedded.total()
                new = embedded if embedded != job.reported else None
                if heartbeat or counts is not None or new is not None:
                    beats.append((job.claim, counts, new))
                    taken.append((job, counts, new))
        flags: dict[str, bool | None] = {}
        if beats:
            try:
                answers = self.ledger.heartbeat_many(beats)
            except Exception:
                with self._lock:
                    for job, counts, _ in taken:
                        job.dirty = job.dirty or counts is not None
                raise
            for (job, _, new), flag in zip(taken, answers):
                flags[job.claim.id] = flag
                if flag is not None and new is not None:
                    job.reported = new
        rest = [j for j in live if j.claim.id not in flags]
        if rest:
            flags.update(zip((j.claim.id for j in rest), self.ledger.poll_many([j.claim for j in rest])))
        for job in live:
            flag = flags.get(job.claim.id)
            if flag is None:
                if not job.lost:
                    log.warning("job %s (batch %s): this dispatcher lost the job (lease expired); it is left out",
                                job.claim.id, self.batch_id)
                job.lost = True
                job.member.cancel.set()
            elif flag and not job.member.cancel.is_set():
                log.info("job %s (batch %s): cancel requested", job.claim.id, self.batch_id)
                job.user_cancelled = True
                job.member.cancel.set()
        return bool(beats) and heartbeat

    # -- the run -----------------------------------------------------------------------------------

    def run(self) -> None:
        """Run the pass to its end and record every job of it."""
        from embedfleet.pipeline.batch import BatchMember
        from embedfleet.pipeline.job import JobSpec

        ends = []
        for job in self.jobs:
            try:
                spec = with_current_roots(JobSpec.from_json(job.claim.spec))
            except Exception as exc:
                log.error("job %s: unreadable job spec: %s", job.claim.id, exc)
                ends.append((job, "failed", None, f"unreadable job spec: {error_text(exc)}"))
                continue
            job.embedded = EmbeddedOnDisk(spec.job_dir)
            job.member = BatchMember(spec, on_progress=functools.partial(self._on_progress, job))
        members = [j.member for j in self.jobs if j.member is not None]
        monitor = threading.Thread(target=self._monitor, name=f"embedfleet-monitor-{self.batch_id}", daemon=True)
        monitor.start()
        error: BaseException | None = None
        try:
            if members:
                self.runner(members, client=self.client, batch_id=self.batch_id,
                            priority=int(self.jobs[0].claim.priority), cancel=self.cancel_event,
                            reserve=self._reserve)
        except BaseException as exc:  # noqa: BLE001 - recorded on every job without an outcome
            error = exc
        finally:
            self._stop.set()
            monitor.join()
        if error is not None and not isinstance(error, JobCancelled):
            log.error("batch %s failed: %s", self.batch_id, error_text(error),
                      exc_info=None if isinstance(error, EmbedfleetError) else error)
        for job in self.jobs:
            if job.member is None:
                continue
            ends.append((job, *self._outcome(job, error)))
        self._finish(ends)

    def _outcome(self, job: _Job, error: BaseException | None) -> tuple[str, Counts | None, str | None]:
        member = job.member
        result = member.result
        if result is not None:
            status, message = result.status, result.error
            if status == "cancelled" and job.lost:
                status = "interrupted"
        elif member.error is not None:
            status, message = "failed", error_text(member.error)
        elif isinstance(error, JobCancelled) or self.cancel_event.is_set():
            status, message = "interrupted", "interrupted: its dispatcher stopped; the job will be resumed"
        elif isinstance(error, StoreBusy):
            status, message = "interrupted", f"interrupted: {error}; the job waits for the store"
        elif error is not None:
            status, message = "failed", error_text(error)
        else:  # pragma: no cover - run_batch gives every member a result or an error
            status, message = "failed", "the batch ended without an outcome for this job"
        with self._lock:
            progress = job.latest
        if result is not None:
            counts = Counts(
                stage=progress.stage if progress is not None and status != "succeeded" else None,
                documents=result.documents, chunks=result.chunks, embedded=result.embedded,
                skipped=result.skipped, deleted=result.deleted,
                skipped_documents=len(result.skipped_documents),
                partitions_done=progress.partitions_done if progress else None,
                partitions_total=progress.partitions_total if progress else None,
            )
        else:
            counts = Counts.from_progress(progress) if progress is not None else None
        return status, counts, message

    def _finish(self, ends: list[tuple[_Job, str, Counts | None, str | None]]) -> None:
        ends = [e for e in ends if not e[0].lost]
        if not ends:
            return
        rows = [(job.claim, status, counts, job.embedded.total() if job.embedded else None, message)
                for job, status, counts, message in ends]
        for attempt in range(3):
            try:
                recorded = self.ledger.finish_many(rows)
                break
            except Exception:
                if attempt == 2:
                    log.exception("batch %s: could not record its end; its jobs' leases will expire", self.batch_id)
                    return
                time.sleep(0.2 * (attempt + 1))
        for (job, status, _, _), ok in zip(ends, recorded):
            job.ended = True
            if ok:
                self.statuses[job.claim.id] = status
                log.info("job %s %s (batch %s)", job.claim.id, status, self.batch_id)
            else:
                job.lost = True
                log.warning("job %s ended %s but is no longer this run's (lease expired); not recorded",
                            job.claim.id, status)
