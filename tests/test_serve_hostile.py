"""``embedfleet serve`` against a hostile user and an unlucky operator, on loopback only.

One real server subprocess for the module. Every refusal is one clear answer: the status, a JSON
``detail``, never a 5xx, never a secret; nothing another user owns is seen, changed or read into
the attacker's collection. Request loops are bounded.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import stat
import time

import httpx
import pytest

from tests import faults_helpers as fh
from tests import serve_helpers as sh

pytestmark = pytest.mark.slow

STREAMS_PER_USER = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    extra = sh.config_extra(tmp / "roots", tmp / "pq")
    extra["server"]["max-event-streams"] = STREAMS_PER_USER
    srv = sh.start_server(tmp, extra=extra, slow=0.005)
    for name in ("alice", "bob", "mallory"):
        sh.add_token(srv, name, name)
    sh.add_token(srv, "ops", "ops", admin=True)
    yield srv
    status = sh.stop_server(srv)
    log = srv.log_text()
    assert status == 0, log[-3000:]
    for secret in srv.tokens.values():
        assert secret not in log
    assert "Traceback" not in log, log[-6000:]


def refused(response: httpx.Response, status: int | tuple[int, ...], server=None) -> dict:
    """The one clear error every refusal is: that status, a JSON detail, no secret in it."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    body = response.json()
    assert isinstance(body, dict) and body.get("detail"), body
    if server is not None:
        for secret in server.tokens.values():
            assert secret not in response.text
    return body


def post_json(http: httpx.Client, path: str, body) -> httpx.Response:
    """``body`` as ASCII JSON: lone surrogates travel as escapes, which httpx's ``json=`` cannot send."""
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def inline_job(http: httpx.Client, collection: str, docs, **options) -> dict:
    response = http.post("/v1/jobs", json={"collection": collection, "model": "fake", "documents": docs, **options})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def bob_kb(server):
    docs = [{"id": f"bob-{i}", "text": f"bob's confidential note number {i} about the merger"} for i in range(3)]
    with server.client("bob") as http:
        job = inline_job(http, "private", docs)
    done = server.wait_job("bob", job["id"])
    assert done["status"] == "succeeded", done
    return done


def chroma_texts(server, user: str, collection: str) -> list[str]:
    try:
        rows = fh.read_chroma(f"chroma://{server.data_dir / 'chroma'}", user, collection)
    except Exception:  # noqa: BLE001 - no such collection
        return []
    return [r["document"] for r in rows.values()]


# ----------------------------------------------------------------------------------- identity


def test_another_users_token_on_every_endpoint(server, bob_kb):
    job_id = bob_kb["id"]
    with server.client("mallory") as http:
        for method, path, body in [
            ("GET", f"/v1/jobs/{job_id}", None),
            ("DELETE", f"/v1/jobs/{job_id}", None),
            ("POST", f"/v1/jobs/{job_id}/resume", None),
            ("GET", f"/v1/jobs/{job_id}/events", None),
            ("GET", "/v1/collections/private", None),
            ("POST", "/v1/collections/private/search", {"query": "merger"}),
            ("DELETE", "/v1/collections/private", None),
        ]:
            detail = refused(http.request(method, path, json=body), 404, server)["detail"]
            assert "bob" not in detail
        assert job_id not in http.get("/v1/jobs").text
        assert http.get("/v1/collections").json()["collections"] == []
        assert http.get("/v1/quota").json()["user"] == "mallory"
        dash = http.get("/v1/dashboard").json()
        assert job_id not in json.dumps(dash) and {u["user"] for u in dash["usage"]} == {"mallory"}
        for method, path, body in [("GET", "/v1/users", None), ("GET", "/v1/tokens", None),
                                   ("POST", "/v1/tokens", {"user": "mallory", "admin": True}),
                                   ("PUT", "/v1/users/mallory/tier", {"tier": "enterprise"}),
                                   ("DELETE", f"/v1/tokens/{server.token_ids['bob']}", None)]:
            refused(http.request(method, path, json=body), 403, server)
    with server.client("bob") as http:  # nothing of bob's moved
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        assert http.get("/v1/collections/private").json()["count"] == 3
        assert http.get("/v1/quota").json()["tier"] == "free"


def test_tokens_are_taken_from_the_header_only(server):
    secret = server.tokens["alice"]
    with server.client() as http:
        for params in ({"token": secret}, {"access_token": secret}, {"api_key": secret}):
            refused(http.get("/v1/jobs", params=params), 401, server)
        refused(http.get("/v1/jobs", headers={"Authorization": f"Bearer {secret}x"}), 401, server)
        refused(http.get("/v1/jobs", headers={"Authorization": f"Bearer  {secret[:-1]}"}), 401, server)
        refused(http.get("/v1/jobs", headers={"Authorization": "Bearer " + "ef_" + "a" * 5000}), 401, server)
        refused(http.get("/v1/jobs", cookies={"token": secret}), 401, server)


def _events(stream):
    name = None
    for line in stream.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_a_token_revoked_or_expiring_mid_stream_ends_the_event_stream(server, how):
    name = f"streamer-{how}"
    secret = sh.add_token(server, name, "alice", expires_in=4.0 if how == "expired" else None)
    with server.client(name) as http:
        job = inline_job(http, f"{how}-stream", sh.documents(300, words=60, prefix="rs"), chunk_size=8, chunk_overlap=0)
        with http.stream("GET", f"/v1/jobs/{job['id']}/events", params={"interval": 0.1}) as stream:
            events = _events(stream)
            assert next(events)[0] == "job"
            if how == "revoked":
                with server.client("ops") as admin:
                    assert admin.delete(f"/v1/tokens/{server.token_ids[name]}").status_code == 200
            revoked_at = time.monotonic()
            tail = list(events)
        assert time.monotonic() - revoked_at < 10
        assert tail and tail[-1][0] == "error" and "token" in tail[-1][1]["detail"]
        assert all(name != "end" for name, _ in tail)
        refused(http.get(f"/v1/jobs/{job['id']}"), 401)
    assert secret not in server.log_text()
    with server.client("alice") as http:
        http.delete(f"/v1/jobs/{job['id']}")
    server.wait_job("alice", job["id"], timeout=120)


def test_concurrent_resumes_queue_the_job_once_and_nothing_is_indexed_twice(server):
    docs = sh.documents(300, words=60, prefix="rz")
    with server.client("alice") as http:
        job = inline_job(http, "resumed", docs, chunk_size=8, chunk_overlap=0)
        fh.wait_for(lambda: http.get(f"/v1/jobs/{job['id']}").json()["stage"] == "embedding", timeout=120, what="embedding")
        assert http.delete(f"/v1/jobs/{job['id']}").status_code == 200
        cancelled = server.wait_job("alice", job["id"], timeout=60)
        assert cancelled["status"] == "cancelled", cancelled

    def resume(_):
        with server.client("alice") as http:
            return http.post(f"/v1/jobs/{job['id']}/resume")

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(resume, range(6)))
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) == 1 and set(codes) <= {200, 409}, [(a.status_code, a.text) for a in answers]
    for answer in answers:
        if answer.status_code == 409:
            refused(answer, 409)
    done = server.wait_job("alice", job["id"], timeout=180)
    assert done["status"] == "succeeded", done
    with server.client("alice") as http:
        jobs = [j for j in http.get("/v1/jobs", params={"limit": 1000}).json() if j["collection"] == "resumed"]
        assert [j["id"] for j in jobs] == [job["id"]]
        count = http.get("/v1/collections/resumed").json()["count"]
    assert count == done["chunks"] == done["embedded"]
    rows = fh.read_chroma(f"chroma://{server.data_dir / 'chroma'}", "alice", "resumed").values()
    places = [(r["metadata"]["doc_id"], r["metadata"]["chunk_index"]) for r in rows]
    assert len(places) == len(set(places)) == count  # every chunk once, however often it was resumed
    assert {doc for doc, _ in places} == {d["id"] for d in docs}


# -------------------------------------------------------------------------------- job sources


def test_source_paths_that_are_refused(server, tmp_path):
    roots = server.roots
    outside = tmp_path / "outside"
    fh.make_corpus(outside, documents=1, words=20)
    (roots / "escape").mkdir(exist_ok=True)
    link_out = roots / "escape" / "out.txt"
    if not link_out.is_symlink():
        link_out.symlink_to(next(outside.rglob("*.*")))
    link_data = roots / "to-data"
    if not link_data.is_symlink():
        link_data.symlink_to(server.data_dir)
    fifo = roots / "pipe.jsonl"
    if not fifo.exists():
        os.mkfifo(fifo)
    device = roots / "zero.jsonl"
    if os.geteuid() == 0 and not device.exists():
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero, inside a root
    cases = {
        str(outside): 403,
        f"{roots}/../{outside.relative_to(roots.parent)}" if outside.is_relative_to(roots.parent) else str(outside): 403,
        f"{roots}/escape/out.txt": 403,
        str(link_data): 403,
        str(link_data / "inline"): 403,
        str(server.data_dir / "inline"): 403,
        str(server.data_dir): 403,
        "/dev/zero": 403,
        "/etc/passwd": 403,
        "https://example.com/corpus.jsonl": 403,
        "file:///etc/passwd": 403,
        "roots/escape": 400,  # relative: to the server's working directory? refused
        "~/corpus": 400,
        str(roots / "no-such-file.jsonl"): 400,
        str(fifo): 400,
        str(device): 400,
        "\x00": (400, 422),
    }
    with server.client("mallory") as http:
        for source, status in cases.items():
            started = time.monotonic()
            body = refused(http.post("/v1/jobs", json={"collection": "src", "model": "fake", "source": source}), status)
            assert time.monotonic() - started < 10, source
            assert str(server.data_dir) not in body["detail"], body
        assert http.get("/v1/jobs").json() == [] or all(j["collection"] != "src" for j in http.get("/v1/jobs").json())


def test_a_folder_with_a_symlink_out_of_it_does_not_read_the_target(server, tmp_path):
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("the launch codes are 0000 and nobody may embed them\n")
    folder = server.roots / "sneaky"
    fh.make_corpus(folder, documents=2, words=20)
    (folder / "codes.txt").symlink_to(secret_file)
    os.mkfifo(folder / "pipe.txt")  # a reader that opened it blocking would hang its worker
    with server.client("mallory") as http:
        response = http.post("/v1/jobs", json={"collection": "sneaky", "model": "fake", "source": str(folder)})
    if response.status_code == 201:
        done = server.wait_job("mallory", response.json()["id"], timeout=60)
        assert done["status"] in ("succeeded", "failed"), done
        assert str(secret_file) not in json.dumps(done)
    else:
        refused(response, (400, 403))
    assert not any("launch codes" in t for t in chroma_texts(server, "mallory", "sneaky"))


@pytest.mark.parametrize("target", ["outside", "other-users-inline"])
def test_a_source_swapped_for_a_symlink_after_submit_is_not_read(server, bob_kb, tmp_path, target):
    if target == "outside":
        victim = tmp_path / "victim.jsonl"
        victim.write_text(json.dumps({"id": "v", "text": "bob's confidential note about the merger"}) + "\n")
    else:
        victim = next((server.data_dir / "inline" / "bob").glob("*.jsonl"))
    bait = server.roots / f"bait-{target}.jsonl"
    bait.write_text(json.dumps({"id": "b", "text": "an innocent line"}) + "\n")
    collection = f"swap-{target.split('-')[0]}"
    with server.client("mallory") as http:
        # Queued behind mallory's own long job, so the swap lands before the source is read.
        blocker = inline_job(http, "blocker", sh.documents(300, words=60, prefix="bl"), chunk_size=8, chunk_overlap=0)
        response = http.post("/v1/jobs", json={"collection": collection, "model": "fake", "source": str(bait)})
        assert response.status_code == 201, response.text
        tmp_link = bait.with_suffix(".swap")
        tmp_link.symlink_to(victim)
        os.replace(tmp_link, bait)
        http.delete(f"/v1/jobs/{blocker['id']}")
    done = server.wait_job("mallory", response.json()["id"], timeout=120)
    texts = chroma_texts(server, "mallory", collection)
    assert not any("merger" in t for t in texts), (done, texts)
    assert done["status"] in ("failed", "succeeded"), done
    if done["status"] == "failed":
        assert str(server.data_dir) not in (done["error"] or "")
    server.wait_job("mallory", blocker["id"], timeout=120)


# ------------------------------------------------------------------------------ inline content


def test_inline_documents_at_and_over_the_limit(server):
    # The limit counts each text's UTF-8 bytes and its metadata as JSON ("{}" when none).
    each = sh.INLINE_LIMIT // 64 - len(json.dumps({}))
    at = [{"id": f"at-{i}", "text": ("word " * each)[:each]} for i in range(64)]
    text_bytes = sh.INLINE_LIMIT - len(json.dumps({}))
    with server.client("alice") as http:
        job = inline_job(http, "at-limit", at)
        refused(http.post("/v1/jobs", json={"collection": "over", "model": "fake",
                                            "documents": [{"id": "o", "text": "y" * (text_bytes + 1)}]}), 413)
        # The limit counts UTF-8 bytes, not characters.
        refused(http.post("/v1/jobs", json={"collection": "over", "model": "fake",
                                            "documents": [{"id": "o", "text": "é" * (text_bytes // 2 + 1)}]}), 413)
        assert all(j["collection"] != "over" for j in http.get("/v1/jobs", params={"limit": 1000}).json())
    assert server.wait_job("alice", job["id"], timeout=120)["status"] == "succeeded"


def test_many_tiny_documents_are_all_indexed_once(server):
    docs = [{"id": str(i), "text": f"w{i}"} for i in range(5000)]
    with server.client("alice") as http:
        job = inline_job(http, "tiny", docs)
        done = server.wait_job("alice", job["id"], timeout=180)
        assert done["status"] == "succeeded", done
        assert done["documents"] == 5000 and done["embedded"] == done["chunks"] == 5000
        assert http.get("/v1/collections/tiny").json()["count"] == 5000


def test_bad_inline_documents_are_refused_at_submit(server):
    ok = {"id": "a", "text": "fine"}
    with server.client("alice") as http:
        def post(docs, **more):
            return post_json(http, "/v1/jobs", {"collection": "bad", "model": "fake", "documents": docs, **more})

        assert "twice" in refused(post([ok, {**ok, "text": "again"}]), 400)["detail"]
        refused(post([]), 400)
        refused(post([{"id": "", "text": "x"}]), 422)
        refused(post([{"id": "a"}]), 422)
        refused(post([{"id": "a", "text": 5}]), 422)
        refused(post([{"id": "a", "text": "x", "extra": 1}]), 422)
        refused(post([{"id": "a", "text": "x", "metadata": [1, 2]}]), 422)
        refused(post([ok], text_column="body"), 400)
        # Lone surrogates are no text: refused, not a 500 when the file is written.
        refused(post([{"id": "a", "text": "bad \ud800 half"}]), 422)
        refused(post([{"id": "\udfff", "text": "x"}]), 422)
        refused(post([{"id": "a", "text": "x", "metadata": {"k": "\ud800"}}]), 422)
        # Nested deeper than a store keeps, or deeper than the parser's recursion.
        deep: dict = {}
        for _ in range(64):
            deep = {"d": deep}
        refused(post([{"id": "a", "text": "x", "metadata": deep}]), 422)
        body = '{"collection": "bad", "model": "fake", "documents": [{"id": "a", "text": "x", "metadata": ' + '{"d": ' * 5000 + "1" + "}" * 5000 + "}]}"
        refused(http.post("/v1/jobs", content=body, headers={"content-type": "application/json"}), (400, 422))
        refused(http.post("/v1/jobs", content=b'{"collection": "bad", "documents": [{"id": "a", "text": "\xff\xfe"}]}',
                          headers={"content-type": "application/json"}), (400, 422))
        refused(http.post("/v1/jobs", content=b"not json", headers={"content-type": "application/json"}), (400, 422))
        refused(http.post("/v1/jobs", json=[ok]), 422)
        assert all(j["collection"] != "bad" for j in http.get("/v1/jobs", params={"limit": 1000}).json())
    inline = list((server.data_dir / "inline" / "alice").glob("*.tmp"))
    assert inline == []


def test_nul_and_odd_text_are_indexed_as_given(server):
    docs = [{"id": "nul", "text": "before\x00after"}, {"id": "id\x00with nul", "text": "x"},
            {"id": "emoji", "text": "rotate 🔁 logs", "metadata": {"lang": "ünïcode", "n": 1.5, "ok": True, "none": None}}]
    with server.client("alice") as http:
        job = inline_job(http, "odd", docs)
        done = server.wait_job("alice", job["id"])
        assert done["status"] in ("succeeded", "failed"), done
        if done["status"] == "succeeded":
            assert done["documents"] == 3 and done["embedded"] == done["chunks"]


def test_options_of_the_wrong_type_or_out_of_range(server):
    docs = [{"id": "a", "text": "x"}]
    with server.client("alice") as http:
        def post(**more):
            return http.post("/v1/jobs", json={"collection": "opt", "model": "fake", "documents": docs, **more})

        for bad in ({"chunk_size": "10"}, {"chunk_size": -1}, {"chunk_size": 10**30}, {"chunk_size": 1.5},
                    {"chunk_overlap": True}, {"priority": 101}, {"priority": -1}, {"priority": "1"},
                    {"mode": "drop"}, {"model": ""}, {"model": "   "}, {"sink": ""}, {"sink": "x" * 65},
                    {"collection": "x" * 10_000}, {"sink_uri": "chroma:///tmp/x"}, {"data_dir": "/tmp"},
                    {"database_url": "sqlite://"}, {"tier": "enterprise"}, {"user": "bob"}, {"owner": "bob"},
                    {"headers": {"Authorization": "x"}}, {"dispatcher": "mine"}):
            refused(post(**bad), (400, 422))
        assert "no sink named" in refused(post(sink="elsewhere"), 400)["detail"]
        refused(post(collection="../../etc"), 400)
        refused(post(model="no-such-model"), 400)
        refused(post(chunk_size=10, chunk_overlap=20), 400)
        assert all(j["collection"] != "opt" for j in http.get("/v1/jobs", params={"limit": 1000}).json())


def test_the_local_user_is_out_of_reach(server):
    with server.client("ops") as admin:
        refused(admin.post("/v1/tokens", json={"user": "local"}), 400)
        refused(admin.post("/v1/users", json={"id": "local"}), 404)
        refused(admin.put("/v1/users/local/tier", json={"tier": "enterprise"}), 404)
        refused(admin.put("/v1/users/alice/tier", json={"tier": "unlimited"}), 403)
        refused(admin.post("/v1/users", json={"id": "newbie", "tier": "unlimited"}), 403)
        for user in ("../../etc", "a/b", ".", ".."):
            refused(admin.post("/v1/users", json={"id": user}), 400)
            refused(admin.post("/v1/tokens", json={"user": user}), 400)
        assert all(u["tier"] != "unlimited" for u in admin.get("/v1/users").json())


# ----------------------------------------------------------------------------- resource abuse


def test_many_event_streams_are_capped_and_others_are_still_served(server, bob_kb):
    with server.client("mallory") as http:
        job = inline_job(http, "streams", [{"id": "a", "text": "x"}])
        server.wait_job("mallory", job["id"], until=("queued", "running", "succeeded"))
    blocker_job = None
    with server.client("mallory") as http:
        blocker_job = inline_job(http, "streams-long", sh.documents(300, words=60, prefix="sl"), chunk_size=8, chunk_overlap=0)
    clients, streams = [], []
    try:
        for _ in range(STREAMS_PER_USER):
            c = server.client("mallory")
            clients.append(c)
            s = c.stream("GET", f"/v1/jobs/{blocker_job['id']}/events", params={"interval": 0.05})
            streams.append(s)
            assert s.__enter__().status_code == 200
        with server.client("mallory") as http:
            over = http.get(f"/v1/jobs/{blocker_job['id']}/events")
            refused(over, 429)
            assert int(over.headers["retry-after"]) >= 1
        with server.client("bob") as http:  # everyone else is still served, promptly
            started = time.monotonic()
            assert http.get(f"/v1/jobs/{bob_kb['id']}").status_code == 200
            assert httpx.get(f"{server.url}/healthz").status_code == 200
            assert time.monotonic() - started < 5
    finally:
        for s in streams:
            s.__exit__(None, None, None)
        for c in clients:
            c.close()
    # A closed stream frees its place.
    with server.client("mallory") as http:
        fh.wait_for(lambda: http.get(f"/v1/jobs/{job['id']}/events").status_code == 200, timeout=10, what="a stream freed")
        http.delete(f"/v1/jobs/{blocker_job['id']}")
    server.wait_job("mallory", blocker_job["id"], timeout=120)


def test_slow_clients_do_not_hold_up_the_others(server):
    host, port = server.url.rsplit("//", 1)[1].split(":")
    socks = []
    try:
        for i in range(40):
            s = socket.create_connection((host, int(port)), timeout=5)
            if i % 2:  # headers trickling in
                s.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n")
            else:  # a body that never finishes
                s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Authorization: Bearer ef_x\r\nContent-Length: 100000\r\n\r\n{\"collection\"")
            socks.append(s)
        started = time.monotonic()
        with server.client("alice") as http:
            for _ in range(5):
                assert http.get("/v1/quota").status_code == 200
        assert time.monotonic() - started < 5
    finally:
        for s in socks:
            s.close()


def test_oversized_urls_queries_and_k(server, bob_kb):
    with server.client("bob") as http:
        refused(http.post("/v1/collections/private/search", json={"query": "merger", "k": 10**9}), 422)
        refused(http.post("/v1/collections/private/search", json={"query": "merger", "k": 0}), 422)
        refused(http.post("/v1/collections/private/search", json={"query": "m" * 20_000}), 422)
        refused(post_json(http, "/v1/collections/private/search", {"query": "half \ud800"}), 422)
        refused(http.post("/v1/collections/private/search", json={"query": ""}), 422)
        assert http.post("/v1/collections/private/search", json={"query": "merger", "k": 1000}).status_code == 200
        refused(http.get("/v1/collections", params={"sink": "s" * 5000}), 422)
        refused(http.get("/v1/jobs", params={"limit": 10**9}), 422)
        assert http.get("/v1/jobs", params={"status": ["running"] * 2000}).json() == []  # bob runs nothing
        refused(http.get("/v1/jobs", params={"status": "bogus"}), (400, 422))
        refused(http.get("/v1/jobs/" + "a" * 5000), 422)
        refused(http.get(f"/v1/jobs/{bob_kb['id']}/events", params={"interval": 0}), 422)
        refused(post_json(http, "/v1/embeddings", {"model": "fake", "input": "half \ud800"}), 422)
        long_url = http.get("/v1/collections", params={"x": "y" * 60_000})
        assert long_url.status_code < 500


def test_a_flood_of_jobs_meets_the_queue_limit_and_leaves_no_files(server):
    sh.add_token(server, "flooder", "flooder")
    accepted, full = [], 0
    with server.client("flooder") as http:
        for i in range(70):  # the default queue-limit is 50 waiting jobs per user
            response = http.post("/v1/jobs", json={"collection": "flood", "model": "fake", "mode": "append",
                                                   "documents": [{"id": f"f{i}", "text": f"flood {i}"}]})
            if response.status_code == 201:
                accepted.append(response.json()["id"])
            else:
                refused(response, 429)
                full += 1
        assert full > 0 and accepted
        # A refused job leaves no inline file behind: one file per accepted job.
        assert len(list((server.data_dir / "inline" / "flooder").glob("*.jsonl"))) == len(accepted)
        for job_id in accepted:
            http.delete(f"/v1/jobs/{job_id}")
        listed = {j["id"] for j in http.get("/v1/jobs", params={"limit": 1000}).json()}
        assert listed == set(accepted)
    for job_id in accepted[-3:]:
        server.wait_job("flooder", job_id, timeout=120)


def test_odd_collections_sinks_and_embedding_requests(server):
    with server.client("mallory") as http:
        job = inline_job(http, "pq", [{"id": "p", "text": "parquet kept text"}], sink="parquet")
        assert server.wait_job("mallory", job["id"])["status"] == "succeeded"
        found = http.post("/v1/collections/pq/search", json={"query": "parquet kept text", "sink": "parquet", "k": 1})
        assert found.status_code == 200 and found.json()["hits"][0]["doc_id"] == "p"
        refused(http.post("/v1/collections/pq/search", json={"query": "x"}), 404)  # not in the default sink
        refused(http.post("/v1/collections/pq/search", json={"query": "x", "sink": "nowhere"}), 400)
        refused(http.get("/v1/collections/Bad Name!"), 400)
        refused(http.get("/v1/collections/..%2F..%2Fetc"), (400, 404))
        refused(http.delete("/v1/collections/pq", params={"sink": "nowhere"}), 400)
        assert http.get("/v1/collections/pq", params={"sink": "parquet"}).json()["count"] == 1
    with server.client("bob") as http:
        refused(http.get("/v1/collections/pq", params={"sink": "parquet"}), 404)
        refused(http.post("/v1/collections/pq/search", json={"query": "parquet kept text", "sink": "parquet"}), 404)
        refused(http.post("/v1/embeddings", json={"model": "fake", "input": ["x"] * 3000}), 400)
        refused(http.post("/v1/embeddings", json={"model": "fake", "input": []}), 400)
        refused(http.post("/v1/embeddings", json={"model": "", "input": "x"}), 422)
        refused(http.post("/v1/embeddings", json={"model": "../../etc/passwd", "input": "x"}), 404)
        refused(http.post("/v1/embeddings", json={"model": "fake", "input": [1, 2]}), 422)
        refused(http.post("/v1/embeddings", json={"model": "fake", "input": "x", "encoding_format": "hex"}), 422)


def test_an_embeddings_burst_is_served_or_told_to_retry(server):
    codes: dict[int, int] = {}

    def one(i: int) -> int:
        with server.client("alice") as http:
            response = http.post("/v1/embeddings", json={"model": "fake", "input": [f"burst {i} {j}" for j in range(8)]})
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1 and response.json()["detail"]
            else:
                assert response.status_code == 200, response.text
                assert [d["index"] for d in response.json()["data"]] == list(range(8))
            return response.status_code

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        for code in pool.map(one, range(96)):
            codes[code] = codes.get(code, 0) + 1
    assert set(codes) <= {200, 429} and codes.get(200, 0) > 0, codes
