"""The CLI as a client of ``embedfleet serve``: ``--server URL`` (or ``EMBEDFLEET_SERVER``) and
``EMBEDFLEET_TOKEN``.

With a server, ``jobs submit/list/status/cancel/resume``, ``search``, ``collections`` and
``quota`` send their request over HTTP and print what they print locally, from the server's
answer; who the user is comes from the token, so ``--user``, ``--db`` and ``--data-dir`` do not
apply, and ``--sink`` names one of the server's sinks instead of giving a URI. Without a server
they open the job database and stores directly: the administrator's way in.
"""

from __future__ import annotations

import datetime as dt
import os
import types
from typing import Any
from urllib.parse import urlsplit

import click

from embedfleet.errors import (
    EmbedfleetError,
    JobNotFound,
    PermissionDenied,
    QueueFull,
    QuotaExceeded,
    SinkError,
)

__all__ = ["Remote", "as_info", "remote", "server_option"]

SERVER_ENV = "EMBEDFLEET_SERVER"
TOKEN_ENV = "EMBEDFLEET_TOKEN"

server_option = click.option(
    "--server",
    "server",
    default=None,
    envvar=SERVER_ENV,
    metavar="URL",
    help=f"An `embedfleet serve` to send this to (env {SERVER_ENV}; the token from {TOKEN_ENV}).",
)


class RemoteError(EmbedfleetError):
    """The server refused the request; its message is the answer's detail."""


def _error_for(status: int, detail: str, what: str) -> EmbedfleetError:
    if status == 401:
        return PermissionDenied(f"the server refused the token ({TOKEN_ENV}): {detail}")
    if status == 403:
        return QuotaExceeded(detail) if "quota" in detail else PermissionDenied(detail)
    if status == 404:
        return JobNotFound(detail) if what == "job" else SinkError(detail)
    if status == 429:
        return QueueFull(detail)
    return RemoteError(f"{detail} (HTTP {status})")


class Remote:
    def __init__(self, url: str, token: str | None):
        import httpx

        if not token:
            raise PermissionDenied(f"--server needs a token in {TOKEN_ENV} (from `embedfleet tokens create`)")
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise click.UsageError(f"--server must be an http(s):// URL, not {url!r}")
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            # The token is a bearer secret: anyone on the path can replay it.
            click.echo(f"Warning: sending the token to {parts.hostname} over plain HTTP; put the server behind TLS.",
                       err=True)
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                                  timeout=httpx.Timeout(120, connect=10))

    def __enter__(self) -> Remote:  # noqa: PYI034 - a final class
        return self

    def __exit__(self, *exc) -> None:
        self._http.close()

    def call(self, method: str, path: str, *, what: str = "job", **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
                detail = body.get("detail") if isinstance(body, dict) else None
            except ValueError:
                detail = response.text.strip()[:200]
            if isinstance(detail, list):  # a validation error: name the fields
                detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
            if not detail:  # not an embedfleet server's answer (a proxy's, say): say where it came from
                detail = f"HTTP {response.status_code} {response.reason_phrase} from {self.url}{path}"
            raise _error_for(response.status_code, str(detail), what)
        return response.json()


def remote(server: str | None, *, refused: dict[str, Any] | None = None) -> Remote | None:
    """A client for ``server``, or None for local mode. ``refused``: options that do not apply to a server."""
    if not server:
        return None
    for flag, value in (refused or {}).items():
        if value not in (None, False, ()):
            raise click.UsageError(f"{flag} does not apply with --server: the server's token says who you are and "
                                   "which database and stores to use")
    return Remote(server, os.environ.get(TOKEN_ENV))


_TIMES = ("created_at", "queued_at", "started_at", "finished_at", "heartbeat_at")


def as_info(body: dict[str, Any]) -> types.SimpleNamespace:
    """A job from the server with the attributes the local formatting reads (times as datetimes)."""
    values = dict(body)
    for key in _TIMES:
        if values.get(key):
            values[key] = dt.datetime.fromisoformat(values[key])
        else:
            values[key] = None
    values.setdefault("dispatcher", None)
    namespace = types.SimpleNamespace(**values)
    namespace.to_dict = lambda: dict(body)
    return namespace
