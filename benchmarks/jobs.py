"""Job service benchmarks; prints one JSON document.

* ``submit``: submissions per minute through :meth:`JobService.submit` on SQLite (a file in a
  temporary data dir) and on PostgreSQL (a temporary schema, dropped afterwards) — with the
  real ``build_job_spec`` and ``estimate_chunks`` (``end_to_end``), and with the spec built once
  and reused (``database_only``: the service's own cost, one transaction per submit).
* ``latency``: wall time of a one-document job from ``submit`` to ``succeeded`` on a warm
  dispatcher (a thread of this process) and a warm LocalCluster (model already resident).

Usage::

    python benchmarks/jobs.py                       # both, default sizes
    python benchmarks/jobs.py --submissions 3000 --latency-jobs 10
    python benchmarks/jobs.py --skip-latency --pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submissions", type=int, default=1000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--latency-jobs", type=int, default=5)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--model", default=None, help="model for the latency job (default embedfleet.embed.model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    result: dict = {"benchmark": "jobs", "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="embedfleet-bench-") as tmp:
        root = Path(tmp)
        docs = _corpus(root)
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
    json.dump(result, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
