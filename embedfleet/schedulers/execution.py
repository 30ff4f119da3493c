"""One run of one claimed job (:class:`JobExecution`), and the watcher that wakes an idle dispatcher.

A :class:`JobExecution` has a monitor thread that every ``tick`` (0.5 s) writes the latest
progress (stage, counts) with the lease heartbeat and the charge for newly embedded chunks in
one transaction, and reads ``cancel_requested``; a requested cancel sets the ``cancel`` Event
the runner watches, which cancels the job's futures. Every write goes through the service's
ledger (:mod:`~embedfleet.schedulers.ledger`), fenced by the claim's ``attempt``: a
dispatcher that lost its lease can no longer touch the job. What a job is charged for is what
its embedding partitions on disk hold (:class:`EmbeddedOnDisk`), over all its runs, so an
embedding task that finished after its run was stopped is charged by the run that resumes
the job, once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from embedfleet import config
from embedfleet.errors import EmbedfleetError, JobCancelled, QuotaExceeded, StoreBusy
from embedfleet.schedulers.records import Claim, Counts
from embedfleet.schedulers.store import NOTIFY_CHANNEL, Store

if TYPE_CHECKING:
    from embedfleet.pipeline.job import JobResult, Progress
    from embedfleet.schedulers.service import JobService

__all__ = ["ChangeWatcher", "EmbeddedOnDisk", "JobExecution", "Runner"]

log = logging.getLogger(__name__)

Runner = Callable[..., "JobResult"]


def default_heartbeat_seconds() -> float:
    """A quarter of ``jobs.lease-seconds`` (0.05-15 s): a lease outlives a few missed beats."""
    return min(15.0, max(0.05, config.seconds_value("jobs.lease-seconds") / 4))


def run_monitor(stop: threading.Event, sync: Callable[..., bool], *, tick: float, heartbeat_seconds: float,
                what: str) -> None:
    """Call ``sync(heartbeat=...)`` every ``tick`` until ``stop``, asking for a heartbeat once
    ``heartbeat_seconds`` have passed since ``sync`` last said it renewed the lease."""
    last_beat = time.monotonic()
    while not stop.wait(tick):
        try:
            if sync(heartbeat=time.monotonic() - last_beat >= heartbeat_seconds):
                last_beat = time.monotonic()
        except Exception:  # a database hiccup must not kill the run; the lease tolerates some
            log.exception("%s: could not update the job records", what)


def error_text(exc: BaseException) -> str:
    if isinstance(exc, EmbedfleetError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def with_current_roots(spec):
    """The job's spec under the allowed roots of this dispatcher's config, where it has any:
    narrowing them binds the jobs already queued too. Workers check every file against them."""
    import dataclasses

    from embedfleet.datasets.readers import real_roots

    roots = config.get("jobs.allowed-roots", None)
    if not roots:
        return spec
    real = real_roots(roots)
    private = real_roots(config.get("jobs.private-roots", None) or [])
    location = str(spec.source.location)
    if private and "://" not in location:
        # As submitted, not resolved now: a source swapped for a symlink into a private root
        # since then must not pass for that root's own file.
        location = os.path.abspath(location)
        if any(location == p or location.startswith(p.rstrip(os.sep) + os.sep) for p in private):
            # A private file (a serve user's inline documents) is read by its own job only.
            real = (location,)
        else:
            # ... and never by another job, whatever a file of its source is swapped for.
            real = tuple(r for r in real if not any(r == p or r.startswith(p.rstrip(os.sep) + os.sep) for p in private))
    return dataclasses.replace(spec, source=dataclasses.replace(spec.source, allowed_roots=real))


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
            from embedfleet.frames.io import read_json

            # glob, not listdir: the data dir may be an object store (a Remote answers glob too).
            names = [p.name for p in self.dir.glob(f"*{self.SUFFIX}")]
            for name in names:
                if name.endswith(self.SUFFIX) and not name.startswith(".") and name not in self._rows:
                    try:
                        self._rows[name] = int(read_json(self.dir / name)["rows"])
                    except (OSError, ValueError, KeyError, TypeError):  # counted at the next look
                        log.warning("embedding partition %s unreadable; not counted yet", self.dir / name)
            return sum(self._rows.values())


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
        on_progress: Callable[[Progress], None] | None = None,
        tick: float = 0.5,
        heartbeat_seconds: float | None = None,
    ):
        self.service = service
        self.ledger = service.ledger
        self.claim = claim
        self.client = client
        self.runner = runner
        self.cancel_event = cancel if cancel is not None else threading.Event()
        self.tick = tick
        self.heartbeat_seconds = default_heartbeat_seconds() if heartbeat_seconds is None else heartbeat_seconds
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

    def _on_progress(self, progress: Progress) -> None:
        with self._lock:
            self._latest = dataclasses.replace(progress)
            self._dirty = True
        if self._user_on_progress is not None:
            self._user_on_progress(progress)

    def _before_embed(self, chunks: int) -> None:
        self.ledger.reserve(self.claim, int(chunks), embedded=self._embedded.total())

    # -- monitor --------------------------------------------------------------------------

    def _monitor(self) -> None:
        run_monitor(self._stop, self._sync, tick=self.tick, heartbeat_seconds=self.heartbeat_seconds,
                    what=f"job {self.job_id}")

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
                cancel = self.ledger.heartbeat(self.claim, counts=counts, embedded=new_embedded)
                if cancel is not None and new_embedded is not None:
                    self._reported = new_embedded
            else:
                cancel = self.ledger.poll(self.claim)
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

    def run(self, *, reraise: bool = False) -> JobResult | None:
        """Run the job to its end and record it; the runner's exception is re-raised if asked."""
        from embedfleet.pipeline.job import JobSpec

        try:
            spec = JobSpec.from_json(self.claim.spec)
        except Exception as exc:
            log.error("job %s: unreadable job spec: %s", self.job_id, exc)
            self._finish("failed", error=f"unreadable job spec: {error_text(exc)}")
            if reraise:
                raise
            return None

        spec = with_current_roots(spec)
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
                stream=self.service.reads.quota(self.claim.owner).daily_limit is None,
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
        elif isinstance(error, StoreBusy) and not reraise:
            # Another dispatcher's job took the embedded store between the claim's look and this
            # run: nothing was done, and the job waits queued for the store to be free.
            status, message = "interrupted", f"interrupted: {error}; the job waits for the store"
            log.info("job %s: %s", self.job_id, message)
        elif error is not None:
            status, message = "failed", error_text(error)
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
                recorded = self.ledger.finish(self.claim, status=status, counts=counts, embedded=embedded, error=error)
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


class ChangeWatcher:
    """Tells the idle dispatcher that the job database changed, without polling the tables.

    PostgreSQL: a dedicated connection LISTENs on :data:`NOTIFY_CHANNEL` (submit, resume, the
    end of a job and lease expiry notify). SQLite: ``PRAGMA data_version`` on a dedicated
    connection changes whenever another connection commits.
    """

    def __init__(self, store: Store):
        self.kind = store.dialect
        self._engine = store.engine
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
