"""Prometheus metrics of a dispatcher: ``embedfleet jobs run --metrics-port 9108``.

Two kinds of series, all on one :class:`prometheus_client.CollectorRegistry` (not the global
one, so tests and several dispatchers in one process do not collide):

Counted by this dispatcher, as it runs jobs (through a wrapper around its runner, the seam
:class:`~embedfleet.schedulers.dispatcher.Dispatcher` already has — no dispatcher change):

=====================================================  =======================================
``embedfleet_jobs_started_total{tier}``                 job runs started
``embedfleet_jobs_finished_total{status,tier}``         job runs ended: succeeded, failed,
                                                        cancelled (also a run stopped by the
                                                        dispatcher's own shutdown), interrupted
``embedfleet_chunks_embedded_total{tier}``              chunks embedded
``embedfleet_tokens_embedded_total{tier}``              real (unpadded) tokens embedded
``embedfleet_job_duration_seconds{status}``             histogram of run wall time
``embedfleet_sink_write_errors_total{sink}``            runs failed by a sink write error
                                                        (after the write retries), by URI scheme
``embedfleet_dispatcher_running_jobs``                  runs in progress here
=====================================================  =======================================

Read from the job database at each scrape (the same for every dispatcher sharing it; use
``max()`` across instances in PromQL):

=====================================================  =======================================
``embedfleet_jobs{status,tier}``                        jobs in the database by status
``embedfleet_queue_depth{tier}``                        jobs waiting (queued or interrupted)
``embedfleet_usage_chunks_today{tier}``                 chunks charged today (UTC)
``embedfleet_database_up``                              1 if the scrape could read the database
=====================================================  =======================================

Usage::

    metrics = DispatcherMetrics(service)
    endpoint = metrics.serve(9108)                      # 127.0.0.1 unless host= says otherwise
    Dispatcher(service, client=client, runner=metrics.instrument()).run()
    endpoint.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

from embedfleet import config
from embedfleet.errors import JobCancelled, SinkError
from embedfleet.schedulers.models import STATUSES, WAITING_STATUSES

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from embedfleet.pipeline.job import JobResult, Progress

__all__ = ["DURATION_BUCKETS", "DispatcherMetrics", "MetricsEndpoint"]

log = logging.getLogger(__name__)

# Indexing runs take seconds to hours.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, float("inf"))


@dataclass
class MetricsEndpoint:
    """A running metrics HTTP server; :meth:`stop` closes it (tests bind port 0)."""

    server: WSGIServer
    thread: threading.Thread
    host: str

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class _DatabaseCollector:
    """Gauges computed from the job database at scrape time."""

    def __init__(self, service: Any):
        self.service = service

    def describe(self):
        return []  # no describe at registration: that would query the database

    def collect(self):
        up = GaugeMetricFamily("embedfleet_database_up", "1 if this scrape could read the job database")
        try:
            by_status, usage = self._query()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the database is down
            log.warning("metrics: cannot read the job database: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        known_tiers = sorted(config.get("jobs.tiers").keys())
        tiers = sorted(set(known_tiers) | {t for _, t in by_status} | set(usage))
        jobs = GaugeMetricFamily("embedfleet_jobs", "Jobs in the job database by status and owner's tier", labels=["status", "tier"])
        queue = GaugeMetricFamily("embedfleet_queue_depth", "Jobs waiting to run (queued or interrupted) by tier", labels=["tier"])
        used = GaugeMetricFamily("embedfleet_usage_chunks_today", "Chunks charged today (UTC) by tier", labels=["tier"])
        for tier in tiers:
            for status in STATUSES:
                jobs.add_metric([status, tier], by_status.get((status, tier), 0))
            queue.add_metric([tier], sum(by_status.get((s, tier), 0) for s in WAITING_STATUSES))
            used.add_metric([tier], usage.get(tier, 0))
        yield jobs
        yield queue
        yield used

    def _query(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        return self.service.reads.totals_by_tier()


class DispatcherMetrics:
    """The metrics of one dispatcher process over ``service``'s job database."""

    def __init__(self, service: Any, *, registry: CollectorRegistry | None = None):
        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.jobs_started = Counter("embedfleet_jobs_started", "Job runs started by this dispatcher", ["tier"], registry=r)
        self.jobs_finished = Counter(
            "embedfleet_jobs_finished", "Job runs ended on this dispatcher, by status", ["status", "tier"], registry=r
        )
        self.chunks_embedded = Counter("embedfleet_chunks_embedded", "Chunks embedded by this dispatcher's jobs", ["tier"], registry=r)
        self.tokens_embedded = Counter(
            "embedfleet_tokens_embedded", "Real (unpadded) tokens embedded by this dispatcher's jobs", ["tier"], registry=r
        )
        self.job_duration = Histogram(
            "embedfleet_job_duration_seconds", "Wall time of a job run", ["status"], buckets=DURATION_BUCKETS, registry=r
        )
        self.sink_write_errors = Counter(
            "embedfleet_sink_write_errors", "Job runs failed by a sink write error, by sink URI scheme", ["sink"], registry=r
        )
        self.running = Gauge("embedfleet_dispatcher_running_jobs", "Job runs in progress on this dispatcher", registry=r)
        r.register(_DatabaseCollector(service))

    # -- counting ---------------------------------------------------------------------------

    def _tier(self, user: str) -> str:
        try:
            info = self.service.get_user(user)
        except Exception:  # noqa: BLE001 - a label is not worth failing a job for
            info = None
        return info.tier if info is not None else config.get("jobs.default-tier")

    def instrument(self, runner: Callable[..., JobResult] | None = None) -> Callable[..., JobResult]:
        """A runner that counts what ``runner`` does (default: the dispatcher's default runner,
        looked up at each call) and otherwise behaves exactly like it."""

        def run(spec, *, on_progress: Callable[[Progress], None] | None = None, **kwargs) -> JobResult:
            if runner is None:
                from embedfleet.schedulers import dispatcher

                target = dispatcher.default_runner
            else:
                target = runner
            tier = self._tier(spec.user)
            seen = {"embedded": 0, "tokens": 0}
            lock = threading.Lock()

            def account(embedded: int, tokens: int) -> None:
                # Counters only go up: count what is new since the last report of this run.
                with lock:
                    d_chunks, d_tokens = embedded - seen["embedded"], tokens - seen["tokens"]
                    seen["embedded"], seen["tokens"] = max(embedded, seen["embedded"]), max(tokens, seen["tokens"])
                if d_chunks > 0:
                    self.chunks_embedded.labels(tier).inc(d_chunks)
                if d_tokens > 0:
                    self.tokens_embedded.labels(tier).inc(d_tokens)

            def progress(p: Progress) -> None:
                account(p.embedded, p.tokens)
                if on_progress is not None:
                    on_progress(p)

            self.jobs_started.labels(tier).inc()
            self.running.inc()
            started = time.perf_counter()
            status = "failed"
            try:
                result = target(spec, on_progress=progress, **kwargs)
                status = result.status
                account(result.embedded, result.tokens)
                return result
            except JobCancelled:
                status = "cancelled"
                raise
            except (KeyboardInterrupt, SystemExit):
                status = "interrupted"
                raise
            except SinkError:
                self.sink_write_errors.labels(spec.sink.uri.partition("://")[0] or "unknown").inc()
                raise
            finally:
                self.running.dec()
                self.jobs_finished.labels(status, tier).inc()
                self.job_duration.labels(status).observe(time.perf_counter() - started)

        return run

    # -- serving ----------------------------------------------------------------------------

    def serve(self, port: int, *, host: str = "127.0.0.1") -> MetricsEndpoint:
        """Serve ``/metrics`` over HTTP on ``host:port`` (port 0: any free port) in a daemon thread."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            from embedfleet.errors import ConfigError

            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        endpoint = MetricsEndpoint(server, thread, host)
        log.info("Prometheus metrics on %s", endpoint.url)
        return endpoint
