"""Admission: whether a job may be queued (or run inline) for its user now, and its record.

Submit, resume and an inline run (``embedfleet index``) are admitted here, in one transaction
each; the dispatcher's claim (:mod:`~embedfleet.schedulers.ledger`) decides on the same counts
(:func:`running_jobs`, :data:`~embedfleet.schedulers.reads.HELD`), so the service, the
dashboard and the dispatcher cannot disagree on what a job holds.

* A user id and collection are validated; an unknown user is created at
  ``embedfleet.jobs.default-tier`` (the user ``embedfleet index`` runs as, config
  ``embedfleet.user``, at ``embedfleet.jobs.local-tier``); at most ``queue-limit`` waiting
  jobs per user (:class:`QueueFull`); the estimated chunks to embed must fit in what is left
  of today's quota (:class:`QuotaExceeded`, naming the remaining amount); file sources must
  lie under ``allowed-roots`` when that is set (:class:`PermissionDenied`). An inline run is
  admitted running, so it is also refused when the user already runs as many jobs as the tier
  allows at once, counted over inline and dispatched jobs alike.
* The estimate at submit is from file sizes, and errs high. A ``sync`` or ``append`` into a
  collection that already holds chunks embeds only new and changed ones (a re-run of an
  unchanged source: none), which only chunking can count: it is never refused on its
  estimate, holds its estimate less what the collection's manifest holds, and is refused, if
  at all, by the exact count after chunking, before anything is embedded
  (:meth:`Admission.estimate`).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from embedfleet import config
from embedfleet.errors import (
    ConfigError,
    EmbedfleetError,
    JobError,
    PermissionDenied,
    QueueFull,
    QuotaExceeded,
)
from embedfleet.options import IndexOptions
from embedfleet.schedulers.lifecycle import transition
from embedfleet.schedulers.models import WAITING_STATUSES, Job, Usage, User
from embedfleet.schedulers.priority import RECENT_WINDOW, PrioritySettings, Tier, tier
from embedfleet.schedulers.reads import Reads, held_chunks, live_priority, quota_left
from embedfleet.schedulers.records import Claim
from embedfleet.schedulers.store import (
    NOTIFY_CHANNEL,
    Store,
    collection_busy,
    dead_run,
    dead_run_values,
    tier_of,
)
from embedfleet.sinks.naming import check_part

if TYPE_CHECKING:
    from embedfleet.config import ChunkSpec
    from embedfleet.datasets.source import SourceSpec
    from embedfleet.pipeline.job import JobSpec

__all__ = [
    "Admission",
    "Estimator",
    "SpecBuilder",
    "admission_counts",
    "admission_lock",
    "at_concurrency_limit",
    "check_priority",
    "check_user",
    "kept_chunks",
    "left_phrase",
    "new_job_id",
    "running_jobs",
]

log = logging.getLogger(__name__)

_ID_HEX = 12

#: ``(source, options, *, job_id, user, data_dir) -> JobSpec``, like :func:`build_job_spec`.
SpecBuilder = Callable[..., "JobSpec"]
Estimator = Callable[["SourceSpec", "ChunkSpec"], int]


# --------------------------------------------------------------------------------------------
# admission's SQL


def running_jobs(owner):
    """The count the tier's concurrency limit is about: the owner's running jobs, dispatched or
    inline, on every dispatcher, a batch of coalesced jobs counting once (it is one pipeline
    pass). Claims and inline admissions check it under the owner's row lock."""
    return select(func.count(func.distinct(running_unit()))).where(Job.owner == owner, Job.status == "running")


def running_unit():
    """What one running pass is: its batch, or the job itself when it runs alone."""
    return func.coalesce(Job.batch, Job.id)


def at_concurrency_limit(t: Tier, running: int) -> bool:
    return int(running or 0) >= t.concurrent_jobs


def admission_lock(*, notify: bool):
    """Lock the user's row, reading its tier.

    Its own statement, before the counts are read: under PostgreSQL's READ COMMITTED a
    statement's subqueries see the snapshot taken when it started, so counts read in the
    statement that waited for the lock would miss what the previous holder just committed.
    """
    columns = [User.tier.label("tier")]
    if notify:
        columns.append(func.pg_notify(bindparam("channel"), "").label("notified"))
    return select(*columns).where(User.id == bindparam("user")).with_for_update(of=User.__table__)


def admission_counts():
    """Everything admission checks about the (locked) user, in one round trip."""
    user = bindparam("user")
    return select(
        select(func.count()).where(Job.owner == user, Job.status.in_(WAITING_STATUSES)).scalar_subquery().label("waiting"),
        running_jobs(user).scalar_subquery().label("running"),
        select(Usage.chunks).where(Usage.user == user, Usage.day == bindparam("day")).scalar_subquery().label("used"),
        held_chunks(user).scalar_subquery().label("held"),
        select(func.count()).where(Job.owner == user, Job.started_at >= bindparam("since")).scalar_subquery().label("recent"),
    )


_ADMISSION_LOCK = admission_lock(notify=False)
_ADMISSION_LOCK_NOTIFY = admission_lock(notify=True)
_ADMISSION_COUNTS = admission_counts()
_INSERT_JOB = Job.__table__.insert()


# --------------------------------------------------------------------------------------------
# the rules


def new_job_id() -> str:
    return uuid.uuid4().hex[:_ID_HEX]


def default_spec_builder(source: str, options: IndexOptions, **kwargs: Any) -> JobSpec:
    from embedfleet.pipeline.spec import build_job_spec

    return build_job_spec(source, options, **kwargs)


def default_estimator(source: SourceSpec, chunk: ChunkSpec) -> int:
    from embedfleet.datasets import estimate_chunks

    return int(estimate_chunks(source, chunk))


def check_user(user: str) -> str:
    return check_part("user id", user)


def check_priority(priority: int | None) -> int:
    if priority is None:
        return int(PrioritySettings.from_config().default)
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 100:
        raise ConfigError(f"priority must be an integer from 0 to 100, not {priority!r}")
    return priority


def kept_chunks(spec: JobSpec) -> int:
    """Chunks of the job's collection it keeps unless they changed: for modes ``sync`` and
    ``append``, what the collection's manifest holds (0 for a new collection); 0 for ``full``,
    which embeds everything again.

    A manifest that cannot be read counts 0: the job's run says what is wrong with it.
    """
    if spec.mode not in ("sync", "append"):
        return 0
    from embedfleet.pipeline.manifest import Manifest
    from embedfleet.sinks.naming import physical_name

    try:
        files = Manifest(spec.data_dir, spec.sink.uri, physical_name(spec.user, spec.collection)).files()
        if not files:
            return 0
        from embedfleet.frames.io import parquet_rows  # the manifest may be on object storage

        return sum(parquet_rows(f) for f in files)
    except (EmbedfleetError, OSError, ValueError):
        return 0


def exact_only_recorded(job: Job) -> bool:
    """:meth:`Admission.estimate`'s rule for a job already recorded: whether only its exact count may refuse it."""
    from embedfleet.pipeline.job import JobSpec

    try:
        spec = JobSpec.from_json(job.spec)
    except Exception:  # noqa: BLE001 - an unreadable spec fails when the job runs, saying so
        return False
    return kept_chunks(spec) > 0


def left_phrase(t: Tier, remaining: int, used: int, held: int, *, holders: str = "its waiting and running jobs") -> str:
    """How a refusal says what is left, and where the rest of the quota went."""
    return (
        f"has only {remaining} of today's {t.daily_chunks} chunks left (tier {t.name}: {int(used or 0)} charged today, "
        f"{int(held or 0)} held by {holders})"
    )


class RetryAdmission(Exception):
    """Internal: run the admission transaction again."""


def _allowed_roots() -> list[Path]:
    return [Path(r).expanduser().resolve() for r in (config.get("jobs.allowed-roots", None) or [])]


def check_root(location: str) -> None:
    roots = _allowed_roots()
    if not roots:
        return
    path = Path(location).expanduser().resolve()
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise PermissionDenied(
            f"source {str(path)!r} is outside the allowed roots ({', '.join(str(r) for r in roots)})"
        )


def check_raw_source(source: str) -> None:
    # Before building the spec, which may open the file (Parquet footers, CSV headers): its
    # error messages must not tell a user about a file outside the roots. A name that is no
    # path (a built-in dataset) is checked on the built spec instead.
    if not _allowed_roots() or source.startswith("builtin:") or "://" in source:
        return
    if Path(source).expanduser().exists():
        check_root(source)


class Admission:
    """Admits jobs into one job database (:class:`~embedfleet.schedulers.store.Store`).

    :param data_dir: the data directory jobs write their frames to.
    :param spec_builder: ``build_job_spec``-compatible callable.
    :param estimator: ``(SourceSpec, ChunkSpec) -> int`` chunk estimate at submit, from file sizes only.
    """

    def __init__(self, store: Store, reads: Reads, *, data_dir: str, spec_builder: SpecBuilder | None = None,
                 estimator: Estimator | None = None):
        self.store = store
        self.reads = reads
        self.data_dir = data_dir
        self._spec_builder = spec_builder or default_spec_builder
        self._estimator = estimator or default_estimator
        self._known_users: set[str] = set()

    def admit(
        self,
        source: str,
        *,
        user: str,
        priority: int | None,
        options: IndexOptions,
        new_user_tier: str | None,
        run_as: str | None,
    ) -> tuple[Job, float]:
        """Validate, build the spec, estimate, and insert the job (queued, or running for ``run_as``)."""
        user = check_user(user)
        # Before the spec builder, which may open the source: a bad name costs no file read.
        options = replace(options, collection=check_part("collection name", options.collection or config.get("collection")))
        priority = check_priority(priority)
        source = str(source)
        check_raw_source(source)
        if new_user_tier is None:
            new_user_tier = (
                config.get("jobs.local-tier") if user == config.get("user") else config.get("jobs.default-tier")
            )
        tier(new_user_tier)  # a misconfigured tier fails before anything is written
        queue_limit = int(config.get("jobs.queue-limit"))
        settings = PrioritySettings.from_config()

        for _ in range(3):  # a 48-bit id collision is rare; a retry makes it harmless
            job_id = new_job_id()
            spec = self._spec_builder(source, options, job_id=job_id, user=user, data_dir=self.data_dir)
            if spec.source.kind != "builtin":
                check_root(spec.source.location)
            estimated, exact_only = self.estimate(spec)
            try:
                return self.insert_job(
                    spec,
                    priority=priority,
                    estimated=estimated,
                    exact_only=exact_only,
                    new_user_tier=new_user_tier,
                    queue_limit=queue_limit,
                    settings=settings,
                    run_as=run_as,
                )
            except RetryAdmission:
                continue
            except IntegrityError:
                if user in self._known_users:  # the user's row is gone (a reset database): create it again
                    self._known_users.discard(user)
                    continue
                with self.store.read() as session:
                    if session.get(Job, job_id) is None:
                        raise
                log.warning("job id %s collided; drawing another", job_id)
        raise JobError("could not draw an unused job id")

    def estimate(self, spec: JobSpec) -> tuple[int, bool]:
        """The chunks ``spec`` will embed, estimated at submit; and whether only the exact count
        after chunking may refuse it on quota.

        The estimate from file sizes errs high (on plain text by 13% at 64-token chunks, 33% at
        the default 200), and into a
        collection that already holds chunks a ``sync`` or ``append`` embeds only the new and
        changed ones, which nothing short of chunking can count: a no-change re-run embeds
        none. So such a job holds (:data:`HELD`) the estimate less what the collection's
        manifest holds, and is refused, if at all, by the exact check after chunking, before
        anything is embedded. Any other job is refused at submit when its estimate does not fit.
        """
        estimated = max(0, int(self._estimator(spec.source, spec.chunk)))
        kept = kept_chunks(spec)
        return max(0, estimated - kept), kept > 0

    def insert_job(
        self,
        spec: JobSpec,
        *,
        priority: int,
        estimated: int,
        exact_only: bool,
        new_user_tier: str,
        queue_limit: int,
        settings: PrioritySettings,
        run_as: str | None,
    ) -> tuple[Job, float]:
        # Submit is the hot path (aim: >= 10,000/min): one transaction of five statements —
        # create the user if new, lock it, read everything admission needs in one query,
        # insert the job (Core, no unit of work).
        user = spec.user
        with self.store.write() as session:
            now = self.store.clock()
            if user not in self._known_users:  # users are never deleted: skip the insert once seen
                session.execute(
                    self.store.insert()(User)
                    .values(id=user, tier=new_user_tier, created_at=now)
                    .on_conflict_do_nothing(index_elements=["id"])
                )
            params = {"user": user, "day": self.store.today(now), "since": now - RECENT_WINDOW}
            if self.store.dialect == "postgresql":
                params["channel"] = NOTIFY_CHANNEL  # delivered at commit, dropped on a refusal
                locked = session.execute(_ADMISSION_LOCK_NOTIFY, params).first()
            else:
                locked = session.execute(_ADMISSION_LOCK, params).first()
            if locked is None:  # a cached user whose row is gone (a reset database)
                self._known_users.discard(user)
                raise RetryAdmission
            t = tier_of(locked.tier)
            if run_as is not None:
                self.refuse_busy_collection(session, user, spec.sink.uri, spec.collection)
            row = session.execute(_ADMISSION_COUNTS, params).one()
            if run_as is not None and at_concurrency_limit(t, row.running) and self.end_dead_runs(session, user, now):
                row = session.execute(_ADMISSION_COUNTS, params).one()
            if row.waiting >= queue_limit:
                raise QueueFull(
                    f"user {user!r} already has {row.waiting} jobs waiting (queue limit {queue_limit}); "
                    f"wait for some to start or cancel one"
                )
            if run_as is not None and at_concurrency_limit(t, row.running):
                # An inline run starts now or never: it cannot wait in the queue like a submit.
                raise JobError(
                    f"user {user!r} already has {row.running} jobs running, the most tier {t.name} runs at once "
                    f"({t.concurrent_jobs}); wait for one to finish (embedfleet jobs list --user {user} --status running)"
                )
            remaining = quota_left(t, row.used, row.held)
            if remaining is not None and estimated > remaining and not exact_only:
                raise QuotaExceeded(
                    f"job refused: it needs about {estimated} chunks but user {user!r} "
                    f"{left_phrase(t, remaining, row.used, row.held)}; the quota resets at 00:00 UTC",
                    remaining=remaining,
                    requested=estimated,
                )
            effective = live_priority(priority, t, recent_jobs=row.recent, waiting_since=now, now=now, settings=settings)
            values = dict(
                id=spec.job_id,
                owner=user,
                source=spec.source.display,
                sink=spec.sink.uri,
                collection=spec.collection,
                model=spec.embedder.model.name,
                chunk_unit=spec.chunk.unit,
                chunk_size=spec.chunk.size,
                chunk_overlap=spec.chunk.overlap,
                mode=spec.mode,
                spec=spec.to_json(),
                priority=priority,
                stage="queued",
                error=None,
                created_at=now,
                queued_at=now,
                started_at=None,
                finished_at=None,
                heartbeat_at=None,
                dispatcher=None,
                attempt=0,
                cancel_requested=False,
                dispatch_priority=None,
                batch=None,
                documents=0,
                chunks=0,
                embedded=0,
                skipped=0,
                deleted=0,
                skipped_documents=0,
                partitions_done=0,
                partitions_total=0,
                estimated_chunks=estimated,
                to_embed=None,
                reserved=0,
                charged=0,
            )
            if run_as is not None:
                values.update(
                    stage="reading",
                    attempt=1,
                    dispatcher=run_as,
                    started_at=now,
                    heartbeat_at=now,
                    dispatch_priority=effective,
                )
            values = transition("record", None, "queued" if run_as is None else "running", values)
            session.execute(_INSERT_JOB, values)
        self._known_users.add(user)
        return Job(**values), effective


    def admit_inline(self, source: str, *, user: str | None, priority: int | None, options: IndexOptions,
                     run_as: str) -> Claim:
        """Admit a job that ``run_as`` runs at once in its own process (``embedfleet index``).

        The same admission as a submit (validation, queue limit, quota estimate, allowed
        roots, the tier's concurrency); an unknown user (default ``embedfleet.user``) is
        created at ``embedfleet.jobs.local-tier``. The job is recorded running from the start,
        so no dispatcher can take it. :func:`embedfleet.schedulers.dispatcher.run_inline` runs it.
        """
        job, effective = self.admit(
            source,
            user=user or config.get("user"),
            priority=priority,
            options=options,
            new_user_tier=config.get("jobs.local-tier"),
            run_as=run_as,
        )
        return Claim(id=job.id, owner=job.owner, attempt=job.attempt, spec=job.spec, priority=effective)

    def check_resume(self, session: Session, job: Job, now: dt.datetime) -> None:
        """Whether ``job`` may be queued again (its owner's row locked): the queue limit, and its
        estimate less what it was charged fitting in what is left today."""
        user = job.owner
        row = self.store.lock_user(session, user)
        t = tier_of(row.tier if row else None)
        queue_limit = int(config.get("jobs.queue-limit"))
        waiting = session.execute(
            select(func.count()).where(Job.owner == user, Job.status.in_(WAITING_STATUSES), Job.id != job.id)
        ).scalar_one()
        if waiting >= queue_limit:
            raise QueueFull(f"user {user!r} already has {waiting} jobs waiting (queue limit {queue_limit})")
        # What the job holds once queued again (HELD): its estimate less what it was charged.
        needed = max(0, job.estimated_chunks - job.charged)
        used, held = self.store.used_today(session, user, self.store.today(now)), self.reads.held(session, user, exclude=job.id)
        remaining = quota_left(t, used, held)
        if remaining is not None and needed > remaining and not exact_only_recorded(job):
            raise QuotaExceeded(
                f"job {job.id} needs about {needed} more chunks but user {user!r} "
                f"{left_phrase(t, remaining, used, held, holders='its other jobs')}",
                remaining=remaining,
                requested=needed,
            )

    def refuse_busy_collection(self, session: Session, owner: str, sink: str, collection: str) -> None:
        """Refuse an inline run on a collection a live job runs on; end a dead one that does."""
        self.store.lock_user(session, owner)
        while (busy := collection_busy(session, owner, sink, collection)) is not None:
            job = session.execute(select(Job).where(Job.id == busy).with_for_update()).scalar_one()
            now = self.store.clock()
            dead = dead_run(job, now)
            if dead is None:
                raise JobError(
                    f"job {busy} is already running on collection {collection!r}; wait for it to finish "
                    f"(embedfleet jobs status {busy}) or cancel it"
                )
            # A SIGKILLed `embedfleet index` leaves its job "running" with nobody to record its
            # end; running the command again must not be refused for it (until a lease expiry
            # that, without a dispatcher, nobody would even notice). The new run replaces it, so
            # it ends failed, not interrupted: a dispatcher must not resume it afterwards and
            # commit its older view of the source over the new run's manifest.
            if job.cancel_requested:
                target, error = "cancelled", f"cancelled; {dead}"
            else:
                target, error = "failed", f"{dead} before the job finished; a new run on the collection replaced it"
            values = transition("abandon", job.status, target,
                                dict(error=error, finished_at=now, dispatcher=None, reserved=0, heartbeat_at=None))
            for key, value in values.items():
                setattr(job, key, value)
            session.flush()
            log.warning("job %s was recorded running on collection %r but %s; marked %s", busy, collection, dead, job.status)

    def end_dead_runs(self, session: Session, user: str, now: dt.datetime) -> int:
        """End ``user``'s runs recorded running whose process is gone (:func:`~embedfleet.schedulers.store.dead_run`); how many.

        For an inline admission at the concurrency limit: a SIGKILLed ``embedfleet index`` on
        another collection must not count against the user until a dispatcher, which may never
        run, notices its lease expired. It is ended as that expiry would end it. The caller
        holds the user's row lock.
        """
        ended = 0
        running = session.execute(
            select(Job).where(Job.owner == user, Job.status == "running").with_for_update()
        ).scalars()
        for job in running:
            dead = dead_run(job, now)
            if dead is None:
                continue
            for key, value in dead_run_values(job.cancel_requested, dead, now).items():
                setattr(job, key, value)
            ended += 1
            log.warning("job %s was recorded running but %s; marked %s", job.id, dead, job.status)
        session.flush()
        return ended
