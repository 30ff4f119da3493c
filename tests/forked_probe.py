"""A backend whose warm module records the process that imported it (tests/test_worker_start.py).

Imported in a cluster's forkserver, ``IMPORTED_BY`` is that process's pid, the parent of
every worker; imported by a worker itself (spawned workers), the worker's own.
"""

from __future__ import annotations

import os

from tests.fake_embedder import FakeEmbedder

__all__ = ["IMPORTED_BY", "ProbeEmbedder"]

IMPORTED_BY = os.getpid()


class ProbeEmbedder(FakeEmbedder):
    warm_modules = ("tests.forked_probe",)
