"""Credentials never reach an output or a job record; the process that runs a job supplies them."""

from __future__ import annotations

import json
from pathlib import Path

import dask.config
import pytest
from click.testing import CliRunner

from embedfleet.cli import main
from embedfleet.pipeline.job import JobSpec
from embedfleet.pipeline.spec import build_job_spec
from embedfleet.schedulers.service import JobService
from embedfleet.sinks.base import SinkSpec

TOKEN = "milvus-token-5f1c0e"
PASSWORD = "milvus-password-a7d2"
HEADER = "Bearer chroma-header-93be"
DB_PASSWORD = "db-password-c41f"
SECRETS = (TOKEN, PASSWORD, HEADER, DB_PASSWORD)

OPERATOR_CONFIG = {
    "embedfleet.sinks.milvus.token": TOKEN,
    "embedfleet.sinks.milvus.password": PASSWORD,
    "embedfleet.sinks.chroma.headers": {"Authorization": HEADER},
}


def _assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} in {where}"


def _files_holding_secrets(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and any(s.encode() in p.read_bytes() for s in SECRETS)]


@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_config_show_masks_every_credential(fmt):
    url = f"postgresql+psycopg://jobs:{DB_PASSWORD}@db.internal:5432/embedfleet"
    with dask.config.set({**OPERATOR_CONFIG, "embedfleet.jobs.database-url": url}):
        result = CliRunner().invoke(main, ["config", "show", *fmt])
    assert result.exit_code == 0, result.output
    _assert_no_secret(result.output, "config show")
    assert "Authorization" in result.output  # which header is set stays visible
    assert "postgresql+psycopg://jobs:***@db.internal:5432/embedfleet" in result.output
    if fmt:
        shown = json.loads(result.output)["embedfleet"]
        assert shown["sinks"]["milvus"]["token"] == shown["sinks"]["milvus"]["password"] == "***"
        assert shown["sinks"]["milvus"]["user"] is None  # unset stays visibly unset


def test_spec_reprs_mask_credentials(tmp_path, docs_dir):
    sink = SinkSpec(uri=f"chroma://admin:{DB_PASSWORD}@chroma.internal:8000",
                    options=(("headers", (("Authorization", HEADER),)), ("ssl", True), ("token", TOKEN)))
    _assert_no_secret(repr(sink), "repr(SinkSpec)")
    assert "('ssl', True)" in repr(sink)
    with dask.config.set(OPERATOR_CONFIG):
        spec = build_job_spec(str(docs_dir), sink="milvus://milvus.internal:19530", data_dir=str(tmp_path / "data"))
    assert spec.sink.option("token") == TOKEN  # in memory, for the process that opens the store
    _assert_no_secret(repr(spec), "repr(JobSpec)")
    _assert_no_secret(str(spec), "str(JobSpec)")


def test_a_queued_job_keeps_no_credential_and_its_runner_brings_its_own(tmp_path, docs_dir):
    data_dir = tmp_path / "data"
    with dask.config.set(OPERATOR_CONFIG), JobService(data_dir=data_dir) as service:
        job = service.submit(str(docs_dir), user="alice", collection="kb", sink="milvus://milvus.internal:19530")
        status = CliRunner().invoke(main, ["jobs", "status", job.id, "--user", "alice", "--json",
                                           "--data-dir", str(data_dir)])
        listed = CliRunner().invoke(main, ["jobs", "list", "--user", "alice", "--json", "--data-dir", str(data_dir)])
        [candidate] = service.ledger.rank()
        claim = service.ledger.claim(candidate, dispatcher="test")
    assert status.exit_code == 0 and listed.exit_code == 0, status.output + listed.output
    _assert_no_secret(status.output, "jobs status --json")
    _assert_no_secret(listed.output, "jobs list --json")
    _assert_no_secret(claim.spec, "the stored spec")
    assert _files_holding_secrets(data_dir) == []  # jobs.db and its WAL included

    # Credentials come from the config of whoever runs the job, when it runs: rotated ones too.
    with dask.config.set({"embedfleet.sinks.milvus.token": "rotated-token"}):
        spec = JobSpec.from_json(claim.spec)
    assert spec.sink.option("token") == "rotated-token"
    assert spec.sink.option("password") is None
    assert spec.sink.uri == "milvus://milvus.internal:19530"
    assert JobSpec.from_json(spec.to_json()).to_json() == spec.to_json()


@pytest.mark.slow
def test_an_indexed_run_writes_no_credential_anywhere(client, data_dir, docs_dir, fake_model):
    # An embedded store ignores the headers, but they travel in the job's sink spec all the same.
    with dask.config.set(OPERATOR_CONFIG):
        result = CliRunner().invoke(main, ["index", str(docs_dir), "--scheduler", client.scheduler.address,
                                           "--model", fake_model, "--collection", "kb", "--data-dir", str(data_dir),
                                           "--json"])
        assert result.exit_code == 0, result.output
        job_id = json.loads(result.output)["job_id"]
        status = CliRunner().invoke(main, ["jobs", "status", job_id, "--json", "--data-dir", str(data_dir)])
    assert status.exit_code == 0, status.output
    _assert_no_secret(result.output + status.output, "index and jobs status output")
    spec_json = data_dir / "jobs" / job_id / "spec.json"
    assert json.loads(spec_json.read_text())["sink"]["options"]  # the record keeps the other options
    assert _files_holding_secrets(data_dir) == []  # spec.json, jobs.db, frames, the Chroma store
