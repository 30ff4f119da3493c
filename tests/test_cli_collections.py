"""``embedfleet collections list|info|drop`` through click's CliRunner, on real stores."""

from __future__ import annotations

import json

import dask.config
import pytest
from click.testing import CliRunner

from embedfleet.cli import main
from embedfleet.sinks.base import CollectionInfo
from embedfleet.sinks.catalog import open_user_collection
from embedfleet.sinks.naming import physical_name
from embedfleet.sinks.registry import open_sink
from tests.test_sinks_contract import ids_of, make_frame

INFO = CollectionInfo(model="fake-a", dimensions=8, metric="cosine")


def seed(uri: str, user: str, collection: str, rows: int) -> None:
    with open_sink(uri) as sink:
        open_user_collection(sink, user, collection, info=INFO, create=True).upsert(make_frame(ids_of(rows)))


@pytest.fixture
def sink_uri(tmp_path):
    uri = f"parquet://{tmp_path}/store"
    seed(uri, "alice", "kb", 5)
    seed(uri, "alice", "notes_2024", 2)
    seed(uri, "bob", "kb", 3)
    seed(uri, "alice-b", "kb", 1)  # a user whose id extends alice's must stay apart
    return uri


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, ["collections", *args], input=input)


def names(sink_uri: str) -> set[str]:
    with open_sink(sink_uri) as sink:
        return set(sink.list_collections())


def test_list_shows_only_the_users_collections(sink_uri):
    result = run("list", "--user", "alice", "--sink", sink_uri, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["user"] == "alice"
    assert [c["name"] for c in document["collections"]] == ["kb", "notes_2024"]
    assert [c["count"] for c in document["collections"]] == [5, 2]
    bob = json.loads(run("list", "--user", "bob", "--sink", sink_uri, "--json").stdout)
    assert [c["name"] for c in bob["collections"]] == ["kb"] and bob["collections"][0]["count"] == 3

    text = run("list", "--user", "alice", "--sink", sink_uri)
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("kb") and "fake-a" in lines[0]

    empty = run("list", "--user", "carol", "--sink", sink_uri, "--json")
    assert json.loads(empty.stdout)["collections"] == []


def test_info(sink_uri):
    result = run("info", "kb", "--user", "alice", "--sink", sink_uri, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model"] == "fake-a" and info["dimensions"] == 8 and info["metric"] == "cosine"
    assert info["count"] == 5
    assert info["physical_name"] == physical_name("alice", "kb")
    assert info["sink"] == sink_uri
    text = run("info", "kb", "--user", "alice", "--sink", sink_uri)
    assert "model:" in text.stdout and "fake-a" in text.stdout


def test_drop_with_yes(sink_uri):
    result = run("drop", "notes_2024", "--user", "alice", "--sink", sink_uri, "--yes")
    assert result.exit_code == 0, result.output
    assert physical_name("alice", "notes_2024") not in names(sink_uri)
    assert physical_name("alice", "kb") in names(sink_uri)


def test_drop_refuses_without_yes_when_not_a_terminal(sink_uri):
    result = run("drop", "kb", "--user", "alice", "--sink", sink_uri)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "--yes" in result.stderr
    assert physical_name("alice", "kb") in names(sink_uri)


def test_drop_asks_on_a_terminal(sink_uri, monkeypatch):
    monkeypatch.setattr("embedfleet.cli.collections._interactive", lambda: True)
    declined = run("drop", "kb", "--user", "alice", "--sink", sink_uri, input="n\n")
    assert declined.exit_code != 0
    assert "5 chunks" in declined.output
    assert physical_name("alice", "kb") in names(sink_uri)
    accepted = run("drop", "kb", "--user", "alice", "--sink", sink_uri, input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert physical_name("alice", "kb") not in names(sink_uri)


def test_user_b_cannot_see_or_drop_user_as_collection(sink_uri):
    before = names(sink_uri)
    listing = json.loads(run("list", "--user", "bob", "--sink", sink_uri, "--json").stdout)
    assert "notes_2024" not in {c["name"] for c in listing["collections"]}
    info = run("info", "notes_2024", "--user", "bob", "--sink", sink_uri, "--json")
    assert info.exit_code == 1 and "no collection 'notes_2024'" in info.stderr and info.stdout == ""
    dropped = run("drop", "notes_2024", "--user", "bob", "--sink", sink_uri, "--yes")
    assert dropped.exit_code == 1 and "no collection" in dropped.stderr
    # bob's own "kb" is bob's: dropping it leaves alice's "kb" in place.
    assert run("drop", "kb", "--user", "bob", "--sink", sink_uri, "--yes").exit_code == 0
    assert names(sink_uri) == before - {physical_name("bob", "kb")}
    # Neither a physical name nor another user's name smuggled in as a collection gets through.
    smuggled = run("info", physical_name("alice", "kb"), "--user", "bob", "--sink", sink_uri)
    assert smuggled.exit_code != 0


def test_default_user_and_default_sink(tmp_path):
    data_dir = tmp_path / "data"
    seed(f"chroma://{data_dir}/chroma", "alice", "kb", 4)
    with dask.config.set({"embedfleet.user": "alice", "embedfleet.sink": None}):
        result = run("info", "kb", "--data-dir", str(data_dir), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["user"] == "alice" and info["count"] == 4 and info["sink"] == f"chroma://{data_dir}/chroma"


def test_configured_sink(sink_uri):
    with dask.config.set({"embedfleet.sink": sink_uri}):
        result = run("list", "--user", "bob", "--json")
    assert [c["name"] for c in json.loads(result.stdout)["collections"]] == ["kb"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["list", "--user", "Alice!"], 2, "invalid user id"),
        (["info", "kb", "--user", "alice", "--sink", "qdrant://h:1"], 2, "known: chroma"),
        (["info", "No Such", "--user", "alice"], 2, "invalid collection name"),
    ],
)
def test_errors_are_one_line(sink_uri, args, code, message):
    if "--sink" not in args:
        args = [*args, "--sink", sink_uri]
    result = run(*args)
    assert result.exit_code == code
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_help_has_examples():
    for command in ([], ["list"], ["info"], ["drop"]):
        result = run(*command, "--help")
        assert result.exit_code == 0
        assert "Examples:" in result.output
