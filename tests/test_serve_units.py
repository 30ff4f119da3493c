"""The server's parts without a cluster: the app in process (jobs stay queued, no dispatcher),
the search cache, the rate limiter, the embeddings batcher and the body limit."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from embedfleet.schedulers.service import JobService
from embedfleet.schedulers.tokens import TokenStore
from embedfleet.server import ServerState, create_app
from embedfleet.server.embeddings import Batcher, Overloaded
from embedfleet.server.limits import RateLimiter
from embedfleet.server.search import TTLCache


@pytest.fixture
def app(data_dir, tmp_path):
    import dask.config

    roots = tmp_path / "roots"
    roots.mkdir()
    with dask.config.set({"embedfleet.jobs.allowed-roots": [str(roots)], "embedfleet.server.max-inline-bytes": 1000}), \
            JobService(data_dir=data_dir, estimator=lambda source, chunk: 1) as service:
        tokens = TokenStore(service)
        secrets = {name: tokens.create(name, admin=(name == "ops"))[1] for name in ("alice", "bob", "ops")}
        state = ServerState(service)
        with TestClient(create_app(state)) as client:
            client.secrets = secrets
            client.state = state
            yield client
        state.close()


def _auth(app, who):
    return {"Authorization": f"Bearer {app.secrets[who]}"}


def test_in_process_app_checks_tokens_scope_and_ownership(app):
    assert app.get("/v1/jobs").status_code == 401
    assert app.get("/v1/users", headers=_auth(app, "alice")).status_code == 403
    assert app.get("/v1/users", headers=_auth(app, "ops")).status_code == 200
    made = app.post("/v1/jobs", headers=_auth(app, "alice"),
                    json={"collection": "kb", "documents": [{"id": "a", "text": "hello there"}]})
    assert made.status_code == 201, made.text
    job = made.json()
    assert job["status"] == "queued" and job["source"] == "inline" and job["sink"] == "default"
    inline = list((app.state.inline_dir / "alice").glob("*.jsonl"))
    assert len(inline) == 1 and '"hello there"' in inline[0].read_text()
    assert oct(app.state.inline_dir.stat().st_mode & 0o777) == "0o700"
    assert app.get(f"/v1/jobs/{job['id']}", headers=_auth(app, "bob")).status_code == 404
    assert app.delete(f"/v1/jobs/{job['id']}", headers=_auth(app, "bob")).status_code == 404
    assert app.delete(f"/v1/jobs/{job['id']}", headers=_auth(app, "alice")).json()["status"] == "cancelled"
    too_big = app.post("/v1/jobs", headers=_auth(app, "alice"),
                       json={"collection": "kb", "documents": [{"id": "a", "text": "x" * 2000}]})
    assert too_big.status_code == 413
    twice = app.post("/v1/jobs", headers=_auth(app, "alice"),
                     json={"collection": "kb", "documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]})
    assert twice.status_code == 400 and "twice" in twice.json()["detail"]
    assert app.post("/v1/jobs", headers=_auth(app, "alice"),
                    json={"collection": "kb", "source": str(app.state.inline_dir / "bob")}).status_code == 403
    assert app.post("/v1/jobs", headers=_auth(app, "alice"),
                    json={"collection": "kb", "documents": [{"id": "a", "text": "x"}], "sink": "elsewhere"}).status_code == 400


def test_request_model_is_index_options_without_the_sink_uri():
    from embedfleet.options import IndexOptions
    from embedfleet.server.schemas import JobRequest

    properties = JobRequest.model_json_schema()["properties"]
    for field in IndexOptions.fields():
        assert field.name in properties
        if field.name != "sink":
            assert properties[field.name].get("description") == field.help
    assert "(embedfleet.sinks.named)" in properties["sink"]["description"]
    mode = properties["mode"]["anyOf"][0]
    assert mode["enum"] == list(IndexOptions.fields()[[f.name for f in IndexOptions.fields()].index("mode")].choices)


def test_ttl_cache_evicts_least_recent_and_expired():
    cache = TTLCache(2, ttl=0.2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # b is the least recently used
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    time.sleep(0.25)
    assert cache.get("a") is None
    TTLCache(0, ttl=1).put("x", 1)


def test_rate_limiter_by_tier():
    limiter = RateLimiter({"free": 2, "enterprise": None, "default": 5}, lambda user: {"eve": "enterprise"}.get(user, "free"))
    from fastapi import HTTPException

    limiter.check("amy")
    limiter.check("amy")
    with pytest.raises(HTTPException) as refused:
        limiter.check("amy")
    assert refused.value.status_code == 429 and int(refused.value.headers["Retry-After"]) >= 1
    limiter.check("bo")  # per user
    for _ in range(100):
        limiter.check("eve")  # unlimited tier


class _CountingEmbedder:
    dimensions = 4

    def __init__(self, delay: float = 0.0):
        self.calls: list[list[str]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]

    def embed(self, texts, n_tokens=None):
        time.sleep(self.delay)
        with self.lock:
            self.calls.append(list(texts))
        return np.asarray([[len(t), 1, 0, 0] for t in texts], dtype=np.float32)


def test_batcher_shares_model_calls_and_identical_inputs():
    embedder = _CountingEmbedder(delay=0.05)
    batcher = Batcher(embedder, max_batch=64, max_wait=0.02, queue_limit=1000, cache_size=10)

    async def many():
        return await asyncio.gather(*(batcher.embed([f"text {i % 5}", "same"]) for i in range(40)))

    try:
        results = asyncio.run(many())
        computed = [t for call in embedder.calls for t in call]
        assert sorted(computed) == sorted({f"text {i}" for i in range(5)} | {"same"})  # each text once
        assert len(embedder.calls) <= 2  # shared calls, not 40
        vectors, tokens = results[7]
        assert vectors[0][0] == len("text 2") and tokens == 3
        before = len(embedder.calls)
        asyncio.run(batcher.embed(["same"]))  # from the LRU
        assert len(embedder.calls) == before
    finally:
        batcher.close()


def test_batcher_refuses_past_its_queue_limit():
    embedder = _CountingEmbedder(delay=0.3)
    batcher = Batcher(embedder, max_batch=2, max_wait=0.0, queue_limit=4, cache_size=0)

    async def flood():
        first = asyncio.ensure_future(batcher.embed(["a", "b", "c"]))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            await batcher.embed(["d", "e"])
        assert refused.value.retry_after >= 1
        await first

    try:
        asyncio.run(flood())
    finally:
        batcher.close()


def test_body_limit_counts_streamed_bodies():
    from fastapi import FastAPI

    from embedfleet.server.limits import BodyLimit

    inner = FastAPI()

    @inner.post("/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    inner.add_middleware(BodyLimit, limit=100)
    with TestClient(inner) as client:
        assert client.post("/echo", content=b"x" * 100).json() == {"n": 100}
        assert client.post("/echo", content=b"x" * 101).status_code == 413
        assert client.post("/echo", content=iter([b"x" * 60, b"x" * 60])).status_code == 413
        assert client.post("/echo", content=iter([b"x" * 40, b"x" * 40])).json() == {"n": 80}


def test_a_refused_inline_job_leaves_no_file(app):
    import dask.config

    body = {"collection": "kb", "documents": [{"id": "a", "text": "x"}]}
    with dask.config.set({"embedfleet.jobs.queue-limit": 1}):
        assert app.post("/v1/jobs", headers=_auth(app, "bob"), json=body).status_code == 201
        refused = app.post("/v1/jobs", headers=_auth(app, "bob"), json=body)
    assert refused.status_code == 429, refused.text
    assert len(list((app.state.inline_dir / "bob").glob("*"))) == 1
