"""``embedfleet serve`` on a PostgreSQL job database: tokens, a job, the search cache's version."""

from __future__ import annotations

import pytest

from tests import serve_helpers as sh
from tests.db import pg_available, pg_schema

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_serve_on_postgres(tmp_path):
    reason = pg_available()
    if reason:
        pytest.skip(reason)
    with pg_schema() as schema:
        srv = sh.start_server(tmp_path, database_url=schema.url)
        try:
            sh.add_token(srv, "alice", "alice")
            sh.add_token(srv, "bob", "bob")
            with srv.client("alice") as http:
                job = http.post("/v1/jobs", json={"collection": "kb", "model": "fake", "documents": sh.documents(3)})
                assert job.status_code == 201, job.text
                assert srv.wait_job("alice", job.json()["id"])["status"] == "succeeded"
                query = {"query": sh.documents(3)[1]["text"], "k": 1}
                first = http.post("/v1/collections/kb/search", json=query).json()
                assert first["hits"][0]["doc_id"] == "doc-1" and not first["cached"]
                assert http.post("/v1/collections/kb/search", json=query).json()["cached"]
            with srv.client("bob") as http:
                assert http.get(f"/v1/jobs/{job.json()['id']}").status_code == 404
            with srv.client() as http:
                assert http.get("/v1/quota", headers={"Authorization": "Bearer ef_x"}).status_code == 401
        finally:
            assert sh.stop_server(srv) == 0
