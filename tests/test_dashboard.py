"""The jobs dashboard: database snapshots, the Bokeh document, the served page over Bokeh's
websocket, and headless Chromium showing a running job's row (screenshot in test-artifacts/).

Why the DevTools protocol and not ``chromium --dump-dom``: Bokeh 3 renders every widget
(the DataTable included) inside shadow roots, which ``--dump-dom`` does not serialise, and the
document arrives over a websocket that ``--virtual-time-budget`` does not wait for. So the
test starts Chromium with ``--remote-debugging-port=0`` and asks the page itself, in real
time, for its text including shadow roots (tornado's websocket client; nothing to install).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from embedfleet.dashboard.data import RateTracker, dask_dashboard_link, record_dask_dashboard, take_snapshot
from embedfleet.schedulers.dispatcher import Dispatcher
from tests.db import FakeRunner, clock, db_url, estimator, make_service, service, wait_for  # noqa: F401

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
UTC = dt.timezone.utc


# --------------------------------------------------------------------------------------------
# data


def test_snapshot_shows_jobs_usage_and_priorities(service, clock):  # noqa: F811
    service.add_user("pat", tier="premium")
    waiting = service.submit("/srv", user="fred", collection="kb", priority=40)
    gate = threading.Event()
    runner = FakeRunner(chunks=20, gate=gate)
    running = service.submit("/srv", user="pat", collection="kb", priority=50)
    service.cancel(waiting.id, user="fred")
    later = service.submit("/srv", user="fred", collection="kb", priority=40)
    clock.advance(minutes=3)
    dispatcher = Dispatcher(service, client="c", runner=runner, tick=0.02, poll_seconds=0.05, max_running=1)
    thread = threading.Thread(target=dispatcher.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: (info := service.status(running.id, user="pat")).to_embed == 20 and info.stage == "chunking")
        snap = take_snapshot(service)
        quotas = {name: service.quota(name) for name in ("fred", "pat")}  # while the running job is held
    finally:
        gate.set()
        dispatcher.stop()
        thread.join(10)

    rows = {j.id: j for j in snap.jobs}
    assert [j.status for j in snap.jobs] == ["running", "queued", "cancelled"]  # running, waiting, then the rest
    assert rows[running.id].tier == "premium" and rows[running.id].effective_priority == 106  # as dispatched: 100 + 3 min
    assert rows[running.id].progress == 0.0 and rows[running.id].stage == "chunking"
    assert rows[later.id].effective_priority == pytest.approx(46)  # 40 + 2/min * 3 min
    assert rows[later.id].progress is None
    usage = {u.user: u for u in snap.usage}
    assert (usage["pat"].reserved, usage["pat"].daily_limit, usage["pat"].running, usage["pat"].concurrent_limit) == (20, 10000, 1, 5)
    # fred's waiting job holds its estimate (10), as admission counts it: the dashboard shows
    # what `embedfleet quota` says.
    assert (usage["fred"].waiting, usage["fred"].reserved, usage["fred"].remaining) == (1, 10, 990)
    for name, quota in quotas.items():
        assert (usage[name].reserved, usage[name].remaining) == (quota.reserved, quota.remaining)
    assert snap.counts == {"running": 1, "queued": 1, "cancelled": 1}
    only_fred = take_snapshot(service, user="fred")
    assert {j.user for j in only_fred.jobs} == {"fred"} and [u.user for u in only_fred.usage] == ["fred"]


def test_rates_from_successive_snapshots(service):  # noqa: F811
    from dataclasses import replace

    job = service.submit("/srv", user="fred", collection="kb")
    snap = take_snapshot(service)
    row = replace(snap.jobs[0], status="running")
    tracker = RateTracker(window=10)
    tracker.update(replace(snap, jobs=[replace(row, embedded=0)]), monotonic=100.0)
    second = tracker.update(replace(snap, jobs=[replace(row, embedded=50)]), monotonic=102.0)
    assert second.jobs[0].id == job.id and second.jobs[0].rate == 25 and second.total_rate == 25
    third = tracker.update(replace(snap, jobs=[replace(row, embedded=10)]), monotonic=103.0)  # resumed: counts restart
    assert third.total_rate == 0 and third.jobs[0].rate == pytest.approx(10 / 3)
    assert [r for _, r in tracker.history] == [0.0, 25.0, 0.0]


def test_the_dispatcher_records_the_dask_dashboard_link(service):  # noqa: F811
    assert dask_dashboard_link(service) is None
    record_dask_dashboard(service, "http://10.0.0.5:8787/status")
    record_dask_dashboard(service, "http://10.0.0.6:8787/status")
    record_dask_dashboard(service, None)
    assert dask_dashboard_link(service) == "http://10.0.0.6:8787/status"
    assert take_snapshot(service).dask_dashboard == "http://10.0.0.6:8787/status"


# --------------------------------------------------------------------------------------------
# the Bokeh document and server


def test_document_fills_its_sources_and_follows_the_sampler(service):  # noqa: F811
    from bokeh.document import Document
    from bokeh.models import ColumnDataSource, Div

    from embedfleet.dashboard.app import Sampler, make_document

    first = service.submit("/srv", user="fred", collection="kb")
    sampler = Sampler(service, dask_dashboard="http://dask:8787/status")
    sampler.sample()
    doc = Document()
    make_document(doc, sampler, database=service.url)
    sources = list(doc.select({"type": ColumnDataSource}))
    jobs_source = next(s for s in sources if "effective" in s.data)
    assert jobs_source.data["id"] == [first.id] and jobs_source.data["status"] == ["queued"]
    header = next(d for d in doc.select({"type": Div}) if "embedfleet jobs" in d.text)
    assert "href='http://dask:8787/status'" in header.text and "1 queued" in header.text

    second = service.submit("/srv", user="fred", collection="kb", priority=90)
    sampler.sample()
    [callback] = doc.session_callbacks
    callback.callback()  # what the 1 s periodic callback does
    assert jobs_source.data["id"] == [second.id, first.id]  # waiting jobs in pick order
    assert jobs_source.data["effective"] == [90.0, 50.0]
    usage_source = next(s for s in sources if "percent" in s.data)
    assert usage_source.data["user"] == ["fred"] and usage_source.data["limit"] == ["1,000"]


@pytest.fixture
def running_job(tmp_path):
    """A real job of the service, visibly running (embedding, slowly) under a dispatcher thread."""
    svc = make_service(f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path / "data")  # the real clock
    svc.add_user("alice", tier="premium")
    job = svc.submit("/srv/docs", user="alice", collection="handbook", priority=60)
    record_dask_dashboard(svc, "http://127.0.0.1:8787/status")
    runner = FakeRunner(chunks=600, tasks=300, task_seconds=0.1)  # 30 s unless stopped
    dispatcher = Dispatcher(svc, client="c", runner=runner, tick=0.1, poll_seconds=0.1)
    thread = threading.Thread(target=dispatcher.run, daemon=True)
    thread.start()
    wait_for(lambda: svc.status(job.id, user="alice").embedded > 0, timeout=20)
    yield svc, job
    dispatcher.stop()
    thread.join(20)
    svc.close()


def test_the_served_document_carries_the_running_job(running_job):
    """Fallback check without a browser: a websocket session gets the job's row."""
    from bokeh.client import pull_session
    from bokeh.models import ColumnDataSource

    from embedfleet.dashboard.app import DashboardServer

    svc, job = running_job
    with DashboardServer(svc, port=0, interval=0.2) as server:
        html = urllib.request.urlopen(server.url, timeout=10).read().decode()
        assert "<title>embedfleet jobs</title>" in html and "/static/js/bokeh" in html  # served, not from a CDN
        with pull_session(url=server.url) as session:
            jobs = next(s for s in session.document.select({"type": ColumnDataSource}) if "effective" in s.data)
            row = jobs.data["id"].index(job.id)
            assert jobs.data["user"][row] == "alice" and jobs.data["tier"][row] == "premium"
            assert jobs.data["status"][row] == "running" and jobs.data["stage"][row] == "embedding"
            assert jobs.data["effective"][row] == 120.0 and 0 < jobs.data["progress"][row] < 100
            assert server.sessions()  # the page request and this websocket session


# --------------------------------------------------------------------------------------------
# the browser


def find_chromium() -> str | None:
    for name in (os.environ.get("EMBEDFLEET_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# The page's visible text including shadow roots, and the links, as JSON.
PAGE_JS = r"""
(() => {
  const text = [], links = [];
  const walk = (node) => {
    if (node.nodeType === Node.TEXT_NODE) { text.push(node.textContent); return; }
    if (node.nodeName === 'STYLE' || node.nodeName === 'SCRIPT') return;
    if (node.nodeName === 'A') links.push({id: node.id, href: node.href, text: node.textContent});
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.childNodes) walk(child);
  };
  walk(document.documentElement);
  return JSON.stringify({text: text.join(' ').replace(/\s+/g, ' '), links});
})()
"""


class Chromium:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    FLAGS = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--remote-debugging-port=0", "--window-size=1400,900",
    ]

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="embedfleet-chromium-")
        self.proc = subprocess.Popen(
            [binary, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        found: dict = {}

        def read_stderr():  # Chromium says where DevTools listens on stderr; keep draining it after
            for line in self.proc.stderr:
                match = re.search(r"DevTools listening on (ws://\S+)", line)
                if match and "ws" not in found:
                    found["ws"] = match.group(1)

        threading.Thread(target=read_stderr, daemon=True).start()
        wait_for(lambda: "ws" in found or self.proc.poll() is not None, timeout=30)
        if "ws" not in found:
            raise RuntimeError(f"Chromium exited with {self.proc.returncode} before DevTools listened")
        port = re.search(r":(\d+)/", found["ws"]).group(1)
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        self.page_ws = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def visit(self, url: str, *, until, screenshot: Path, timeout: float = 30.0) -> dict:
        """Open ``url``; poll the page until ``until(page)`` holds; save a PNG; return the last page."""
        return asyncio.run(self._visit(url, until, screenshot, timeout))

    async def _visit(self, url, until, screenshot, timeout):
        from tornado.websocket import websocket_connect

        conn = await websocket_connect(self.page_ws, max_message_size=64 * 1024 * 1024)
        counter = iter(range(1, 1_000_000))

        async def call(method, **params):
            mid = next(counter)
            await conn.write_message(json.dumps({"id": mid, "method": method, "params": params}))
            while True:  # events arrive in between; skip them
                message = json.loads(await conn.read_message())
                if message.get("id") == mid:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message["result"]

        try:
            await call("Page.enable")
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            page: dict = {"text": "", "links": []}
            while time.monotonic() < deadline:
                result = await call("Runtime.evaluate", expression=PAGE_JS, returnByValue=True)
                page = json.loads(result["result"].get("value") or '{"text": "", "links": []}')
                if until(page):
                    break
                await asyncio.sleep(0.25)
            await asyncio.sleep(1.5)  # a few more live updates, so the chart has a line
            shot = await call("Page.captureScreenshot", format="png")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return page
        finally:
            conn.close()


@pytest.fixture
def chromium():
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome or $EMBEDFLEET_CHROMIUM); "
                    "`apt-get install chromium` — .ci/run installs it in CI")
    return binary


@pytest.mark.slow
def test_chromium_shows_the_running_job_on_the_dashboard(chromium, running_job):  # chromium first: skip before the job starts
    from embedfleet.dashboard.app import DashboardServer

    svc, job = running_job
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    with DashboardServer(svc, port=0) as server:
        browser = Chromium(chromium)
        try:
            page = browser.visit(server.url, until=lambda p: job.id in p["text"] and "chunks/s" in p["text"], screenshot=shot)
        finally:
            browser.close()
    (ARTIFACTS / "dashboard.txt").write_text(page["text"])
    text = page["text"]
    assert job.id in text, text[:2000]
    # The job's row, in the table's column order: id, user, tier, status, stage, effective priority.
    assert re.search(rf"{job.id}\s+alice\s+premium\s+running\s+embedding\s+120\.0", text), text[:2000]
    assert re.search(r"alice\s+premium\s+\d+\s+\d+\s+10,000", text)  # usage today vs the premium quota
    assert "1 running" in text and "usage today vs quota" in text and "chunks/s" in text  # plot titles are canvas
    assert {"id": "dask-dashboard", "href": "http://127.0.0.1:8787/status", "text": "Dask dashboard"} in page["links"]
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


@pytest.mark.slow
def test_embedfleet_dashboard_command_serves_the_page(tmp_path):
    import signal
    import sys

    svc = make_service(f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path / "data")
    svc.submit("/srv", user="fred", collection="kb")
    svc.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedfleet.cli", "dashboard", "--port", "0", "--db", f"sqlite:///{tmp_path / 'jobs.db'}",
         "--data-dir", str(tmp_path / "data"), "--dask-dashboard", "http://sched:8787/status"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        # An ignored SIGINT is inherited, and Python then never installs its Ctrl-C handler;
        # a terminal's process starts with the default, so give the child that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = proc.stderr.readline()
        match = re.search(r"Jobs dashboard at (http://127\.0\.0\.1:\d+/)", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        html = urllib.request.urlopen(match.group(1), timeout=10).read().decode()
        assert "<title>embedfleet jobs</title>" in html  # the document itself: test_the_served_document_...
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(60)  # generous: on a loaded 2-core machine the shutdown joins alone take seconds
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
