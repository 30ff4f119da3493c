"""The job service's owner API: submit, status, list, cancel, resume, users and quota (DESIGN §5).

:class:`JobService` is the one object the CLI, notebooks, ``embedfleet index`` and the HTTP
API talk to::

    from embedfleet.schedulers import JobService

    service = JobService()                          # sqlite:///<data-dir>/jobs.db, or embedfleet.jobs.database-url
    service.add_user("alice", tier="premium")       # admin: the submitter never chooses a tier
    job = service.submit("./docs", user="alice", collection="kb", priority=70)
    service.status(job.id, user="alice").status     # 'queued'
    run_once(service, client=client)                # dispatcher.run_once: until nothing is queued or running
    service.quota("alice").remaining

The service is split by audience; each part works over the same :class:`Store` (sessions,
notify, tiers):

* :attr:`JobService.admission` (:mod:`~embedfleet.schedulers.admission`): whether a job may be
  queued or run inline now, and its record;
* :attr:`JobService.ledger` (:mod:`~embedfleet.schedulers.ledger`): what the dispatcher writes:
  rank, claim, lease, charge, finish;
* :attr:`JobService.reads` (:mod:`~embedfleet.schedulers.reads`): effective priority, what is
  left of a quota and job infos, for this API, the dashboard, metrics and cron;
* status moves are the table of :mod:`~embedfleet.schedulers.lifecycle`.

A user only ever sees their own jobs: another user's job id is :class:`JobNotFound` for
``status``, exactly like a missing one, and never listed. ``cancel``/``resume`` of it is
:class:`PermissionDenied`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from embedfleet import config
from embedfleet.errors import ConfigError, JobError, JobNotFound, PermissionDenied
from embedfleet.options import IndexOptions
from embedfleet.schedulers.admission import (
    Admission,
    Estimator,
    SpecBuilder,
    check_user,
)
from embedfleet.schedulers.ledger import Ledger
from embedfleet.schedulers.lifecycle import transition
from embedfleet.schedulers.models import (
    STATUSES,
    WAITING_STATUSES,
    Job,
    User,
    ensure_schema,
    make_engine,
)
from embedfleet.schedulers.priority import tier as _tier
from embedfleet.schedulers.reads import Reads
from embedfleet.schedulers.records import (
    Candidate,
    Claim,
    Counts,
    JobInfo,
    QuotaInfo,
    UserInfo,
)
from embedfleet.schedulers.store import NOTIFY_CHANNEL, Clock, Store, dead_run

__all__ = ["NOTIFY_CHANNEL", "Candidate", "Claim", "Counts", "JobInfo", "JobService", "QuotaInfo", "UserInfo"]

log = logging.getLogger(__name__)


def _apply(job: Job, values: dict[str, Any]) -> None:
    for key, value in values.items():
        setattr(job, key, value)


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
        url = database_url or config.get("jobs.database-url", None) or f"sqlite:///{config.local_dir(self.data_dir) / 'jobs.db'}"
        config.check_database_url(url)
        self.store = Store(engine if engine is not None else make_engine(url), clock=clock)
        self.url = self.engine.url.render_as_string(hide_password=True)
        self.reads = Reads(self.store)
        self.admission = Admission(self.store, self.reads, data_dir=self.data_dir, spec_builder=spec_builder,
                                   estimator=estimator)
        self.ledger = Ledger(self.store, self.reads)
        self.schema_version = ensure_schema(self.engine)

    # ----------------------------------------------------------------------------------------
    # plumbing

    @property
    def engine(self) -> Engine:
        return self.store.engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self.store.bind(engine)

    @property
    def clock(self) -> Clock:
        return self.store.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self.store.clock = clock

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> JobService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JobService({self.url!r})"

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
        exact count after chunking, before anything is embedded (:meth:`Admission.estimate`).

        Raises ConfigError (bad user id, collection, priority, mode or options), QueueFull,
        QuotaExceeded (with ``remaining``) or PermissionDenied (source outside allowed roots).
        """
        job, effective = self.admission.admit(
            source,
            user=user,
            priority=priority,
            options=IndexOptions.merge(options, **fields),
            new_user_tier=None,
            run_as=None,
        )
        log.info("queued job %s for %s (estimated %d chunks)", job.id, job.owner, job.estimated_chunks)
        return JobInfo.from_row(job, effective)

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
        user = check_user(user)
        with self.store.read() as session:
            now = self.store.clock()
            return self.reads.infos(session, [self._own_job(session, str(job_id), user)], now)[0]

    def list(self, *, user: str, status: str | Iterable[str] | None = None, limit: int | None = 100) -> list[JobInfo]:
        """``user``'s jobs, newest first, optionally only those in ``status`` (one or several)."""
        user = check_user(user)
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
        with self.store.read() as session:
            now = self.store.clock()
            return self.reads.infos(session, list(session.execute(stmt).scalars()), now)

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
        user = check_user(user)
        with self.store.write() as session:
            now = self.store.clock()
            job = self._job_to_change(session, job_id, user, action="cancel")
            if job.status in WAITING_STATUSES:
                _apply(job, transition("cancel", job.status, "cancelled", {"finished_at": now, "error": None, "dispatcher": None}))
            elif job.status == "running":
                job.cancel_requested = True
            elif job.status != "cancelled":
                raise JobError(f"job {job_id!r} already {job.status}; nothing to cancel")
            session.flush()
            return self.reads.infos(session, [job], now)[0]

    def resume(self, job_id: str, *, user: str) -> JobInfo:
        """Queue ``user``'s interrupted, failed or cancelled job again under the same id.

        The pipeline skips the partitions the earlier run finished, so this continues the job.
        The queue limit applies, and its estimate (less the chunks already charged) must fit
        in what is left of today's quota. A job still recorded ``running`` whose run is dead
        (:func:`~embedfleet.schedulers.store.dead_run`: e.g. a SIGKILLed ``embedfleet index``) is resumed like an
        interrupted one.
        """
        user = check_user(user)
        with self.store.write() as session:
            now = self.store.clock()
            job = self._job_to_change(session, job_id, user, action="resume")
            if job.status == "running":
                dead = dead_run(job, now)
                if dead is None:
                    raise JobError(
                        f"job {job_id!r} is running (dispatcher {job.dispatcher}); if its process died, it can be "
                        f"resumed once its lease expires ({config.seconds_value('jobs.lease-seconds'):g}s after "
                        f"its last heartbeat)"
                    )
                log.warning("job %s was recorded running but %s; resuming it", job.id, dead)
            elif job.status not in ("interrupted", "failed", "cancelled"):
                raise JobError(f"job {job_id!r} is {job.status}; only interrupted, failed or cancelled jobs can be resumed")
            self.admission.check_resume(session, job, now)
            _apply(job, transition("resume", job.status, "queued", {
                "stage": "queued", "queued_at": now, "finished_at": None, "heartbeat_at": None, "error": None,
                "dispatcher": None, "cancel_requested": False, "reserved": 0,
            }))
            session.flush()
            self.store.notify(session)
            return self.reads.infos(session, [job], now)[0]

    # ----------------------------------------------------------------------------------------
    # users and quota (admin commands)

    def add_user(self, user: str, *, tier: str | None = None) -> UserInfo:
        """Create ``user`` at ``tier`` (default ``embedfleet.jobs.default-tier``)."""
        user = check_user(user)
        tier_name = tier or config.get("jobs.default-tier")
        _tier_check(tier_name)
        with self.store.write() as session:
            existing = self.store.lock_user(session, user)
            if existing is not None:
                raise ConfigError(
                    f"user {user!r} already exists (tier {existing.tier}); change it with `embedfleet users set-tier`"
                )
            row = User(id=user, tier=tier_name, created_at=self.store.clock())
            session.add(row)
        return UserInfo(row.id, row.tier, row.created_at)

    def set_tier(self, user: str, tier: str) -> UserInfo:
        """Move an existing user to another tier (effective for the next admission and pick)."""
        user = check_user(user)
        _tier_check(tier)
        with self.store.write() as session:
            row = self.store.lock_user(session, user)
            if row is None:
                raise ConfigError(f"unknown user {user!r}; add it with `embedfleet users add {user} --tier {tier}`")
            row.tier = tier
            self.store.notify(session)  # a higher concurrency limit may let a waiting job start
        return UserInfo(row.id, row.tier, row.created_at)

    def get_user(self, user: str) -> UserInfo | None:
        user = check_user(user)
        with self.store.read() as session:
            row = session.get(User, user)
            return UserInfo(row.id, row.tier, row.created_at) if row else None

    def list_users(self) -> list[UserInfo]:
        with self.store.read() as session:
            return [UserInfo(r.id, r.tier, r.created_at) for r in session.execute(select(User).order_by(User.id)).scalars()]

    def quota(self, user: str) -> QuotaInfo:
        """Today's (UTC) quota of ``user``: limit, used, reserved, remaining, concurrency."""
        return self.reads.quota(check_user(user))

    def job(self, job_id: str) -> JobInfo:
        """Any job by id, without the owner check (admin/dispatcher use only)."""
        return self.reads.job(job_id)


def _tier_check(name: str) -> None:
    _tier(name)
