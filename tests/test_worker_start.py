"""How the worker processes of a cluster embedfleet starts begin and end (pipeline/cluster.py, embedders/warm.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _python(script: str, **env: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: the forkserver is per process and keeps the preload of its first cluster.
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env})


def test_local_cluster_workers_are_forked_from_a_process_that_imported_the_backend():
    done = _python("""
        import json, os
        import dask.config
        dask.config.set({"embedfleet.backends.probe": "tests.forked_probe:ProbeEmbedder"})
        from embedfleet.pipeline.cluster import connect

        def where():
            import tests.forked_probe as probe
            from embedfleet.embedders import warm
            return {"pid": os.getpid(), "parent": os.getppid(), "imported_by": probe.IMPORTED_BY,
                    "fast_exit": getattr(warm.exit_without_final_collection, "registered", False)}

        with connect(workers=2, threads_per_worker=1, dashboard_address=":0", backend="probe") as client:
            print(json.dumps({"driver": os.getpid(), "workers": list(client.run(where).values())}))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    workers = seen["workers"]
    assert len(workers) == 2
    forkserver = {w["parent"] for w in workers}
    # One forkserver, a child of the driver, is every worker's parent, and it imported the
    # backend's module before forking them: no worker imported it again.
    assert len(forkserver) == 1 and forkserver != {seen["driver"]}
    assert all(w["imported_by"] == w["parent"] != w["pid"] for w in workers)
    assert all(w["fast_exit"] for w in workers)


def test_exit_without_final_collection_skips_the_collections_at_exit():
    script = """
        import {setup}

        class Cycle:
            def __init__(self):
                self.me = self

            def __del__(self):
                print("collected at exit", flush=True)

        keep = Cycle()
        del keep  # unreachable, but only the cycle collector can free it
    """
    plain = _python(script.format(setup="gc"))
    frozen = _python(script.format(setup="gc; from embedfleet.embedders.warm import exit_without_final_collection; "
                                         "exit_without_final_collection()"))
    assert plain.returncode == frozen.returncode == 0, plain.stderr + frozen.stderr
    # Python's last collections find the cycle; with the heap frozen at exit they skip it.
    assert plain.stdout.strip() == "collected at exit"
    assert frozen.stdout.strip() == ""
