"""``embedfleet jobs run`` whose job thread gets stuck for good, like the dispatcher deadlock of issue 14.

Run as ``python -c "from tests.jobs_stuck_runner import main; main()" jobs run ...``: the real
CLI, dispatcher, cluster and pipeline, except that the job's driver thread blocks forever on a
lock nobody releases (ignoring the job's cancel) once its first embedding partition is
reported, with embedding tasks still running on the cluster. The job's monitor thread keeps
renewing its lease meanwhile, so the job looks alive to every other dispatcher. The file named
by ``EMBEDFLEET_TEST_STUCK_FILE`` is written at that moment, with the job id.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

STUCK_FILE_ENV = "EMBEDFLEET_TEST_STUCK_FILE"


def stuck_runner(spec, **kwargs):
    from embedfleet.pipeline.run import run_job

    report = kwargs["on_progress"]
    never = threading.Lock()
    never.acquire()

    def on_progress(progress) -> None:
        report(progress)
        if progress.embedded:
            Path(os.environ[STUCK_FILE_ENV]).write_text(spec.job_id)
            never.acquire()  # held above: this thread never runs again

    return run_job(spec, **{**kwargs, "on_progress": on_progress})


def main() -> None:
    import embedfleet.schedulers.dispatcher as dispatcher
    from embedfleet.cli import main as cli

    dispatcher.default_runner = stuck_runner
    cli()
