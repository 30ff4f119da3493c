"""Fixtures for real vector-store servers on free loopback ports: ``chroma run`` and a Milvus
standalone server.

Import the fixtures into a test module (or into conftest.py) by name::

    from tests.sink_servers import chroma_server  # noqa: F401  (pytest fixture)

``milvus_server_uri`` gives ``(milvus://host:port, options)``. With ``MILVUS_URI``
(``http://host:port``, ``https://host:port`` or ``milvus://host:port``) it is that server;
otherwise the one this session starts: the PyPI package ``milvus`` (2.3.5), a real
standalone Milvus (embedded etcd, local storage, rocksmq) behind ``milvus-server``. That
package pins old dependencies, so it lives in a venv of its own, made once and cached under
``~/.cache/embedfleet-tests/`` (``EMBEDFLEET_TEST_CACHE`` moves it) with its binaries
unpacked there; each server's data dir links to them. Tests skip, saying why, only when the
package cannot be installed or the server does not start.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

__all__ = [
    "MilvusServer",
    "MilvusServerUnavailable",
    "chroma_server",
    "free_port",
    "milvus_server",
    "milvus_server_install",
    "milvus_server_uri",
    "start_chroma_server",
    "start_milvus_server",
    "wait_for_heartbeat",
]

STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chroma_executable() -> str:
    # The venv running the tests has the chroma CLI next to its python.
    candidate = Path(sys.executable).with_name("chroma")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("chroma")
    if not found:
        pytest.fail("the `chroma` command is not installed next to this Python")
    return found


def wait_for_heartbeat(url: str, process: subprocess.Popen, *, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chroma server exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"chroma server did not answer {url} within {timeout:.0f}s")


def start_chroma_server(path: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    # Another process may grab a port between our probe and the server's bind: retry a few times.
    last: Exception | None = None
    for _ in range(3):
        port = free_port()
        log = open(log_path, "ab")
        process = subprocess.Popen(
            [_chroma_executable(), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        try:
            wait_for_heartbeat(f"http://127.0.0.1:{port}/api/v2/heartbeat", process)
            return process, port
        except RuntimeError as exc:
            last = exc
            stop(process)
    raise RuntimeError(f"could not start a chroma server (log: {log_path}): {last}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory):
    """``chroma://127.0.0.1:<port>`` of a Chroma server run for this test session."""
    root = tmp_path_factory.mktemp("chroma-server")
    process, port = start_chroma_server(root / "db", root / "server.log")
    try:
        yield f"chroma://127.0.0.1:{port}"
    finally:
        stop(process)


# -- Milvus ------------------------------------------------------------------------------

MILVUS_SERVER_VERSION = "2.3.5"
#: 2.3.5's built-in superuser; a server started with authorization accepts it until changed.
MILVUS_ROOT = ("root", "Milvus")
# Measured on 2 shared cores: ~4-5 s to answer on a new data dir (binaries unpacked), ~11 s
# after a restart on the same one (the root coordinator recovers from etcd); 40-60 s has been
# seen on a busier machine. The limit leaves room for a loaded CI machine.
MILVUS_STARTUP_TIMEOUT = 240.0
# Every listener milvus-server has a setting for, each given a free port so that two servers
# (two sessions) never meet on the defaults. Milvus 2.3 binds these on all interfaces (it has no
# listen-address setting); the embedded etcd, configured below, listens on loopback only.
_MILVUS_PORTS = (
    "proxy-port", "etcd-port", "root-coord-port", "proxy-internal-port", "query-coord-port",
    "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port",
)


# milvus-server's own entry point with two changes. Its probe of each port binds without
# SO_REUSEADDR (Go's listeners set it), so on a restart, with the old server's sockets still in
# TIME_WAIT, it took the port for busy and silently moved to the next one: a job's sink URI
# then named a port nobody listened on. And the ports it is given become fixed ones (a taken
# port is an error, not a move).
_MILVUS_LAUNCHER = """
import json, socket, sys
import milvus

def try_bind_port(self, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None

milvus.MilvusServerConfig.try_bind_port = try_bind_port
milvus.default_server.config.configs.update(json.loads(sys.argv[1]))
sys.argv = ["milvus-server", *sys.argv[2:]]
milvus.main()
"""


class MilvusServerUnavailable(RuntimeError):
    """The Milvus server package could not be installed or the server did not start."""


def _test_cache() -> Path:
    configured = os.environ.get("EMBEDFLEET_TEST_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedfleet-tests"


def _run(args: list[str], what: str, timeout: float) -> None:
    try:
        subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise MilvusServerUnavailable(f"{what} failed: {' | '.join(tail)}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MilvusServerUnavailable(f"{what} failed: {exc}") from exc


def milvus_server_install() -> Path:
    """The cached install: ``venv/`` with ``milvus==2.3.5`` and ``bin/`` with its unpacked binaries.

    Made once per machine (a file lock keeps concurrent sessions from building it twice); a
    ``ready`` file marks a complete one, so an interrupted install is redone.
    """
    root = _test_cache() / f"milvus-server-{MILVUS_SERVER_VERSION}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        python = root / "venv" / "bin" / "python"
        if (root / "ready").exists() and _imports_milvus(python):
            return root
        shutil.rmtree(root, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(root / "venv")], "creating the Milvus server venv", 300)
        _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              f"milvus=={MILVUS_SERVER_VERSION}"], f"pip install milvus=={MILVUS_SERVER_VERSION}", 900)
        # milvus-server unpacks ~250 MB of binaries into every data dir it is given; unpacked once
        # here, each data dir links to them (its md5 files say they are current).
        _run([str(python), "-c", "import sys, milvus; milvus._initialize_data_files(sys.argv[1])", str(root)],
             "unpacking the Milvus binaries", 300)
        (root / "ready").write_text(MILVUS_SERVER_VERSION)
    return root


def _imports_milvus(python: Path) -> bool:
    # A cached venv outlives the interpreter it was made from (a Python upgrade breaks it).
    try:
        return subprocess.run([str(python), "-c", "import milvus"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _free_ports(n: int) -> list[int]:
    # All held at once, so the n ports differ.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class MilvusServer:
    """One ``milvus-server`` process group on free ports, reached over loopback, over one data dir.

    ``stop()`` then ``start()`` is a restart on the same data dir and the same ports (a job's
    sink URI names the port); ``stop(crash=True)`` kills it without a shutdown.
    """

    def __init__(self, install: Path, data_dir: Path, *, authorization: bool = False,
                 tls: tuple[Path, Path] | None = None):
        self.install = install
        self.data_dir = Path(data_dir)
        self.authorization = authorization
        #: (certificate, key) of one-way TLS (tls mode 1); the certificate names 127.0.0.1.
        self.tls = tls
        #: The superuser's password, for a test that changes it.
        self.password = MILVUS_ROOT[1]
        *ports, self.etcd_peer_port = _free_ports(len(_MILVUS_PORTS) + 1)
        self.ports = dict(zip(_MILVUS_PORTS, ports))
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self.process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self.ports["proxy-port"]

    @property
    def uri(self) -> str:
        """The embedfleet sink URI."""
        return f"milvus://127.0.0.1:{self.port}"

    @property
    def http_uri(self) -> str:
        """The address pymilvus' own clients take."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def token(self) -> str | None:
        """The superuser's ``user:password`` token when authorization is on."""
        return f"{MILVUS_ROOT[0]}:{self.password}" if self.authorization else None

    def client(self, **kwargs):
        from pymilvus import MilvusClient

        if self.token:
            kwargs.setdefault("token", self.token)
        if self.tls:
            kwargs.setdefault("server_pem_path", str(self.tls[0]))
        return MilvusClient(uri=self.http_uri, **kwargs)

    def start(self, timeout: float = MILVUS_STARTUP_TIMEOUT) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "bin").exists():
            (self.data_dir / "bin").symlink_to(self.install / "bin", target_is_directory=True)
        fixed = {flag.replace("-", "_"): port for flag, port in self.ports.items()}
        args = [str(self.install / "venv" / "bin" / "python"), "-c", _MILVUS_LAUNCHER, json.dumps(fixed),
                "--data", str(self.data_dir)]
        if self.authorization:
            args += ["--authorization-enabled", "true"]
        if self.tls:
            args += ["--tls-mode", "1", "--server-pem-path", str(self.tls[0]), "--server-key-path", str(self.tls[1])]
        # The embedded etcd's peer port is fixed at 2380 unless an etcd config file says
        # otherwise: without one, a second server on the machine dies at startup.
        etcd_config = self.data_dir / "embed-etcd.yaml"
        client_url, peer_url = f"http://127.0.0.1:{self.ports['etcd-port']}", f"http://127.0.0.1:{self.etcd_peer_port}"
        etcd_config.write_text(
            f"name: default\nlisten-client-urls: {client_url}\nadvertise-client-urls: {client_url}\n"
            f"listen-peer-urls: {peer_url}\ninitial-advertise-peer-urls: {peer_url}\n"
            f"initial-cluster: default={peer_url}\n"
        )
        env = {**os.environ, "ETCD_CONFIG_PATH": str(etcd_config)}
        with open(self.log_path, "ab") as log:
            # A group of its own: milvus-server is a Python wrapper whose `milvus run standalone`
            # child outlives it when only the wrapper is signalled.
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except MilvusServerUnavailable:
            self.stop(crash=True)
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last, seen = "no answer yet", False
        while time.monotonic() < deadline:
            self.process.poll()
            members = self._live_members()
            seen = seen or "milvus" in members
            # The wrapper does not notice its server dying (it only waits to be stopped).
            if not members or (seen and "milvus" not in members):
                raise MilvusServerUnavailable(f"the milvus process exited before answering; see "
                                              f"{self.data_dir / 'logs'} and {self.log_path}")
            try:
                client = self.client(timeout=5)
                try:
                    # list_collections goes through the root coordinator, the last to be ready.
                    client.list_collections(timeout=5)
                    return
                finally:
                    client.close()
            except Exception as exc:  # noqa: BLE001  (not up yet: refused, coordinator not ready)
                last = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            time.sleep(1)
        raise MilvusServerUnavailable(f"Milvus did not answer on {self.http_uri} within {timeout:.0f}s "
                                      f"({last}; log: {self.log_path})")

    def _live_members(self) -> list[str]:
        """Command names of the group's live processes (zombies left out: where init does not
        reap, a killed server stays in the group as one)."""
        names = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
            comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            if rest[0] != "Z" and int(rest[2]) == self.process.pid:
                names.append(comm)
        return names

    def stop(self, *, crash: bool = False, grace: float = 3.0) -> None:
        """Stop the whole group: SIGTERM then, after ``grace`` seconds, SIGKILL; or SIGKILL at once.

        2.3.5 was still shutting down 20 s after a SIGTERM here; waiting longer for a test
        server, whose data dir is temporary, only lengthens the suite.
        """
        if self.process is None:
            return
        started = time.monotonic()
        sig = signal.SIGKILL if crash else signal.SIGTERM
        while self._live_members() and time.monotonic() - started < grace + 15:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            if time.monotonic() - started >= (0 if crash else grace):
                sig = signal.SIGKILL
            time.sleep(0.2)
            self.process.poll()  # reaps the wrapper so the group can empty
        self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_milvus_server(data_dir: Path, *, authorization: bool = False,
                        tls: tuple[Path, Path] | None = None) -> MilvusServer:
    """A started :class:`MilvusServer`; skips the calling test, saying why, when there can be none.

    A port taken between our probe and the server's bind fails the start (the ports are
    fixed): the first start tries fresh ports once more.
    """
    try:
        install = milvus_server_install()
        for attempt in range(2):
            server = MilvusServer(install, Path(data_dir) / f"server-{attempt}", authorization=authorization, tls=tls)
            try:
                server.start()
                return server
            except MilvusServerUnavailable as exc:
                if attempt:
                    raise MilvusServerUnavailable(f"{exc}\n{server.log_tail()}") from exc
    except MilvusServerUnavailable as exc:
        pytest.skip(f"no Milvus {MILVUS_SERVER_VERSION} server: {exc}")
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """The Milvus 2.3.5 server this session starts once and shares (authorization off)."""
    server = start_milvus_server(tmp_path_factory.mktemp("milvus-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def milvus_server_uri(request):
    """``(milvus://host:port, options)``: the server named by ``MILVUS_URI``, else this session's.

    Credentials for a MILVUS_URI server come from MILVUS_TOKEN / MILVUS_USER /
    MILVUS_PASSWORD, which the sink reads itself.
    """
    raw = os.environ.get("MILVUS_URI")
    if not raw:
        return request.getfixturevalue("milvus_server").uri, {}
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    options = {"secure": True} if parts.scheme == "https" else {}
    return f"milvus://{parts.hostname}:{parts.port or 19530}", options
