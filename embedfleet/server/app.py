"""The FastAPI application of ``embedfleet serve``: :func:`create_app` over a :class:`ServerState`.

Unauthenticated: ``/healthz``, ``/metrics`` (Prometheus: the dispatcher's metrics, the search
cache's hit rate, the embeddings batches) and ``/openapi.json``. Everything under ``/v1`` needs
a Bearer token (:mod:`embedfleet.server.auth`). Errors are ``{"detail": message}``: a job or
collection of another user is a 404 exactly like a missing one.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as FastPath
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from starlette.concurrency import run_in_threadpool

from embedfleet.errors import (
    ConfigError,
    EmbedfleetError,
    JobError,
    JobNotFound,
    PermissionDenied,
    QueueFull,
    QuotaExceeded,
    SinkError,
    SourceError,
    UnknownBackendError,
)
from embedfleet.server.auth import Admin
from embedfleet.server.schemas import TierRequest, TokenRequest, UserRequest
from embedfleet.server.state import ServerState

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _status_of(exc: EmbedfleetError) -> int:
    if isinstance(exc, JobNotFound):
        return 404
    if isinstance(exc, QueueFull):
        return 429
    if isinstance(exc, (QuotaExceeded, PermissionDenied)):
        return 403
    if isinstance(exc, (ConfigError, SourceError, UnknownBackendError)):
        return 400
    if isinstance(exc, JobError):
        return 409
    if isinstance(exc, SinkError):
        return 502
    return 500


def create_app(state: ServerState) -> FastAPI:
    from embedfleet.server.dashboard import dashboard_router
    from embedfleet.server.limits import BodyLimit
    from embedfleet.server.routes import (
        collections_router,
        embeddings_router,
        jobs_router,
    )

    app = FastAPI(
        title="embedfleet",
        summary="Jobs, search and embeddings over a shared Dask cluster",
        version=_version(),
        docs_url=None,
        redoc_url=None,
    )
    app.state.embedfleet = state
    app.add_middleware(BodyLimit, limit=state.max_request_bytes)
    Gauge("embedfleet_search_cache_hit_ratio", "Search cache hits / lookups since start (NaN before any)",
          registry=state.registry).set_function(lambda: state.search.hit_rate() if state.search.hit_rate() is not None else float("nan"))

    @app.exception_handler(EmbedfleetError)
    async def _embedfleet_error(request: Request, exc: EmbedfleetError):
        status = _status_of(exc)
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # The default answer echoes each bad input: a megabyte back for a megabyte sent, and a
        # lone surrogate in it cannot even be encoded (a 500). Where and why is enough.
        errors = [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Still one JSON answer; the exception's text (paths, URIs) goes to the log, not the caller.
        log.error("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
        return JSONResponse({"detail": "internal error; the server's log has the cause"}, status_code=500)

    @app.get("/healthz", tags=["service"], summary="Liveness: 200 while the server and its dispatcher run")
    def healthz() -> dict:
        dispatcher = state.dispatcher
        return {"status": "ok", "dispatcher": getattr(dispatcher, "name", None),
                "running_jobs": len(dispatcher.running) if dispatcher is not None else 0}

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(jobs_router, prefix="/v1")
    app.include_router(collections_router, prefix="/v1")
    app.include_router(embeddings_router, prefix="/v1")
    app.include_router(dashboard_router)
    _admin_routes(app, state)
    return app


def _admin_routes(app: FastAPI, state: ServerState) -> None:
    from embedfleet import config

    local = str(config.get("user"))

    def not_local(user: str) -> None:
        if user == local:
            raise HTTPException(status_code=404, detail=f"no user {user!r}")

    def not_local_tier(tier: str | None) -> None:
        if tier is not None and tier == config.get("jobs.local-tier"):
            raise HTTPException(status_code=403, detail=f"tier {tier!r} is the local administrator's")

    @app.get("/v1/users", tags=["admin"], summary="Every user and their tier")
    async def list_users(who: Admin) -> list[dict]:
        users = await run_in_threadpool(state.service.list_users)
        return [u.to_dict() for u in users if u.id != local]

    @app.post("/v1/users", tags=["admin"], status_code=201, summary="Add a user (default tier unless given)")
    async def add_user(body: UserRequest, who: Admin) -> dict:
        not_local(body.id)
        not_local_tier(body.tier)
        return (await run_in_threadpool(lambda: state.service.add_user(body.id, tier=body.tier))).to_dict()

    @app.put("/v1/users/{user}/tier", tags=["admin"], summary="Move a user to another tier")
    async def set_tier(user: Annotated[str, FastPath(min_length=1, max_length=64)], body: TierRequest, who: Admin) -> dict:
        not_local(user)
        not_local_tier(body.tier)
        return (await run_in_threadpool(state.service.set_tier, user, body.tier)).to_dict()

    @app.get("/v1/tokens", tags=["admin"], summary="Every token (never a secret)")
    async def list_tokens(who: Admin) -> list[dict]:
        return [t.to_dict() for t in await run_in_threadpool(state.tokens.list)]

    @app.post("/v1/tokens", tags=["admin"], status_code=201, summary="Create a token; its secret is in this answer only")
    async def create_token(body: TokenRequest, who: Admin) -> dict:
        import datetime as dt

        lifetime = dt.timedelta(seconds=body.expires_in_seconds) if body.expires_in_seconds else None
        info, secret = await run_in_threadpool(
            lambda: state.tokens.create(body.user, admin=body.admin, expires_in=lifetime, note=body.note))
        return {**info.to_dict(), "token": secret}

    @app.delete("/v1/tokens/{token_id}", tags=["admin"], summary="Revoke a token")
    async def revoke_token(token_id: Annotated[int, FastPath(ge=1, le=2**31 - 1)], who: Admin) -> dict:
        try:
            return (await run_in_threadpool(state.tokens.revoke, token_id)).to_dict()
        except ConfigError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("embedfleet")
    except PackageNotFoundError:  # pragma: no cover - a source checkout
        return "0"
