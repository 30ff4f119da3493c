"""Backend ``openai``: any OpenAI-compatible embeddings API (OpenAI, TEI, Infinity, vLLM, Ollama).

A partition's texts are cut, in order, into requests of at most ``max-inputs-per-request``
texts and ``max-request-bytes`` UTF-8 bytes, POSTed to ``{url}/embeddings`` with up to
``concurrent-requests`` in flight (async httpx), each ``{"model", "input": [...]}`` (and
``"dimensions"`` with ``send-dimensions``). Nothing is loaded: the embedder holds a tokenizer
(the model's ``tokenizer`` key) for counting tokens, and one HTTP client per call.

Limits, per worker process and provider (:class:`RateLimiter`)
-------------------------------------------------------------
``requests-per-minute`` and ``tokens-per-minute`` are the whole job's. Each worker process
that embeds gets an equal share (``EmbedderSpec.rate_share``, set where the job's tasks are
placed: tasks of a remote model are pinned, spread over the workers the job saw at its
start), and its tasks share one limiter, which spaces requests out (a request of n tokens
holds the token budget for n/tpm minutes), so the job's rate stays under the limit over any
window without the workers talking to each other. Two jobs of one model on one worker share
its limiter too. A 429's ``Retry-After`` pauses the process's limiter for that long.

Failures (:class:`CircuitBreaker`)
----------------------------------
429, 5xx, timeouts and connection errors are retried with exponential backoff and full
jitter, or after ``Retry-After`` when the provider says. Every failed attempt except a 429
counts toward the provider's circuit breaker (one per worker process and URL): after
``breaker-failures`` in a row it opens, and every request fails at once for
``breaker-cooldown`` seconds, after which one probe is let through. So a dead provider fails
the job in seconds, with one line naming the provider and the cause, instead of after hours of
retries. Other HTTP errors (400, 401, 404...) fail at once. A response with the wrong number of
vectors, the wrong dimension or non-finite values fails the partition.

The API key is read from the environment variable named by ``api-key-env`` on the worker,
each time a partition is embedded; it is never part of a spec, record or log line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedfleet.config import EmbedderSpec, RemoteSpec, resolve_model_path
from embedfleet.embedders.base import BatchStats, Embedder
from embedfleet.errors import ConfigError, EmbeddingError, ProviderUnavailable

logger = logging.getLogger(__name__)

__all__ = [
    "CircuitBreaker",
    "OpenAIEmbedder",
    "RateLimiter",
    "breaker_for",
    "limiter_for",
    "plan_requests",
]


# --------------------------------------------------------------------------- limits


class RateLimiter:
    """Requests and tokens per minute for one provider in one process, as reserved start times.

    Thread-safe: tasks on several worker threads (each with its own event loop) share it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_request = 0.0
        self._next_token = 0.0
        self._paused_until = 0.0

    def reserve(self, tokens: int, *, requests_per_minute: float | None, tokens_per_minute: float | None) -> float:
        """Seconds to wait before sending a request of ``tokens`` tokens (its slot is taken)."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_request, self._next_token, self._paused_until)
            if requests_per_minute:
                self._next_request = start + 60.0 / requests_per_minute
            if tokens_per_minute:
                self._next_token = start + tokens * 60.0 / tokens_per_minute
            return start - now

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures -> one probe after ``cooldown`` s."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self._lock = threading.Lock()
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing_since: float | None = None  # half-open: when the probe request went
        self.last_cause = ""

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def before(self, *, failures: int, cooldown: float) -> None:
        """Raise :class:`ProviderUnavailable` unless a request may go now."""
        with self._lock:
            if self.opened_at is None:
                return
            now = time.monotonic()
            # A probe that never reported (its partition was cancelled) is replaced after a cool-down.
            if now - (self.probing_since or self.opened_at) >= cooldown:
                self.probing_since = now  # half-open: this request is the probe
                return
            raise ProviderUnavailable(
                f"embedding provider {self.provider} is failing: circuit open after {failures} consecutive "
                f"failed requests (last: {self.last_cause})"
            )

    def success(self) -> None:
        with self._lock:
            self.consecutive, self.opened_at, self.probing_since = 0, None, None

    def failure(self, cause: str, *, failures: int) -> None:
        with self._lock:
            self.consecutive += 1
            self.last_cause = cause
            probing = self.probing_since is not None
            if probing or self.consecutive >= failures:
                if self.opened_at is None or probing:
                    logger.warning("embedding provider %s: circuit open (%s)", self.provider, cause)
                self.opened_at, self.probing_since = time.monotonic(), None


_registry_lock = threading.Lock()
_limiters: dict[tuple, RateLimiter] = {}
_breakers: dict[str, CircuitBreaker] = {}


def limiter_for(remote: RemoteSpec) -> RateLimiter:
    with _registry_lock:
        return _limiters.setdefault((remote.endpoint, remote.model, remote.api_key_env), RateLimiter())


def breaker_for(remote: RemoteSpec) -> CircuitBreaker:
    with _registry_lock:
        return _breakers.setdefault(remote.url, CircuitBreaker(remote.url))


def reset() -> None:
    """Forget this process's limiters and breakers (tests)."""
    with _registry_lock:
        _limiters.clear()
        _breakers.clear()


# --------------------------------------------------------------------------- requests


def plan_requests(texts: Sequence[str], *, max_inputs: int, max_bytes: int) -> list[range]:
    """Consecutive index ranges of ``texts``, each within ``max_inputs`` texts and ``max_bytes``
    UTF-8 bytes (a single longer text gets a request of its own)."""
    plans: list[range] = []
    start, size = 0, 0
    for i, text in enumerate(texts):
        n = len(text.encode("utf-8", "surrogatepass"))
        if i > start and (i - start >= max_inputs or size + n > max_bytes):
            plans.append(range(start, i))
            start, size = i, 0
        size += n
    if start < len(texts):
        plans.append(range(start, len(texts)))
    return plans


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class _Call:
    """One partition's requests: shared counters and the spec they run under."""

    remote: RemoteSpec
    share: float
    headers: dict[str, str]
    dimensions: int
    requests: int = 0
    tokens: int = 0
    retries: int = 0


def _scrub(text: str, headers: dict[str, str]) -> str:
    """``text`` (a provider's error body, which may quote what it was sent) without the key."""
    key = headers.get("Authorization", "").removeprefix("Bearer ")
    return text.replace(key, "***") if key else text


def _run(coro) -> Any:
    """Run ``coro`` to completion from sync code, also where this thread already runs a loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class OpenAIEmbedder(Embedder):
    #: What loading a model imports, for warm workers (embedfleet.embedders.registry.backend_modules).
    warm_modules = ("httpx",)

    warm_modules = ("httpx",)

    def __init__(self, spec: EmbedderSpec):
        super().__init__(spec)
        if spec.model.remote is None:
            raise ConfigError(f"model {spec.model.name!r} has no url: backend openai serves remote models only")
        self.precision = "fp32"
        self.memory_bytes = 0
        self._tokenizer = None

    @property
    def remote(self) -> RemoteSpec:
        return self.spec.model.remote

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = os.path.join(resolve_model_path(self.spec.model.path), "tokenizer.json")
            if not os.path.isfile(path):
                raise ConfigError(f"model {self.name!r}: tokenizer {self.spec.model.path!r} has no tokenizer.json")
            tokenizer = Tokenizer.from_file(path)
            tokenizer.no_truncation()
            tokenizer.no_padding()
            self._tokenizer = tokenizer
        return [len(e.ids) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def _headers(self) -> dict[str, str]:
        name = self.remote.api_key_env
        if not name:
            return {}
        key = os.environ.get(name)
        if not key:
            raise EmbeddingError(
                f"model {self.name}: environment variable {name} (its API key) is not set on {socket.gethostname()}"
            )
        return {"Authorization": f"Bearer {key}"}

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors, _ = self._embed([self.spec.model.document_prefix + t for t in texts], None)
        return vectors

    def embed_query(self, text: str) -> np.ndarray:
        vectors, _ = self._embed([self.spec.model.query_prefix + text], None)
        return vectors[0]

    def embed_with_stats(
        self, texts: Sequence[str], n_tokens: Sequence[int] | None = None, *, batch_tokens: int | None = None
    ) -> tuple[np.ndarray, BatchStats]:
        prefix = self.spec.model.document_prefix
        texts = [prefix + t for t in texts]
        counts = None if n_tokens is None or prefix else [int(n) for n in n_tokens]
        return self._embed(texts, counts)

    def _embed(self, texts: list[str], n_tokens: list[int] | None) -> tuple[np.ndarray, BatchStats]:
        stats = BatchStats(texts=len(texts))
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return out, stats
        if n_tokens is None:
            n_tokens = self.count_tokens(texts)
        remote = self.remote
        call = _Call(remote=remote, share=max(1e-9, float(self.spec.rate_share)), headers=self._headers(),
                     dimensions=self.dimensions)
        plans = plan_requests(texts, max_inputs=remote.max_inputs, max_bytes=remote.max_request_bytes)
        started = time.perf_counter()
        _run(self._send_all(call, texts, n_tokens, plans, out))
        if self.spec.model.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.where(norms > 0, norms, 1.0)
        stats.batches = stats.requests = call.requests
        stats.real_tokens = stats.padded_tokens = stats.tokens_sent = call.tokens
        stats.seconds = time.perf_counter() - started
        return out, stats

    async def _send_all(self, call: _Call, texts: list[str], n_tokens: list[int], plans: list[range],
                        out: np.ndarray) -> None:
        import httpx

        remote = call.remote
        limits = httpx.Limits(max_connections=remote.concurrency, max_keepalive_connections=remote.concurrency)
        semaphore = asyncio.Semaphore(remote.concurrency)
        async with httpx.AsyncClient(timeout=remote.timeout, limits=limits, headers=call.headers) as client:

            async def one(plan: range) -> None:
                async with semaphore:
                    out[plan.start:plan.stop] = await self._request(
                        client, call, texts[plan.start:plan.stop], sum(n_tokens[plan.start:plan.stop])
                    )

            tasks = [asyncio.ensure_future(one(plan)) for plan in plans]
            try:
                await asyncio.gather(*tasks)
            finally:
                # The first failure fails the partition: stop its other requests now.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _request(self, client, call: _Call, inputs: list[str], tokens: int) -> np.ndarray:
        import httpx

        remote = call.remote
        breaker, limiter = breaker_for(remote), limiter_for(remote)
        body: dict[str, Any] = {"model": remote.model, "input": inputs, "encoding_format": "float"}
        if remote.send_dimensions:
            body["dimensions"] = call.dimensions
        rpm = remote.requests_per_minute * call.share if remote.requests_per_minute else None
        tpm = remote.tokens_per_minute * call.share if remote.tokens_per_minute else None
        delay = remote.retry_delay
        for attempt in range(1, remote.retries + 1):
            breaker.before(failures=remote.breaker_failures, cooldown=remote.breaker_cooldown)
            wait = limiter.reserve(tokens, requests_per_minute=rpm, tokens_per_minute=tpm)
            if wait > 0:
                await asyncio.sleep(wait)
            retry_after: float | None = None
            call.requests += 1
            try:
                response = await client.post(remote.endpoint, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                breaker.failure(cause, failures=remote.breaker_failures)
            else:
                status = response.status_code
                if status == 200:
                    breaker.success()
                    vectors, used = self._parse(response, len(inputs), call.dimensions)
                    call.tokens += used if used is not None else tokens
                    return vectors
                cause = f"HTTP {status} {response.reason_phrase}".strip()
                if status == 429:
                    # Alive and asking us to slow down: no failure toward the breaker (and a probe
                    # that gets one has shown the provider answers).
                    breaker.success()
                    retry_after = _retry_after(response.headers.get("retry-after"))
                    if retry_after is not None:
                        limiter.pause(retry_after)
                elif status >= 500:
                    retry_after = _retry_after(response.headers.get("retry-after"))
                    breaker.failure(cause, failures=remote.breaker_failures)
                else:
                    breaker.success()
                    raise EmbeddingError(f"embedding provider {remote.url} refused the request: {cause}: "
                                         f"{_scrub(response.text[:300], call.headers)!r}")
            if attempt == remote.retries:
                raise EmbeddingError(f"embedding provider {remote.url}: request failed after {remote.retries} "
                                     f"attempts (last: {cause})")
            sleep = retry_after if retry_after is not None else random.uniform(0, min(remote.retry_max_delay, delay))
            call.retries += 1
            logger.info("embedding provider %s: %s (attempt %d/%d), retrying in %.2fs",
                        remote.url, cause, attempt, remote.retries, sleep)
            await asyncio.sleep(sleep)
            delay *= 2
        raise AssertionError("unreachable")

    def _parse(self, response, count: int, dimensions: int) -> tuple[np.ndarray, int | None]:
        provider = self.remote.url
        try:
            payload = response.json()
            data = payload["data"]
            rows = [(int(item.get("index", k)), item["embedding"]) for k, item in enumerate(data)]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EmbeddingError(f"embedding provider {provider} sent a malformed response ({exc!r}): "
                                 f"{response.text[:200]!r}") from exc
        if len(rows) != count or sorted(i for i, _ in rows) != list(range(count)):
            raise EmbeddingError(f"embedding provider {provider} returned {len(rows)} embeddings for {count} inputs")
        vectors = np.zeros((count, dimensions), dtype=np.float32)
        for index, embedding in rows:
            if not isinstance(embedding, list) or len(embedding) != dimensions:
                got = len(embedding) if isinstance(embedding, list) else type(embedding).__name__
                raise EmbeddingError(f"embedding provider {provider} returned {got}-dimensional embeddings; model "
                                     f"{self.name} is configured with {dimensions} dimensions")
            try:
                vectors[index] = embedding
            except (TypeError, ValueError) as exc:
                raise EmbeddingError(f"embedding provider {provider} returned a non-numeric embedding") from exc
        if not np.isfinite(vectors).all():
            raise EmbeddingError(f"embedding provider {provider} returned non-finite values (NaN or infinity)")
        usage = payload.get("usage") if isinstance(payload, dict) else None
        used = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        return vectors, int(used) if isinstance(used, (int, float)) and not math.isnan(used) else None
