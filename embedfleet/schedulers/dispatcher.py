"""The dispatcher: runs queued jobs on a shared Dask cluster, fairly (DESIGN §5).

One :class:`Dispatcher` (``embedfleet jobs run``) loops:

1. any running job whose lease expired (its dispatcher died) is marked ``interrupted`` — any
   dispatcher does this; an interrupted job waits like a queued one and is resumed under the
   same id (the pipeline skips the partitions that were finished);
2. while fewer than ``max_running`` of its jobs run, it ranks the waiting jobs by effective
   priority (recomputed at every pick, :func:`embedfleet.schedulers.priority.effective_priority`),
   skips users at their tier's concurrency limit (counted over every dispatcher) and claims the
   best one atomically (:meth:`JobService.claim`);
3. each claimed job runs in its own thread, a :class:`JobExecution`, which calls the runner
   (:func:`embedfleet.pipeline.run.run_job`) with the shared ``distributed.Client`` and
   ``priority=int(effective priority)`` as the Dask priority of the job's tasks;
4. it sleeps until the database changes (PostgreSQL ``LISTEN``; SQLite ``PRAGMA data_version``),
   a job ends, or ``poll-seconds`` pass.

A :class:`JobExecution` has a monitor thread that every ``tick`` (0.5 s) writes the latest
progress (stage, counts) with the lease heartbeat and the charge for newly embedded chunks in
one transaction, and reads ``cancel_requested``; a requested cancel sets the ``cancel`` Event
the runner watches, which cancels the job's futures. Every write of a run is fenced by the
claim's ``attempt``: a dispatcher that lost its lease can no longer touch the job. What a job
is charged for is what its embedding partitions on disk hold (:class:`EmbeddedOnDisk`), over
all its runs, so an embedding task that finished after its run was stopped is charged by
the run that resumes the job, once.

Stopping (Ctrl-C, SIGTERM, :meth:`Dispatcher.stop`): no new claims; running jobs are cancelled
on the cluster and recorded ``interrupted`` (resumed by the next dispatcher) unless they finish
first. A second SIGTERM or SIGINT (:class:`StopSignals`) stops the process at once, even with a
job thread stuck for good: this dispatcher's jobs are recorded ``interrupted`` first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy.exc import DBAPIError

from embedfleet import config
from embedfleet.errors import EmbedfleetError, JobCancelled, QuotaExceeded
from embedfleet.options import IndexOptions
from embedfleet.schedulers.service import NOTIFY_CHANNEL, Claim, Counts, JobInfo, JobService

if TYPE_CHECKING:
    from embedfleet.pipeline.job import JobResult, Progress

__all__ = ["Dispatcher", "EmbeddedOnDisk", "JobExecution", "Runner", "StopSignals", "default_runner", "dispatcher_name"]

log = logging.getLogger(__name__)

Runner = Callable[..., "JobResult"]


def default_runner(spec, **kwargs) -> "JobResult":
    """:func:`embedfleet.pipeline.run.run_job`, imported when a job first runs."""
    from embedfleet.pipeline.run import run_job

    return run_job(spec, **kwargs)


def dispatcher_name(kind: str = "dispatcher") -> str:
    return f"{kind}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, EmbedfleetError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _with_current_roots(spec):
    """The job's spec under the allowed roots of this dispatcher's config, where it has any:
    narrowing them binds the jobs already queued too. Workers check every file against them."""
    import dataclasses

    from embedfleet.datasets.readers import real_roots

    roots = config.get("jobs.allowed-roots", None)
    if not roots:
        return spec
    return dataclasses.replace(spec, source=dataclasses.replace(spec.source, allowed_roots=real_roots(roots)))


class EmbeddedOnDisk:
    """Chunks a job embedded over all its runs: the rows of its embedding partitions on disk.

    Every finished embedding task leaves ``<job_dir>/embeddings/<partition>.parquet.json``
    (renamed into place after its Parquet file) with its ``rows``, whichever run submitted it
    and whether or not that run was still there to see it finish; a resumed job reuses it and
    never embeds it again. A runner that does not embed through these files is charged
    nothing. Sidecars once read are remembered, so a monitor tick reads only new ones.
    """

    SUFFIX = ".parquet.json"

    def __init__(self, job_dir: str | os.PathLike):
        from embedfleet.pipeline.jobdir import JobDir

        self.dir = JobDir(job_dir).embeddings
        self._rows: dict[str, int] = {}
        self._lock = threading.Lock()  # the monitor and the runner's before_embed both count

    def total(self) -> int:
        with self._lock:
            try:
                names = os.listdir(self.dir)
            except FileNotFoundError:
                names = []
            for name in names:
                if name.endswith(self.SUFFIX) and not name.startswith(".") and name not in self._rows:
                    try:
                        with open(self.dir / name) as f:
                            self._rows[name] = int(json.load(f)["rows"])
                    except (OSError, ValueError, KeyError, TypeError):  # counted at the next look
                        log.warning("embedding partition %s unreadable; not counted yet", self.dir / name)
            return sum(self._rows.values())


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
    on_progress: Callable[["Progress"], None] | None = None,
    cancel: threading.Event | None = None,
    **fields: Any,
) -> "JobResult":
    """Submit and run a job now, in this process, on ``client`` (what ``embedfleet index`` does).

    Admitted like a submitted job (:meth:`JobService.admit_inline`), then run like a dispatched
    one: its progress, exact-count quota check and charges are kept the same way, and it ends
    succeeded/failed/cancelled (interrupted on Ctrl-C, then ``embedfleet jobs resume``
    continues it). Exceptions from the runner are recorded and re-raised. ``options`` and
    ``fields`` are :meth:`JobService.submit`'s.
    """
    name = dispatcher_name("inline")
    claim = service.admit_inline(source, user=user, priority=priority, options=IndexOptions.merge(options, **fields),
                                 run_as=name)
    execution = JobExecution(service, claim, client=client, runner=runner or default_runner, cancel=cancel,
                             on_progress=on_progress)
    return execution.run(reraise=True)


class JobExecution:
    """One run of one claimed job: the runner call, its monitor thread and the final record."""

    def __init__(
        self,
        service: JobService,
        claim: Claim,
        *,
        client: Any,
        runner: Runner,
        cancel: threading.Event | None = None,
        on_progress: Callable[["Progress"], None] | None = None,
        tick: float = 0.5,
        heartbeat_seconds: float | None = None,
    ):
        self.service = service
        self.claim = claim
        self.client = client
        self.runner = runner
        self.cancel_event = cancel if cancel is not None else threading.Event()
        self.tick = tick
        if heartbeat_seconds is None:
            heartbeat_seconds = min(15.0, max(0.05, config.seconds_value("jobs.lease-seconds") / 4))
        self.heartbeat_seconds = heartbeat_seconds
        self._user_on_progress = on_progress
        self._lock = threading.Lock()
        self._latest: Progress | None = None
        self._dirty = False
        self._embedded: EmbeddedOnDisk | None = None  # once the spec is read
        self._reported: int | None = None  # the embedded total the job record last took
        self._stop = threading.Event()
        self.user_cancelled = False
        self.lost = False
        self.shutting_down = False
        self.result: JobResult | None = None
        self.status: str | None = None

    @property
    def job_id(self) -> str:
        return self.claim.id

    def interrupt(self) -> None:
        """Stop the run because the dispatcher stops: the job will be recorded interrupted."""
        self.shutting_down = True
        self.cancel_event.set()

    # -- callbacks handed to the runner ------------------------------------------------------

    def _on_progress(self, progress: "Progress") -> None:
        with self._lock:
            self._latest = dataclasses.replace(progress)
            self._dirty = True
        if self._user_on_progress is not None:
            self._user_on_progress(progress)

    def _before_embed(self, chunks: int) -> None:
        self.service.reserve(self.claim, int(chunks), embedded=self._embedded.total())

    # -- monitor --------------------------------------------------------------------------

    def _monitor(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(self.tick):
            try:
                due = time.monotonic() - last_beat >= self.heartbeat_seconds
                if self._sync(heartbeat=due):
                    last_beat = time.monotonic()
            except Exception:  # a database hiccup must not kill the job; the lease tolerates some
                log.exception("job %s: could not update the job record", self.job_id)

    def _sync(self, *, heartbeat: bool) -> bool:
        """Flush progress/heartbeat/charge or poll for a cancel; True if the lease was renewed."""
        with self._lock:
            progress, dirty = self._latest, self._dirty
            self._dirty = False
        embedded = self._embedded.total()
        new_embedded = embedded if embedded != self._reported else None
        wrote = dirty or heartbeat or new_embedded is not None
        try:
            if wrote:
                counts = Counts.from_progress(progress) if dirty and progress is not None else None
                cancel = self.service.heartbeat(self.claim, counts=counts, embedded=new_embedded)
                if cancel is not None and new_embedded is not None:
                    self._reported = new_embedded
            else:
                cancel = self.service.poll(self.claim)
        except Exception:
            if dirty:
                with self._lock:
                    self._dirty = True
            raise
        if cancel is None:
            if not self.lost:
                log.warning("job %s: this dispatcher lost the job (lease expired); stopping its run", self.job_id)
            self.lost = True
            self.cancel_event.set()
        elif cancel and not self.cancel_event.is_set():
            log.info("job %s: cancel requested; cancelling its tasks", self.job_id)
            self.user_cancelled = True
            self.cancel_event.set()
        return wrote and cancel is not None

    # -- the run --------------------------------------------------------------------------

    def run(self, *, reraise: bool = False) -> "JobResult | None":
        """Run the job to its end and record it; the runner's exception is re-raised if asked."""
        from embedfleet.pipeline.job import JobSpec

        try:
            spec = JobSpec.from_json(self.claim.spec)
        except Exception as exc:
            log.error("job %s: unreadable job spec: %s", self.job_id, exc)
            self._finish("failed", error=f"unreadable job spec: {_error_text(exc)}")
            if reraise:
                raise
            return None

        spec = _with_current_roots(spec)
        self._embedded = EmbeddedOnDisk(spec.job_dir)
        monitor = threading.Thread(target=self._monitor, name=f"embedfleet-monitor-{self.job_id}", daemon=True)
        monitor.start()
        result = None
        error: BaseException | None = None
        try:
            result = self.runner(
                spec,
                client=self.client,
                priority=int(self.claim.priority),
                on_progress=self._on_progress,
                before_embed=self._before_embed,
                cancel=self.cancel_event,
                # Without a daily quota, nothing needs the exact chunk count before embedding
                # starts, so the run may embed while it chunks.
                stream=self.service.quota(self.claim.owner).daily_limit is None,
            )
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised or logged
            error = exc
        finally:
            self._stop.set()
            monitor.join()
        self.result = result

        if self.cancel_event.is_set() and not self.shutting_down and not self.lost and not self.user_cancelled:
            # Cancelled through the caller's own Event (run_inline(cancel=...)): a user cancel.
            self.user_cancelled = True
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            # Only a run in the main thread (run_inline) sees these: the user stopped it on
            # purpose, so no dispatcher should pick it up again by itself.
            status, message = "cancelled", (
                f"stopped by the user ({type(error).__name__}); `embedfleet jobs resume {self.job_id}` continues it"
            )
        elif isinstance(error, JobCancelled) or (result is not None and result.status == "cancelled"):
            if self.shutting_down and not self.user_cancelled:
                status, message = "interrupted", "interrupted: its dispatcher stopped; the job will be resumed"
            else:
                status, message = "cancelled", None
        elif error is not None:
            status, message = "failed", _error_text(error)
            if not reraise:  # a re-raised error is its caller's to report (the CLI's `Error:` line)
                # The exception itself: out of its except clause, exc_info=True logs "NoneType: None".
                log.error("job %s failed: %s", self.job_id, message,
                          exc_info=None if isinstance(error, EmbedfleetError) else error)
        else:
            assert result is not None
            status, message = result.status, result.error

        with self._lock:
            progress = self._latest
        if isinstance(error, QuotaExceeded):
            # Refused by the exact check after chunking: nothing was written, but the store was
            # opened (creating the collection) beside chunking.
            _drop_collection_left_empty(spec)
        if result is not None:
            counts = Counts(
                stage=progress.stage if progress is not None and status != "succeeded" else None,
                documents=result.documents,
                chunks=result.chunks,
                embedded=result.embedded,
                skipped=result.skipped,
                deleted=result.deleted,
                skipped_documents=len(result.skipped_documents),
                partitions_done=progress.partitions_done if progress else None,
                partitions_total=progress.partitions_total if progress else None,
            )
        else:
            counts = Counts.from_progress(progress) if progress is not None else None
        self._finish(status, counts=counts, embedded=self._embedded.total(), error=message)
        if error is not None and reraise:
            raise error
        return result

    def _finish(self, status: str, *, counts: Counts | None = None, embedded: int | None = None,
                error: str | None = None) -> None:
        if self.lost:
            log.warning("job %s ended %s after this dispatcher lost it; not recorded", self.job_id, status)
            return
        for attempt in range(3):
            try:
                recorded = self.service.finish(self.claim, status=status, counts=counts, embedded=embedded, error=error)
                break
            except Exception:
                if attempt == 2:
                    log.exception("job %s: could not record its end (%s); its lease will expire", self.job_id, status)
                    return
                time.sleep(0.2 * (attempt + 1))
        if recorded:
            self.status = status
            log.info("job %s %s", self.job_id, status)
        else:
            self.lost = True
            log.warning("job %s ended %s but is no longer this run's (lease expired); not recorded", self.job_id, status)


def _drop_collection_left_empty(spec) -> None:
    """Drop the job's collection if it holds nothing and no job ever committed to it.

    A job refused by the exact quota check has written nothing, but its store was opened with
    ``create`` beside chunking; the collection it leaves is then empty and has no manifest.
    One with a manifest, or with any row in it, is not this job's to drop. Jobs of one
    collection run one at a time, and an embedded store is dropped under its writer lock.
    """
    from embedfleet.pipeline.manifest import Manifest
    from embedfleet.sinks.naming import physical_name
    from embedfleet.sinks.registry import open_sink
    from embedfleet.sinks.writer_lock import exclusive_writer, lock_path

    name = physical_name(spec.user, spec.collection)
    try:
        if Manifest(spec.data_dir, spec.sink.uri, name).files():
            return
        lock = lock_path(spec.sink.uri)
        if lock is not None and not lock.parent.exists():
            return  # an embedded store that was never created
        with exclusive_writer(spec.sink.uri), open_sink(spec.sink) as sink:
            if name in sink.list_collections() and sink.open(name).count() == 0:
                sink.drop(name)
                log.info("job %s: dropped the empty collection %r it created", spec.job_id, spec.collection)
    except Exception as exc:  # noqa: BLE001 - the job's own failure is what its record must say
        log.warning("job %s: could not drop its empty collection %r: %s", spec.job_id, spec.collection, exc)


class _ChangeWatcher:
    """Tells the idle dispatcher that the job database changed, without polling the tables.

    PostgreSQL: a dedicated connection LISTENs on :data:`NOTIFY_CHANNEL` (submit, resume, the
    end of a job and lease expiry notify). SQLite: ``PRAGMA data_version`` on a dedicated
    connection changes whenever another connection commits.
    """

    def __init__(self, service: JobService):
        self.kind = service.dialect
        self._engine = service.engine
        self._conn = None
        self._version = None
        try:
            self._connect()
        except Exception as exc:  # noqa: BLE001 - fall back to polling; retried at the next wait
            log.warning("cannot watch the job database for changes (%s); polling", exc)

    def _connect(self) -> None:
        raw = self._engine.raw_connection()
        conn = raw.driver_connection
        raw.detach()
        if self.kind == "postgresql":
            conn.autocommit = True
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._conn = conn
        else:
            self._conn = conn
            self._version = self._data_version()

    def _data_version(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if the database (may have) changed."""
        try:
            if self._conn is None:
                self._connect()
                return True
            if self.kind == "postgresql":
                changed = False
                for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                    changed = True
                if changed:
                    for _ in self._conn.notifies(timeout=0):  # drain the burst
                        pass
                return changed
            version = self._data_version()
            if version != self._version:
                self._version = version
                return True
        except Exception as exc:  # noqa: BLE001 - a lost listener connection: reconnect next time
            log.warning("lost the job database watcher connection (%s); reconnecting", exc)
            self.close()
            self._conn = None
        time.sleep(timeout)
        return False

    def close(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.close()
        except Exception:  # pragma: no cover - closing a broken connection
            pass


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
    ):
        self.service = service
        self.client = client
        if runner is None and client is None:
            from embedfleet.errors import ConfigError

            raise ConfigError("a dispatcher running the pipeline needs client=distributed.Client(...)")
        self.runner = runner or default_runner
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
        self._executions: dict[str, tuple[JobExecution, threading.Thread]] = {}
        self._finished: list[str] = []
        self._ran: list[str] = []
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()

    @property
    def running(self) -> list[str]:
        with self._guard:
            return list(self._executions)

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
        watcher = _ChangeWatcher(self.service)
        interrupted = False
        next_lease_check = 0.0
        try:
            while not self._stop.is_set():
                self._reap()
                try:
                    if time.monotonic() >= next_lease_check:
                        self.service.expire_leases(self.lease_seconds)
                        next_lease_check = time.monotonic() + min(self.poll_seconds, max(0.05, self.lease_seconds / 4))
                    self._fill()
                    if once and not self._executions and not self.service.has_active():
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
                ran.append(self.service.job(job_id))
            except EmbedfleetError:  # pragma: no cover - deleted meanwhile
                pass
        if interrupted:
            raise KeyboardInterrupt
        return ran

    def _idle(self, watcher: _ChangeWatcher, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._wake.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if watcher.wait(min(0.05, left)):
                break
        self._wake.clear()

    def _reap(self) -> None:
        with self._guard:
            done, self._finished = self._finished, []
            for job_id in done:
                self._executions.pop(job_id, None)

    def _fill(self) -> None:
        while not self._stop.is_set() and len(self._executions) < self.max_running:
            claim = None
            for candidate in self.service.rank():
                claim = self.service.claim(candidate, dispatcher=self.name)
                if claim is not None:
                    break
            if claim is None:
                return
            self._start(claim)

    def _start(self, claim: Claim) -> None:
        log.info("dispatcher %s: starting job %s of %s (priority %.1f)", self.name, claim.id, claim.owner, claim.priority)
        execution = JobExecution(self.service, claim, client=self.client, runner=self.runner, tick=self.tick)
        thread = threading.Thread(
            target=self._run_execution, args=(execution,), name=f"embedfleet-job-{claim.id}", daemon=True
        )
        with self._guard:
            self._executions[claim.id] = (execution, thread)
            self._ran.append(claim.id)
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
        left = self.service.interrupt_dispatcher(self.name)
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
                marked.extend(self.service.interrupt_dispatcher(self.name, why=why))
            except Exception:  # noqa: BLE001 - the process ends either way
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


class StopSignals:
    """SIGTERM and SIGINT for a dispatcher process (``embedfleet jobs run``), as a context manager.

    The first signal asks for the clean stop: SIGTERM calls :meth:`Dispatcher.stop`, SIGINT
    raises KeyboardInterrupt as Ctrl-C always did (:meth:`Dispatcher.run` stops the same way).
    That stop waits for the job threads, which a job stuck for good (two threads deadlocked
    building a graph, say) never ends, and closing the cluster can hang on such a thread too.
    The second signal, of either kind, marks this dispatcher's running jobs interrupted
    (:meth:`Dispatcher.abort`), flushes the logs and ends the process at once with exit status
    ``128 + signal``. A first SIGTERM that comes while the cluster is still starting stops the
    dispatcher as soon as it is attached. Outside the main thread nothing is installed:
    signals only reach that thread.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.dispatcher: Dispatcher | None = None
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def attach(self, dispatcher: "Dispatcher") -> None:
        self.dispatcher = dispatcher
        if self.received:
            dispatcher.stop()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)
        name = signal.Signals(signum).name
        if len(self.received) > 1:
            self._exit_now(name, 128 + signum)
        log.warning("%s: stopping; running jobs that do not finish are marked interrupted (%s again: stop at once)",
                    name, name)
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt

    def _exit_now(self, name: str, status: int) -> None:
        if self.dispatcher is not None:
            self.dispatcher.abort(f"stopped at once by a second {name}")
        _flush_logs()
        os._exit(status)


def _flush_logs() -> None:
    """What the logging handlers and standard streams hold, written out before an ``os._exit``."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
