"""Prometheus metrics: scraped over HTTP from a real endpoint while jobs run through a dispatcher."""

from __future__ import annotations

import threading
import urllib.request

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from embedfleet.errors import SinkError
from embedfleet.schedulers.dispatcher import Dispatcher
from embedfleet.schedulers.metrics import DispatcherMetrics
from tests.db import FakeRunner, clock, db_url, estimator, service, wait_for  # noqa: F401


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class TokenRunner(FakeRunner):
    """A FakeRunner whose progress also counts tokens (4 per chunk), like run_job's."""

    def __call__(self, spec, *, on_progress=None, **kwargs):
        def with_tokens(p):
            p.tokens = 4 * p.embedded
            on_progress(p)

        result = super().__call__(spec, on_progress=with_tokens if on_progress else None, **kwargs)
        result.tokens = 4 * result.embedded
        return result


@pytest.fixture
def metrics(service):  # noqa: F811
    m = DispatcherMetrics(service)
    endpoint = m.serve(0)  # any free port on 127.0.0.1
    yield m, endpoint
    endpoint.stop()


def test_counters_move_with_jobs_and_are_scraped_over_http(service, metrics):  # noqa: F811
    m, endpoint = metrics
    assert endpoint.url.startswith("http://127.0.0.1:") and endpoint.url.endswith("/metrics")
    service.add_user("pat", tier="premium")
    before = scrape(endpoint.url)
    assert before[("embedfleet_database_up", ())] == 1
    assert before.get(("embedfleet_chunks_embedded_total", (("tier", "premium"),)), 0) == 0

    jobs = [service.submit("/srv", user="pat", collection="kb") for _ in range(2)]
    service.submit("/srv", user="fred", collection="kb")
    queued = scrape(endpoint.url)
    assert queued[("embedfleet_queue_depth", (("tier", "premium"),))] == 2
    assert queued[("embedfleet_queue_depth", (("tier", "free"),))] == 1
    assert queued[("embedfleet_jobs", (("status", "queued"), ("tier", "premium")))] == 2

    gate = threading.Event()
    runner = TokenRunner(chunks=30, tasks=3, gate=gate)
    dispatcher = Dispatcher(service, client="c", runner=m.instrument(runner), tick=0.02, poll_seconds=0.05, max_running=1)
    thread = threading.Thread(target=dispatcher.run, kwargs={"once": True}, daemon=True)
    thread.start()
    try:
        runner.started.wait(10)
        running = wait_for(lambda: (s := scrape(endpoint.url))[("embedfleet_jobs", (("status", "running"), ("tier", "premium")))] == 1 and s)
        assert running[("embedfleet_dispatcher_running_jobs", ())] == 1
        assert running[("embedfleet_queue_depth", (("tier", "premium"),))] == 1
    finally:
        gate.set()
        thread.join(20)
    assert {service.status(j.id, user="pat").status for j in jobs} == {"succeeded"}

    after = scrape(endpoint.url)
    premium, free = (("tier", "premium"),), (("tier", "free"),)
    assert after[("embedfleet_chunks_embedded_total", premium)] == 60
    assert after[("embedfleet_chunks_embedded_total", free)] == 30
    assert after[("embedfleet_tokens_embedded_total", premium)] == 240
    assert after[("embedfleet_jobs_started_total", premium)] == 2
    assert after[("embedfleet_jobs_finished_total", (("status", "succeeded"), ("tier", "premium")))] == 2
    assert after[("embedfleet_jobs_finished_total", (("status", "succeeded"), ("tier", "free")))] == 1
    assert after[("embedfleet_job_duration_seconds_count", (("status", "succeeded"),))] == 3
    assert after[("embedfleet_job_duration_seconds_bucket", (("le", "+Inf"), ("status", "succeeded")))] == 3
    assert after[("embedfleet_jobs", (("status", "succeeded"), ("tier", "premium")))] == 2
    assert after[("embedfleet_queue_depth", premium)] == 0
    assert after[("embedfleet_dispatcher_running_jobs", ())] == 0
    assert after[("embedfleet_usage_chunks_today", premium)] == 60  # charged, as the service recorded it


def test_sink_write_errors_and_failures_are_counted(service, metrics):  # noqa: F811
    m, endpoint = metrics
    job = service.submit("/srv", user="fred", collection="kb")
    runner = FakeRunner(error=SinkError("writing part-0 to chroma failed after 5 attempts: connection refused"))
    Dispatcher(service, client="c", runner=m.instrument(runner), tick=0.02, poll_seconds=0.05).run(once=True)
    assert service.status(job.id, user="fred").status == "failed"
    got = scrape(endpoint.url)
    assert got[("embedfleet_sink_write_errors_total", (("sink", "chroma"),))] == 1
    assert got[("embedfleet_jobs_finished_total", (("status", "failed"), ("tier", "free")))] == 1
    assert got[("embedfleet_jobs", (("status", "failed"), ("tier", "free")))] == 1


def test_a_scrape_survives_a_lost_database(service, metrics):  # noqa: F811
    m, endpoint = metrics
    service.engine.dispose()
    original = service.engine
    try:
        import sqlalchemy as sa

        service.engine = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
        got = scrape(endpoint.url)
        assert got[("embedfleet_database_up", ())] == 0
        assert ("embedfleet_chunks_embedded_total", (("tier", "free"),)) not in got  # nothing counted yet, nothing shown
    finally:
        service.engine = original


def test_jobs_run_serves_metrics_on_the_given_port(tmp_path, monkeypatch):
    """`embedfleet jobs run --metrics-port` end to end, with a gated fake runner and no cluster."""
    import contextlib
    import socket

    from embedfleet.cli import main
    from embedfleet.schedulers import dispatcher as dispatcher_module
    from tests.db import fake_spec_builder

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    from embedfleet.schedulers.service import JobService

    with JobService(url, data_dir=tmp_path / "data", spec_builder=fake_spec_builder, estimator=lambda s, c: 5) as svc:
        job = svc.submit("/srv", user="alice", collection="kb")

    gate = threading.Event()
    runner = FakeRunner(chunks=12, gate=gate)
    monkeypatch.setattr(dispatcher_module, "default_runner", runner)

    @contextlib.contextmanager
    def no_cluster(**_):
        yield "no-client"

    monkeypatch.setattr("embedfleet.cli.jobs._connect", no_cluster)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out: dict = {}
    thread = threading.Thread(
        target=lambda: out.setdefault(
            "result",
            CliRunner().invoke(main, ["jobs", "run", "--once", "--metrics-port", str(port), "--db", url,
                                      "--data-dir", str(tmp_path / "data")]),
        ),
        daemon=True,
    )
    thread.start()
    try:
        runner.started.wait(20)
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        running = wait_for(lambda: scrape(metrics_url)[("embedfleet_dispatcher_running_jobs", ())] == 1, timeout=20)
        assert running
    finally:
        gate.set()
        thread.join(30)
    result = out["result"]
    assert result.exit_code == 0, result.output
    assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics" in result.output
    with pytest.raises(OSError):  # stopped with the dispatcher
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with JobService(url, data_dir=tmp_path / "data") as svc:
        assert svc.status(job.id, user="alice").status == "succeeded"
