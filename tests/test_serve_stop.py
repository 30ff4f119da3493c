"""SIGTERM stops ``embedfleet serve`` cleanly: its running job is interrupted, and resumed later."""

from __future__ import annotations

import pytest

from embedfleet.schedulers.service import JobService
from tests import faults_helpers as fh
from tests import serve_helpers as sh

pytestmark = pytest.mark.slow


def test_sigterm_interrupts_running_jobs_and_a_new_server_resumes_them(tmp_path):
    srv = sh.start_server(tmp_path, slow=0.01)
    try:
        sh.add_token(srv, "alice", "alice")
        with srv.client("alice") as http:
            response = http.post("/v1/jobs", json={"collection": "big", "model": "fake", "chunk_size": 8, "chunk_overlap": 0,
                                                   "documents": sh.documents(250, words=60)})
            assert response.status_code == 201, response.text
            job_id = response.json()["id"]
            fh.wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["stage"] == "embedding", timeout=120,
                        what="the job embedding")
        assert sh.stop_server(srv, timeout=90) == 0
    finally:
        fh.kill_group(srv.process)
    log = srv.log_text()
    assert "stopping: running jobs" in log and "embedfleet serve stopped" in log
    with JobService(data_dir=srv.data_dir) as service:
        info = service.job(job_id)
    assert info.status == "interrupted", info
    assert info.embedded < info.chunks

    again = sh.start_server(tmp_path, log_name="serve-2.log")
    try:
        again.tokens = srv.tokens
        done = again.wait_job("alice", job_id, timeout=300)
        assert done["status"] == "succeeded", done
        assert done["attempt"] == 2 and done["chunks"] > 0
        # The second run continued the first: it embedded only what the first had not.
        assert done["embedded"] < done["chunks"]
        with again.client("alice") as http:
            assert http.get("/v1/collections/big").json()["count"] == done["chunks"]
    finally:
        sh.stop_server(again)
