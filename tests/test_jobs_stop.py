"""Stopping jobs, for real: a stuck dispatcher process and a job cancelled mid-embedding.

* ``embedfleet jobs run`` as a subprocess, its job's driver thread stuck for good
  (:mod:`tests.jobs_stuck_runner`): the first SIGTERM/SIGINT cannot finish the clean stop, the
  second ends the process at once after marking the job interrupted, and the next
  ``jobs run --once`` resumes and finishes it.
* A free user's job cancelled during embedding on a cluster whose embedding is slowed down, so
  an embedding task is still running when the cancel lands and finishes after it; the resume
  reuses that partition. Every stored chunk is charged exactly once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import dask.config
import pytest

from embedfleet.schedulers.dispatcher import Dispatcher
from embedfleet.schedulers.service import JobService
from tests import faults_helpers as fh
from tests.jobs_stuck_runner import STUCK_FILE_ENV

pytestmark = pytest.mark.slow

CHUNKING = dict(chunk_size=64, chunk_overlap=8)
PER_PARTITION = 8
SETTINGS = {"embedfleet.models.fake": dict(fh.FAKE_MODEL), "embedfleet.embed.chunks-per-partition": PER_PARTITION}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    fh.make_corpus(root, documents=12, words=400, seed=7)
    return root


def _cli(*args: str):
    """An embedfleet command in this process; its --json output."""
    from click.testing import CliRunner

    from embedfleet.cli import main

    with dask.config.set(SETTINGS):
        outcome = CliRunner().invoke(main, list(args))
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    return fh.last_json(outcome.stdout)


def _submit(data, corpus, user="alice"):
    with dask.config.set(SETTINGS), JobService(data_dir=data) as service:
        service.add_user(user, tier="free")
        return service.submit(str(corpus), user=user, collection="kb", model="fake", **CHUNKING).id


def _status(data, job_id, user="alice"):
    with JobService(data_dir=data) as service:
        return service.status(job_id, user=user)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_stops_a_stuck_dispatcher(tmp_path, corpus, client, stop):
    data = tmp_path / "data"
    job_id = _submit(data, corpus)
    stuck = tmp_path / "stuck"
    env = fh.cli_env(fh.write_dask_config(tmp_path / "dask-config"), slow=0.02, **{STUCK_FILE_ENV: str(stuck)})
    command = [sys.executable, "-c", "from tests.jobs_stuck_runner import main; main()",
               "jobs", "run", "--once", "--data-dir", str(data)]
    log = tmp_path / "dispatcher.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        fh.wait_for(stuck.exists, timeout=240, what="the job's thread to get stuck", process=process)
        assert _status(data, job_id).status == "running"

        process.send_signal(stop)
        # The clean stop cancels the job and waits for its thread, which never comes back.
        time.sleep(2)
        assert process.poll() is None, log.read_text()
        sent = time.monotonic()
        process.send_signal(stop)
        process.wait(timeout=30)
        took = time.monotonic() - sent
        assert process.returncode == 128 + stop, log.read_text()
        assert took < 10, f"{took:.1f}s after the second signal"
        # The cluster's worker processes go with it.
        fh.wait_for(lambda: not fh.group_members(process.pid), timeout=60, what="the cluster's processes to exit")
    finally:
        fh.stop_group(process)
    output = log.read_text()
    name = signal.Signals(stop).name
    assert f"stopped at once by a second {name}; marked {job_id} interrupted" in output, output

    info = _status(data, job_id)
    assert info.status == "interrupted" and f"stopped at once by a second {name}" in info.error, info
    assert info.charged <= fh.partition_rows(sorted((data / "jobs" / job_id / "embeddings").glob("*.parquet.json")))

    # The next dispatcher resumes it (here in this process, on the session cluster).
    [job] = _cli("jobs", "run", "--once", "--json", "--data-dir", str(data), "--scheduler", client.scheduler.address)
    assert (job["id"], job["status"], job["attempt"]) == (job_id, "succeeded", 2), job
    stored = fh.read_chroma(f"chroma://{data}/chroma", "alice", "kb")
    assert job["chunks"] == len(stored) == job["charged"]


@pytest.fixture(scope="module")
def slow_client():
    """A cluster of its own whose fake embedder takes 0.1 s per text (0.8 s per embedding task)."""
    from distributed import Client, LocalCluster

    from embedfleet.pipeline.cluster import EMBED_SLOT

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(fh.DELAY_ENV, "0.1")  # spawned worker processes read it from their environment
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None,
                          resources={EMBED_SLOT: 1}, preload=[str(fh.HERE)]) as cluster, \
                Client(cluster, set_as_default=False) as c:
            yield c


def _settled(client, job_id: str) -> bool:
    """None of the job's tasks is left to run on the scheduler, nor running on a worker."""
    pending = client.run_on_scheduler(lambda dask_scheduler, job=job_id: [
        key for key, task in dask_scheduler.tasks.items()
        if job in str(key) and task.state in ("waiting", "queued", "no-worker", "processing")
    ])
    running = client.run(lambda dask_worker: len(dask_worker.state.all_running_tasks))
    return not pending and not any(running.values())


def test_cancel_during_embedding_then_resume_charges_every_chunk_once(tmp_path, corpus, slow_client, client):
    data = tmp_path / "data"
    with dask.config.set(SETTINGS):
        service = JobService(data_dir=data)
        service.add_user("fr", tier="free")
        job = service.submit(str(corpus), user="fr", collection="kb", model="fake", **CHUNKING)
        embeddings = data / "jobs" / job.id / "embeddings"
        dispatcher = Dispatcher(service, client=slow_client, tick=0.05, poll_seconds=0.1)
        thread = threading.Thread(target=dispatcher.run, kwargs={"once": True}, daemon=True)
        thread.start()
        fh.wait_for(lambda: list(embeddings.glob("*.parquet.json")), timeout=240, what="an embedding partition")
        service.cancel(job.id, user="fr")
        thread.join(60)
        cancelled = service.status(job.id, user="fr")
        assert cancelled.status == "cancelled"

        # The task that was running when the cancel came finishes after it and keeps its output.
        fh.wait_for(lambda: _settled(slow_client, job.id), timeout=60, what="the cancelled job's tasks to settle")
        finished, total = fh.embed_partitions(data / "jobs" / job.id)
        on_disk = fh.partition_rows(finished)
        assert 0 < len(finished) < total
        assert on_disk > cancelled.charged, "no partition finished after the cancel: nothing to show"
        assert service.quota("fr").used_today == cancelled.charged

        # Resumed (on the session cluster, embedding at full speed): that partition is reused, and charged now.
        service.resume(job.id, user="fr")
        Dispatcher(service, client=client, tick=0.05, poll_seconds=0.1).run(once=True)
        done = service.status(job.id, user="fr")
        used = service.quota("fr").used_today
        service.close()
    stored = fh.read_chroma(f"chroma://{data}/chroma", "fr", "kb")
    assert done.status == "succeeded"
    assert done.embedded == len(stored) - on_disk  # the resume embedded only what was not on disk
    assert done.charged == used == len(stored) == done.chunks
