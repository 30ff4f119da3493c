"""Job service benchmarks; prints one JSON document.

* ``submit``: submissions per minute through :meth:`JobService.submit` on SQLite (a file in a
  temporary data dir) and on PostgreSQL (a temporary schema, dropped afterwards) — with the
  real ``build_job_spec`` and ``estimate_chunks`` (``end_to_end``), and with the spec built once
  and reused (``database_only``: the service's own cost, one transaction per submit).
* ``latency``: wall time of a one-document job from ``submit`` to ``succeeded`` on a warm
  dispatcher (a thread of this process) and a warm LocalCluster (model already resident).
* ``overhead``: where that time goes, per job (median over the jobs, milliseconds): the driver
  functions of each stage timed in place (submit, the dispatcher's wait and claim, each stage
  of ``run_job``, the visibility probe, the ledger's writes, the final record), the tasks each
  job sends to the scheduler and the workers' own compute time per kind of task.
* ``jobs_per_minute``: one-document append jobs (100 or 1,000 queued) of 3 or 20 users, each
  user's jobs into one collection of its own (the seeds' case), then one dispatcher
  (``--max-running 20``) on a warm cluster: jobs per minute from its start to the last end,
  each job's queued -> succeeded time, and the batches coalescing made (``--coalesce 1`` runs
  every job alone, for comparison; ``--precision bf16`` embeds at bf16).

Usage::

    python benchmarks/jobs.py                       # both, default sizes
    python benchmarks/jobs.py --submissions 3000 --latency-jobs 10
    python benchmarks/jobs.py --skip-latency --pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import dask.config

import embedfleet  # noqa: F401  (config defaults)
from embedfleet.schedulers.service import JobService

DEFAULT_PG = os.environ.get("EMBEDFLEET_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _corpus(root: Path) -> Path:
    docs = root / "docs"
    docs.mkdir(parents=True)
    for i in range(5):
        (docs / f"doc-{i}.md").write_text(f"# Document {i}\n\n" + "Some text to index. " * 50)
    return docs


class _PgSchema:
    def __init__(self, url: str):
        import sqlalchemy as sa

        self.sa = sa
        self.name = f"ef_bench_{uuid.uuid4().hex[:10]}"
        self.admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        self.url = f"{url}{'&' if '?' in url else '?'}options={quote(f'-csearch_path={self.name}')}"

    def __enter__(self):
        with self.admin.connect() as conn:
            conn.execute(self.sa.text(f'CREATE SCHEMA "{self.name}"'))
        return self

    def __exit__(self, *exc):
        with self.admin.connect() as conn:
            conn.execute(self.sa.text(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE'))
        self.admin.dispose()


def _rate(service: JobService, docs: Path, n: int, users: int, prefix: str) -> dict:
    for u in range(users):
        service.add_user(f"{prefix}-{u}", tier="enterprise")
    service.submit(str(docs), user=f"{prefix}-0", collection="kb")  # warm-up: imports, caches, connections
    times = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        service.submit(str(docs), user=f"{prefix}-{i % users}", collection="kb", priority=i % 101)
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    times.sort()
    return {
        "submissions": n,
        "per_minute": round(n / total * 60),
        "ms_mean": round(total / n * 1000, 3),
        "ms_p50": round(times[len(times) // 2] * 1000, 3),
        "ms_p95": round(times[int(len(times) * 0.95)] * 1000, 3),
    }


def bench_submit(url: str, data_dir: Path, docs: Path, n: int, users: int) -> dict:
    from embedfleet.datasets import estimate_chunks
    from embedfleet.pipeline.spec import build_job_spec

    out = {}
    with dask.config.set({"embedfleet.jobs.queue-limit": n + 10}):
        service = JobService(url, data_dir=data_dir)
        try:
            out["end_to_end"] = _rate(service, docs, n, users, "e2e")
        finally:
            service.close()

        # The same, with the JobSpec built once: what the job database itself costs.
        template = build_job_spec(str(docs), job_id="x", user="bench-0", collection="kb", data_dir=str(data_dir))
        estimate = estimate_chunks(template.source, template.chunk)

        def cached_builder(source, options, *, job_id, user, **_):
            import dataclasses

            return dataclasses.replace(template, job_id=job_id, user=user, collection=options.collection)

        service = JobService(url, data_dir=data_dir, spec_builder=cached_builder, estimator=lambda s, c: estimate)
        try:
            out["database_only"] = _rate(service, docs, n, users, "db")
        finally:
            service.close()
    return out


def bench_latency(url: str, data_dir: Path, root: Path, jobs: int, model: str | None) -> dict:
    from embedfleet.pipeline.cluster import connect
    from embedfleet.schedulers.dispatcher import Dispatcher

    service = JobService(url, data_dir=data_dir)
    service.add_user("lat", tier="unlimited")
    samples = []
    with connect(workers=1, dashboard_address=":0") as client:
        dispatcher = Dispatcher(service, client=client)
        thread = threading.Thread(target=dispatcher.run, daemon=True)
        thread.start()
        try:
            for i in range(jobs + 1):  # the first one warms the cluster (model load) and is not counted
                docs = root / f"latency-{i}"
                docs.mkdir(parents=True)
                (docs / "one.md").write_text(f"# Note {i}\n\nA single short document, number {i}, to embed.\n")
                t0 = time.perf_counter()
                job = service.submit(str(docs), user="lat", collection=f"lat-{i}", model=model)
                while True:
                    info = service.status(job.id, user="lat")
                    if info.status not in ("queued", "running"):
                        break
                    time.sleep(0.005)
                elapsed = time.perf_counter() - t0
                if info.status != "succeeded":
                    raise RuntimeError(f"latency job {job.id} ended {info.status}: {info.error}")
                if i:
                    samples.append(elapsed)
        finally:
            dispatcher.stop()
            thread.join(60)
            service.close()
    return {
        "jobs": len(samples),
        "seconds_p50": round(statistics.median(samples), 3),
        "seconds_min": round(min(samples), 3),
        "seconds_max": round(max(samples), 3),
        "model": model or dask.config.get("embedfleet.embed.model"),
    }


class _Spans:
    """Wall time spent in named driver functions, patched in place for the benchmark's duration.

    Records ``(name, start, end)``; the jobs run one at a time, so a job's spans are those that
    start between its submit and the moment its status reads succeeded.
    """

    def __init__(self):
        self.records: list[tuple[str, float, float]] = []
        self._undo: list[tuple[object, str, object]] = []
        self._lock = threading.Lock()

    def wrap(self, owner: object, attr: str, name: str) -> None:
        original = getattr(owner, attr, None) if owner is not None else None
        if original is None:  # a stage this version of the pipeline does not have
            return
        spans = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with spans._lock:
                    spans.records.append((name, t0, time.perf_counter()))

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()

    def between(self, t0: float, t1: float) -> list[tuple[str, float, float]]:
        with self._lock:
            return [r for r in self.records if t0 <= r[1] <= t1]


def _instrument(spans: _Spans) -> None:
    from embedfleet.pipeline import embedding, incremental, run, unchanged, visibility
    from embedfleet.pipeline import placement as placement_mod
    from embedfleet.schedulers import execution, ledger, service
    from embedfleet.tasks import stages

    # Nested names: "run_job" holds "run_job.*", whose "prepare" holds "prepare.*".
    spans.wrap(service.JobService, "submit", "submit")
    spans.wrap(ledger.Ledger, "rank", "dispatcher.rank")
    spans.wrap(ledger.Ledger, "claim", "dispatcher.claim")
    spans.wrap(execution.JobExecution, "run", "execution")
    spans.wrap(run, "run_job", "run_job")
    spans.wrap(unchanged, "run_unchanged", "run_job.unchanged_check")
    spans.wrap(unchanged, "fingerprint", "run_job.source_fingerprint")
    spans.wrap(unchanged, "record", "run_job.unchanged_record")
    spans.wrap(run._JobRun, "__init__", "run_job.setup")
    spans.wrap(run, "write_json_atomic", "run_job.json_writes")
    spans.wrap(run._JobRun, "_prepare", "run_job.prepare")
    spans.wrap(placement_mod.Placement, "preload", "prepare.model_preload")
    spans.wrap(run, "check_workers_see", "prepare.visibility_probe")  # before the probe was started and waited apart
    spans.wrap(run, "start_check", "prepare.visibility_start")
    spans.wrap(getattr(visibility, "Visibility", None), "verify", "visibility.verify")  # waits only on new workers, or for the source
    spans.wrap(run, "_check_plan_unchanged", "prepare.plan_write")
    spans.wrap(run, "_in_thread", "prepare.open_sink_start")
    spans.wrap(run._JobRun, "_chunk", "run_job.read_chunk")
    spans.wrap(run._JobRun, "_diff", "run_job.diff")
    spans.wrap(run._JobRun, "_embed", "run_job.embed_write")
    spans.wrap(run._JobRun, "_delete", "run_job.delete")
    spans.wrap(incremental, "commit_manifest", "run_job.manifest_commit")
    spans.wrap(embedding.Embedding, "summarise", "run_job.summarise")
    spans.wrap(stages, "forget_collections", "run_job.forget_collections")
    spans.wrap(ledger.Ledger, "reserve", "ledger.reserve")
    spans.wrap(ledger.Ledger, "heartbeat", "ledger.heartbeat")
    spans.wrap(ledger.Ledger, "poll", "ledger.poll")
    spans.wrap(ledger.Ledger, "finish", "ledger.finish")


def _task_kind(key: object) -> str:
    key = key[0] if isinstance(key, tuple) else str(key)
    for kind in ("embedfleet-probe", "chunk", "embed", "write", "delete", "diff", "manifest", "preload"):
        if kind in key:
            return kind
    return key.split("-")[0] or "other"


def bench_overhead(url: str, data_dir: Path, root: Path, jobs: int, model: str | None) -> dict:
    """Per-job breakdown of a one-document job on a warm dispatcher and cluster (see the module doc)."""
    from distributed import get_task_stream

    from embedfleet.pipeline.cluster import connect
    from embedfleet.schedulers.dispatcher import Dispatcher

    service = JobService(url, data_dir=data_dir)
    service.add_user("ovh", tier="unlimited")
    spans = _Spans()
    per_job: list[dict[str, float]] = []
    tasks: list[dict[str, int]] = []
    compute: list[dict[str, float]] = []
    with connect(workers=1, dashboard_address=":0") as client:
        submitted: list[str] = []
        original_submit = client.submit

        def counting_submit(fn, *args, **kwargs):
            submitted.append(_task_kind(kwargs.get("key") or getattr(fn, "__name__", "task")))
            return original_submit(fn, *args, **kwargs)

        client.submit = counting_submit
        dispatcher = Dispatcher(service, client=client)
        thread = threading.Thread(target=dispatcher.run, daemon=True)
        thread.start()
        _instrument(spans)
        try:
            for i in range(jobs + 1):  # the first one warms the cluster and is not counted
                docs = root / f"overhead-{i}"
                docs.mkdir(parents=True)
                (docs / "one.md").write_text(f"# Note {i}\n\nA single short document, number {i}, to embed.\n")
                submitted.clear()
                with get_task_stream(client) as stream:
                    t0 = time.perf_counter()
                    job = service.submit(str(docs), user="ovh", collection=f"ovh-{i}", model=model)
                    while (info := service.status(job.id, user="ovh")).status in ("queued", "running"):
                        time.sleep(0.002)
                    t1 = time.perf_counter()
                if info.status != "succeeded":
                    raise RuntimeError(f"overhead job {job.id} ended {info.status}: {info.error}")
                if not i:
                    continue
                times: dict[str, float] = {"total": t1 - t0}
                first: dict[str, float] = {}
                last: dict[str, float] = {}
                for name, s0, s1 in spans.between(t0, t1):
                    times[name] = times.get(name, 0.0) + (s1 - s0)
                    first.setdefault(name, s0)
                    last[name] = s1
                # The gaps between the pieces: the dispatcher noticing the job, starting its
                # thread, and this loop noticing the end.
                if "submit" in last and "dispatcher.claim" in first:
                    times["gap.submit_to_claim"] = first["dispatcher.claim"] - last["submit"]
                if "dispatcher.claim" in last and "execution" in first:
                    times["gap.claim_to_start"] = first["execution"] - last["dispatcher.claim"]
                if "execution" in last:
                    times["gap.recorded_to_seen"] = t1 - last["execution"]
                    if "run_job" in last:
                        times["execution.after_run_job"] = last["execution"] - last["run_job"]
                per_job.append(times)
                counts: dict[str, int] = {}
                for kind in submitted:
                    counts[kind] = counts.get(kind, 0) + 1
                tasks.append(counts)
                busy: dict[str, float] = {}
                for task in stream.data:
                    kind = _task_kind(task.get("key"))
                    for ss in task.get("startstops", ()):
                        if ss.get("action") == "compute":
                            busy[kind] = busy.get(kind, 0.0) + ss["stop"] - ss["start"]
                compute.append(busy)
        finally:
            spans.restore()
            client.submit = original_submit
            dispatcher.stop()
            thread.join(60)
            service.close()

    def medians(rows: list[dict[str, float]], scale: float) -> dict[str, float]:
        names = sorted({k for r in rows for k in r})
        return {k: round(statistics.median(r.get(k, 0.0) for r in rows) * scale, 1) for k in names}

    return {
        "jobs": len(per_job),
        "ms_p50": medians(per_job, 1000),
        "tasks_submitted_p50": medians(tasks, 1),  # type: ignore[arg-type]
        "worker_compute_ms_p50": medians(compute, 1000),
        "model": model or dask.config.get("embedfleet.embed.model"),
    }


def bench_jobs_per_minute(url: str, data_dir: Path, root: Path, jobs: int, users: int, max_running: int,
                          model: str | None, timeout: float = 900.0, coalesce: int | None = None,
                          precision: str | None = None) -> dict:
    """``jobs`` one-document append jobs of ``users`` users, each user's into one collection of
    its own (the seeds' case), all queued, then run by one dispatcher on a warm cluster.

    ``jobs_per_minute`` is the jobs done over the time from the dispatcher's start to the last
    end; ``latency`` is each job's submit -> succeeded, its wait in the queue included.
    ``coalesce`` sets ``embedfleet.jobs.coalesce.max-jobs`` (1: every job alone, as before
    coalescing); ``precision`` is the jobs' model precision.
    """
    from embedfleet.pipeline.cluster import connect
    from embedfleet.schedulers.dispatcher import Dispatcher

    paragraph = ("The command reads each named file and writes it, in order, to standard output; with no "
                 "file, or when the file is -, it reads standard input. Options change how lines are "
                 "numbered, how blank lines are squeezed and how non-printing characters are shown. ") * 4
    settings = {"embedfleet.jobs.queue-limit": jobs + 10}
    if coalesce is not None:
        settings["embedfleet.jobs.coalesce.max-jobs"] = coalesce
    options = {"model": model, "mode": "append", **({"precision": precision} if precision else {})}
    names = [f"tp-{u}" for u in range(users)]
    with dask.config.set(settings):
        service = JobService(url, data_dir=data_dir)
        for name in names:
            service.add_user(name, tier="enterprise")
        with connect(workers=1, dashboard_address=":0") as client:
            warm = root / "tp-warm"
            warm.mkdir(parents=True)
            (warm / "warm.md").write_text(paragraph)
            for name in names:  # every collection exists, and the model is loaded
                service.submit(str(warm), user=name, collection="media", **options)
            Dispatcher(service, client=client, max_running=max_running).run(once=True)
            ids = []
            t0 = time.perf_counter()
            for i in range(jobs):
                docs = root / f"tp-{i}"
                docs.mkdir(parents=True)
                (docs / f"item-{i}.md").write_text(f"# Item {i}\n\n{paragraph}")
                user = names[i % users]
                ids.append((service.submit(str(docs), user=user, collection="media", **options).id, user))
            submitted = time.perf_counter() - t0
            dispatcher = Dispatcher(service, client=client, max_running=max_running)
            thread = threading.Thread(target=dispatcher.run, kwargs={"once": True}, daemon=True)
            started = service.store.clock()
            thread.start()
            thread.join(timeout)
            stuck = thread.is_alive()
            if stuck:
                dispatcher.stop()
                thread.join(60)
            infos = [service.status(job_id, user=user) for job_id, user in ids]
            batches = _batch_sizes(service, [job_id for job_id, _ in ids])
        service.close()
    statuses: dict[str, int] = {}
    for info in infos:
        statuses[info.status] = statuses.get(info.status, 0) + 1
    # From the dispatcher's start: the jobs were all queued by then.
    latency = sorted((i.finished_at - started).total_seconds() for i in infos if i.finished_at)
    run_times = sorted((i.finished_at - i.started_at).total_seconds() for i in infos if i.finished_at and i.started_at)
    span = latency[-1] if latency else None
    done = statuses.get("succeeded", 0)
    return {
        "jobs": jobs,
        "users": users,
        "collections": users,
        "max_running": max_running,
        "precision": precision or "default",
        "coalesce_max_jobs": coalesce if coalesce is not None else dask.config.get("embedfleet.jobs.coalesce.max-jobs"),
        "statuses": statuses,
        "timed_out": stuck,
        "submit_seconds": round(submitted, 2),
        "seconds": round(span, 2) if span else None,
        "jobs_per_minute": round(done / span * 60, 1) if span else None,
        "queued_to_succeeded_p50": round(statistics.median(latency), 3) if latency else None,
        "queued_to_succeeded_p90": round(latency[int(0.9 * (len(latency) - 1))], 3) if latency else None,
        "run_seconds_p50": round(statistics.median(run_times), 3) if run_times else None,
        "batches": len(batches),
        "batch_size_median": statistics.median(batches) if batches else None,
        "batch_size_max": max(batches) if batches else None,
        "chunks_per_job_median": statistics.median(i.chunks for i in infos) if infos else None,
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def _batch_sizes(service: JobService, ids: list[str]) -> list[int]:
    from sqlalchemy import select

    from embedfleet.schedulers.models import Job

    with service.store.read() as session:
        rows = session.execute(select(Job.id, Job.batch).where(Job.id.in_(ids))).all()
    sizes: dict[str, int] = {}
    for job_id, batch in rows:
        sizes[batch or job_id] = sizes.get(batch or job_id, 0) + 1
    return sorted(sizes.values())


def bench_rates(root: Path, scenarios: list[tuple[int, int]], max_running: int, model: str | None,
                coalesce: list[int | None], precisions: list[str | None]) -> list[dict]:
    out = []
    for n, (jobs, users) in enumerate(scenarios):
        for c in coalesce:
            for p in precisions:
                where = root / f"rate-{n}-{c}-{p}"
                where.mkdir(parents=True)
                out.append(bench_jobs_per_minute(f"sqlite:///{where / 'rate.db'}", where / "data", where, jobs, users,
                                                 max_running, model, coalesce=c, precision=p))
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submissions", type=int, default=1000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--latency-jobs", type=int, default=5)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--overhead-jobs", type=int, default=5, help="0 skips the per-job breakdown")
    parser.add_argument("--rate", action="append", default=None, metavar="JOBSxUSERS",
                        help="a jobs-per-minute scenario, e.g. 100x3 (repeatable; default 100x3 100x20 1000x3 "
                             "1000x20); 0 skips")
    parser.add_argument("--precision", action="append", default=None,
                        help="the rate runs' model precision (repeatable, e.g. fp32 and bf16; default the configured)")
    parser.add_argument("--coalesce", type=int, action="append", default=None,
                        help="embedfleet.jobs.coalesce.max-jobs for the rate runs (repeatable; 1 = no coalescing; "
                             "default the configured value)")
    parser.add_argument("--max-running", type=int, default=20)
    parser.add_argument("--only", choices=["overhead", "rate"], action="append", default=None,
                        help="run only these parts (repeatable); submit and latency are skipped")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--model", default=None, help="model for the latency job (default embedfleet.embed.model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rates = args.rate or ["100x3", "100x20", "1000x3", "1000x20"]
    scenarios = [tuple(int(v) for v in r.split("x")) for r in rates if r != "0"]
    coalesce = args.coalesce or [None]

    result: dict = {"benchmark": "jobs", "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="embedfleet-bench-") as tmp:
        root = Path(tmp)
        docs = _corpus(root)
        if args.only:
            if "overhead" in args.only and args.overhead_jobs:
                result["overhead"] = bench_overhead(f"sqlite:///{root / 'ovh.db'}", root / "data-ovh", root / "ovh",
                                                    args.overhead_jobs, args.model)
            if "rate" in args.only and scenarios:
                result["jobs_per_minute"] = bench_rates(root, scenarios, args.max_running, args.model, coalesce, args.precision or [None])
            json.dump(result, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
            return 0
        result["submit"] = {"sqlite": bench_submit(f"sqlite:///{root / 'jobs.db'}", root / "data", docs, args.submissions, args.users)}
        if not args.skip_postgres:
            try:
                with _PgSchema(args.pg_url) as schema:
                    result["submit"]["postgresql"] = bench_submit(schema.url, root / "data", docs, args.submissions, args.users)
            except Exception as exc:  # noqa: BLE001 - report, do not fail the other numbers
                result["submit"]["postgresql"] = {"error": f"{type(exc).__name__}: {exc}"}
        if not args.skip_latency:
            try:
                from embedfleet.pipeline import run  # noqa: F401
            except ImportError as exc:
                result["latency"] = {"error": f"the pipeline is not available: {exc}"}
            else:
                result["latency"] = {
                    "sqlite": bench_latency(f"sqlite:///{root / 'latency.db'}", root / "data", root, args.latency_jobs, args.model)
                }
                if not args.skip_postgres:
                    try:
                        with _PgSchema(args.pg_url) as schema:
                            result["latency"]["postgresql"] = bench_latency(
                                schema.url, root / "data-pg", root / "pg", args.latency_jobs, args.model
                            )
                    except Exception as exc:  # noqa: BLE001
                        result["latency"]["postgresql"] = {"error": f"{type(exc).__name__}: {exc}"}
                if args.overhead_jobs:
                    result["overhead"] = bench_overhead(f"sqlite:///{root / 'ovh.db'}", root / "data-ovh",
                                                        root / "ovh", args.overhead_jobs, args.model)
                if scenarios:
                    result["jobs_per_minute"] = bench_rates(root, scenarios, args.max_running, args.model, coalesce, args.precision or [None])
    json.dump(result, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
