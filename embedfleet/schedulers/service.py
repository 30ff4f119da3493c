"""The job service: users, tiers, quotas, submission and the job records (DESIGN §5).

:class:`JobService` is the one object the CLI, notebooks and ``embedfleet index`` talk to::

    from embedfleet.schedulers import JobService

    service = JobService()                          # sqlite:///<data-dir>/jobs.db, or embedfleet.jobs.database-url
    service.add_user("alice", tier="premium")       # admin: the submitter never chooses a tier
    job = service.submit("./docs", user="alice", collection="kb", priority=70)
    service.status(job.id, user="alice").status     # 'queued'
    run_once(service, client=client)                # dispatcher.run_once: until nothing is queued or running
    service.quota("alice").remaining

Rules kept here (the dispatcher in :mod:`embedfleet.schedulers.dispatcher` keeps the rest):

* Admission at submit, in one transaction: user id and collection validated; an unknown user is
  created at ``embedfleet.jobs.default-tier`` (the user ``embedfleet index`` runs as, config
  ``embedfleet.user``, at ``embedfleet.jobs.local-tier``); at most ``queue-limit`` waiting jobs
  per user (:class:`QueueFull`); the estimated chunks to embed must fit in what is left of
  today's quota (:class:`QuotaExceeded`, naming the remaining amount); file sources must lie
  under ``allowed-roots`` when that is set (:class:`PermissionDenied`). An inline run
  (:func:`embedfleet.schedulers.dispatcher.run_inline`, ``embedfleet index``) is admitted running, so it is also
  refused when the user already runs as many jobs as the tier allows at once, counted over
  inline and dispatched jobs alike (:func:`running_jobs`, what a dispatcher's claim counts).
* The estimate at submit is from file sizes, and errs high. A ``sync`` or ``append`` into a
  collection that already holds chunks embeds only new and changed ones (a re-run of an
  unchanged source: none), which only chunking can count: it is never refused on its estimate,
  holds its estimate less what the collection's manifest holds, and is refused, if at all, by
  the exact count after chunking, before anything is embedded (:meth:`JobService._estimate`).
* "Left today" (:func:`quota_left`) is the tier's daily chunks minus the chunks charged today
  (UTC) minus what the user's active jobs hold (:data:`HELD`): a waiting job holds its
  estimate, a running one its exact count once checked, each less what it was charged.
* Every embedded chunk is charged exactly once: a job's charge is what it embedded over all its
  runs (its embedding partitions on disk) less what it was already charged, recorded with the
  job's counts in one transaction (:meth:`JobService.heartbeat`, :meth:`JobService.finish`).
* A user only ever sees their own jobs: another user's job id is :class:`JobNotFound` for
  ``status``, exactly like a missing one, and never listed. ``cancel``/``resume`` of it is
  :class:`PermissionDenied`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from sqlalchemy import Engine, and_, bindparam, func, select, text, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from embedfleet import config
from embedfleet.errors import (
    ConfigError,
    EmbedfleetError,
    JobCancelled,
    JobError,
    JobNotFound,
    PermissionDenied,
    QueueFull,
    QuotaExceeded,
)
from embedfleet.options import IndexOptions
from embedfleet.schedulers.admission import (
    admission_counts,
    admission_lock,
    at_concurrency_limit,
    held_chunks,
    max0,
    quota_left,
    running_jobs,
)
from embedfleet.schedulers.lifecycle import moved, moved_from_any
from embedfleet.schedulers.models import (
    ACTIVE_STATUSES,
    STATUSES,
    WAITING_STATUSES,
    Job,
    Usage,
    User,
    ensure_schema,
    make_engine,
    read_engine,
    utcnow,
)
from embedfleet.schedulers.priority import RECENT_WINDOW, PrioritySettings, Tier, effective_priority, tier, tiers
from embedfleet.sinks.naming import check_part

if TYPE_CHECKING:
    from embedfleet.config import ChunkSpec
    from embedfleet.datasets.source import SourceSpec
    from embedfleet.pipeline.job import JobResult, JobSpec, Progress

__all__ = ["JobService", "JobInfo", "UserInfo", "QuotaInfo", "Candidate", "Claim", "NOTIFY_CHANNEL"]

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "embedfleet_jobs"
_ID_HEX = 12

Clock = Callable[[], dt.datetime]
#: ``(source, options, *, job_id, user, data_dir) -> JobSpec``, like :func:`build_job_spec`.
SpecBuilder = Callable[..., "JobSpec"]
Estimator = Callable[["SourceSpec", "ChunkSpec"], int]


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class JobInfo:
    """One job as its owner sees it. ``to_dict()`` is what ``jobs status --json`` prints."""

    id: str
    user: str
    status: str
    stage: str
    priority: int
    effective_priority: float | None  # live for waiting jobs; as dispatched for the others
    source: str
    sink: str
    collection: str
    model: str
    mode: str
    chunk_unit: str
    chunk_size: int
    chunk_overlap: int
    documents: int
    chunks: int
    embedded: int
    skipped: int
    deleted: int
    skipped_documents: int
    partitions_done: int
    partitions_total: int
    estimated_chunks: int  # chunks to embed, estimated at submit (see JobService.submit)
    to_embed: int | None
    charged: int
    cancel_requested: bool
    attempt: int
    dispatcher: str | None
    created_at: dt.datetime
    queued_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = _iso(value) if isinstance(value, dt.datetime) else value
        if out["effective_priority"] is not None:
            out["effective_priority"] = round(out["effective_priority"], 3)
        return out

    @classmethod
    def from_row(cls, job: Job, effective: float | None) -> "JobInfo":
        return cls(
            id=job.id,
            user=job.owner,
            status=job.status,
            stage=job.stage,
            priority=job.priority,
            effective_priority=effective,
            source=job.source,
            sink=job.sink,
            collection=job.collection,
            model=job.model,
            mode=job.mode,
            chunk_unit=job.chunk_unit,
            chunk_size=job.chunk_size,
            chunk_overlap=job.chunk_overlap,
            documents=job.documents,
            chunks=job.chunks,
            embedded=job.embedded,
            skipped=job.skipped,
            deleted=job.deleted,
            skipped_documents=job.skipped_documents,
            partitions_done=job.partitions_done,
            partitions_total=job.partitions_total,
            estimated_chunks=job.estimated_chunks,
            to_embed=job.to_embed,
            charged=job.charged,
            cancel_requested=bool(job.cancel_requested),
            attempt=job.attempt,
            dispatcher=job.dispatcher,
            created_at=job.created_at,
            queued_at=job.queued_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            heartbeat_at=job.heartbeat_at,
            error=job.error,
        )


@dataclass(frozen=True)
class UserInfo:
    id: str
    tier: str
    created_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "tier": self.tier, "created_at": _iso(self.created_at)}


@dataclass(frozen=True)
class QuotaInfo:
    user: str
    tier: str
    day: dt.date  # the UTC day the numbers are for
    daily_limit: int | None  # None: unlimited
    used_today: int  # chunks charged today
    reserved: int  # chunks the user's active jobs hold and were not charged for yet (HELD)
    remaining: int | None  # None: unlimited
    concurrent_limit: int
    running: int
    queued: int  # waiting: queued or interrupted
    queue_limit: int
    known_user: bool  # False: the user does not exist yet; these are the defaults they would get

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["day"] = self.day.isoformat()
        return out


@dataclass(frozen=True)
class Candidate:
    """A waiting job as the dispatcher ranks it."""

    id: str
    owner: str
    tier: str
    base: int
    effective: float
    queued_at: dt.datetime
    created_at: dt.datetime


@dataclass(frozen=True)
class Claim:
    """A job a dispatcher has just claimed: what it needs to run it."""

    id: str
    owner: str
    attempt: int
    spec: str  # JobSpec JSON
    priority: float  # effective priority at the claim


@dataclass(frozen=True)
class Counts:
    """Counts to store from a Progress or a JobResult."""

    stage: str | None = None
    documents: int | None = None
    chunks: int | None = None
    embedded: int | None = None
    skipped: int | None = None
    deleted: int | None = None
    skipped_documents: int | None = None
    partitions_done: int | None = None
    partitions_total: int | None = None

    @classmethod
    def from_progress(cls, p: "Progress") -> "Counts":
        return cls(
            stage=p.stage,
            documents=p.documents,
            chunks=p.chunks,
            embedded=p.embedded,
            skipped=p.skipped,
            deleted=p.deleted,
            skipped_documents=p.skipped_documents,
            partitions_done=p.partitions_done,
            partitions_total=p.partitions_total,
        )

    def values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _rank_query():
    """Every waiting job with its owner's tier, running jobs and jobs started since ``since``."""
    running = (
        select(Job.owner.label("owner"), func.count().label("n"))
        .where(Job.status == "running")
        .group_by(Job.owner)
        .subquery("running_by_owner")
    )
    recent = (
        select(Job.owner.label("owner"), func.count().label("n"))
        .where(Job.started_at >= bindparam("since"))
        .group_by(Job.owner)
        .subquery("recent_by_owner")
    )
    return (
        select(
            Job.id,
            Job.owner,
            Job.priority,
            Job.queued_at,
            Job.created_at,
            User.tier,
            running.c.n.label("running"),
            recent.c.n.label("recent"),
        )
        .select_from(Job)
        .outerjoin(User, User.id == Job.owner)
        .outerjoin(running, running.c.owner == Job.owner)
        .outerjoin(recent, recent.c.owner == Job.owner)
        .where(Job.status.in_(WAITING_STATUSES))
    )


_RANK = _rank_query()
_ADMISSION_LOCK = admission_lock(notify=False)
_ADMISSION_LOCK_NOTIFY = admission_lock(notify=True)
_ADMISSION_COUNTS = admission_counts()
_INSERT_JOB = Job.__table__.insert()


def new_job_id() -> str:
    return uuid.uuid4().hex[:_ID_HEX]


def _default_spec_builder(source: str, options: IndexOptions, **kwargs: Any) -> "JobSpec":
    from embedfleet.pipeline.spec import build_job_spec

    return build_job_spec(source, options, **kwargs)


def _default_estimator(source: "SourceSpec", chunk: "ChunkSpec") -> int:
    from embedfleet.datasets import estimate_chunks

    return int(estimate_chunks(source, chunk))


class JobService:
    """Users, quotas and job records over one job database.

    :param database_url: SQLAlchemy URL; default ``embedfleet.jobs.database-url``, else
        ``sqlite:///<data-dir>/jobs.db``.
    :param data_dir: the data directory jobs write their frames to (default ``embedfleet.data-dir``).
    :param clock: returns the current aware UTC datetime; injected by tests.
    :param spec_builder: ``build_job_spec``-compatible callable (default
        :func:`embedfleet.pipeline.spec.build_job_spec`).
    :param estimator: ``(SourceSpec, ChunkSpec) -> int`` chunk estimate at submit, from file
        sizes only (default :func:`embedfleet.datasets.estimate_chunks`).
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        data_dir: str | os.PathLike | None = None,
        clock: Clock | None = None,
        spec_builder: SpecBuilder | None = None,
        estimator: Estimator | None = None,
        engine: Engine | None = None,
    ):
        self.data_dir = str(config.data_dir(data_dir))
        url = database_url or config.get("jobs.database-url", None) or f"sqlite:///{Path(self.data_dir) / 'jobs.db'}"
        self.engine = engine if engine is not None else make_engine(url)
        self.url = self.engine.url.render_as_string(hide_password=True)
        self._read_engine = read_engine(self.engine)
        self._single_read_engine = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.engine.dialect.name == "postgresql"
            else self._read_engine
        )
        self.clock: Clock = clock or utcnow
        self._spec_builder = spec_builder or _default_spec_builder
        self._estimator = estimator or _default_estimator
        self.schema_version = ensure_schema(self.engine)
        self._known_users: set[str] = set()

    # ----------------------------------------------------------------------------------------
    # plumbing

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "JobService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JobService({self.url!r})"

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def _read(self, *, single: bool = False) -> Iterator[Session]:
        """A read-only transaction; ``single``: for one statement, which on PostgreSQL then
        runs in autocommit (no BEGIN/COMMIT round trips: a statement is its own snapshot)."""
        engine = self._single_read_engine if single else self._read_engine
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _insert(self):
        return pg_dialect.insert if self.dialect == "postgresql" else sqlite_dialect.insert

    def _notify(self, session: Session) -> None:
        """Wake listening dispatchers at commit (PostgreSQL; SQLite dispatchers watch data_version)."""
        if self.dialect == "postgresql":
            session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    def _tier_of(self, name: str) -> Tier:
        known = tiers()
        if name in known:
            return known[name]
        fallback = config.get("jobs.default-tier")
        log.warning("tier %r is not configured any more; using the default tier %r", name, fallback)
        return tier(fallback)

    @staticmethod
    def _today(now: dt.datetime) -> dt.date:
        return now.astimezone(dt.timezone.utc).date()

    def _lock_user(self, session: Session, user: str) -> User | None:
        return session.execute(select(User).where(User.id == user).with_for_update()).scalar_one_or_none()

    def _ensure_user(self, session: Session, user: str, tier_name: str, now: dt.datetime) -> User:
        """The user row, created at ``tier_name`` if unknown, locked for this transaction."""
        stmt = self._insert()(User).values(id=user, tier=tier_name, created_at=now).on_conflict_do_nothing(
            index_elements=["id"]
        )
        session.execute(stmt)
        row = self._lock_user(session, user)
        assert row is not None
        return row

    def _used_today(self, session: Session, user: str, day: dt.date) -> int:
        used = session.execute(select(Usage.chunks).where(Usage.user == user, Usage.day == day)).scalar_one_or_none()
        return int(used or 0)

    def _held(self, session: Session, user: str, *, exclude: str | None = None) -> int:
        return int(session.execute(held_chunks(user, exclude=exclude)).scalar_one())

    def _recent_jobs(self, session: Session, users: Iterable[str], now: dt.datetime) -> dict[str, int]:
        users = list(set(users))
        if not users:
            return {}
        rows = session.execute(
            select(Job.owner, func.count())
            .where(Job.owner.in_(users), Job.started_at >= now - RECENT_WINDOW)
            .group_by(Job.owner)
        ).all()
        return {owner: int(n) for owner, n in rows}

    def _effective(self, session: Session, jobs: list[Job], now: dt.datetime) -> list[float | None]:
        waiting = [j for j in jobs if j.status in WAITING_STATUSES]
        if not waiting:
            return [j.dispatch_priority for j in jobs]
        settings = PrioritySettings.from_config()
        owners = {j.owner for j in waiting}
        tier_names = dict(session.execute(select(User.id, User.tier).where(User.id.in_(owners))).all())
        recent = self._recent_jobs(session, owners, now)
        out: list[float | None] = []
        for j in jobs:
            if j.status not in WAITING_STATUSES:
                out.append(j.dispatch_priority)
                continue
            t = self._tier_of(tier_names.get(j.owner, config.get("jobs.default-tier")))
            out.append(
                effective_priority(
                    j.priority,
                    multiplier=t.multiplier,
                    recent_jobs=recent.get(j.owner, 0),
                    waiting=now - j.queued_at,
                    settings=settings,
                )
            )
        return out

    def _infos(self, session: Session, jobs: list[Job], now: dt.datetime) -> list[JobInfo]:
        return [JobInfo.from_row(j, e) for j, e in zip(jobs, self._effective(session, jobs, now))]

    @staticmethod
    def _check_user(user: str) -> str:
        return check_part("user id", user)

    @staticmethod
    def _check_priority(priority: int | None) -> int:
        if priority is None:
            return int(PrioritySettings.from_config().default)
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 100:
            raise ConfigError(f"priority must be an integer from 0 to 100, not {priority!r}")
        return priority

    # ----------------------------------------------------------------------------------------
    # allowed roots

    @staticmethod
    def _allowed_roots() -> list[Path]:
        return [Path(r).expanduser().resolve() for r in (config.get("jobs.allowed-roots", None) or [])]

    def _check_root(self, location: str) -> None:
        roots = self._allowed_roots()
        if not roots:
            return
        path = Path(location).expanduser().resolve()
        if not any(path == root or path.is_relative_to(root) for root in roots):
            raise PermissionDenied(
                f"source {str(path)!r} is outside the allowed roots ({', '.join(str(r) for r in roots)})"
            )

    def _check_raw_source(self, source: str) -> None:
        # Before building the spec, which may open the file (Parquet footers, CSV headers): its
        # error messages must not tell a user about a file outside the roots. A name that is no
        # path (a built-in dataset) is checked on the built spec instead.
        if not self._allowed_roots() or source.startswith("builtin:") or "://" in source:
            return
        if Path(source).expanduser().exists():
            self._check_root(source)

    # ----------------------------------------------------------------------------------------
    # submission

    def submit(
        self,
        source: str,
        *,
        user: str,
        priority: int | None = None,
        options: IndexOptions | None = None,
        **fields: Any,
    ) -> JobInfo:
        """Queue a job for ``user``; returns it. One transaction; no source file is read.

        The job's options are ``options`` with ``fields`` (``collection="kb", chunk_size=128``,
        any :class:`IndexOptions` field) replacing its values.

        ``estimated_chunks`` estimates the chunks the job will embed: the source's chunks by file
        size, less, for modes ``sync`` and ``append``, the chunks the collection's manifest
        already holds (unchanged chunks are free). A job into a new collection, or of mode
        ``full``, is refused here when that does not fit in what is left today; a ``sync`` or
        ``append`` into a collection that holds chunks is refused, if at all, only by the
        exact count after chunking, before anything is embedded (:meth:`_estimate`).

        Raises ConfigError (bad user id, collection, priority, mode or options), QueueFull,
        QuotaExceeded (with ``remaining``) or PermissionDenied (source outside allowed roots).
        """
        job, effective = self._admit(
            source,
            user=user,
            priority=priority,
            options=IndexOptions.merge(options, **fields),
            new_user_tier=None,
            run_as=None,
        )
        log.info("queued job %s for %s (estimated %d chunks)", job.id, job.owner, job.estimated_chunks)
        return JobInfo.from_row(job, effective)

    def _admit(
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
        user = self._check_user(user)
        # Before the spec builder, which may open the source: a bad name costs no file read.
        options = replace(options, collection=check_part("collection name", options.collection or config.get("collection")))
        priority = self._check_priority(priority)
        source = str(source)
        self._check_raw_source(source)
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
                self._check_root(spec.source.location)
            estimated, exact_only = self._estimate(spec)
            try:
                return self._insert_job(
                    spec,
                    priority=priority,
                    estimated=estimated,
                    exact_only=exact_only,
                    new_user_tier=new_user_tier,
                    queue_limit=queue_limit,
                    settings=settings,
                    run_as=run_as,
                )
            except _RetryAdmission:
                continue
            except IntegrityError:
                if user in self._known_users:  # the user's row is gone (a reset database): create it again
                    self._known_users.discard(user)
                    continue
                with self._read() as session:
                    if session.get(Job, job_id) is None:
                        raise
                log.warning("job id %s collided; drawing another", job_id)
        raise JobError("could not draw an unused job id")

    def _estimate(self, spec: "JobSpec") -> tuple[int, bool]:
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
        kept = _kept_chunks(spec)
        return max(0, estimated - kept), kept > 0

    def _insert_job(
        self,
        spec: "JobSpec",
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
        with self._write() as session:
            now = self.clock()
            if user not in self._known_users:  # users are never deleted: skip the insert once seen
                session.execute(
                    self._insert()(User)
                    .values(id=user, tier=new_user_tier, created_at=now)
                    .on_conflict_do_nothing(index_elements=["id"])
                )
            params = {"user": user, "day": self._today(now), "since": now - RECENT_WINDOW}
            if self.dialect == "postgresql":
                params["channel"] = NOTIFY_CHANNEL  # delivered at commit, dropped on a refusal
                locked = session.execute(_ADMISSION_LOCK_NOTIFY, params).first()
            else:
                locked = session.execute(_ADMISSION_LOCK, params).first()
            if locked is None:  # a cached user whose row is gone (a reset database)
                self._known_users.discard(user)
                raise _RetryAdmission
            t = self._tier_of(locked.tier)
            if run_as is not None:
                self._refuse_busy_collection(session, user, spec.sink.uri, spec.collection)
            row = session.execute(_ADMISSION_COUNTS, params).one()
            if run_as is not None and at_concurrency_limit(t, row.running) and self._end_dead_runs(session, user, now):
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
                    f"{_left_phrase(t, remaining, row.used, row.held)}; the quota resets at 00:00 UTC",
                    remaining=remaining,
                    requested=estimated,
                )
            effective = effective_priority(
                priority, multiplier=t.multiplier, recent_jobs=int(row.recent or 0), waiting=0, settings=settings
            )
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
                status=moved(None, "queued"),
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
                    status=moved(None, "running"),
                    stage="reading",
                    attempt=1,
                    dispatcher=run_as,
                    started_at=now,
                    heartbeat_at=now,
                    dispatch_priority=effective,
                )
            session.execute(_INSERT_JOB, values)
        self._known_users.add(user)
        return Job(**values), effective

    # ----------------------------------------------------------------------------------------
    # the owner's view

    def _own_job(self, session: Session, job_id: str, user: str, *, lock: bool = False) -> Job:
        stmt = select(Job).where(Job.id == job_id)
        if lock:
            stmt = stmt.with_for_update()
        job = session.execute(stmt).scalar_one_or_none()
        if job is None or job.owner != user:
            raise JobNotFound(f"no job {job_id!r} for user {user!r}")
        return job

    def status(self, job_id: str, *, user: str) -> JobInfo:
        """The job, if ``user`` owns it; JobNotFound otherwise (a missing id and another user's job look the same)."""
        user = self._check_user(user)
        with self._read() as session:
            now = self.clock()
            return self._infos(session, [self._own_job(session, str(job_id), user)], now)[0]

    def list(self, *, user: str, status: str | Iterable[str] | None = None, limit: int | None = 100) -> list[JobInfo]:
        """``user``'s jobs, newest first, optionally only those in ``status`` (one or several)."""
        user = self._check_user(user)
        stmt = select(Job).where(Job.owner == user)
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            unknown = sorted(set(wanted) - set(STATUSES))
            if unknown:
                raise ConfigError(f"unknown job status {', '.join(map(repr, unknown))}; statuses: {', '.join(STATUSES)}")
            stmt = stmt.where(Job.status.in_(wanted))
        stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc())
        if limit is not None:
            stmt = stmt.limit(int(limit))
        with self._read() as session:
            now = self.clock()
            return self._infos(session, list(session.execute(stmt).scalars()), now)

    @staticmethod
    def _job_to_change(session: Session, job_id: str, user: str, *, action: str) -> Job:
        """The job, locked for update; PermissionDenied if ``user`` does not own it."""
        job = session.execute(select(Job).where(Job.id == str(job_id)).with_for_update()).scalar_one_or_none()
        if job is None:
            raise JobNotFound(f"no job {job_id!r} for user {user!r}")
        if job.owner != user:
            raise PermissionDenied(f"user {user!r} may not {action} job {job_id!r}")
        return job

    def cancel(self, job_id: str, *, user: str) -> JobInfo:
        """Cancel ``user``'s job: a waiting job at once, a running one through its dispatcher.

        A running job keeps status ``running`` with ``cancel_requested`` until its dispatcher has
        stopped its Dask tasks; then it is ``cancelled``. Cancelling a cancelled job is a no-op;
        a finished one is a JobError. Another user's job: PermissionDenied.
        """
        user = self._check_user(user)
        with self._write() as session:
            now = self.clock()
            job = self._job_to_change(session, job_id, user, action="cancel")
            if job.status in WAITING_STATUSES:
                job.status = moved(job.status, "cancelled")
                job.finished_at = now
                job.error = None
                job.dispatcher = None
            elif job.status == "running":
                job.cancel_requested = True
            elif job.status != "cancelled":
                raise JobError(f"job {job_id!r} already {job.status}; nothing to cancel")
            session.flush()
            return self._infos(session, [job], now)[0]

    def resume(self, job_id: str, *, user: str) -> JobInfo:
        """Queue ``user``'s interrupted, failed or cancelled job again under the same id.

        The pipeline skips the partitions the earlier run finished, so this continues the job.
        The queue limit applies, and its estimate (less the chunks already charged) must fit
        in what is left of today's quota. A job still recorded ``running`` whose run is dead
        (:meth:`_dead_run`: e.g. a SIGKILLed ``embedfleet index``) is resumed like an
        interrupted one.
        """
        user = self._check_user(user)
        with self._write() as session:
            now = self.clock()
            job = self._job_to_change(session, job_id, user, action="resume")
            if job.status == "running":
                dead = self._dead_run(job, now)
                if dead is None:
                    raise JobError(
                        f"job {job_id!r} is running (dispatcher {job.dispatcher}); if its process died, it can be "
                        f"resumed once its lease expires ({config.seconds_value('jobs.lease-seconds'):g}s after "
                        f"its last heartbeat)"
                    )
                log.warning("job %s was recorded running but %s; resuming it", job.id, dead)
            elif job.status not in ("interrupted", "failed", "cancelled"):
                raise JobError(f"job {job_id!r} is {job.status}; only interrupted, failed or cancelled jobs can be resumed")
            row = self._lock_user(session, user)
            t = self._tier_of(row.tier if row else config.get("jobs.default-tier"))
            queue_limit = int(config.get("jobs.queue-limit"))
            waiting = session.execute(
                select(func.count()).where(Job.owner == user, Job.status.in_(WAITING_STATUSES), Job.id != job.id)
            ).scalar_one()
            if waiting >= queue_limit:
                raise QueueFull(f"user {user!r} already has {waiting} jobs waiting (queue limit {queue_limit})")
            # What the job holds once queued again (HELD): its estimate less what it was charged.
            needed = max(0, job.estimated_chunks - job.charged)
            used, held = self._used_today(session, user, self._today(now)), self._held(session, user, exclude=job.id)
            remaining = quota_left(t, used, held)
            if remaining is not None and needed > remaining and not self._exact_only(job):
                raise QuotaExceeded(
                    f"job {job.id} needs about {needed} more chunks but user {user!r} "
                    f"{_left_phrase(t, remaining, used, held, holders='its other jobs')}",
                    remaining=remaining,
                    requested=needed,
                )
            job.status = moved(job.status, "queued")
            job.stage = "queued"
            job.queued_at = now
            job.finished_at = None
            job.heartbeat_at = None
            job.error = None
            job.dispatcher = None
            job.cancel_requested = False
            job.reserved = 0
            session.flush()
            self._notify(session)
            return self._infos(session, [job], now)[0]

    def _end_dead_runs(self, session: Session, user: str, now: dt.datetime) -> int:
        """End ``user``'s runs recorded running whose process is gone (:meth:`_dead_run`); how many.

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
            dead = self._dead_run(job, now)
            if dead is None:
                continue
            for key, value in _dead_run_values(job.cancel_requested, dead, now).items():
                setattr(job, key, value)
            ended += 1
            log.warning("job %s was recorded running but %s; marked %s", job.id, dead, job.status)
        session.flush()
        return ended

    @staticmethod
    def _exact_only(job: Job) -> bool:
        """:meth:`_estimate`'s rule for a job already recorded: whether only its exact count may refuse it."""
        from embedfleet.pipeline.job import JobSpec

        try:
            spec = JobSpec.from_json(job.spec)
        except Exception:  # noqa: BLE001 - an unreadable spec fails when the job runs, saying so
            return False
        return _kept_chunks(spec) > 0

    def _dead_run(self, job: Job, now: dt.datetime) -> str | None:
        """Why ``job``, recorded running, cannot be running any more; None if it may be.

        Either its lease expired (what :meth:`expire_leases` acts on, without waiting for a
        dispatcher to notice), or it ran on this host in a process that no longer exists: a
        SIGKILLed or OOM-killed ``embedfleet index`` leaves nobody to record its end, and
        making its user wait out the lease before resuming would protect nothing. The run's
        late writes, if any, are fenced off by the attempt number either way.
        """
        lease = config.seconds_value("jobs.lease-seconds")
        if job.heartbeat_at is not None and job.heartbeat_at < now - dt.timedelta(seconds=lease):
            return f"its lease expired (last heartbeat {_iso(job.heartbeat_at)})"
        # dispatcher_name(): "<kind>:<host>:<pid>:<random>"
        parts = (job.dispatcher or "").rsplit(":", 2)
        if len(parts) == 3 and parts[1].isdigit() and ":" in parts[0]:
            import socket

            host, pid = parts[0].split(":", 1)[1], int(parts[1])
            if host == socket.gethostname() and not _process_exists(pid):
                return f"its process {pid} on this host is gone"
        return None

    # ----------------------------------------------------------------------------------------
    # users and quota (admin commands)

    def add_user(self, user: str, *, tier: str | None = None) -> UserInfo:
        """Create ``user`` at ``tier`` (default ``embedfleet.jobs.default-tier``)."""
        user = self._check_user(user)
        tier_name = tier or config.get("jobs.default-tier")
        _tier_check(tier_name)
        with self._write() as session:
            existing = self._lock_user(session, user)
            if existing is not None:
                raise ConfigError(
                    f"user {user!r} already exists (tier {existing.tier}); change it with `embedfleet users set-tier`"
                )
            row = User(id=user, tier=tier_name, created_at=self.clock())
            session.add(row)
        return UserInfo(row.id, row.tier, row.created_at)

    def set_tier(self, user: str, tier: str) -> UserInfo:
        """Move an existing user to another tier (effective for the next admission and pick)."""
        user = self._check_user(user)
        _tier_check(tier)
        with self._write() as session:
            row = self._lock_user(session, user)
            if row is None:
                raise ConfigError(f"unknown user {user!r}; add it with `embedfleet users add {user} --tier {tier}`")
            row.tier = tier
            self._notify(session)  # a higher concurrency limit may let a waiting job start
        return UserInfo(row.id, row.tier, row.created_at)

    def get_user(self, user: str) -> UserInfo | None:
        user = self._check_user(user)
        with self._read() as session:
            row = session.get(User, user)
            return UserInfo(row.id, row.tier, row.created_at) if row else None

    def list_users(self) -> list[UserInfo]:
        with self._read() as session:
            return [UserInfo(r.id, r.tier, r.created_at) for r in session.execute(select(User).order_by(User.id)).scalars()]

    def quota(self, user: str) -> QuotaInfo:
        """Today's (UTC) quota of ``user``: limit, used, reserved, remaining, concurrency."""
        user = self._check_user(user)
        with self._read() as session:
            now = self.clock()
            row = session.get(User, user)
            t = self._tier_of(row.tier) if row else tier(config.get("jobs.default-tier"))
            counts = dict(
                session.execute(
                    select(Job.status, func.count()).where(Job.owner == user, Job.status.in_(ACTIVE_STATUSES)).group_by(Job.status)
                ).all()
            )
            used = self._used_today(session, user, self._today(now))
            held = self._held(session, user)
            return QuotaInfo(
                user=user,
                tier=t.name,
                day=self._today(now),
                daily_limit=t.daily_chunks,
                used_today=used,
                reserved=held,
                remaining=quota_left(t, used, held),
                concurrent_limit=t.concurrent_jobs,
                running=int(counts.get("running", 0)),
                queued=int(counts.get("queued", 0)) + int(counts.get("interrupted", 0)),
                queue_limit=int(config.get("jobs.queue-limit")),
                known_user=row is not None,
            )

    # ----------------------------------------------------------------------------------------
    # running jobs

    def admit_inline(self, source: str, *, user: str | None, priority: int | None, options: IndexOptions,
                     run_as: str) -> Claim:
        """Admit a job that ``run_as`` runs at once in its own process (``embedfleet index``).

        The same admission as :meth:`submit` (validation, queue limit, quota estimate, allowed
        roots, the tier's concurrency); an unknown user (default ``embedfleet.user``) is
        created at ``embedfleet.jobs.local-tier``. The job is recorded running from the start,
        so no dispatcher can take it. :func:`embedfleet.schedulers.dispatcher.run_inline` runs it.
        """
        job, effective = self._admit(
            source,
            user=user or config.get("user"),
            priority=priority,
            options=options,
            new_user_tier=config.get("jobs.local-tier"),
            run_as=run_as,
        )
        return Claim(id=job.id, owner=job.owner, attempt=job.attempt, spec=job.spec, priority=effective)

    # -- used by the dispatcher (and JobExecution); not part of the notebook API --------------

    def has_active(self) -> bool:
        """Whether any job is queued, interrupted or running (on any dispatcher)."""
        with self._read(single=True) as session:
            return session.execute(select(Job.id).where(Job.status.in_(ACTIVE_STATUSES)).limit(1)).first() is not None

    def expire_leases(self, lease_seconds: float | None = None) -> list[str]:
        """Mark running jobs whose lease expired ``interrupted`` (to be resumed); return their ids.

        A job whose owner had asked to cancel it is marked ``cancelled`` instead. Leases are
        compared with this process's clock: keep dispatcher hosts' clocks in sync (NTP) to well
        under the lease.
        """
        lease = float(lease_seconds if lease_seconds is not None else config.seconds_value("jobs.lease-seconds"))
        now = self.clock()
        cutoff = now - dt.timedelta(seconds=lease)
        with self._read() as session:
            stale = session.execute(
                select(Job.id, Job.attempt, Job.dispatcher, Job.heartbeat_at, Job.cancel_requested).where(
                    Job.status == "running", Job.heartbeat_at < cutoff
                )
            ).all()
        expired = []
        for job_id, attempt, dispatcher, heartbeat, cancel_requested in stale:
            why = f"dispatcher {dispatcher} stopped renewing its lease (last heartbeat {_iso(heartbeat)})"
            values = _dead_run_values(cancel_requested, why, now)
            with self._write() as session:
                result = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.attempt == attempt, Job.status == "running", Job.heartbeat_at < cutoff)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:
                    self._notify(session)
                    expired.append(job_id)
                    log.warning("job %s: lease of dispatcher %s expired; marked %s", job_id, dispatcher, values["status"])
        return expired

    def rank(self, *, now: dt.datetime | None = None) -> list[Candidate]:
        """Waiting jobs whose owner is below their tier's concurrency limit, best first.

        Order: effective priority (highest first), then the oldest submission, then the id.
        """
        now = now or self.clock()
        settings = PrioritySettings.from_config()
        with self._read(single=True) as session:
            waiting = session.execute(_RANK, {"since": now - RECENT_WINDOW}).all()
        tier_cache: dict[str, Tier] = {}
        out = []
        for w in waiting:
            name = w.tier or config.get("jobs.default-tier")
            t = tier_cache.get(name) or tier_cache.setdefault(name, self._tier_of(name))
            if at_concurrency_limit(t, w.running):
                continue
            eff = effective_priority(
                w.priority, multiplier=t.multiplier, recent_jobs=w.recent or 0, waiting=now - w.queued_at, settings=settings
            )
            out.append(Candidate(w.id, w.owner, t.name, w.priority, eff, w.queued_at, w.created_at))
        out.sort(key=lambda c: (-c.effective, c.created_at, c.id))
        return out

    def claim(self, candidate: Candidate, *, dispatcher: str) -> Claim | None:
        """Atomically take a waiting job for ``dispatcher``; None if another got it or its owner is at the limit.

        PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` on the job, then the owner's row is
        locked while their running jobs are counted, so two dispatchers never exceed a user's
        concurrency limit. SQLite: the write transaction holds the database lock and the
        update is conditional on the job still waiting (rowcount checked).
        """
        with self._write() as session:
            now = self.clock()
            row = session.execute(
                select(Job.id, Job.owner, Job.attempt, Job.spec, Job.sink, Job.collection)
                .where(Job.id == candidate.id, Job.status.in_(WAITING_STATUSES))
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            user = self._lock_user(session, row.owner)
            t = self._tier_of(user.tier if user else config.get("jobs.default-tier"))
            if at_concurrency_limit(t, session.execute(running_jobs(row.owner)).scalar_one()):
                return None
            if self._collection_busy(session, row.owner, row.sink, row.collection) is not None:
                return None  # waits until the job on its collection ends
            result = session.execute(
                update(Job)
                .where(Job.id == row.id, Job.attempt == row.attempt, Job.status.in_(WAITING_STATUSES))
                .values(
                    status=moved_from_any(WAITING_STATUSES, "running"),
                    stage="reading",
                    attempt=row.attempt + 1,
                    dispatcher=dispatcher,
                    started_at=now,
                    heartbeat_at=now,
                    finished_at=None,
                    dispatch_priority=candidate.effective,
                    cancel_requested=False,
                    reserved=0,
                    to_embed=None,
                    error=None,
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                return None
        return Claim(id=row.id, owner=row.owner, attempt=row.attempt + 1, spec=row.spec, priority=candidate.effective)

    @staticmethod
    def _collection_busy(session: Session, owner: str, sink: str, collection: str) -> str | None:
        """The id of a running job on this collection, if any.

        Two jobs on one collection would each diff against the same manifest and commit over
        each other, so jobs on one collection run one at a time. Callers hold the owner's row
        lock, which serialises this check with the owner's other claims.
        """
        return session.execute(
            select(Job.id)
            .where(Job.owner == owner, Job.status == "running", Job.sink == sink, Job.collection == collection)
            .limit(1)
        ).scalar()

    def _refuse_busy_collection(self, session: Session, owner: str, sink: str, collection: str) -> None:
        self._lock_user(session, owner)
        while (busy := self._collection_busy(session, owner, sink, collection)) is not None:
            job = session.execute(select(Job).where(Job.id == busy).with_for_update()).scalar_one()
            now = self.clock()
            dead = self._dead_run(job, now)
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
                job.status, job.error = moved(job.status, "cancelled"), f"cancelled; {dead}"
            else:
                job.status, job.error = moved(job.status, "failed"), f"{dead} before the job finished; a new run on the collection replaced it"
            job.finished_at, job.dispatcher, job.reserved, job.heartbeat_at = now, None, 0, None
            session.flush()
            log.warning("job %s was recorded running on collection %r but %s; marked %s", busy, collection, dead, job.status)

    def _charge(self, session: Session, user: str, delta: int, now: dt.datetime) -> None:
        if delta <= 0:
            return
        insert = self._insert()
        stmt = insert(Usage).values(user=user, day=self._today(now), chunks=delta)
        stmt = stmt.on_conflict_do_update(
            index_elements=["user", "day"], set_={"chunks": Usage.chunks + stmt.excluded.chunks}
        )
        session.execute(stmt)

    def _fence(self, claim: Claim):
        return and_(Job.id == claim.id, Job.attempt == claim.attempt, Job.status == "running")

    def _settle(self, session: Session, claim: Claim, embedded: int | None, now: dt.datetime) -> tuple[Job, dict[str, Any]] | None:
        """Lock the claimed job and charge what it embedded and was not charged for yet.

        ``embedded`` is everything the job embedded over all its runs (the dispatcher counts
        its embedding partitions on disk), so the charge is that total less the job's
        ``charged``: a slice finished after a cancel is charged by the next run that sees it,
        and a repeated report charges nothing twice. Returns the job (None if the claim was
        lost) and the column values that record the charge.
        """
        job = session.execute(
            select(Job.charged, Job.cancel_requested).where(self._fence(claim)).with_for_update()
        ).first()
        if job is None:
            return None
        delta = max(0, int(embedded) - job.charged) if embedded is not None else 0
        if delta == 0:
            return job, {}
        self._charge(session, claim.owner, delta, now)
        return job, dict(charged=job.charged + delta, reserved=max0(Job.reserved - delta))

    def heartbeat(self, claim: Claim, *, counts: Counts | None = None, embedded: int | None = None) -> bool | None:
        """Renew the lease, store counts and charge what is newly embedded, in one transaction.

        ``embedded``: the job's embedded chunks over all its runs (see :meth:`_settle`); None
        when unchanged since the last report. Returns the job's ``cancel_requested``, or None
        when the job is no longer this claim's (its lease expired and it was interrupted):
        the caller must stop it.
        """
        values: dict[str, Any] = dict(counts.values()) if counts else {}
        with self._write() as session:
            now = self.clock()
            if embedded is None:  # nothing to charge: one statement
                row = session.execute(
                    update(Job).where(self._fence(claim)).values(heartbeat_at=now, **values).returning(Job.cancel_requested)
                    .execution_options(synchronize_session=False)
                ).first()
                return None if row is None else bool(row[0])
            settled = self._settle(session, claim, embedded, now)
            if settled is None:
                return None
            job, charged = settled
            session.execute(
                update(Job).where(self._fence(claim)).values(heartbeat_at=now, **values, **charged)
                .execution_options(synchronize_session=False)
            )
            return bool(job.cancel_requested)

    def poll(self, claim: Claim) -> bool | None:
        """``cancel_requested`` of a claimed job without writing; None if the claim was lost."""
        with self._read(single=True) as session:
            row = session.execute(select(Job.cancel_requested).where(self._fence(claim))).first()
            return None if row is None else bool(row[0])

    def reserve(self, claim: Claim, chunks: int, *, embedded: int = 0) -> None:
        """The exact check after chunking: admit ``chunks`` to be embedded or raise QuotaExceeded.

        ``embedded`` is what the job embedded over all its runs so far (:meth:`_settle`): what
        of it was not charged yet (slices an earlier run finished after it was stopped) is
        charged by this run, so it is part of what must fit. What is admitted is held
        (:data:`HELD`) until it is charged or the job ends.
        """
        with self._write() as session:
            now = self.clock()
            user = self._lock_user(session, claim.owner)
            t = self._tier_of(user.tier if user else config.get("jobs.default-tier"))
            job = session.execute(select(Job.charged).where(self._fence(claim)).with_for_update()).first()
            if job is None:
                raise JobCancelled(f"job {claim.id} is no longer running on this dispatcher")
            uncharged = max(0, int(embedded) - job.charged)
            needed = int(chunks) + uncharged
            used, held = self._used_today(session, claim.owner, self._today(now)), self._held(session, claim.owner, exclude=claim.id)
            remaining = quota_left(t, used, held)
            if remaining is not None and needed > remaining:
                earlier = f" (and {uncharged} its earlier run embedded, not charged yet)" if uncharged else ""
                raise QuotaExceeded(
                    f"quota exceeded: job {claim.id} has {chunks} chunks to embed{earlier} but user {claim.owner!r} "
                    f"{_left_phrase(t, remaining, used, held, holders='its other jobs')}; nothing was embedded",
                    remaining=remaining,
                    requested=needed,
                )
            session.execute(
                update(Job).where(self._fence(claim)).values(reserved=needed, to_embed=chunks, heartbeat_at=now)
                .execution_options(synchronize_session=False)
            )

    def finish(
        self,
        claim: Claim,
        *,
        status: str,
        counts: Counts | None = None,
        embedded: int | None = None,
        error: str | None = None,
    ) -> bool:
        """Record the end of a run, charging what is left to charge (:meth:`_settle`) in the same
        transaction; False if the claim was lost."""
        moved("running", status)
        values: dict[str, Any] = dict(counts.values()) if counts else {}
        with self._write() as session:
            now = self.clock()
            settled = self._settle(session, claim, embedded, now)
            if settled is None:
                return False
            values.update(
                settled[1],
                status=status,
                error=error,
                reserved=0,
                heartbeat_at=None,
                finished_at=None if status == "interrupted" else now,
            )
            if status == "interrupted":
                values.update(queued_at=now, dispatcher=None)
            if status == "succeeded":
                values["stage"] = "done"
            session.execute(
                update(Job).where(self._fence(claim)).values(**values).execution_options(synchronize_session=False)
            )
            self._notify(session)  # a slot is free
        return True

    def interrupt_dispatcher(self, dispatcher: str, *, why: str = "stopped") -> list[str]:
        """Mark every job still running on ``dispatcher`` interrupted (its shutdown); their ids.

        ``why`` completes "dispatcher <name> ..." in the jobs' error.
        """
        with self._write() as session:
            now = self.clock()
            ids = list(
                session.execute(
                    update(Job)
                    .where(Job.dispatcher == dispatcher, Job.status == "running")
                    .values(
                        status=moved("running", "interrupted"),
                        queued_at=now,
                        dispatcher=None,
                        reserved=0,
                        heartbeat_at=None,
                        error=f"interrupted: dispatcher {dispatcher} {why}; the job will be resumed",
                    )
                    .returning(Job.id)
                    .execution_options(synchronize_session=False)
                ).scalars()
            )
            if ids:
                self._notify(session)
        return ids

    def job(self, job_id: str) -> JobInfo:
        """Any job by id, without the owner check (admin/dispatcher use only)."""
        with self._read() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            return self._infos(session, [job], self.clock())[0]


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _kept_chunks(spec: "JobSpec") -> int:
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
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except (EmbedfleetError, OSError, ValueError):
        return 0


def _dead_run_values(cancel_requested: bool, why: str, now: dt.datetime) -> dict[str, Any]:
    """The end of a run nobody is left to record: interrupted, to be resumed, unless its owner
    had asked to cancel it anyway."""
    if cancel_requested:
        values: dict[str, Any] = dict(status=moved("running", "cancelled"), finished_at=now, error=f"cancelled; {why}")
    else:
        values = dict(status=moved("running", "interrupted"), queued_at=now, error=f"interrupted: {why}; the job will be resumed")
    return dict(values, dispatcher=None, reserved=0, heartbeat_at=None)


def _left_phrase(t: Tier, remaining: int, used: int, held: int, *, holders: str = "its waiting and running jobs") -> str:
    """How a refusal says what is left, and where the rest of the quota went."""
    return (
        f"has only {remaining} of today's {t.daily_chunks} chunks left (tier {t.name}: {int(used or 0)} charged today, "
        f"{int(held or 0)} held by {holders})"
    )


class _RetryAdmission(Exception):
    """Internal: run the admission transaction again."""


def _tier_check(name: str) -> None:
    tier(name)
