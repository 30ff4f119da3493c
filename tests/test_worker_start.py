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
            from embedfleet import exiting
            return {"pid": os.getpid(), "parent": os.getppid(), "imported_by": probe.IMPORTED_BY,
                    "fast_exit": getattr(exiting.exit_without_final_collection, "registered", False)}

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
    frozen = _python(script.format(setup="gc; from embedfleet.exiting import exit_without_final_collection; "
                                         "exit_without_final_collection()"))
    assert plain.returncode == frozen.returncode == 0, plain.stderr + frozen.stderr
    # Python's last collections find the cycle; with the heap frozen at exit they skip it.
    assert plain.stdout.strip() == "collected at exit"
    assert frozen.stdout.strip() == ""


def test_the_forkserver_starts_before_distributed_is_imported_with_the_environment_a_nanny_gives():
    done = _python("""
        import json, os, sys
        for inherited in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "PYTHONHASHSEED"):
            os.environ.pop(inherited, None)  # set by a nanny of the test run's own process, they would win
        import dask.config
        dask.config.set({"embedfleet.backends.probe": "tests.forked_probe:ProbeEmbedder",
                         "distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": 3})
        from embedfleet.pipeline import cluster

        before = cluster._pre_spawn_config()
        environ_before = dict(os.environ)
        cluster.start_local_workers(backend="probe")
        started = {"distributed_imported": "distributed" in sys.modules,
                   "environ_untouched": dict(os.environ) == environ_before}
        import distributed  # noqa: F401  (adds its defaults to dask config)
        started["same_config_after_import"] = cluster._pre_spawn_config() == before

        def where():
            import tests.forked_probe as probe
            parent = dict(kv.split("=", 1) for kv in open(f"/proc/{os.getppid()}/environ").read().split("\\0") if "=" in kv)
            return {"parent": os.getppid(), "imported_by": probe.IMPORTED_BY, "tasks_imported": "embedfleet.tasks.stages" in sys.modules,
                    "forkserver_env": {k: parent.get(k) for k in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "PYTHONHASHSEED")}}

        with cluster.connect(workers=2, threads_per_worker=1, dashboard_address=":0", backend="probe") as client:
            print(json.dumps({**started, "driver": os.getpid(), "workers": list(client.run(where).values())}))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["distributed_imported"] is False
    assert seen["environ_untouched"] and seen["same_config_after_import"]
    workers = seen["workers"]
    # The forkserver started early is the one the cluster's workers fork from: it imported the
    # backend and the task modules, and began with the nanny's variables (a configured value
    # wins over distributed's default of 1).
    assert len({w["parent"] for w in workers}) == 1
    assert all(w["imported_by"] == w["parent"] and w["tasks_imported"] for w in workers)
    assert all(w["forkserver_env"] == {"OMP_NUM_THREADS": "3", "MALLOC_TRIM_THRESHOLD_": "65536", "PYTHONHASHSEED": "6640"}
               for w in workers)


def test_no_forkserver_for_an_existing_scheduler_or_a_gpu_cluster():
    done = _python("""
        import multiprocessing.forkserver as forkserver
        from embedfleet.pipeline import cluster

        cluster.start_local_workers(scheduler_address="tcp://127.0.0.1:1", backend="fake")
        cluster.start_local_workers(gpu=True, backend="fake")
        print(forkserver._forkserver._forkserver_pid)
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "None"
