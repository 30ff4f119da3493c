"""The Milvus server sink (``milvus://host:port``) against a real Milvus 2.3.5 standalone server.

What a production user of a Milvus server relies on and Milvus Lite cannot show: writes from
several worker processes at once, a collection an application can search with its own client
right after a job, a server with authorization, and a server that dies in the middle of a
job's writes and comes back on the same data. Servers come from tests/sink_servers.py: the
session's shared one, or one of a test's own where the test changes the server.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import dask.config
import numpy as np
import pyarrow.parquet as pq
import pytest

import embedfleet
from embedfleet.errors import SinkError
from embedfleet.sinks.base import CollectionInfo
from embedfleet.sinks.naming import physical_name
from embedfleet.sinks.registry import make_spec, open_sink
from tests import faults_helpers as fh
from tests.sink_servers import MilvusServer, milvus_server, start_milvus_server  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.server

CHUNK_ARGS = ["--chunk-size", "64", "--chunk-overlap", "8"]
PER_PARTITION = 8
INFO = CollectionInfo(model="fake", dimensions=fh.FAKE_MODEL["dimensions"], metric="cosine")


# -- reading back, as an application would -----------------------------------------------


def stored_rows(server: MilvusServer, name: str) -> list[tuple[str, np.ndarray]]:
    """Every (chunk_id, vector) the server holds for ``name``, through pymilvus' own client.

    Duplicates, if any, are kept: the tests count them.
    """
    client = server.client()
    try:
        iterator = client.query_iterator(name, batch_size=1000, filter="", output_fields=["chunk_id", "embedding"])
        rows = []
        while batch := iterator.next():
            rows += [(r["chunk_id"], np.asarray(r["embedding"], dtype=np.float32)) for r in batch]
        iterator.close()
        return rows
    finally:
        client.close()


def job_vectors(data_dir: Path) -> dict[str, np.ndarray]:
    """chunk_id -> vector of every embedding partition a job left on disk: what it had to store."""
    out: dict[str, np.ndarray] = {}
    for job_dir in fh.job_dirs(data_dir):
        for path in sorted((job_dir / "embeddings").glob("*.parquet")):
            table = pq.read_table(path, columns=["chunk_id", "embedding"])
            for chunk_id, vector in zip(table.column("chunk_id").to_pylist(), table.column("embedding").to_pylist()):
                out[chunk_id] = np.asarray(vector, dtype=np.float32)
    return out


def assert_holds_exactly(server: MilvusServer, name: str, expected: dict[str, np.ndarray]) -> None:
    rows = stored_rows(server, name)
    ids = [chunk_id for chunk_id, _ in rows]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicated rows"
    assert set(ids) == set(expected), f"missing {len(set(expected) - set(ids))}, extra {len(set(ids) - set(expected))}"
    for chunk_id, vector in rows:
        np.testing.assert_allclose(vector, expected[chunk_id], atol=1e-6)


def assert_an_application_can_search(server: MilvusServer, name: str, expected: dict[str, np.ndarray]) -> None:
    """A new client, which never loads anything itself, finds a stored chunk by its own vector."""
    client = server.client()
    try:
        assert client.get_load_state(name)["state"].name == "Loaded"
        chunk_id, vector = next(iter(sorted(expected.items())))
        [hits] = client.search(name, data=[vector.tolist()], limit=1, output_fields=["chunk_id"])
        assert hits[0]["entity"]["chunk_id"] == chunk_id
        assert client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"] == len(expected)
    finally:
        client.close()


# -- parallel writes, and a searchable collection after the job ----------------------------


@pytest.fixture(scope="module")
def two_workers():
    """A LocalCluster of two worker processes: writes to a server store go from both."""
    from distributed import Client, LocalCluster

    from embedfleet.pipeline.cluster import EMBED_SLOT

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      resources={EMBED_SLOT: 1}) as cluster, Client(cluster, set_as_default=False) as client:
        yield client


@pytest.mark.slow
def test_workers_write_in_parallel_and_an_application_searches_right_after(
        milvus_server, two_workers, fake_model, tmp_path):  # noqa: F811  (the fixture)
    from distributed import get_task_stream

    corpus = tmp_path / "corpus"
    fh.make_corpus(corpus, documents=24, words=400, seed=3)
    data = tmp_path / "data"
    collection = f"parallel-{uuid.uuid4().hex[:8]}"  # a MILVUS_URI server may keep older ones
    name = physical_name("local", collection)
    kwargs = {"collection": collection, "sink": milvus_server.uri, "model": fake_model, "data_dir": str(data),
              "client": two_workers, "chunk_size": 64, "chunk_overlap": 8}
    with dask.config.set({"embedfleet.embed.chunks-per-partition": PER_PARTITION}), \
            get_task_stream(two_workers) as stream:
        result = embedfleet.index(str(corpus), **kwargs)
    assert result.status == "succeeded" and result.embedded == result.chunks > 4 * PER_PARTITION
    writers = {task["worker"] for task in stream.data if str(task["key"]).startswith("write-")}
    assert len(writers) == 2, f"the writes ran on {writers}: a server store takes them from every worker"
    expected = job_vectors(data)
    assert len(expected) == result.chunks
    assert_holds_exactly(milvus_server, name, expected)
    assert_an_application_can_search(milvus_server, name, expected)

    # Someone releases the collection (to free the query node's memory); the next job's
    # upserts alone would leave it unsearchable.
    admin = milvus_server.client()
    admin.release_collection(name)
    assert admin.get_load_state(name)["state"].name == "NotLoad"
    admin.close()
    fh.make_corpus(corpus, documents=2, words=200, seed=4, prefix="added")
    with dask.config.set({"embedfleet.embed.chunks-per-partition": PER_PARTITION}):
        again = embedfleet.index(str(corpus), **kwargs)
    assert again.status == "succeeded" and 0 < again.embedded < again.chunks
    expected = job_vectors(data)
    assert_holds_exactly(milvus_server, name, expected)
    assert_an_application_can_search(milvus_server, name, expected)
    with open_sink(make_spec(milvus_server.uri)) as sink:
        sink.drop(name)


def test_db_name_writes_into_that_database_only(milvus_server):  # noqa: F811  (the fixture)
    from tests.test_sinks_contract import ids_of, make_frame

    database = f"kb_{uuid.uuid4().hex[:8]}"
    admin = milvus_server.client()
    admin.create_database(database)
    try:
        with open_sink(make_spec(milvus_server.uri, {"db-name": database})) as sink:
            collection = sink.open("in_db", info=CollectionInfo(model="fake-a", dimensions=8, metric="cosine"),
                                   create=True)
            assert collection.upsert(make_frame(ids_of(5))) == 5 and collection.count() == 5
            assert sink.list_collections() == ["in_db"]
        assert "in_db" not in admin.list_collections()
        # A client of that database (pymilvus 3's using_database() asks for DescribeDatabase,
        # which 2.3 does not have).
        in_database = milvus_server.client(db_name=database)
        assert in_database.list_collections() == ["in_db"]
        in_database.drop_collection("in_db")
        in_database.close()
    finally:
        admin.drop_database(database)
        admin.close()

    with pytest.raises(SinkError, match="not found|not exist") as missing:
        open_sink(make_spec(milvus_server.uri, {"db-name": "no_such_db"})).open("x", info=INFO, create=True)
    assert milvus_server.uri in str(missing.value)


# -- authorization ---------------------------------------------------------------------------

PASSWORD = "Sq3-embedfleet-8121"  # distinctive: the tests look for it in every output and file


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A server started with authorization on, root's password changed to PASSWORD."""
    server = start_milvus_server(tmp_path_factory.mktemp("milvus-auth"), authorization=True)
    try:
        admin = server.client()
        admin.update_password("root", server.password, PASSWORD)
        admin.close()
        server.password = PASSWORD
        yield server
    finally:
        server.stop()


def test_a_server_with_authorization_names_the_problem_never_the_password(auth_server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="embedfleet.sinks.milvus")  # where pymilvus' records go
    for name in ("MILVUS_TOKEN", "MILVUS_USER", "MILVUS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SinkError, match="requires credentials") as missing:
        open_sink(make_spec(auth_server.uri))
    assert "MILVUS_TOKEN" in str(missing.value) and "embedfleet.sinks.milvus.token" in str(missing.value)

    wrong = PASSWORD[::-1]
    for options in ({"user": "root", "password": wrong}, {"token": f"root:{wrong}"}):
        with pytest.raises(SinkError, match="refused the credentials") as refused:
            open_sink(make_spec(auth_server.uri, options))
        shown = f"{refused.value!s} {refused.value!r} {refused.value.__cause__!r}"
        assert wrong not in shown and auth_server.uri in str(refused.value)
    assert wrong not in caplog.text

    monkeypatch.setenv("MILVUS_USER", "root")
    monkeypatch.setenv("MILVUS_PASSWORD", PASSWORD)
    with open_sink(make_spec(auth_server.uri)) as sink:
        collection = sink.open("auth_env_login", info=INFO, create=True)
        assert collection.count() == 0
        sink.drop("auth_env_login")


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["env-token", "config-user-password"])
def test_a_queued_job_logs_in_without_storing_the_credentials(auth_server, tmp_path, where):
    """`jobs submit` then `jobs run --once` (two processes) against the server with authorization:
    the process that runs the job logs in with its own MILVUS_TOKEN or config, and neither
    the job database, the job's directory nor any output holds the password."""
    corpus = tmp_path / "corpus"
    fh.make_corpus(corpus, documents=6, words=200, seed=7)
    data = tmp_path / "data"
    settings = {} if where == "env-token" else {"sinks": {"milvus": {"user": "root", "password": PASSWORD}}}
    env = fh.cli_env(fh.write_dask_config(tmp_path / "dask-config", settings))
    for name in ("MILVUS_TOKEN", "MILVUS_USER", "MILVUS_PASSWORD"):
        env.pop(name, None)
    if where == "env-token":
        env["MILVUS_TOKEN"] = auth_server.token
    common = ["--data-dir", str(data), "--json"]
    outputs = []

    def cli(*args: str):
        done = fh.run_cli(*args, *common, env=env, cwd=tmp_path)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        return fh.last_json(done.stdout)

    submitted = cli("jobs", "submit", str(corpus), "--user", "local", "--collection", "secure", "--sink",
                    auth_server.uri, "--model", "fake", *CHUNK_ARGS)
    [job] = cli("jobs", "run", "--once")
    assert job["status"] == "succeeded" and job["embedded"] > 0, job
    assert cli("jobs", "status", submitted["id"], "--user", "local")["status"] == "succeeded"

    expected = job_vectors(data)
    assert len(expected) == job["embedded"]
    assert_holds_exactly(auth_server, physical_name("local", "secure"), expected)
    for output in outputs:
        assert PASSWORD not in output
    for path in _files_under(data):
        assert PASSWORD.encode() not in path.read_bytes(), f"{path} holds the password"


# -- TLS ---------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.mark.slow
def test_index_over_tls_with_secure_true(tmp_path):
    """A server in one-way TLS mode: `secure: true` indexes into it (the certificate trusted
    the way gRPC trusts one, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH); without it the job fails
    naming the sink."""
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path / "tls")
    server = start_milvus_server(tmp_path / "server", tls=(cert, key))
    try:
        corpus = tmp_path / "corpus"
        fh.make_corpus(corpus, documents=4, words=200, seed=9)
        config_dir = fh.write_dask_config(tmp_path / "dask-config")
        args = ["index", str(corpus), "--sink", server.uri, "--collection", "tls", "--model", "fake", "--json",
                *CHUNK_ARGS]
        plain = fh.run_cli(*args, "--data-dir", str(tmp_path / "plain"), cwd=tmp_path,
                           env=fh.cli_env(config_dir, DASK_EMBEDFLEET__SINKS__MILVUS__TIMEOUT="10"))
        assert plain.returncode != 0 and server.uri in plain.stderr, plain.stderr

        data = tmp_path / "data"
        done = fh.run_cli(*args, "--data-dir", str(data), cwd=tmp_path,
                          env=fh.cli_env(config_dir, DASK_EMBEDFLEET__SINKS__MILVUS__SECURE="true",
                                         GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(cert)))
        assert done.returncode == 0, done.stderr
        result = fh.last_json(done.stdout)
        assert result["status"] == "succeeded" and result["embedded"] > 0
        expected = job_vectors(data)
        assert len(expected) == result["embedded"]
        assert_holds_exactly(server, physical_name("local", "tls"), expected)
    finally:
        server.stop()


# -- a server restart in the middle of a job's writes ----------------------------------------


@pytest.mark.slow
def test_server_killed_during_writes_then_restarted_and_resumed_loses_and_duplicates_nothing(tmp_path):
    """SIGKILL the server while workers write; the job fails once its write retries are spent
    (embedding goes on to the end). The server comes back on the same data dir and port;
    `jobs resume` + `jobs run --once` write only what was not written: afterwards the server
    holds every chunk of the job exactly once, with the vectors on disk."""
    server = start_milvus_server(tmp_path / "server")
    try:
        _killed_during_writes_then_resumed(server, tmp_path)
    finally:
        server.stop()


def _killed_during_writes_then_resumed(server: MilvusServer, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    fh.make_corpus(corpus, documents=30, words=400, seed=5)
    data = tmp_path / "data"
    config_dir = fh.write_dask_config(tmp_path / "dask-config")
    env = fh.cli_env(
        config_dir, slow=0.03,
        DASK_EMBEDFLEET__EMBED__CHUNKS_PER_PARTITION=str(PER_PARTITION),
        DASK_EMBEDFLEET__WRITE__RETRIES="3",
        DASK_EMBEDFLEET__WRITE__RETRY_DELAY="50ms",
        DASK_EMBEDFLEET__WRITE__RETRY_MAX_DELAY="200ms",
    )
    process = fh.start_cli("index", str(corpus), "--sink", server.uri, "--collection", "kb", "--model", "fake",
                           "--data-dir", str(data), "--json", *CHUNK_ARGS, env=env, cwd=tmp_path,
                           log=tmp_path / "index.log")
    try:
        fh.wait_for(lambda: [p for d in fh.job_dirs(data) for p in (d / "written").glob("*.json")],
                    timeout=240, interval=0.02, what="the first partition written to the server", process=process)
        server.stop(crash=True)
        process.wait(timeout=240)
    finally:
        fh.stop_group(process)
    output = (tmp_path / "index.log").read_text()
    assert process.returncode != 0, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and server.uri in errors[0] and "after 3 attempts" in errors[0], output
    assert output.strip().splitlines() == errors, "the outage is one line: no pymilvus tracebacks, no retry warnings"

    [job_dir] = fh.job_dirs(data)
    finished, total = fh.embed_partitions(job_dir)
    assert len(finished) == total, "every embedding is on disk before the job gives up on the store"
    written = list((job_dir / "written").glob("*.json"))
    assert 0 < len(written) < total, f"{len(written)} of {total} partitions written: the kill came too late"
    expected = job_vectors(data)

    server.start()  # same data dir, same ports: the job's sink URI still names it
    common = ["--data-dir", str(data), "--json"]

    def cli(*args: str):
        done = fh.run_cli(*args, *common, env=fh.cli_env(config_dir), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return fh.last_json(done.stdout)

    status = cli("jobs", "status", job_dir.name, "--user", "local")
    assert status["status"] == "failed" and server.uri in status["error"]
    assert cli("jobs", "resume", job_dir.name, "--user", "local")["status"] == "queued"
    [job] = cli("jobs", "run", "--once")
    assert job["status"] == "succeeded" and job["embedded"] == 0, job  # the resume only writes

    name = physical_name("local", "kb")
    assert_holds_exactly(server, name, expected)
    assert_an_application_can_search(server, name, expected)


# -- the test server itself ------------------------------------------------------------------


def test_a_taken_port_fails_the_start_at_once_instead_of_moving(tmp_path):
    """milvus-server alone would probe on to the next free port, and a restarted server would
    then answer where no job's sink URI points; the fixture's ports are fixed."""
    import socket
    import time

    from tests.sink_servers import MilvusServerUnavailable, milvus_server_install

    try:
        install = milvus_server_install()
    except MilvusServerUnavailable as exc:
        pytest.skip(f"no Milvus server package: {exc}")
    server = MilvusServer(install, tmp_path / "server")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", server.port))
        taken.listen()
        started = time.monotonic()
        with pytest.raises(MilvusServerUnavailable, match="exited before answering"):
            server.start()
    assert time.monotonic() - started < 60
    assert server.process is None


def test_no_server_is_a_skip_that_says_why(monkeypatch, tmp_path):
    from tests import sink_servers

    def unavailable():
        raise sink_servers.MilvusServerUnavailable("pip install milvus==2.3.5 failed: no route to PyPI")

    monkeypatch.setattr(sink_servers, "milvus_server_install", unavailable)
    with pytest.raises(pytest.skip.Exception, match="no Milvus 2.3.5 server: pip install milvus==2.3.5 failed"):
        sink_servers.start_milvus_server(tmp_path)
