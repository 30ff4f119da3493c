"""Data dir and sources on object storage, against a real S3 API (moto's server on loopback).

The pipeline finds the server the way it finds any S3: the standard AWS variables, which the
``s3`` fixture sets for this module only (and its subprocesses inherit). Every job here has
an ``s3://`` data dir and (except where said) an ``s3://`` source; the vectors land in an
embedded Chroma store on local disk, written by the driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dask.config
import pyarrow.parquet as pq
import pytest

from tests import faults_helpers as fh
from tests.fake_embedder import BACKEND, NAME
from tests.s3_server import SECRET, free_port, moto_server

CHUNKING = {"chunk_size": 48, "chunk_overlap": 8}
CHUNK_ARGS = ["--chunk-size", "48", "--chunk-overlap", "8"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server, and this process's environment pointing at it until the module ends."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with moto_server(log) as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        _forget_filesystems()  # one made before would keep the endpoint and keys it was made with
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _forget_filesystems()


def _forget_filesystems() -> None:
    import s3fs

    from embedfleet.frames import storage

    storage._filesystem.cache_clear()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_client(s3):
    """A LocalCluster started after the S3 variables are set, so its worker process has them."""
    from distributed import Client, LocalCluster

    from embedfleet.pipeline.cluster import EMBED_SLOT

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None,
                      resources={EMBED_SLOT: 1}) as cluster, Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture
def bucket(s3, request):
    """A fresh bucket per test (names are global on a server)."""
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def local(tmp_path):
    """This machine's side: the store, and embedfleet.storage.local-dir (model cache, SQLite)."""
    with dask.config.set({"embedfleet.storage.local-dir": str(tmp_path / "local"),
                          "embedfleet.models.fake": dict(fh.FAKE_MODEL), "embedfleet.backends": {NAME: BACKEND}}):
        yield tmp_path


def _put_corpus(s3, bucket: str, prefix: str, documents: int, tmp: Path) -> dict[str, bytes]:
    files = fh.make_corpus(tmp / "src", documents=documents, words=260, seed=5)
    out = {}
    for path in files:
        key = f"{prefix}{path.name}"
        s3.client().put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        out[key] = path.read_bytes()
    return out


def _index(source: str, *, data_dir: str, sink: str, client, **options):
    import embedfleet

    result = embedfleet.index(source, data_dir=data_dir, sink=sink, client=client, collection="kb", model="fake",
                              **CHUNKING, **options)
    assert result.status == "succeeded", result
    return result


def _chunk_ids(data_dir: str, job_id: str) -> dict[str, str]:
    """chunk id -> doc id of a job's chunk files, read from the bucket."""
    from embedfleet.frames.io import read_table
    from embedfleet.pipeline.jobdir import JobDir

    out = {}
    for path in JobDir(f"{data_dir}/jobs/{job_id}").chunks.glob("*.parquet"):
        table = read_table(path, columns=["chunk_id", "doc_id"])
        out.update(zip(table.column("chunk_id").to_pylist(), table.column("doc_id").to_pylist()))
    return out


def JobDirOf(data_dir: str, job_id: str) -> list:
    """The chunk files of a job."""
    from embedfleet.pipeline.jobdir import JobDir

    return list(JobDir(f"{data_dir}/jobs/{job_id}").chunks.glob("*.parquet"))


def _check_fake_vectors(stored: dict) -> None:
    import numpy as np

    from tests.conftest import FAKE_DIMENSIONS
    from tests.fake_embedder import fake_vector

    for row in stored.values():
        np.testing.assert_allclose(row["embedding"], fake_vector(row["document"], FAKE_DIMENSIONS), atol=1e-6)


def test_folder_then_unchanged_then_one_edited_object(s3, s3_client, bucket, local):
    """An s3:// folder with an s3:// data dir: everything embedded; an unchanged re-run embeds 0
    (its partition comes from the source cache); an edited object re-embeds exactly its new
    chunks and deletes its old ones."""
    objects = _put_corpus(s3, bucket, "corpus/", 4, local)
    data_dir, sink = f"s3://{bucket}/work", f"chroma://{local / 'chroma'}"
    source = f"s3://{bucket}/corpus/"

    first = _index(source, data_dir=data_dir, sink=sink, client=s3_client)
    assert first.documents == 4 and first.embedded == first.chunks > 0
    before = _chunk_ids(data_dir, first.job_id)
    stored = fh.read_chroma(sink, "local", "kb")
    assert sorted(stored) == sorted(before)
    _check_fake_vectors(stored)
    # The job's files are objects in the bucket; nothing went to a local data dir.
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix="work/")["Contents"]}
    assert f"work/jobs/{first.job_id}/committed.json" in keys
    assert any(k.startswith("work/manifests/") and k.endswith("/CURRENT") for k in keys)
    assert any(k.startswith("work/source-cache/") for k in keys)

    again = _index(source, data_dir=data_dir, sink=sink, client=s3_client)
    assert (again.embedded, again.deleted, again.skipped) == (0, 0, first.chunks)

    edited = sorted(objects)[1]
    doc_id = edited.removeprefix("corpus/")
    s3.client().put_object(Bucket=bucket, Key=edited, Body=objects[edited] + b"\n\nA new closing paragraph, edited.\n")
    third = _index(source, data_dir=data_dir, sink=sink, client=s3_client)
    after = _chunk_ids(data_dir, third.job_id)
    fresh, stale = set(after) - set(before), set(before) - set(after)
    assert fresh and {after[c] for c in fresh} == {doc_id}
    assert {before[c] for c in stale} <= {doc_id}
    assert third.embedded == len(fresh) and third.deleted == len(stale)
    stored = fh.read_chroma(sink, "local", "kb")
    assert sorted(stored) == sorted(after)
    _check_fake_vectors(stored)

    # The credentials came from the environment and went nowhere: not into a job record (the
    # local SQLite database, spec.json), nor any object the jobs wrote.
    from embedfleet import config

    records = list(config.local_dir(data_dir).rglob("jobs.db*"))
    assert records
    for path in records:
        assert SECRET.encode() not in path.read_bytes()
    for key in (o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix="work/")["Contents"]):
        assert SECRET.encode() not in s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def test_storage_secrets_are_masked_in_config_output():
    from embedfleet import config

    shown = config.redacted({"storage": {"options": {"s3": {"key": "AKIA", "secret": "shh", "endpoint-url": "http://x"}}}})
    assert shown["storage"]["options"]["s3"] == {"key": "***", "secret": "***", "endpoint-url": "http://x"}


def test_jsonl_object_by_url(s3, s3_client, bucket, local):
    """An s3:// JSONL object with a text column: one document per line; a re-run embeds 0."""
    lines = [json.dumps({"id": f"p{i}", "body": f"page {i} " + "words of the page " * (10 + i)}) for i in range(30)]
    s3.client().put_object(Bucket=bucket, Key="pages.jsonl", Body="\n".join(lines).encode())
    data_dir, sink = f"s3://{bucket}/work", f"chroma://{local / 'chroma'}"
    source = f"s3://{bucket}/pages.jsonl"
    # Small partitions: the object is read as several byte ranges (ranged GETs).
    with dask.config.set({"embedfleet.read.partition-bytes": 1024}):
        first = _index(source, data_dir=data_dir, sink=sink, client=s3_client, text_column="body", id_column="id")
        assert first.documents == 30 and first.embedded == first.chunks >= 30
        chunks = _chunk_ids(data_dir, first.job_id)
        assert len(JobDirOf(data_dir, first.job_id)) > 1
        assert set(chunks.values()) == {f"p{i}" for i in range(30)}
        stored = fh.read_chroma(sink, "local", "kb")
        assert sorted(chunks) == sorted(stored)
        _check_fake_vectors(stored)
        again = _index(source, data_dir=data_dir, sink=sink, client=s3_client, text_column="body", id_column="id")
        assert again.embedded == 0 and again.chunks == first.chunks


def test_unchanged_partition_is_not_read_again(s3, bucket, local, monkeypatch):
    """The source cache: a partition of objects with the same sizes and ETags is taken from
    ``<data-dir>/source-cache`` without reading the source (reading it here would fail)."""
    from embedfleet.config import chunk_spec
    from embedfleet.datasets import plan_partitions, readers, source_spec
    from embedfleet.tasks import stages

    _put_corpus(s3, bucket, "c/", 2, local)
    spec = source_spec(f"s3://{bucket}/c/")
    [part] = plan_partitions(spec)
    assert all(len(entry) == 3 and entry[2] for entry in part.files)  # each object's ETag is planned
    options = {"chunk": chunk_spec(unit="tokens", size=48, overlap=8), "model_path": fh.FAKE_MODEL["path"],
                   "max_tokens": 254, "on_error": "skip"}
    first = stages.read_chunk_stage(spec, part, out_path=f"s3://{bucket}/d/jobs/a/chunks/part-00000.parquet",
                                    **options)

    def no_reading(*_args, **_kwargs):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(readers, "read_partition", no_reading)
    second = stages.read_chunk_stage(spec, part, out_path=f"s3://{bucket}/d/jobs/b/chunks/part-00000.parquet",
                                     **options)
    assert second == first
    from embedfleet.frames.io import read_table

    assert read_table(f"s3://{bucket}/d/jobs/b/chunks/part-00000.parquet").equals(
        read_table(f"s3://{bucket}/d/jobs/a/chunks/part-00000.parquet"))
    # An edited object has a new ETag: a new key, so it is read.
    s3.client().put_object(Bucket=bucket, Key="c/" + part.files[0][0], Body=b"rewritten text of the first document")
    [edited] = plan_partitions(spec)
    with pytest.raises(AssertionError, match="read again"):
        stages.read_chunk_stage(spec, edited, out_path=f"s3://{bucket}/d/jobs/c/chunks/part-00000.parquet", **options)


def test_sqlite_on_object_storage_is_refused(s3, bucket, local):
    from embedfleet import config
    from embedfleet.errors import ConfigError
    from embedfleet.schedulers.service import JobService

    with pytest.raises(ConfigError, match="SQLite file on object storage.*PostgreSQL"):
        JobService(f"sqlite:///s3://{bucket}/jobs.db", data_dir=f"s3://{bucket}/work")
    # Unset, the job database of an object-store data dir is a local file of this machine.
    with JobService(data_dir=f"s3://{bucket}/work") as service:
        assert str(config.local_dir(f"s3://{bucket}/work")) in service.url


def test_a_worker_that_cannot_see_the_data_dir_is_named(s3, s3_client, tmp_path):
    from embedfleet.errors import JobError
    from embedfleet.pipeline import visibility

    assert visibility.probe(str(tmp_path / "d/jobs/j/visible.json"), "t", None) == f"data dir {tmp_path / 'd'}"
    visibility.check_workers_see(s3_client, token_path=tmp_path / "visible.json", source=str(tmp_path))

    # A worker that looks for the token elsewhere: what a node-local data dir looks like from
    # another machine (the same path, another disk).
    token = tmp_path / "d" / "jobs" / "j" / "visible.json"
    token.parent.mkdir(parents=True)
    original = visibility.probe
    try:
        visibility.probe = lambda path, tok, source: original(path + ".elsewhere", tok, source)
        with pytest.raises(JobError) as caught:
            visibility.check_workers_see(s3_client, token_path=token, source=None)
    finally:
        visibility.probe = original
    [worker] = s3_client.scheduler_info()["workers"]
    assert str(caught.value) == (f"worker {worker} cannot see data dir {tmp_path / 'd'}: use shared storage or an "
                                 "object-store data dir (s3://...)")


# --------------------------------------------------------------------------- processes


def _env(s3, config_dir: Path, local_dir: Path, **extra: str) -> dict[str, str]:
    return fh.cli_env(config_dir, **s3.env(), DASK_EMBEDFLEET__STORAGE__LOCAL_DIR=str(local_dir), **extra)


def _objects(bucket: str, prefix: str) -> list[str]:
    from embedfleet.frames.storage import filesystem

    fs = filesystem("s3://")
    fs.invalidate_cache()
    try:
        return sorted(fs.find(f"{bucket}/{prefix}"))
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_sigkill_mid_embedding_then_resume(s3, s3_client, bucket, local, tmp_path):
    """SIGKILL `embedfleet index` (the CLI and its LocalCluster) mid-embedding with an s3://
    data dir; `jobs resume` + `jobs run --once` finish it with the clean run's ids and vectors."""
    _put_corpus(s3, bucket, "corpus/", 6, local)
    source = f"s3://{bucket}/corpus/"
    reference = _index(source, data_dir=f"s3://{bucket}/clean", sink=f"chroma://{tmp_path / 'clean'}",
                       client=s3_client)
    expected = fh.read_chroma(f"chroma://{tmp_path / 'clean'}", "local", "kb")
    assert len(expected) == reference.chunks

    config_dir = fh.write_dask_config(tmp_path / "dask-config")
    data_dir, sink = f"s3://{bucket}/work", f"chroma://{tmp_path / 'store'}"
    env = _env(s3, config_dir, tmp_path / "local-cli", DASK_EMBEDFLEET__EMBED__CHUNKS_PER_PARTITION="4")
    slow = {**env, fh.DELAY_ENV: "0.05", "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(fh.HERE)])}
    process = fh.start_cli("index", source, "--collection", "kb", "--model", "fake", "--data-dir", data_dir,
                           "--sink", sink, "--json", *CHUNK_ARGS, env=slow, cwd=tmp_path, log=tmp_path / "index.log")
    try:
        fh.wait_for(lambda: [k for k in _objects(bucket, "work/jobs/") if "/embeddings/" in k and k.endswith(".json")],
                    timeout=240, interval=0.05, what="a finished embedding partition", process=process)
        fh.kill_group(process)
    finally:
        fh.stop_group(process)
    keys = _objects(bucket, "work/jobs/")
    [job_id] = {k.split("/")[3] for k in keys}
    finished = [k for k in keys if "/embeddings/" in k and k.endswith(".parquet.json")]
    assert f"{bucket}/work/jobs/{job_id}/committed.json" not in keys
    # Every completion marker names a whole object: it was written after its data.
    from embedfleet.frames.io import parquet_rows, read_json

    for marker in finished:
        assert parquet_rows("s3://" + marker[: -len(".json")]) == read_json("s3://" + marker)["rows"]

    def cli(*args: str) -> dict:
        done = subprocess.run(fh.cli_command(*args, "--data-dir", data_dir, "--json"), env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
        assert done.returncode == 0, done.stderr
        return fh.last_json(done.stdout)

    assert cli("jobs", "resume", job_id, "--user", "local")["status"] == "queued"
    [job] = cli("jobs", "run", "--once")
    assert job["id"] == job_id and job["status"] == "succeeded", job
    assert 0 < job["embedded"] < reference.chunks  # only what the killed run had not finished
    stored = fh.read_chroma(sink, "local", "kb")
    fh.assert_same_collection(stored, expected)


def _start(command: list[str], *, env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """A ``dask`` command of this venv in its own process group, output to ``log``."""
    import sys

    command = [str(Path(sys.executable).parent / command[0]), *command[1:]]
    with open(log, "ab") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.slow
def test_real_cluster_with_private_worker_dirs(s3, bucket, local, tmp_path):
    """`dask scheduler` and two `dask worker` processes, each with its own local directory and
    working directory, no shared folder: an s3:// data dir and source make the job work, and
    the vectors read back from the store."""
    _put_corpus(s3, bucket, "corpus/", 4, local)
    config_dir = fh.write_dask_config(tmp_path / "dask-config")
    env = _env(s3, config_dir, tmp_path / "driver-local")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    try:
        procs.append(_start(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                             "--dashboard-address", ":0"], env=env, cwd=tmp_path, log=tmp_path / "sched.log"))
        for n in (1, 2):
            home = tmp_path / f"worker{n}"
            home.mkdir()
            procs.append(_start(
                ["dask", "worker", address, "--nthreads", "1", "--nworkers", "1", "--local-directory", str(home / "tmp"),
                 "--name", f"w{n}", "--no-dashboard", "--resources", "embed-slot=1"],
                env={**env, "DASK_EMBEDFLEET__STORAGE__LOCAL_DIR": str(home / "local")}, cwd=home,
                log=tmp_path / f"worker{n}.log"))
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
        sink = f"chroma://{tmp_path / 'store'}"
        done = subprocess.run(
            fh.cli_command("index", f"s3://{bucket}/corpus/", "--collection", "kb", "--model", "fake", "--data-dir",
                           f"s3://{bucket}/work", "--sink", sink, "--scheduler", address, "--json", *CHUNK_ARGS),
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        result = fh.last_json(done.stdout)
        assert result["status"] == "succeeded" and result["embedded"] == result["chunks"] > 0
        stored = fh.read_chroma(sink, "local", "kb")
        assert len(stored) == result["chunks"]
        _check_fake_vectors(stored)
        # Nothing of the job was written to the workers' or the driver's disks.
        for n in (1, 2):
            assert not list((tmp_path / f"worker{n}").rglob("*.parquet"))
        assert not (tmp_path / "embedfleet-data").exists()
    finally:
        for p in reversed(procs):
            fh.stop_group(p)


def test_plan_of_an_s3_parquet_object(s3, bucket, local, tmp_path):
    """A Parquet object by URL is planned from its footer (its row groups) and read by rows."""
    import pyarrow as pa

    from embedfleet.datasets import plan_partitions, read_partition, source_spec

    table = pa.table({"text": [f"row {i} text" for i in range(50)], "lang": ["en"] * 50})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=10)
    s3.client().put_object(Bucket=bucket, Key="t/t.parquet", Body=path.read_bytes())
    spec = source_spec(f"s3://{bucket}/t/t.parquet")
    assert spec.kind == "parquet"
    plan = plan_partitions(spec)
    rows = [r for part in plan for r in read_partition(spec, part).column("text").to_pylist()]
    assert rows == table.column("text").to_pylist()
    folder = source_spec(f"s3://{bucket}/t/")
    assert folder.kind == "parquet" and folder.location.endswith("/t/")


def test_csv_object_by_url(s3, bucket, local):
    """A CSV object by URL: its records, typed metadata columns, and line-numbered errors."""
    from embedfleet.datasets import plan_partitions, read_partition, source_spec

    body = "id,text,stars\na,first text,3\nb,second text,5\nc,broken\nd,fourth text,1\n"
    s3.client().put_object(Bucket=bucket, Key="t/rows.csv", Body=body.encode())
    spec = source_spec(f"s3://{bucket}/t/rows.csv", id_column="id")
    assert spec.kind == "csv"
    [part] = plan_partitions(spec)
    assert part.version  # the object's ETag
    table = read_partition(spec, part)
    assert table.column("doc_id").to_pylist() == ["a", "b", "rows.csv:3", "d"]
    assert table.column("error").to_pylist()[2].startswith("malformed CSV row at line 4")
    assert json.loads(table.column("metadata").to_pylist()[1])["stars"] == 5


def test_a_rewritten_object_of_the_same_size_changes_the_plan(s3, bucket, tmp_path):
    """The plan's repr is the fingerprint a resumed job checks: an object rewritten with the
    same size has a new ETag, so a resume across the rewrite is refused; local plans read as before."""
    from embedfleet.datasets import plan_partitions, source_spec

    s3.client().put_object(Bucket=bucket, Key="p.jsonl", Body=b'{"text": "aaaa"}\n')
    spec = source_spec(f"s3://{bucket}/p.jsonl")
    before = repr(plan_partitions(spec))
    s3.client().put_object(Bucket=bucket, Key="p.jsonl", Body=b'{"text": "bbbb"}\n')
    after = repr(plan_partitions(spec))
    assert before != after and "version=" in after
    (tmp_path / "p.jsonl").write_bytes(b'{"text": "aaaa"}\n')
    assert repr(plan_partitions(source_spec(str(tmp_path / "p.jsonl")))) == "[ByteRange(path='p.jsonl', start=0, length=17)]"


def _private_mounts_work(tmp: Path) -> bool:
    """Whether this machine lets a process mount a tmpfs in its own mount namespace (root)."""
    import shutil

    if shutil.which("unshare") is None:
        return False
    probe = tmp / "mount-probe"
    probe.mkdir()
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs none {probe}"],
                          capture_output=True, timeout=30, check=False)
    return done.returncode == 0


@pytest.mark.slow
def test_a_node_local_data_dir_stops_the_job_in_one_line(tmp_path):
    """A worker that sees another disk at the data dir's path (its own mount namespace, with a
    tmpfs over the driver's folder: what a node-local data dir is from another machine) stops
    the job at its start with one line, not a FileNotFoundError in the middle of it."""
    if not _private_mounts_work(tmp_path):
        pytest.skip("needs unshare -m and mount (root) to give a worker its own view of a folder")
    node = tmp_path / "node"
    fh.make_corpus(node / "corpus", documents=2, words=100)
    data = node / "data"
    config_dir = fh.write_dask_config(tmp_path / "dask-config")
    env = fh.cli_env(config_dir)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = Path(sys.executable).parent / "dask"
    (tmp_path / "w").mkdir()
    procs = [_start(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
                    env=env, cwd=tmp_path, log=tmp_path / "sched.log")]
    try:
        worker_command = (f"mount -t tmpfs none {node} && exec {dask} worker {address} --nthreads 1 --no-dashboard "
                          f"--local-directory {tmp_path / 'w'} --resources embed-slot=1")
        with open(tmp_path / "worker.log", "ab") as out:
            procs.append(subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", worker_command],
                env=env, cwd=tmp_path / "w", stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True))
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(1, timeout=120)
            [worker] = c.scheduler_info()["workers"]
        done = subprocess.run(
            fh.cli_command("index", str(node / "corpus"), "--model", "fake", "--data-dir", str(data),
                           "--sink", f"chroma://{tmp_path / 'store'}", "--scheduler", address, *CHUNK_ARGS),
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
        assert done.returncode != 0
        assert done.stderr.strip().splitlines()[-1] == (
            f"Error: worker {worker} cannot see data dir {data}: use shared storage or an object-store data dir (s3://...)"
        ), done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert not list((data / "jobs").glob("*/chunks/*.parquet"))  # stopped before any task
    finally:
        for p in reversed(procs):
            fh.stop_group(p)


@pytest.mark.postgres
def test_dispatched_job_with_postgres_and_an_s3_data_dir(s3, s3_client, bucket, local):
    """The many-machine setup: jobs submitted to PostgreSQL, run by a dispatcher, data dir and
    source on S3; the job record holds the URLs and nothing of the credentials."""
    from tests.db import pg_available, pg_schema

    reason = pg_available()
    if reason:
        pytest.skip(reason)
    from embedfleet.schedulers.dispatcher import run_once
    from embedfleet.schedulers.service import JobService

    _put_corpus(s3, bucket, "corpus/", 3, local)
    data_dir, sink = f"s3://{bucket}/work", f"chroma://{local / 'chroma'}"
    with pg_schema() as schema, JobService(schema.url, data_dir=data_dir) as service:
        job = service.submit(f"s3://{bucket}/corpus/", user="ann", collection="kb", model="fake", sink=sink,
                             **CHUNKING)
        [done] = run_once(service, s3_client)
        assert done.id == job.id and done.status == "succeeded", done.error
        assert done.embedded == done.chunks > 0
        assert done.source == f"s3://{bucket}/corpus/"
        import sqlalchemy as sa

        with service.engine.connect() as conn:
            record = conn.execute(sa.text("SELECT spec FROM ef_jobs WHERE id = :id"), {"id": job.id}).scalar_one()
        assert data_dir in record and SECRET not in record
    assert len(fh.read_chroma(sink, "ann", "kb")) == done.chunks


def test_is_done_lists_a_prefix_once(s3, bucket, monkeypatch):
    """Finished partitions on S3 are found by one listing, not a request per partition, and a
    marker this process writes is seen at once."""
    from embedfleet.frames import io
    from embedfleet.frames.storage import Remote

    root = f"s3://{bucket}/jobs/j/chunks"
    for i in range(0, 40, 2):
        io.write_json_atomic({"chunks": i}, f"{root}/part-{i:05d}.parquet.json")
    calls = []
    real_glob = Remote.glob
    monkeypatch.setattr(Remote, "glob", lambda self, pattern: calls.append(str(self)) or real_glob(self, pattern))
    done = [i for i in range(40) if io.is_done(f"{root}/part-{i:05d}.parquet")]
    assert done == list(range(0, 40, 2)) and calls == [root]
    io.write_json_atomic({"chunks": 1}, f"{root}/part-00001.parquet.json")
    assert io.is_done(f"{root}/part-00001.parquet")
