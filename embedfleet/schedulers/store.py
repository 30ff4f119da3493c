"""The job database as every side of the job service uses it: sessions, notify, tiers, dead runs.

One :class:`Store` per :class:`~embedfleet.schedulers.service.JobService`, shared by its
readers (:mod:`~embedfleet.schedulers.reads`), its admission
(:mod:`~embedfleet.schedulers.admission`) and the dispatcher's ledger
(:mod:`~embedfleet.schedulers.ledger`), so they open transactions the same way and agree on
what "today", a user's tier and a dead run are.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, or_, select, text
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import Session

from embedfleet import config
from embedfleet.schedulers.lifecycle import transition
from embedfleet.schedulers.models import Job, Usage, User, read_engine, utcnow
from embedfleet.schedulers.priority import Tier, tier, tiers
from embedfleet.schedulers.records import iso

__all__ = [
    "NOTIFY_CHANNEL",
    "Clock",
    "Store",
    "collection_busy",
    "dead_run",
    "dead_run_values",
    "default_tier",
    "tier_of",
]

log = logging.getLogger(__name__)

#: The PostgreSQL channel dispatchers LISTEN on; every change that may let a job start notifies it.
NOTIFY_CHANNEL = "embedfleet_jobs"

Clock = Callable[[], dt.datetime]

_warned_tiers: set[str] = set()


def default_tier() -> str:
    return config.get("jobs.default-tier")


def tier_of(name: str | None) -> Tier:
    """The configured tier ``name`` (None: the default tier); a user left on a tier that is no
    longer configured gets the default tier's limits, with one warning per name."""
    known = tiers()
    if name is not None and name in known:
        return known[name]
    fallback = default_tier()
    if name is not None and name not in _warned_tiers:
        _warned_tiers.add(name)
        log.warning("tier %r is not configured any more; using the default tier %r", name, fallback)
    return known[fallback] if fallback in known else tier(fallback)


class Store:
    """Transactions on one job database, and the clock its records are stamped with."""

    def __init__(self, engine: Engine, *, clock: Clock | None = None):
        self.bind(engine)
        self.clock: Clock = clock or utcnow

    def bind(self, engine: Engine) -> None:
        """Use ``engine`` from now on (and read engines derived from it)."""
        self.engine = engine
        self._read_engine = read_engine(engine)
        self._single_read_engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql"
            else self._read_engine
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def write(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def read(self, *, single: bool = False) -> Iterator[Session]:
        """A read-only transaction; ``single``: for one statement, which on PostgreSQL then
        runs in autocommit (no BEGIN/COMMIT round trips: a statement is its own snapshot)."""
        engine = self._single_read_engine if single else self._read_engine
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session

    def insert(self):
        """The dialect's INSERT (for ON CONFLICT)."""
        return pg_dialect.insert if self.dialect == "postgresql" else sqlite_dialect.insert

    def notify(self, session: Session) -> None:
        """Wake listening dispatchers at commit (PostgreSQL; SQLite dispatchers watch data_version)."""
        if self.dialect == "postgresql":
            session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    @staticmethod
    def today(now: dt.datetime) -> dt.date:
        """The UTC day a quota is counted for."""
        return now.astimezone(dt.timezone.utc).date()

    @staticmethod
    def lock_user(session: Session, user: str) -> User | None:
        return session.execute(select(User).where(User.id == user).with_for_update()).scalar_one_or_none()

    @staticmethod
    def used_today(session: Session, user: str, day: dt.date) -> int:
        used = session.execute(select(Usage.chunks).where(Usage.user == user, Usage.day == day)).scalar_one_or_none()
        return int(used or 0)


def collection_busy(session: Session, owner: str, sink: str, collection: str, *,
                    batch: str | None = None) -> str | None:
    """The id of a running job on this collection, if any (jobs of ``batch`` aside).

    Two jobs on one collection would each diff against the same manifest and commit over
    each other, so jobs on one collection run one at a time, or together in one batch
    (pipeline/batch.py), which diffs and commits once. Callers hold the owner's row lock,
    which serialises this check with the owner's other claims.
    """
    query = select(Job.id).where(Job.owner == owner, Job.status == "running", Job.sink == sink,
                                 Job.collection == collection)
    if batch is not None:
        query = query.where(or_(Job.batch.is_(None), Job.batch != batch))
    return session.execute(query.limit(1)).scalar()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def dead_run(job: Job, now: dt.datetime) -> str | None:
    """Why ``job``, recorded running, cannot be running any more; None if it may be.

    Either its lease expired (what the ledger's ``expire_leases`` acts on, without waiting for
    a dispatcher to notice), or it ran on this host in a process that no longer exists: a
    SIGKILLed or OOM-killed ``embedfleet index`` leaves nobody to record its end, and making
    its user wait out the lease before resuming would protect nothing. The run's late writes,
    if any, are fenced off by the attempt number either way.
    """
    lease = config.seconds_value("jobs.lease-seconds")
    if job.heartbeat_at is not None and job.heartbeat_at < now - dt.timedelta(seconds=lease):
        return f"its lease expired (last heartbeat {iso(job.heartbeat_at)})"
    # dispatcher_name(): "<kind>:<host>:<pid>:<random>"
    parts = (job.dispatcher or "").rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and ":" in parts[0]:
        import socket

        host, pid = parts[0].split(":", 1)[1], int(parts[1])
        if host == socket.gethostname() and not _process_exists(pid):
            return f"its process {pid} on this host is gone"
    return None


def dead_run_values(cancel_requested: bool, why: str, now: dt.datetime) -> dict[str, Any]:
    """The end of a run nobody is left to record: interrupted, to be resumed, unless its owner
    had asked to cancel it anyway."""
    let_go = dict(dispatcher=None, reserved=0, heartbeat_at=None)
    if cancel_requested:
        return transition("abandon", "running", "cancelled", dict(let_go, finished_at=now, error=f"cancelled; {why}"))
    return transition("requeue", "running", "interrupted",
                      dict(let_go, queued_at=now, error=f"interrupted: {why}; the job will be resumed"))
