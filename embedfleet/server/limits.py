"""Request body size limit (413) and the per-tier request rate limit (429)."""

from __future__ import annotations

import json
import threading
import time

from fastapi import HTTPException

__all__ = ["BodyLimit", "RateLimiter", "StreamSlots"]


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before it is parsed,
    whether it declares a Content-Length or streams chunks."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await _too_large(send, self.limit)
        # Read the body here, up to the limit: an exception raised from inside the app's own
        # body parsing would come back as its 400, not as this 413.
        parts, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return await _too_large(send, self.limit)
            parts.append(body)
            more = message.get("more_body", False)
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(parts), "more_body": False}], receive), send)


def _replay(messages, then=None):
    async def receive():
        if messages:
            return messages.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RateLimiter:
    """A token bucket per user: ``rate`` requests per minute by the user's tier, bursts up to that."""

    def __init__(self, per_minute: dict[str, int | None], tier_of):
        self.per_minute = per_minute
        self.tier_of = tier_of
        self._buckets: dict[str, tuple[float, float]] = {}
        self._tiers: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def _tier(self, user: str, now: float) -> str:
        cached = self._tiers.get(user)
        if cached is not None and now - cached[1] < 10.0:
            return cached[0]
        tier = self.tier_of(user)
        self._tiers[user] = (tier, now)
        return tier

    def check(self, user: str) -> None:
        now = time.monotonic()
        tier = self._tier(user, now)
        rate = self.per_minute.get(tier, self.per_minute.get("default"))
        if rate is None:
            return
        with self._lock:
            level, at = self._buckets.get(user, (float(rate), now))
            level = min(float(rate), level + (now - at) * rate / 60.0)
            if level < 1.0:
                wait = (1.0 - level) * 60.0 / rate
                self._buckets[user] = (level, now)
                raise HTTPException(status_code=429, detail=f"rate limit of tier {tier}: {rate} requests per minute",
                                    headers={"Retry-After": str(max(1, int(wait + 0.999)))})
            self._buckets[user] = (level - 1.0, now)


class StreamSlots:
    """How many event streams each user holds open: each one polls the database from a thread
    of the server's pool, so a client opening hundreds would starve every other request."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, user: str) -> bool:
        with self._lock:
            if self._open.get(user, 0) >= self.limit:
                return False
            self._open[user] = self._open.get(user, 0) + 1
            return True

    def release(self, user: str) -> None:
        with self._lock:
            left = self._open.get(user, 0) - 1
            if left > 0:
                self._open[user] = left
            else:
                self._open.pop(user, None)
