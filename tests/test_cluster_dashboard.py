"""The Dask dashboard of a cluster embedfleet starts is on loopback unless configured otherwise."""

from __future__ import annotations

import os

import dask.config
import psutil
import pytest

from embedfleet.pipeline.cluster import connect


def _listening(pid: int) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def _pid() -> int:
    return os.getpid()


@pytest.mark.slow
@pytest.mark.parametrize(("configured", "host"), [(None, "127.0.0.1"), ("127.0.0.2:0", "127.0.0.2")])
def test_the_dashboard_listens_where_cluster_dashboard_address_says(configured, host):
    settings = {"embedfleet.cluster.dashboard-address": configured} if configured else {}
    with dask.config.set(settings), connect(workers=1, threads_per_worker=1, backend="fake") as client:
        scheduler = client.cluster.scheduler  # a LocalCluster's scheduler runs in this process
        port = scheduler.http_server.port
        # The socket itself, not the address Dask reports: ":8787" reported 127.0.0.1 and bound 0.0.0.0.
        assert {ip for ip, p in _listening(os.getpid()) if p == port} == {host}
        if configured is None:
            assert client.dashboard_link == f"http://127.0.0.1:{port}/status"  # what `embedfleet index` prints
        for pid in client.run(_pid).values():
            assert {ip for ip, _ in _listening(pid)} <= {"127.0.0.1"}
