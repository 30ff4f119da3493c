"""The job service's tables (SQLAlchemy 2, typed declarative) and its database setup.

Tables (all prefixed ``ef_`` so they can live in a shared PostgreSQL database)::

    ef_meta    key -> value; holds ``schema_version``
    ef_users   id, tier, created_at
    ef_jobs    one row per job: options, JobSpec JSON, status/stage/counts, lease, quota bookkeeping
    ef_usage   (user, UTC day) -> chunks embedded (charged) that day
    ef_cron_state  one row per cron schedule: last slot handled, last job, outcome (schema 2)
    ef_tokens  API tokens of ``embedfleet serve``: sha256 of the secret, owner, admin scope, expiry, revocation (schema 3)

Timestamps are stored as naive UTC (``UTCDateTime``) and always come back timezone-aware,
so SQLite and PostgreSQL behave the same.

:func:`make_engine` builds an engine for a URL: SQLite files get WAL, a busy timeout and
``BEGIN IMMEDIATE`` for write transactions (reads use a plain deferred ``BEGIN`` through
:func:`read_engine`); PostgreSQL gets a pool sized for a dispatcher's threads. To keep the
tables in a PostgreSQL schema other than ``public``, put the search path in the URL:
``postgresql+psycopg://host/db?options=-csearch_path%3Dmyschema``.

:func:`ensure_schema` creates the tables on first use, records :data:`SCHEMA_VERSION`, runs
the migrations in :data:`MIGRATIONS` for an older database and refuses a newer one.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Callable, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Connection,
    Date,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from embedfleet.config import hide_url_password, private_file
from embedfleet.errors import ConfigError

__all__ = [
    "SCHEMA_VERSION",
    "MIGRATIONS",
    "Base",
    "Meta",
    "User",
    "Job",
    "Usage",
    "CronState",
    "ApiToken",
    "JobStatus",
    "STATUSES",
    "ACTIVE_STATUSES",
    "WAITING_STATUSES",
    "FINAL_STATUSES",
    "make_engine",
    "read_engine",
    "ensure_schema",
    "schema_version",
    "utcnow",
]

log = logging.getLogger(__name__)

#: Bump when the tables change, and add a migration ``MIGRATIONS[old] = fn(conn)`` that brings
#: a database at version ``old`` to ``old + 1``.
SCHEMA_VERSION = 4
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
#: Waiting to be (re)started by a dispatcher. An interrupted job is resumed like a queued one.
WAITING_STATUSES: tuple[str, ...] = ("queued", "interrupted")
ACTIVE_STATUSES: tuple[str, ...] = ("queued", "interrupted", "running")
FINAL_STATUSES: tuple[str, ...] = ("succeeded", "failed", "cancelled")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime, stored naive (UTC) on every backend."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the job service only stores aware UTC datetimes")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "ef_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class User(Base):
    __tablename__ = "ef_users"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tier: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Job(Base):
    __tablename__ = "ef_jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'interrupted')",
            name="ef_jobs_status",
        ),
        CheckConstraint("priority >= 0 AND priority <= 100", name="ef_jobs_priority"),
        Index("ef_jobs_status_owner", "status", "owner"),
        Index("ef_jobs_owner_created", "owner", "created_at"),
        Index("ef_jobs_owner_started", "owner", "started_at"),
        Index("ef_jobs_dispatcher", "dispatcher"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # short uuid4 hex
    owner: Mapped[str] = mapped_column(ForeignKey("ef_users.id"))
    # What to run (the options, for display and filtering; the JobSpec JSON is authoritative).
    source: Mapped[str] = mapped_column(Text)
    sink: Mapped[str] = mapped_column(Text)
    collection: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    chunk_unit: Mapped[str] = mapped_column(String(16))
    chunk_size: Mapped[int] = mapped_column(Integer)
    chunk_overlap: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(16))
    spec: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer)  # base priority 0-100
    # Lifecycle.
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str] = mapped_column(String(16), default="queued")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    queued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())  # waiting since (the age bonus)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)  # latest start
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)  # the lease
    dispatcher: Mapped[str | None] = mapped_column(String(128), default=None)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # fencing token: +1 at every claim
    # The batch of coalesced jobs its latest run is part of (pipeline/batch.py); None: alone.
    # A batch is one pipeline pass: it counts once against the owner's concurrency limit.
    batch: Mapped[str | None] = mapped_column(String(32), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    dispatch_priority: Mapped[float | None] = mapped_column(default=None)  # effective priority at the claim
    # Counts, as the pipeline reports them.
    documents: Mapped[int] = mapped_column(BigInteger, default=0)
    chunks: Mapped[int] = mapped_column(BigInteger, default=0)
    embedded: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped: Mapped[int] = mapped_column(BigInteger, default=0)
    deleted: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped_documents: Mapped[int] = mapped_column(BigInteger, default=0)
    partitions_done: Mapped[int] = mapped_column(Integer, default=0)
    partitions_total: Mapped[int] = mapped_column(Integer, default=0)
    # Quota bookkeeping.
    # How much of the owner's quota a job holds is admission.HELD, computed from these.
    estimated_chunks: Mapped[int] = mapped_column(BigInteger, default=0)  # to embed, estimated at submit
    to_embed: Mapped[int | None] = mapped_column(BigInteger, default=None)  # exact, from before_embed; None until then
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)  # admitted by before_embed, not yet charged
    charged: Mapped[int] = mapped_column(BigInteger, default=0)  # charged to ef_usage, all attempts


class Usage(Base):
    __tablename__ = "ef_usage"

    user: Mapped[str] = mapped_column(ForeignKey("ef_users.id"), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)  # UTC date
    chunks: Mapped[int] = mapped_column(BigInteger, default=0)


class CronState(Base):
    """What :mod:`embedfleet.schedulers.cron` remembers of each schedule (names are global per database)."""

    __tablename__ = "ef_cron_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    cron: Mapped[str] = mapped_column(String(128))  # the expression when last handled
    timezone: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_slot: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)  # latest cron time handled
    last_run_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)  # when it was handled
    last_outcome: Mapped[str | None] = mapped_column(String(16), default=None)  # submitted|skipped|refused|error|firing
    last_job_id: Mapped[str | None] = mapped_column(String(32), default=None)  # no FK: jobs may be purged
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    coalesced: Mapped[int] = mapped_column(Integer, default=0)  # slots missed before the last one handled
    runs: Mapped[int] = mapped_column(Integer, default=0)  # jobs submitted
    skips: Mapped[int] = mapped_column(Integer, default=0)  # due runs skipped because the last job was active


def _add_cron_state(conn: Connection) -> None:
    # Additive only: version-1 tables are untouched.
    CronState.__table__.create(conn, checkfirst=True)


MIGRATIONS[1] = _add_cron_state


class ApiToken(Base):
    """A bearer token of ``embedfleet serve`` (:mod:`embedfleet.schedulers.tokens`).

    Only the SHA-256 of the secret is kept: a stolen database does not hand out working
    tokens, and the secret (32 random bytes) is too long to guess from its hash.
    """

    __tablename__ = "ef_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(ForeignKey("ef_users.id"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    note: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)  # None: never
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)


def _add_tokens(conn: Connection) -> None:
    # Additive only: version-2 tables are untouched.
    ApiToken.__table__.create(conn, checkfirst=True)


MIGRATIONS[2] = _add_tokens


def _add_batch(conn: Connection) -> None:
    # Additive: a nullable column; every existing job ran alone.
    from sqlalchemy import inspect

    if "batch" not in {c["name"] for c in inspect(conn).get_columns(Job.__tablename__)}:
        conn.execute(text("ALTER TABLE ef_jobs ADD COLUMN batch VARCHAR(32)"))


MIGRATIONS[3] = _add_batch


# --------------------------------------------------------------------------------------------
# Engines


def _is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str) -> Engine:
    """An engine for the job database at ``url`` (SQLite file or PostgreSQL)."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError
        raise ConfigError(f"invalid job database URL {hide_url_password(url)!r}: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file:"):
            raise ConfigError(
                "the job service needs a SQLite *file* (sqlite:///path/jobs.db): an in-memory database "
                "is not shared between the dispatcher's threads"
            )
        # It holds every user's jobs and sources: created its owner's only (its WAL follows).
        private_file(Path(database).expanduser())
        engine = create_engine(
            parsed,
            connect_args={"timeout": 30.0, "check_same_thread": False},
            pool_size=8,
            max_overflow=32,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record):
            # Take transaction control away from the sqlite3 module so "begin" below decides.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # Write transactions take the write lock up front: a deferred transaction that reads
            # and then writes can fail with SQLITE_BUSY without waiting when another writer went first.
            mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    if backend == "postgresql":
        return create_engine(parsed, pool_size=8, max_overflow=48, pool_pre_ping=True)
    raise ConfigError(f"the job database must be SQLite or PostgreSQL, not {backend!r} ({hide_url_password(url)})")


def read_engine(engine: Engine) -> Engine:
    """The same engine (and pool) for read-only transactions: a deferred BEGIN on SQLite."""
    if _is_sqlite(engine):
        return engine.execution_options(sqlite_begin="DEFERRED")
    return engine


# --------------------------------------------------------------------------------------------
# Schema


def schema_version(conn: Connection) -> int | None:
    """The recorded schema version, or None if the tables were never created."""
    if not conn.dialect.has_table(conn, Meta.__tablename__):
        return None
    value = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar_one_or_none()
    return int(value) if value is not None else None


def _check_version(found: int | None, url: str) -> None:
    if found is not None and found > SCHEMA_VERSION:
        raise ConfigError(
            f"the job database {url} has schema version {found}, newer than the {SCHEMA_VERSION} this "
            f"embedfleet understands; upgrade embedfleet (the database was left untouched)"
        )


def ensure_schema(engine: Engine) -> int:
    """Create or migrate the tables; return the schema version. Refuses a newer schema."""
    url = engine.url.render_as_string(hide_password=True)
    with read_engine(engine).connect() as conn:
        found = schema_version(conn)
    _check_version(found, url)
    if found == SCHEMA_VERSION:
        return found
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Two processes starting at once: one creates, the other waits and then sees the tables.
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(current_schema() || :suffix))"), {"suffix": "/embedfleet"})
        found = schema_version(conn)
        _check_version(found, url)
        if found is None:
            Base.metadata.create_all(conn)
            conn.execute(Meta.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            log.info("created job database schema version %d at %s", SCHEMA_VERSION, url)
            return SCHEMA_VERSION
        while found < SCHEMA_VERSION:
            migrate = MIGRATIONS.get(found)
            if migrate is None:
                raise ConfigError(f"no migration from job database schema version {found} ({url})")
            migrate(conn)
            found += 1
            log.info("migrated job database %s to schema version %d", url, found)
        conn.execute(Meta.__table__.update().where(Meta.key == "schema_version").values(value=str(found)))
        return found
