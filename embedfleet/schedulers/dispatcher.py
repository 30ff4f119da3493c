"""The dispatcher: runs queued jobs on a shared Dask cluster, fairly (DESIGN §5).

One :class:`Dispatcher` (``embedfleet jobs run``) loops:

1. any running job whose lease expired (its dispatcher died) is marked ``interrupted`` — any
   dispatcher does this; an interrupted job waits like a queued one and is resumed under the
   same id (the pipeline skips the partitions that were finished);
2. while fewer than ``max_running`` of its jobs run, it ranks the waiting jobs by effective
   priority (recomputed at every pick, :func:`embedfleet.schedulers.reads.live_priority`),
   skips users at their tier's concurrency limit (counted over every dispatcher) and claims the
   best one atomically (:meth:`Ledger.claim <embedfleet.schedulers.ledger.Ledger.claim>`);
3. each claimed job runs in its own thread, a :class:`~embedfleet.schedulers.execution.JobExecution`,
   which calls the runner (:func:`embedfleet.pipeline.run.run_job`) with the shared
   ``distributed.Client`` and ``priority=int(effective priority)`` as the Dask priority of the
   job's tasks, and keeps the job's record through the service's ledger;
4. it sleeps until the database changes (PostgreSQL ``LISTEN``; SQLite ``PRAGMA data_version``),
   a job ends, or ``poll-seconds`` pass.

Stopping (Ctrl-C, SIGTERM, :meth:`Dispatcher.stop`): no new claims; running jobs are cancelled
on the cluster and recorded ``interrupted`` (resumed by the next dispatcher) unless they finish
first. A second SIGTERM or SIGINT (:class:`~embedfleet.schedulers.signals.StopSignals`) stops the
process at once, even with a job thread stuck for good: this dispatcher's jobs are recorded
``interrupted`` first.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from embedfleet import config
from embedfleet.errors import EmbedfleetError
from embedfleet.options import IndexOptions
from embedfleet.schedulers.execution import (
    ChangeWatcher,
    EmbeddedOnDisk,
    JobExecution,
    Runner,
)
from embedfleet.schedulers.batching import BatchExecution, default_batch_runner
from embedfleet.schedulers.records import Candidate, Claim, JobInfo
from embedfleet.schedulers.service import JobService
from embedfleet.schedulers.signals import StopSignals

if TYPE_CHECKING:
    from embedfleet.pipeline.job import JobResult, Progress

# JobExecution, EmbeddedOnDisk and StopSignals live in their own modules; they stay importable
# from here, where `embedfleet jobs run`, tests and notebooks have always found them.
__all__ = ["Dispatcher", "EmbeddedOnDisk", "JobExecution", "Runner", "StopSignals", "default_runner", "dispatcher_name"]

log = logging.getLogger(__name__)


#: How often an idle dispatcher looks at its wake flag (a job of its own ended) and, on SQLite,
#: at the database's version (a submit): a one-document job takes a few hundred milliseconds,
#: so the 50 ms this was before showed in its latency; ``PRAGMA data_version`` costs microseconds.
WATCH_STEP_SECONDS = 0.01


#: A collection with at least this share of ``jobs.coalesce.max-jobs`` waiting gets a batch of
#: its own when a slot is free, rather than joining another collection's: two passes overlap
#: (one embeds while the other writes and commits), which one big pass cannot.
OWN_PASS_SHARE = 0.25


def _job_ids(execution: JobExecution | BatchExecution) -> list[str]:
    return execution.job_ids if isinstance(execution, BatchExecution) else [execution.job_id]


def default_runner(spec, **kwargs) -> JobResult:
    """:func:`embedfleet.pipeline.run.run_job`, imported when a job first runs."""
    from embedfleet.pipeline.run import run_job

    return run_job(spec, **kwargs)


def dispatcher_name(kind: str = "dispatcher") -> str:
    return f"{kind}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def run_once(service: JobService, client: Any = None, *, runner: Runner | None = None,
             max_running: int | None = None) -> list[JobInfo]:
    """Dispatch until no job is queued, interrupted or running; return the jobs this call ran."""
    return Dispatcher(service, client=client, runner=runner, max_running=max_running).run(once=True)


def run_inline(
    service: JobService,
    source: str,
    *,
    client: Any,
    user: str | None = None,
    priority: int | None = None,
    options: IndexOptions | None = None,
    runner: Runner | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
    **fields: Any,
) -> JobResult:
    """Submit and run a job now, in this process, on ``client`` (what ``embedfleet index`` does).

    Admitted like a submitted job (:meth:`Admission.admit_inline <embedfleet.schedulers.admission.Admission.admit_inline>`), then run like a dispatched
    one: its progress, exact-count quota check and charges are kept the same way, and it ends
    succeeded/failed/cancelled (interrupted on Ctrl-C, then ``embedfleet jobs resume``
    continues it). Exceptions from the runner are recorded and re-raised. ``options`` and
    ``fields`` are :meth:`JobService.submit`'s.
    """
    name = dispatcher_name("inline")
    claim = service.admission.admit_inline(source, user=user, priority=priority, options=IndexOptions.merge(options, **fields),
                                 run_as=name)
    execution = JobExecution(service, claim, client=client, runner=runner or default_runner, cancel=cancel,
                             on_progress=on_progress)
    return execution.run(reraise=True)


class Dispatcher:
    """Runs waiting jobs of a :class:`JobService` on one Dask client.

    :param client: the shared ``distributed.Client`` handed to every runner call.
    :param runner: ``run_job``-compatible callable (default :func:`default_runner`); tests pass a fake.
    :param max_running: jobs this dispatcher runs at once (default ``embedfleet.jobs.max-running``).
    :param poll_seconds: idle re-check interval (default ``embedfleet.jobs.poll-seconds``); the age
        bonus and lease expiry are noticed at least this often.
    :param lease_seconds: lease length (default ``embedfleet.jobs.lease-seconds``).
    :param tick: how often a running job's progress is written and its cancel flag read.
    """

    def __init__(
        self,
        service: JobService,
        *,
        client: Any = None,
        runner: Runner | None = None,
        max_running: int | None = None,
        name: str | None = None,
        poll_seconds: float | None = None,
        lease_seconds: float | None = None,
        tick: float = 0.5,
        shutdown_grace: float = 30.0,
        batch_runner: Runner | None = None,
    ):
        self.service = service
        self.client = client
        if runner is None and client is None:
            from embedfleet.errors import ConfigError

            raise ConfigError("a dispatcher running the pipeline needs client=distributed.Client(...)")
        self.runner = runner or default_runner
        # Coalescing (pipeline/batch.py) runs through the batch runner: the pipeline's own,
        # unless a test's runner stands in for the pipeline and brings no batch runner.
        self.batch_runner = batch_runner or (default_batch_runner if runner is None else None)
        self.coalesce_jobs = int(config.get("jobs.coalesce.max-jobs"))
        self.coalesce_chunks = int(config.get("jobs.coalesce.max-chunks"))
        self.max_running = int(max_running if max_running is not None else config.get("jobs.max-running"))
        if self.max_running < 1:
            from embedfleet.errors import ConfigError

            raise ConfigError(f"max-running must be at least 1, not {self.max_running}")
        self.name = name or dispatcher_name()
        self.poll_seconds = float(poll_seconds if poll_seconds is not None else config.seconds_value("jobs.poll-seconds"))
        self.lease_seconds = float(
            lease_seconds if lease_seconds is not None else config.seconds_value("jobs.lease-seconds")
        )
        self.tick = tick
        self.shutdown_grace = shutdown_grace
        self._executions: dict[str, tuple[JobExecution | BatchExecution, threading.Thread]] = {}
        self._finished: list[str] = []
        self._ran: list[str] = []
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()

    @property
    def running(self) -> list[str]:
        """The jobs this dispatcher runs now (a batch's every job)."""
        with self._guard:
            return [job_id for execution, _ in self._executions.values() for job_id in _job_ids(execution)]

    def stop(self) -> None:
        """Ask :meth:`run` to stop: no new claims; running jobs are interrupted (or finish)."""
        self._stop.set()
        self._wake.set()

    def run(self, *, once: bool = False) -> list[JobInfo]:
        """Dispatch until :meth:`stop` (or, with ``once``, until no job is waiting or running).

        Returns the jobs this dispatcher ran (as they are now). Ctrl-C stops like :meth:`stop`
        and then re-raises KeyboardInterrupt.
        """
        log.info("dispatcher %s started (max %d running, %s)", self.name, self.max_running, self.service.url)
        watcher = ChangeWatcher(self.service.store)
        interrupted = False
        next_lease_check = 0.0
        try:
            while not self._stop.is_set():
                self._reap()
                try:
                    if time.monotonic() >= next_lease_check:
                        self.service.ledger.expire_leases(self.lease_seconds)
                        next_lease_check = time.monotonic() + min(self.poll_seconds, max(0.05, self.lease_seconds / 4))
                    self._fill()
                    if once and not self._executions and not self.service.ledger.has_active():
                        break
                except DBAPIError as exc:
                    # The database restarted or is unreachable for a moment: running jobs keep
                    # running (their leases tolerate it); try again after a poll interval.
                    log.error("dispatcher %s: job database error, retrying: %s", self.name, exc)
                    self._stop.wait(self.poll_seconds)
                    continue
                self._idle(watcher, min(self.poll_seconds, max(0.05, next_lease_check - time.monotonic())))
        except KeyboardInterrupt:
            interrupted = True
            log.warning("dispatcher %s: interrupted; stopping its jobs", self.name)
        finally:
            self._shutdown()
            watcher.close()
        ran = []
        for job_id in self._ran:
            try:
                ran.append(self.service.reads.job(job_id))
            except EmbedfleetError:  # pragma: no cover - deleted meanwhile
                pass
        if interrupted:
            raise KeyboardInterrupt
        return ran

    def _idle(self, watcher: ChangeWatcher, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._wake.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if watcher.wait(min(WATCH_STEP_SECONDS, left)):
                break
        self._wake.clear()

    def _reap(self) -> None:
        with self._guard:
            done, self._finished = self._finished, []
            for job_id in done:
                self._executions.pop(job_id, None)

    def _fill(self) -> None:
        while not self._stop.is_set() and len(self._executions) < self.max_running:
            ranked = self.service.ledger.rank()
            for at, candidate in enumerate(ranked):
                batch = uuid.uuid4().hex[:16] if self._may_coalesce(candidate) else None
                claim = self.service.ledger.claim(candidate, dispatcher=self.name, batch=batch)
                if claim is not None:
                    break
            else:
                return
            claims = [claim] + (self._join(ranked, at, claim, batch) if batch is not None else [])
            self._start(claims, batch)

    def _may_coalesce(self, candidate: Candidate) -> bool:
        return (self.batch_runner is not None and self.coalesce_jobs > 1 and candidate.mode == "append"
                and candidate.estimated_chunks <= self.coalesce_chunks)

    def _join(self, ranked: list[Candidate], at: int, lead: Claim, batch: str) -> list[Claim]:
        """Claim the waiting jobs that run in ``lead``'s batch, in rank order: small append jobs
        whose options agree with its (of any user and collection), each only if no job ranked
        above it is kept waiting for it.

        A joining job takes no slot of its own, so it keeps waiting no job that still gets one
        now: the jobs passed over are counted, and joining stops once they are more than the
        slots left after this batch. Passed over are jobs of another kind (a sync job, a big
        one), and the jobs of another collection with a batch's worth waiting
        (:data:`OWN_PASS_SHARE` of ``max-jobs``) while a slot is left for them: such a
        collection gets a pass of its own, beside this one, so one collection's commit overlaps
        another's embedding; a collection with a few jobs waiting joins instead.
        """
        from embedfleet.pipeline.batch import coalescing_key

        key = coalescing_key(lead.spec)
        if key is None:
            return []
        own = (ranked[at].owner, ranked[at].sink, ranked[at].collection)
        waiting: dict[tuple[str, str, str], int] = {}
        for candidate in ranked[at + 1:]:
            if self._may_coalesce(candidate):
                group = (candidate.owner, candidate.sink, candidate.collection)
                waiting[group] = waiting.get(group, 0) + 1
        deep = max(2, int(self.coalesce_jobs * OWN_PASS_SHARE))
        slots_left = self.max_running - len(self._executions) - 1
        passed = 0
        own_pass: set[tuple[str, str, str]] = set()
        joined: list[Claim] = []
        for candidate in ranked[at + 1:]:
            if len(joined) + 1 >= self.coalesce_jobs or passed > slots_left:
                break
            group = (candidate.owner, candidate.sink, candidate.collection)
            if not self._may_coalesce(candidate):
                passed += 1
                continue
            if group != own and (group in own_pass or (waiting[group] >= deep and len(own_pass) < slots_left)):
                if group not in own_pass:
                    own_pass.add(group)
                    passed += 1
                continue
            claim = self.service.ledger.claim(candidate, dispatcher=self.name, batch=batch,
                                              joins=lambda spec: coalescing_key(spec) == key)
            if claim is not None:
                joined.append(claim)
        return joined

    def _start(self, claims: list[Claim], batch: str | None = None) -> None:
        from embedfleet.pipeline.batch import was_batched

        lead = claims[0]
        if len(claims) == 1 and not (batch is not None and was_batched(lead.spec)):
            log.info("dispatcher %s: starting job %s of %s (priority %.1f)", self.name, lead.id, lead.owner,
                     lead.priority)
            execution: JobExecution | BatchExecution = JobExecution(
                self.service, lead, client=self.client, runner=self.runner, tick=self.tick)
        else:
            log.info("dispatcher %s: starting batch %s of %d jobs of %s (priority %.1f)", self.name, batch,
                     len(claims), lead.owner, lead.priority)
            execution = BatchExecution(self.service, claims, batch_id=batch, client=self.client,
                                       runner=self.batch_runner, tick=self.tick)
        thread = threading.Thread(
            target=self._run_execution, args=(execution,), name=f"embedfleet-job-{execution.job_id}", daemon=True
        )
        with self._guard:
            self._executions[execution.job_id] = (execution, thread)
            self._ran.extend(_job_ids(execution))
        thread.start()

    def _run_execution(self, execution: JobExecution) -> None:
        try:
            execution.run()
        except BaseException:  # pragma: no cover - run() records and swallows everything
            log.exception("job %s: dispatcher thread failed", execution.job_id)
        finally:
            with self._guard:
                self._finished.append(execution.job_id)
            self._wake.set()

    def _shutdown(self) -> None:
        with self._guard:
            running = list(self._executions.values())
        for execution, _ in running:
            execution.interrupt()
        deadline = time.monotonic() + self.shutdown_grace
        try:
            for _, thread in running:
                thread.join(max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            log.warning("dispatcher %s: not waiting for its jobs any longer", self.name)
        left = self.service.ledger.interrupt_dispatcher(self.name)
        if left:
            log.warning("dispatcher %s: marked %s interrupted", self.name, ", ".join(left))
        self._reap()

    def abort(self, why: str, *, timeout: float = 10.0) -> list[str]:
        """Record this dispatcher's running jobs interrupted now, without waiting for their threads.

        For a process about to end whatever its threads are doing (:class:`StopSignals`). The
        write runs in a thread of its own, given ``timeout`` seconds: called from a signal
        handler, this runs on the main thread in the middle of whatever it was doing, which
        may hold a lock the database write needs. If it cannot finish, the jobs' leases expire
        and the next dispatcher marks them interrupted instead.
        """
        marked: list[str] = []

        def mark() -> None:
            try:
                marked.extend(self.service.ledger.interrupt_dispatcher(self.name, why=why))
            except Exception:
                log.exception("dispatcher %s: could not mark its jobs interrupted", self.name)

        writer = threading.Thread(target=mark, name="embedfleet-abort", daemon=True)
        writer.start()
        writer.join(timeout)
        if writer.is_alive():
            log.error("dispatcher %s: could not mark its jobs interrupted within %gs; their leases will expire",
                      self.name, timeout)
            return []
        if marked:
            log.warning("dispatcher %s: %s; marked %s interrupted (resumed by the next dispatcher)",
                        self.name, why, ", ".join(marked))
        return marked
