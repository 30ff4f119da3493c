"""The jobs dashboard: a Bokeh server application (``embedfleet dashboard``).

One :class:`Sampler` thread per server reads the job database every ``interval`` seconds
(:func:`~embedfleet.dashboard.data.take_snapshot`) — never the Tornado IO loop, and once for
all open browser tabs, like the Dask dashboard's shared state. Every Bokeh document (one per
tab) has a periodic callback that copies the latest snapshot into its ColumnDataSources when
it changed. The page shows the jobs table, today's usage against each user's quota, chunks/s
over time, job counts by status and a link to the Dask dashboard of the cluster in use.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import logging
import threading
import time
from typing import Any

from embedfleet.dashboard.data import RateTracker, Snapshot, take_snapshot

__all__ = ["Sampler", "DashboardServer", "make_document"]

log = logging.getLogger(__name__)

_STATUS_COLORS = {
    "running": "#1f77b4",
    "queued": "#7f7f7f",
    "interrupted": "#ff7f0e",
    "succeeded": "#2ca02c",
    "failed": "#d62728",
    "cancelled": "#9467bd",
}


class Sampler:
    """Reads the job database every ``interval`` seconds in a daemon thread; :attr:`latest` is the newest snapshot."""

    def __init__(self, service: Any, *, interval: float = 1.0, user: str | None = None, dask_dashboard: str | None = None):
        self.service = service
        self.interval = interval
        self.user = user
        self.dask_dashboard = dask_dashboard
        self.rates = RateTracker()
        self.latest: Snapshot | None = None
        self.version = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> Snapshot | None:
        try:
            snapshot = take_snapshot(self.service, user=self.user)
        except Exception as exc:  # noqa: BLE001 - the page says so and keeps the last data
            log.warning("dashboard: cannot read the job database: %s", exc)
            self.error = f"cannot read the job database: {exc}"
            return None
        if self.dask_dashboard:
            snapshot = _with_link(snapshot, self.dask_dashboard)
        with self._lock:  # history() copies the rate history under the same lock
            snapshot = self.rates.update(snapshot, monotonic=time.monotonic())
            self.latest = snapshot
            self.version += 1
            self.error = None
        return snapshot

    def start(self) -> None:
        if self._thread is not None:
            return
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="embedfleet-dashboard-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def history(self) -> list[tuple[dt.datetime, float]]:
        with self._lock:
            return list(self.rates.history)


def _with_link(snapshot: Snapshot, link: str) -> Snapshot:
    from dataclasses import replace

    return replace(snapshot, dask_dashboard=link)


def _naive_utc(value: dt.datetime) -> dt.datetime:
    # Bokeh's datetime axis wants naive UTC.
    return value.astimezone(dt.timezone.utc).replace(tzinfo=None)


def _ago(value: dt.datetime | None, now: dt.datetime) -> str:
    if value is None:
        return "-"
    seconds = max(0, int((now - value).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _jobs_columns(snapshot: Snapshot) -> dict[str, list]:
    now = snapshot.taken_at
    rows = snapshot.jobs
    return {
        "id": [j.id for j in rows],
        "user": [j.user for j in rows],
        "tier": [j.tier for j in rows],
        "status": [j.status for j in rows],
        "color": [_STATUS_COLORS.get(j.status, "#333") for j in rows],
        "stage": [j.stage for j in rows],
        "priority": [j.priority for j in rows],
        "effective": [float("nan") if j.effective_priority is None else round(j.effective_priority, 1) for j in rows],
        "progress": [0.0 if j.progress is None else round(100 * j.progress, 1) for j in rows],
        "rate": [round(j.rate, 1) for j in rows],
        "embedded": [j.embedded for j in rows],
        "chunks": [j.chunks for j in rows],
        "collection": [j.collection for j in rows],
        "source": [j.source for j in rows],
        "when": [_ago(j.finished_at or j.started_at or j.created_at, now) for j in rows],
        "error": [j.error or "" for j in rows],
    }


def _usage_columns(snapshot: Snapshot) -> dict[str, list]:
    rows = snapshot.usage
    return {
        "user": [u.user for u in rows],
        "tier": [u.tier for u in rows],
        "used": [u.used_today for u in rows],
        "reserved": [u.reserved for u in rows],
        "limit": ["unlimited" if u.daily_limit is None else f"{u.daily_limit:,}" for u in rows],
        "remaining": ["-" if u.remaining is None else f"{u.remaining:,}" for u in rows],
        "percent": [round(100 * u.fraction_used, 1) for u in rows],
        "running": [f"{u.running}/{u.concurrent_limit}" for u in rows],
        "waiting": [u.waiting for u in rows],
        "label": [f"{u.user} ({u.tier})" for u in rows],
    }


def _header_html(snapshot: Snapshot | None, *, database: str, error: str | None) -> str:
    parts = [f"<h2 style='margin:4px 0'>embedfleet jobs</h2><div>database <code>{html.escape(database)}</code>"]
    if snapshot is not None:
        link = snapshot.dask_dashboard
        if link:
            parts.append(f" &middot; <a id='dask-dashboard' href='{html.escape(link, quote=True)}' target='_blank'>Dask dashboard</a>")
        else:
            parts.append(" &middot; Dask dashboard: not recorded yet (start a dispatcher, or pass --dask-dashboard)")
        counts = " &middot; ".join(
            f"<span style='color:{_STATUS_COLORS.get(s, '#333')}'>{n} {s}</span>" for s, n in sorted(snapshot.counts.items())
        )
        parts.append(
            f"</div><div>{counts or 'no jobs yet'} &middot; {snapshot.total_rate:,.1f} chunks/s &middot; "
            f"updated {snapshot.taken_at:%H:%M:%S}Z"
        )
    if error:
        parts.append(f"</div><div style='color:#d62728'>{html.escape(error)}")
    parts.append("</div>")
    return "".join(parts)


def make_document(doc, sampler: Sampler, *, database: str, interval_ms: int = 1000) -> None:
    """Build the dashboard into Bokeh document ``doc`` and keep it up to date from ``sampler``."""
    from bokeh.layouts import column, row
    from bokeh.models import (
        ColumnDataSource,
        DataTable,
        DatetimeTickFormatter,
        Div,
        HTMLTemplateFormatter,
        NumberFormatter,
        Range1d,
        TableColumn,
    )
    from bokeh.plotting import figure

    snapshot = sampler.latest
    header = Div(text=_header_html(snapshot, database=database, error=sampler.error), sizing_mode="stretch_width")
    jobs_source = ColumnDataSource(_jobs_columns(snapshot) if snapshot else _jobs_columns(_EMPTY))
    usage_source = ColumnDataSource(_usage_columns(snapshot) if snapshot else _usage_columns(_EMPTY))
    history = sampler.history()
    rate_source = ColumnDataSource(
        {"time": [_naive_utc(t) for t, _ in history], "rate": [r for _, r in history]}
    )

    status_fmt = HTMLTemplateFormatter(template="<span style='color:<%= color %>;font-weight:bold'><%= value %></span>")
    progress_fmt = HTMLTemplateFormatter(
        template=(
            "<div style='background:#eee;width:100%;height:14px;margin-top:3px;position:relative'>"
            "<div style='background:#4caf50;height:14px;width:<%= value %>%'></div>"
            "<span style='position:absolute;left:4px;top:-1px;font-size:11px'><%= value %>%</span></div>"
        )
    )
    jobs_table = DataTable(
        source=jobs_source,
        columns=[
            TableColumn(field="id", title="job", width=110),
            TableColumn(field="user", title="user", width=80),
            TableColumn(field="tier", title="tier", width=80),
            TableColumn(field="status", title="status", formatter=status_fmt, width=85),
            TableColumn(field="stage", title="stage", width=80),
            TableColumn(field="effective", title="eff. priority", formatter=NumberFormatter(format="0.0"), width=80),
            TableColumn(field="progress", title="progress", formatter=progress_fmt, width=120),
            TableColumn(field="rate", title="chunks/s", formatter=NumberFormatter(format="0,0.0"), width=70),
            TableColumn(field="embedded", title="embedded", formatter=NumberFormatter(format="0,0"), width=80),
            TableColumn(field="chunks", title="chunks", formatter=NumberFormatter(format="0,0"), width=70),
            TableColumn(field="collection", title="collection", width=90),
            TableColumn(field="when", title="since", width=70),
            TableColumn(field="error", title="error", width=220),
        ],
        index_position=None,
        sizing_mode="stretch_width",
        height=210,
    )
    usage_table = DataTable(
        source=usage_source,
        columns=[
            TableColumn(field="user", title="user", width=90),
            TableColumn(field="tier", title="tier", width=80),
            TableColumn(field="used", title="used today", formatter=NumberFormatter(format="0,0"), width=80),
            TableColumn(field="reserved", title="reserved", formatter=NumberFormatter(format="0,0"), width=70),
            TableColumn(field="limit", title="daily quota", width=80),
            TableColumn(field="remaining", title="left", width=70),
            TableColumn(field="running", title="running/limit", width=80),
            TableColumn(field="waiting", title="waiting", width=60),
        ],
        index_position=None,
        width=640,
        height=180,
    )
    labels = list(usage_source.data["label"]) or [" "]
    usage_plot = figure(
        title="usage today, % of daily quota",
        y_range=labels,
        x_range=Range1d(0, 100),
        height=200,
        width=420,
        toolbar_location=None,
    )
    usage_plot.hbar(y="label", right="percent", height=0.6, source=usage_source, color="#1f77b4")
    rate_plot = figure(
        title="chunks embedded per second (all jobs)",
        x_axis_type="datetime",
        height=200,
        sizing_mode="stretch_width",
        toolbar_location=None,
    )
    rate_plot.line(x="time", y="rate", source=rate_source, line_width=2)
    rate_plot.xaxis.formatter = DatetimeTickFormatter(seconds="%H:%M:%S", minsec="%H:%M:%S", minutes="%H:%M")
    rate_plot.y_range.start = 0

    doc.title = "embedfleet jobs"
    doc.add_root(
        column(
            header,
            Div(text="<h3 style='margin:8px 0 0 0'>jobs</h3>"),
            jobs_table,
            row(column(Div(text="<h3 style='margin:8px 0 0 0'>usage today vs quota</h3>"), usage_table), usage_plot),
            rate_plot,
            sizing_mode="stretch_width",
        )
    )

    state = {"version": sampler.version, "points": len(history), "labels": labels}

    def update() -> None:
        latest = sampler.latest
        if sampler.version == state["version"] or latest is None:
            if sampler.error:
                header.text = _header_html(latest, database=database, error=sampler.error)
            return
        state["version"] = sampler.version
        header.text = _header_html(latest, database=database, error=sampler.error)
        jobs_source.data = _jobs_columns(latest)
        usage = _usage_columns(latest)
        new_labels = usage["label"] or [" "]
        if new_labels != state["labels"]:
            usage_plot.y_range.factors = new_labels
            state["labels"] = new_labels
        usage_source.data = usage
        points = sampler.history()
        # history is a bounded deque: stream what is new, replace everything when it rolled over.
        fresh = len(points) - state["points"]
        if 0 < fresh <= len(points) and len(points) < sampler.rates.history.maxlen:
            rate_source.stream({"time": [_naive_utc(t) for t, _ in points[-fresh:]], "rate": [r for _, r in points[-fresh:]]})
        else:
            rate_source.data = {"time": [_naive_utc(t) for t, _ in points], "rate": [r for _, r in points]}
        state["points"] = len(points)

    doc.add_periodic_callback(update, interval_ms)


_EMPTY = Snapshot(taken_at=dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc), jobs=[], usage=[], counts={}, dask_dashboard=None)


class DashboardServer:
    """A Bokeh server for the jobs page, running its own Tornado loop in a daemon thread.

    :param service: the :class:`~embedfleet.schedulers.service.JobService` to show.
    :param host: listen address (default 127.0.0.1: the page shows every user's jobs).
    :param port: 0 picks a free port; :attr:`port` says which.
    :param dask_dashboard: a Dask dashboard URL to link to; default the one a dispatcher recorded.
    :param user: show only this user's jobs and usage.
    :param allow_websocket_origin: extra ``host:port`` origins allowed to open the page
        (behind a proxy, or with --host 0.0.0.0 under another name).
    """

    def __init__(
        self,
        service: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 8790,
        interval: float = 1.0,
        dask_dashboard: str | None = None,
        user: str | None = None,
        allow_websocket_origin: list[str] | None = None,
    ):
        self.service = service
        self.host = host
        self.requested_port = port
        self.interval = interval
        self.sampler = Sampler(service, interval=interval, user=user, dask_dashboard=dask_dashboard)
        self.extra_origins = list(allow_websocket_origin or [])
        self.port: int | None = None
        self._server = None
        self._loop = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def _make(self, doc) -> None:
        make_document(doc, self.sampler, database=self.service.url, interval_ms=int(self.interval * 1000))

    def _run(self) -> None:
        from bokeh.application import Application
        from bokeh.application.handlers.function import FunctionHandler
        from bokeh.server.server import BaseServer
        from bokeh.server.tornado import BokehTornado
        from bokeh.server.util import bind_sockets, create_hosts_allowlist
        from tornado.httpserver import HTTPServer
        from tornado.ioloop import IOLoop

        try:
            asyncio.set_event_loop(asyncio.new_event_loop())
            self._loop = IOLoop.current()
            # Bind first (port 0 = any free port), then allow exactly that port's origins.
            sockets, port = bind_sockets(self.host, self.requested_port)
            self.port = port
            wildcard = self.host in ("0.0.0.0", "::", "")
            origins = {"localhost", "127.0.0.1"} | ({"*"} if wildcard else {self.host})
            origins = {f"{o}:{port}" if o != "*" else o for o in origins} | set(self.extra_origins)
            tornado_app = BokehTornado(
                {"/": Application(FunctionHandler(self._make))},
                extra_websocket_origins=create_hosts_allowlist(sorted(origins), port),
                check_unused_sessions_milliseconds=5000,
                unused_session_lifetime_milliseconds=15000,
            )
            http_server = HTTPServer(tornado_app)
            http_server.start(1)
            http_server.add_sockets(sockets)
            self._server = BaseServer(self._loop, tornado_app, http_server)
            self._server.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.start()
        self._loop.close(all_fds=True)

    def start(self) -> "DashboardServer":
        """Start sampling and serving; returns once the port is bound."""
        from embedfleet.errors import ConfigError

        self.sampler.start()
        self._thread = threading.Thread(target=self._run, name="embedfleet-dashboard", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            self.sampler.stop()
            raise ConfigError(f"cannot serve the dashboard on {self.host}:{self.requested_port}: {self._error}") from self._error
        log.info("jobs dashboard at %s", self.url)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            server, loop = self._server, self._loop

            def shutdown():
                server.stop()
                loop.stop()

            loop.add_callback(shutdown)
        if self._thread is not None:
            self._thread.join(10)
        self.sampler.stop()

    def sessions(self) -> list:
        """The open Bokeh server sessions (for tests: their documents hold the sources)."""
        if self._server is None:
            return []
        return list(self._server.get_sessions("/"))

    def __enter__(self) -> "DashboardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
