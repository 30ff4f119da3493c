"""API tokens: shown once, stored hashed, expiring, revocable; the CLI that manages them."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from click.testing import CliRunner

from embedfleet.cli import main
from embedfleet.errors import ConfigError
from embedfleet.schedulers.models import SCHEMA_VERSION
from embedfleet.schedulers.service import JobService
from embedfleet.schedulers.tokens import TokenStore, hash_secret
from tests.db import db_url  # noqa: F401  (SQLite, and PostgreSQL where it runs)


@pytest.fixture
def store(db_url, data_dir):  # noqa: F811
    with JobService(db_url, data_dir=data_dir) as service:
        yield TokenStore(service, touch_every=0)


def test_secret_shown_once_and_stored_as_its_hash_only(store, data_dir):
    info, secret = store.create("alice", note="laptop")
    assert secret.startswith("ef_") and len(secret) > 40
    assert store.authenticate(secret).id == info.id
    if store.engine.dialect.name == "sqlite":
        from pathlib import Path

        database = Path(store.engine.url.database)
        raw = b"".join(path.read_bytes() for path in database.parent.glob(database.name + "*"))
        assert raw and secret.encode() not in raw
    import sqlalchemy as sa

    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM ef_tokens")).all()
        (stored,) = conn.execute(sa.text("SELECT secret_hash FROM ef_tokens WHERE id = :id"), {"id": info.id}).one()
    assert secret not in repr(rows)
    assert stored == hash_secret(secret)
    assert "secret" not in json.dumps(store.list()[0].to_dict()).replace("secret_hash", "")
    # The user was created at the default tier: the submitter never chose one.
    assert store.service.get_user("alice").tier == "free"


def test_unknown_expired_and_revoked_tokens_are_refused(store):
    assert store.authenticate(None) is None
    assert store.authenticate("") is None
    assert store.authenticate("ef_" + "x" * 43) is None
    assert store.authenticate("Bearer nonsense") is None
    info, secret = store.create("bob", expires_in=dt.timedelta(seconds=0.3))
    assert store.authenticate(secret) is not None
    import time

    time.sleep(0.4)
    assert store.authenticate(secret) is None
    assert store.get(info.id).state() == "expired"
    info, secret = store.create("bob")
    assert store.authenticate(secret).user == "bob"
    store.revoke(info.id)
    assert store.authenticate(secret) is None
    first = store.get(info.id).revoked_at
    assert store.revoke(info.id).revoked_at == first
    with pytest.raises(ConfigError, match="no token 999"):
        store.revoke(999)


def test_the_local_user_gets_no_token(store):
    with pytest.raises(ConfigError, match="not reachable over the API"):
        store.create("local")
    with pytest.raises(ConfigError):
        store.create("no spaces allowed")
    with pytest.raises(ConfigError, match="positive"):
        store.create("carol", expires_in=dt.timedelta(seconds=-1))


def test_last_use_is_recorded(store):
    info, secret = store.create("dave")
    assert store.get(info.id).last_used_at is None
    store.authenticate(secret)
    assert store.get(info.id).last_used_at is not None


def test_tokens_table_migrates_from_schema_2(data_dir):
    import sqlalchemy as sa

    from embedfleet.schedulers.models import ApiToken, Meta, ensure_schema, make_engine

    engine = make_engine(f"sqlite:///{data_dir / 'old.db'}")
    ensure_schema(engine)
    with engine.begin() as conn:
        ApiToken.__table__.drop(conn)
        conn.execute(sa.update(Meta).where(Meta.key == "schema_version").values(value="2"))
    assert ensure_schema(engine) == SCHEMA_VERSION >= 3
    with engine.connect() as conn:
        assert conn.dialect.has_table(conn, "ef_tokens")


def test_tokens_cli(data_dir):
    runner = CliRunner()
    args = ["--data-dir", str(data_dir)]
    created = runner.invoke(main, ["tokens", "create", "alice", "--expires", "30d", "--json", *args])
    assert created.exit_code == 0, created.output
    body = json.loads(created.stdout)
    assert body["user"] == "alice" and body["token"].startswith("ef_") and body["state"] == "active"
    expires = dt.datetime.fromisoformat(body["expires_at"]) - dt.datetime.fromisoformat(body["created_at"])
    assert expires == dt.timedelta(days=30)
    admin = runner.invoke(main, ["tokens", "create", "ops", "--admin", *args])
    assert admin.exit_code == 0 and admin.stdout.strip().startswith("ef_")
    listed = runner.invoke(main, ["tokens", "list", *args])
    assert listed.exit_code == 0
    assert "alice" in listed.stdout and "admin" in listed.stdout
    assert body["token"] not in listed.stdout and admin.stdout.strip() not in listed.stdout
    revoked = runner.invoke(main, ["tokens", "revoke", str(body["id"]), *args])
    assert revoked.exit_code == 0, revoked.output
    rows = json.loads(runner.invoke(main, ["tokens", "list", "--json", *args]).stdout)
    assert [r["state"] for r in rows] == ["revoked", "active"]
    bad = runner.invoke(main, ["tokens", "create", "bob", "--expires", "soon", *args])
    assert bad.exit_code != 0 and "--expires" in bad.output
