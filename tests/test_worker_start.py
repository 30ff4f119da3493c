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
            import gc
            return {"parent": os.getppid(), "imported_by": probe.IMPORTED_BY, "tasks_imported": "embedfleet.tasks.stages" in sys.modules,
                    "forkserver_env": {k: parent.get(k) for k in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "PYTHONHASHSEED")},
                    "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
                    "preload_variable": "EMBEDFLEET_FORKSERVER_MODULES" in os.environ}

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
    # It imported them with the collector paused and froze the result: each worker starts with
    # the collector on and distributed's objects (tens of thousands) in the permanent generation.
    assert all(w["gc_enabled"] and w["frozen"] > 20_000 and not w["preload_variable"] for w in workers)


def test_the_preload_module_imports_its_modules_with_the_collector_paused_and_skips_a_missing_one():
    done = _python("""
        import gc, json, os, sys
        seen = []
        gc.callbacks.append(lambda phase, info: seen.append(info["generation"]) if phase == "start" else None)
        import embedfleet.pipeline.forkserver_preload as preload  # no variable: nothing happens
        nothing = {"frozen": gc.get_freeze_count(), "email_imported": "email.mime.text" in sys.modules}
        before = len(seen)
        preload.import_with_collector_paused(["email.mime.text", "no_such_module_anywhere", "json.tool"])
        print(json.dumps({"nothing": nothing, "collections_during_import": len(seen) - before,
                          "imported": ["email.mime.text" in sys.modules, "json.tool" in sys.modules],
                          "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["nothing"]["email_imported"] is False
    assert seen["collections_during_import"] == 0
    assert seen["imported"] == [True, True] and seen["gc_enabled"] is True
    assert seen["frozen"] > seen["nothing"]["frozen"]


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
