"""``embedfleet users|jobs|quota``: JSON output, exit codes, help examples (real spec builder)."""

from __future__ import annotations

import contextlib
import json

import pytest
from click.testing import CliRunner

from embedfleet.cli import main
from tests.db import FakeRunner, db_url  # noqa: F401


@pytest.fixture
def cli(db_url, tmp_path):  # noqa: F811
    runner = CliRunner()
    common = ["--db", db_url, "--data-dir", str(tmp_path / "data")]

    def invoke(*args, ok=True):
        # options go after the subcommand: `jobs submit SRC ... --db URL --data-dir DIR`
        result = runner.invoke(main, [*args, *common], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output + (result.stderr if result.stderr_bytes else "")
        return result

    return invoke


@pytest.fixture
def docs(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.md").write_text("# Title\n\nSome text about logs and rotation.\n")
    (root / "b.txt").write_text("Backups run nightly.\n" * 20)
    return root


def test_users_commands(cli):
    assert json.loads(cli("users", "add", "alice", "--tier", "premium", "--json").stdout)["tier"] == "premium"
    assert "Added user bob (tier free)." in cli("users", "add", "bob").stdout
    assert json.loads(cli("users", "set-tier", "alice", "enterprise", "--json").stdout)["tier"] == "enterprise"
    listed = json.loads(cli("users", "list", "--json").stdout)
    assert [(u["id"], u["tier"]) for u in listed] == [("alice", "enterprise"), ("bob", "free")]
    bad = cli("users", "set-tier", "alice", "gold", ok=False)
    assert bad.exit_code == 2 and "unknown tier 'gold'" in bad.stderr and not bad.stdout
    dup = cli("users", "add", "alice", ok=False)
    assert dup.exit_code != 0 and "already exists" in dup.stderr


def test_submit_list_status_cancel_resume(cli, docs):
    out = cli("jobs", "submit", str(docs), "--user", "alice", "--collection", "kb", "--priority", "70",
              "--chunk-size", "64", "--chunk-overlap", "8", "--chunk-unit", "words", "--json").stdout
    job = json.loads(out)  # exactly one JSON document
    assert (job["user"], job["status"], job["priority"], job["chunk_size"]) == ("alice", "queued", 70, 64)
    assert job["estimated_chunks"] >= 2
    for key in ("id", "user", "status", "stage", "priority", "effective_priority", "documents", "chunks",
                "embedded", "skipped", "created_at", "started_at", "finished_at", "error"):
        assert key in job

    status = json.loads(cli("jobs", "status", job["id"], "--user", "alice", "--json").stdout)
    assert status["id"] == job["id"] and 70 <= status["effective_priority"] < 71  # + the age bonus
    assert "status:     queued" in cli("jobs", "status", job["id"], "--user", "alice").stdout
    listed = json.loads(cli("jobs", "list", "--user", "alice", "--status", "queued", "--json").stdout)
    assert [j["id"] for j in listed] == [job["id"]]
    assert job["id"] in cli("jobs", "list", "--user", "alice").stdout

    # Another user: not found (status, exit 1) / permission denied (cancel); never listed.
    other = cli("jobs", "status", job["id"], "--user", "mallory", "--json", ok=False)
    assert other.exit_code == 1 and "no job" in other.stderr and not other.stdout
    assert json.loads(cli("jobs", "list", "--user", "mallory", "--json").stdout) == []
    denied = cli("jobs", "cancel", job["id"], "--user", "mallory", ok=False)
    assert denied.exit_code == 1 and "may not cancel" in denied.stderr

    assert json.loads(cli("jobs", "cancel", job["id"], "--user", "alice", "--json").stdout)["status"] == "cancelled"
    assert "queued again" in cli("jobs", "resume", job["id"], "--user", "alice").stdout


def test_quota_refusal_exits_non_zero_with_the_remaining_amount(cli, docs):
    big = docs / "big.txt"
    big.write_text("word " * 300_000)  # ~1.5 MB: far more than the free tier's 1,000 chunks
    result = cli("jobs", "submit", str(docs), "--user", "alice", "--collection", "kb", ok=False)
    assert result.exit_code == 1
    assert "has only 1000 of today's 1000 chunks left" in result.stderr
    quota = json.loads(cli("quota", "show", "--user", "alice", "--json").stdout)
    assert quota["tier"] == "free" and quota["remaining"] == 1000 and quota["used_today"] == 0
    for key in ("daily_limit", "concurrent_limit", "running"):
        assert key in quota
    assert "remaining:   1,000" in cli("quota", "show", "--user", "alice").stdout


def test_bad_options_are_usage_errors(cli, docs):
    assert cli("jobs", "submit", str(docs), "--user", "alice", "--priority", "101", ok=False).exit_code == 2
    bad_user = cli("jobs", "submit", str(docs), "--user", "Alice", ok=False)
    assert bad_user.exit_code == 2 and "invalid user id" in bad_user.stderr
    missing = cli("jobs", "submit", str(docs / "nope"), "--user", "alice", ok=False)
    assert missing.exit_code != 0 and "Traceback" not in missing.output


def test_jobs_run_once_dispatches(cli, docs, monkeypatch):
    import embedfleet.cli.jobs as jobs_cli
    import embedfleet.schedulers.dispatcher as dispatcher_module

    seen = {}

    @contextlib.contextmanager
    def fake_connect(**kwargs):
        seen.update(kwargs)
        yield "client"

    runner = FakeRunner(chunks=5)
    monkeypatch.setattr(jobs_cli, "_connect", fake_connect)
    monkeypatch.setattr(dispatcher_module, "default_runner", runner)
    ids = [json.loads(cli("jobs", "submit", str(docs), "--user", u, "--json").stdout)["id"] for u in ("alice", "bob")]
    result = cli("jobs", "run", "--once", "--max-running", "1", "--workers", "2", "--json")
    ran = json.loads(result.stdout)
    assert sorted(j["id"] for j in ran) == sorted(ids) and {j["status"] for j in ran} == {"succeeded"}
    assert seen == {"scheduler_address": None, "workers": 2, "gpu": None}
    assert runner.max_total_active == 1 and {c["client"] for c in runner.calls} == {"client"}


@pytest.mark.parametrize("group", ["users", "jobs", "quota"])
def test_help_has_examples(group):
    result = CliRunner().invoke(main, [group, "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output


@pytest.mark.parametrize(
    "command",
    [["jobs", "submit"], ["jobs", "run"], ["jobs", "list"], ["jobs", "status"], ["jobs", "cancel"], ["jobs", "resume"],
     ["users", "add"], ["users", "set-tier"], ["users", "list"], ["quota", "show"]],
)
def test_every_command_takes_db_and_data_dir(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0 and "--db URL" in result.output and "--data-dir" in result.output
    assert "Examples:" in result.output


def test_allowed_roots_restrict_sources(cli, docs, tmp_path):
    import dask.config

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.csv").write_text("id,text\n1,hello\n")
    with dask.config.set({"embedfleet.jobs.allowed-roots": [str(docs)]}):
        cli("jobs", "submit", str(docs), "--user", "alice")
        refused = cli("jobs", "submit", str(outside / "secret.csv"), "--user", "alice", "--text-column", "nope", ok=False)
    assert refused.exit_code == 1 and "outside the allowed roots" in refused.stderr
    assert "nope" not in refused.stderr  # refused before the file was opened
