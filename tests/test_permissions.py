"""What embedfleet creates to hold documents, vectors and jobs is its owner's only."""

from __future__ import annotations

import os
import sqlite3
import stat
from contextlib import contextmanager

import pytest

from embedfleet import config
from embedfleet.sinks.base import CollectionInfo, SinkSpec


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextmanager
def _umask(mask: int):
    # The most permissive umask: what is created must not depend on the caller's.
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_the_data_dir_is_created_0700_and_an_existing_one_keeps_its_mode(tmp_path):
    with _umask(0):
        created = config.data_dir(tmp_path / "new" / "data")
    assert _mode(created) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    os.chmod(shared, 0o750)
    assert _mode(config.data_dir(shared)) == 0o750


def test_a_sqlite_database_in_a_private_file_keeps_its_wal_and_shm_0600(tmp_path):
    with _umask(0):
        path = config.private_file(tmp_path / "db" / "jobs.db")
        db = sqlite3.connect(path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (1)")
        db.commit()
        sidecars = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
        modes = {p.name: _mode(p) for p in [path, *sidecars]}
        db.close()
    assert modes == {"jobs.db": 0o600, "jobs.db-wal": 0o600, "jobs.db-shm": 0o600}
    assert _mode(path.parent) == 0o700


def test_an_existing_file_keeps_its_mode_and_content(tmp_path):
    path = tmp_path / "jobs.db"
    path.write_bytes(b"data")
    os.chmod(path, 0o640)
    config.private_file(path)
    assert _mode(path) == 0o640 and path.read_bytes() == b"data"


def test_a_new_embedded_chroma_store_is_0700(tmp_path):
    from embedfleet.sinks.chroma import ChromaSink

    store = tmp_path / "stores" / "chroma"
    with _umask(0), ChromaSink(SinkSpec(uri=f"chroma://{store}")) as sink:
        sink.open("kb-test", info=CollectionInfo(model="fake", dimensions=4), create=True)
    assert _mode(store) == 0o700


def test_a_new_milvus_lite_store_is_its_owners_only(tmp_path):
    pytest.importorskip("pymilvus")
    from embedfleet.sinks.milvus import MilvusSink

    store = tmp_path / "stores" / "vectors.db"
    with _umask(0), MilvusSink(SinkSpec(uri=f"milvus://{store}")) as sink:
        sink.open("kb-test", info=CollectionInfo(model="fake", dimensions=4), create=True)
    assert _mode(store) == (0o700 if store.is_dir() else 0o600)


def test_a_new_parquet_store_and_collection_are_0700(tmp_path):
    from embedfleet.sinks.parquet import ParquetSink

    store = tmp_path / "stores" / "vectors"
    with _umask(0), ParquetSink(SinkSpec(uri=f"parquet://{store}")) as sink:
        sink.open("kb-test", info=CollectionInfo(model="fake", dimensions=4), create=True)
    assert _mode(store) == 0o700 and _mode(store / "kb-test") == 0o700


def test_a_job_database_at_a_chosen_path_is_its_owners_only(tmp_path):
    from embedfleet.schedulers.service import JobService

    with _umask(0):
        service = JobService(f"sqlite:///{tmp_path}/db/jobs.db", data_dir=tmp_path / "d")
        service.add_user("ann")
        service.close()
    assert _mode(tmp_path / "db" / "jobs.db") == 0o600


def test_a_database_url_password_never_shows_in_errors():
    import pytest

    from embedfleet.errors import ConfigError
    from embedfleet.schedulers.models import make_engine

    with pytest.raises(ConfigError) as caught:
        make_engine("mysql://admin:hunter2@db.example/jobs")
    assert "hunter2" not in str(caught.value) and "***" in str(caught.value)
