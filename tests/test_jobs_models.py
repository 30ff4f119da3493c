"""The job database: schema creation, the recorded version, migrations, refusal of newer schemas."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from embedfleet.errors import ConfigError
from embedfleet.schedulers import models
from embedfleet.schedulers.models import SCHEMA_VERSION, Meta, ensure_schema, make_engine, schema_version
from tests.db import clock, db_url, estimator, make_service, service  # noqa: F401


def _version(engine) -> int | None:
    with engine.connect() as conn:
        return schema_version(conn)


def test_schema_created_on_first_use_with_version(db_url, tmp_path):  # noqa: F811
    engine = make_engine(db_url)
    assert _version(engine) is None
    assert ensure_schema(engine) == SCHEMA_VERSION
    assert _version(engine) == SCHEMA_VERSION
    tables = set(sa.inspect(engine).get_table_names())
    assert {"ef_meta", "ef_users", "ef_jobs", "ef_usage"} <= tables
    # Idempotent: a second service on the same database changes nothing.
    assert ensure_schema(engine) == SCHEMA_VERSION
    engine.dispose()


def test_newer_schema_is_refused_and_left_untouched(db_url, tmp_path):  # noqa: F811
    svc = make_service(db_url, tmp_path / "data")
    svc.submit(str(tmp_path), user="alice", collection="kb")
    with svc.engine.begin() as conn:
        conn.execute(sa.update(Meta).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    svc.close()
    with pytest.raises(ConfigError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION}"):
        make_service(db_url, tmp_path / "data")
    engine = make_engine(db_url)
    assert _version(engine) == SCHEMA_VERSION + 1
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ef_jobs")).scalar_one() == 1
    engine.dispose()


def test_older_schema_is_migrated(db_url, monkeypatch):  # noqa: F811
    engine = make_engine(db_url)
    ensure_schema(engine)
    ran = []

    def to_next(conn):
        ran.append(schema_version(conn))
        conn.execute(sa.text("CREATE TABLE ef_migrated (id INTEGER PRIMARY KEY)"))

    monkeypatch.setattr(models, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(models.MIGRATIONS, SCHEMA_VERSION, to_next)
    assert ensure_schema(engine) == SCHEMA_VERSION + 1
    assert ran == [SCHEMA_VERSION]
    assert _version(engine) == SCHEMA_VERSION + 1
    assert "ef_migrated" in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_timestamps_round_trip_as_aware_utc(service, clock):  # noqa: F811
    clock.set(dt.datetime(2026, 5, 1, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-2))))
    job = service.submit("/srv", user="alice", collection="kb")
    info = service.status(job.id, user="alice")
    assert info.created_at.tzinfo is not None
    assert info.created_at == dt.datetime(2026, 5, 2, 1, 30, tzinfo=dt.timezone.utc)
    # Usage is per UTC day: 23:30 at UTC-2 is already the 2nd.
    assert service.quota("alice").day == dt.date(2026, 5, 2)


def test_sqlite_is_wal_with_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'jobs.db'}")  # the directory is created
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    engine.dispose()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "mysql://x/y", "not a url"])
def test_unusable_urls_are_config_errors(url):
    with pytest.raises(ConfigError):
        make_engine(url)


def test_a_version_3_database_gains_the_batch_column_and_keeps_its_jobs(db_url, tmp_path):  # noqa: F811
    svc = make_service(db_url, tmp_path / "data")
    try:
        job = svc.submit(str(tmp_path), user="ana", collection="kb")
    finally:
        svc.close()
    engine = make_engine(db_url)
    with engine.begin() as conn:
        # Back to version 3: no batch column (the job recorded before stays).
        conn.execute(sa.text("ALTER TABLE ef_jobs DROP COLUMN batch"))
        conn.execute(sa.update(Meta).where(Meta.key == "schema_version").values(value="3"))
    engine.dispose()
    svc = make_service(db_url, tmp_path / "data")
    try:
        assert svc.status(job.id, user="ana").batch is None
    finally:
        svc.close()
    engine = make_engine(db_url)
    assert _version(engine) == SCHEMA_VERSION == 4
    assert "batch" in {c["name"] for c in sa.inspect(engine).get_columns("ef_jobs")}
    engine.dispose()
