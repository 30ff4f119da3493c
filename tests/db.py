"""Job-database fixtures and fakes for the job service tests.

Import the fixtures you use into a test module (``from tests.db import db_url, service``) —
pytest finds fixtures that are module attributes.

* ``db_url``: parametrised over a SQLite file and the real PostgreSQL on 127.0.0.1:5432
  (marked ``postgres``; skipped when the server is unreachable). Each PostgreSQL test gets its
  own schema ``ef_test_<random>`` (search_path set through the URL's connect options) and
  drops it afterwards. ``EMBEDFLEET_TEST_PG_URL`` overrides the server URL.
* ``clock``: a settable fake UTC clock; ``estimator``: a settable fake chunk estimate.
* ``service``: a JobService on ``db_url`` with the fake clock and estimator, and a spec
  builder that never reads files.
* :class:`FakeRunner`: a ``run_job`` stand-in that reports progress, calls ``before_embed``,
  honours ``cancel`` between its "tasks", records each task's rows as run_job's embedding
  partitions do (the job service charges what they hold), and records concurrency.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import pytest

PG_URL = os.environ.get("EMBEDFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

__all__ = [
    "PG_URL",
    "pg_available",
    "pg_schema",
    "db_url",
    "clock",
    "estimator",
    "service",
    "source_dir",
    "FakeClock",
    "FakeEstimator",
    "FakeRunner",
    "fake_spec_builder",
    "make_service",
    "wait_for",
]


@functools.lru_cache(maxsize=1)
def pg_available() -> str | None:
    """None if the PostgreSQL answers, else why not."""
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means skip
        return f"PostgreSQL at {PG_URL} unreachable: {type(exc).__name__}: {exc}"


class pg_schema:
    """A fresh PostgreSQL schema; ``url`` puts it first on the search path. Dropped on exit."""

    def __init__(self):
        import sqlalchemy as sa

        self.name = f"ef_test_{uuid.uuid4().hex[:12]}"
        self._sa = sa
        self._admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        sep = "&" if "?" in PG_URL else "?"
        self.url = f"{PG_URL}{sep}options={quote(f'-csearch_path={self.name}')}"

    def __enter__(self) -> "pg_schema":
        with self._admin.connect() as conn:
            conn.execute(self._sa.text(f'CREATE SCHEMA "{self.name}"'))
        return self

    def __exit__(self, *exc) -> None:
        with self._admin.connect() as conn:
            # Connections a test leaked must not keep the schema alive.
            conn.execute(self._sa.text("SET lock_timeout = '10s'"))
            conn.execute(self._sa.text(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE'))
        self._admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    reason = pg_available()
    if reason:
        pytest.skip(reason)
    with pg_schema() as schema:
        yield schema.url


class FakeClock:
    """A UTC clock that only moves when told to. Thread-safe."""

    def __init__(self, start: dt.datetime | None = None):
        self._now = start or dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.timezone.utc)
        self._lock = threading.Lock()

    def __call__(self) -> dt.datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float = 0, **kwargs) -> dt.datetime:
        with self._lock:
            self._now += dt.timedelta(seconds=seconds, **kwargs)
            return self._now

    def set(self, when: dt.datetime) -> None:
        with self._lock:
            self._now = when


class FakeEstimator:
    """``estimate_chunks`` stand-in: ``value`` chunks for any source (or ``per_source[location]``)."""

    def __init__(self, value: int = 10):
        self.value = value
        self.per_source: dict[str, int] = {}
        self.calls = 0

    def __call__(self, source, chunk) -> int:
        self.calls += 1
        return self.per_source.get(source.location, self.value)


def fake_spec_builder(source: str, options, *, job_id, user, data_dir):
    """A JobSpec built from ``options`` like build_job_spec would, from config, without touching files."""
    from embedfleet import config
    from embedfleet.datasets.source import SourceSpec
    from embedfleet.pipeline.job import JobSpec
    from embedfleet.sinks.base import SinkSpec

    if source.startswith("builtin:"):
        src = SourceSpec(kind="builtin", location=source[len("builtin:"):])
    else:
        path = Path(source).expanduser().resolve()
        kind = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix, "files")
        src = SourceSpec(kind=kind, location=str(path), text_column=options.text_column, id_column=options.id_column)
    return JobSpec(
        job_id=job_id,
        user=user,
        collection=options.collection,
        source=src,
        sink=SinkSpec(uri=options.sink or f"chroma://{data_dir}/chroma"),
        chunk=config.chunk_spec(unit=options.chunk_unit, size=options.chunk_size, overlap=options.chunk_overlap),
        embedder=config.embedder_spec(
            model=options.model,
            backend=options.backend,
            precision=options.precision,
            batch_tokens=options.batch_tokens,
            quantize=options.quantize,
        ),
        data_dir=str(data_dir),
        mode=options.mode or "sync",
        on_error=options.on_error or "skip",
        allow_mass_delete=options.allow_mass_delete,
        allow_mixed=options.allow_mixed,
    )


def make_service(url: str, data_dir, *, clock=None, estimator=None):
    from embedfleet.schedulers.service import JobService

    return JobService(
        url,
        data_dir=data_dir,
        clock=clock,
        estimator=estimator or FakeEstimator(),
        spec_builder=fake_spec_builder,
    )


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def estimator():
    return FakeEstimator()


@pytest.fixture
def source_dir(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("alpha beta gamma\n")
    return root


@pytest.fixture
def service(db_url, tmp_path, clock, estimator):
    svc = make_service(db_url, tmp_path / "data", clock=clock, estimator=estimator)
    yield svc
    svc.close()


class FakeRunner:
    """Stands in for ``embedfleet.pipeline.run.run_job``.

    A job "reads" ``documents`` documents into ``chunks`` chunks (``chunks`` may be a callable of
    the spec), of which ``skipped`` are unchanged; ``before_embed`` is called with the rest;
    they are embedded in ``tasks`` equal tasks taking ``task_seconds`` each, checking ``cancel``
    between tasks (a cancelled job returns status "cancelled", like run_job). Each task leaves
    the sidecar a real embedding partition leaves, ``<job_dir>/embeddings/*.parquet.json``
    with its ``rows``, which is what the dispatcher charges. ``gate`` (an
    Event), when given, is waited on before embedding, so a test can look at a running job.
    """

    def __init__(
        self,
        *,
        chunks: int | Callable = 10,
        skipped: int = 0,
        documents: int = 1,
        tasks: int = 2,
        task_seconds: float = 0.0,
        gate: threading.Event | None = None,
        error: BaseException | None = None,
    ):
        self.chunks = chunks
        self.skipped = skipped
        self.documents = documents
        self.tasks = tasks
        self.task_seconds = task_seconds
        self.gate = gate
        self.error = error
        self.lock = threading.Lock()
        self.calls: list[dict] = []
        self.active: dict[str, int] = {}  # user -> running now
        self.max_active: dict[str, int] = {}
        self.active_by_collection: dict[str, int] = {}
        self.max_by_collection: dict[str, int] = {}
        self.total_active = 0
        self.max_total_active = 0
        self.tasks_done: dict[str, int] = {}
        self.started = threading.Event()

    def __call__(self, spec, *, client, priority=0, on_progress=None, before_embed=None, cancel=None, stream=False):
        from embedfleet.pipeline.job import Progress

        with self.lock:
            self.calls.append({"job_id": spec.job_id, "user": spec.user, "priority": priority, "client": client})
            self.active[spec.user] = self.active.get(spec.user, 0) + 1
            self.max_active[spec.user] = max(self.max_active.get(spec.user, 0), self.active[spec.user])
            on = self.active_by_collection[spec.collection] = self.active_by_collection.get(spec.collection, 0) + 1
            self.max_by_collection[spec.collection] = max(self.max_by_collection.get(spec.collection, 0), on)
            self.total_active += 1
            self.max_total_active = max(self.max_total_active, self.total_active)
            self.tasks_done.setdefault(spec.job_id, 0)
        self.started.set()
        report = (lambda p: on_progress(p)) if on_progress else (lambda p: None)
        progress = Progress(stage="reading")
        try:
            report(progress)
            if self.error is not None:
                raise self.error
            total = self.chunks(spec) if callable(self.chunks) else self.chunks
            progress.stage = "chunking"
            progress.documents = self.documents
            progress.chunks = total
            progress.skipped = self.skipped
            report(progress)
            to_embed = max(0, total - self.skipped)
            progress.chunks_to_embed = to_embed
            if before_embed is not None:
                before_embed(to_embed)
            if self.gate is not None:
                while not self.gate.wait(0.01):
                    if cancel is not None and cancel.is_set():
                        break
            progress.stage = "embedding"
            per_task = [to_embed // self.tasks + (1 if i < to_embed % self.tasks else 0) for i in range(self.tasks)]
            embeddings = Path(spec.job_dir) / "embeddings"
            embeddings.mkdir(parents=True, exist_ok=True)
            for i, n in enumerate(per_task):
                if cancel is not None and cancel.is_set():
                    return self._result(spec, progress, "cancelled")
                if self.task_seconds:
                    time.sleep(self.task_seconds)
                (embeddings / f"e-fake-{i:05d}.parquet.json").write_text(json.dumps({"rows": n}))
                progress.embedded += n
                with self.lock:
                    self.tasks_done[spec.job_id] += 1
                report(progress)
            if cancel is not None and cancel.is_set():
                return self._result(spec, progress, "cancelled")
            progress.stage = "committing"
            report(progress)
            return self._result(spec, progress, "succeeded")
        finally:
            with self.lock:
                self.active[spec.user] -= 1
                self.active_by_collection[spec.collection] -= 1
                self.total_active -= 1

    def max_active_by_collection(self, collection: str) -> int:
        return self.max_by_collection.get(collection, 0)

    @staticmethod
    def _result(spec, progress, status):
        from embedfleet.pipeline.job import JobResult

        return JobResult(
            job_id=spec.job_id,
            status=status,
            user=spec.user,
            sink=spec.sink.uri,
            collection=spec.collection,
            documents=progress.documents,
            chunks=progress.chunks,
            embedded=progress.embedded,
            skipped=progress.skipped,
        )

    @property
    def order(self) -> list[str]:
        return [c["job_id"] for c in self.calls]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
