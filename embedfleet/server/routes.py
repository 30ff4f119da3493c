"""The ``/v1`` routes of jobs, collections (search) and embeddings; every one needs a token.

A user sees only their own jobs and collections: another user's job or collection is a 404,
the same answer as for one that does not exist.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from embedfleet.errors import ConfigError, JobNotFound, PermissionDenied
from embedfleet.options import IndexOptions
from embedfleet.schedulers.models import FINAL_STATUSES, STATUSES
from embedfleet.server.auth import Caller
from embedfleet.server.schemas import (
    EmbeddingsRequest,
    JobRequest,
    SearchRequest,
    SearchResponse,
    option_values,
)

__all__ = ["collections_router", "embeddings_router", "jobs_router"]

jobs_router = APIRouter(tags=["jobs"])
collections_router = APIRouter(tags=["collections"])
embeddings_router = APIRouter(tags=["embeddings"])

JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
Name = Annotated[str, Path(min_length=1, max_length=60)]
SinkName = Annotated[str, Query(min_length=1, max_length=64)]


def _state(request: Request):
    return request.app.state.embedfleet


def _public_job(state, info) -> dict[str, Any]:
    """A job as its owner sees it over the API: the operator's sink URI and data dir stay hidden."""
    out = info.to_dict()
    names = {uri: name for name, uri in state.sinks.items()}
    out["sink"] = names.get(info.sink, "-")
    try:
        if FsPath(info.source).resolve().is_relative_to(state.inline_dir):
            out["source"] = "inline"
    except (OSError, ValueError):
        pass
    out.pop("dispatcher", None)
    if out.get("error"):
        # A reader's message may name a file in the data dir (another user's, where a source was
        # swapped for a symlink to it): the data dir's paths are the server's, not the owner's.
        out["error"] = out["error"].replace(str(state.inline_dir), "<inline documents>").replace(
            str(state.local_dir.resolve()), "<data dir>")
    return out


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no job {job_id!r}")


# -------------------------------------------------------------------------------------- jobs


@jobs_router.post("/jobs", status_code=201, summary="Queue a job: a source path under the allowed roots, or inline documents")
async def submit_job(body: JobRequest, request: Request, who: Caller) -> dict:
    state = _state(request)
    if (body.source is None) == (body.documents is None):
        raise HTTPException(status_code=400, detail="give exactly one of source and documents")
    values = option_values(body)
    uri = state.search.uri(body.sink)

    def submit():
        if body.documents is not None:
            if body.text_column is not None or body.id_column is not None:
                raise ConfigError("text_column and id_column describe a source file, not inline documents")
            size = sum(len(d.text.encode("utf-8", "surrogatepass")) + len(json.dumps(d.metadata or {})) for d in body.documents)
            if size > state.max_inline_bytes:
                raise HTTPException(status_code=413, detail=f"inline documents of {size} bytes; at most {state.max_inline_bytes}")
            if not body.documents:
                raise ConfigError("documents is empty")
            values.update(text_column="text", id_column="id")
            options = IndexOptions.merge(None, **values, sink=uri)
            source = state.write_inline(who.user, body.documents)
            try:
                return state.service.submit(source, user=who.user, priority=body.priority, options=options)
            except BaseException:
                # Refused (quota, queue limit, a bad option): no job will ever read the file.
                FsPath(source).unlink(missing_ok=True)
                raise
        source = state.check_source(body.source)
        options = IndexOptions.merge(None, **values, sink=uri)
        return state.service.submit(source, user=who.user, priority=body.priority, options=options)

    info = await run_in_threadpool(submit)
    return _public_job(state, info)


@jobs_router.get("/jobs", summary="Your jobs, newest first")
async def list_jobs(
    request: Request,
    who: Caller,
    status: Annotated[list[str] | None, Query(description=f"Only these statuses: {', '.join(STATUSES)}")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict]:
    state = _state(request)
    infos = await run_in_threadpool(lambda: state.service.list(user=who.user, status=status or None, limit=limit))
    return [_public_job(state, i) for i in infos]


@jobs_router.get("/jobs/{job_id}", summary="One of your jobs")
async def get_job(job_id: JobId, request: Request, who: Caller) -> dict:
    state = _state(request)
    return _public_job(state, await run_in_threadpool(state.service.status, job_id, user=who.user))


@jobs_router.delete("/jobs/{job_id}", summary="Cancel one of your jobs")
async def cancel_job(job_id: JobId, request: Request, who: Caller) -> dict:
    state = _state(request)
    try:
        info = await run_in_threadpool(state.service.cancel, job_id, user=who.user)
    except (PermissionDenied, JobNotFound):
        raise _not_found(job_id) from None
    return _public_job(state, info)


@jobs_router.post("/jobs/{job_id}/resume", summary="Queue an interrupted, failed or cancelled job again")
async def resume_job(job_id: JobId, request: Request, who: Caller) -> dict:
    state = _state(request)
    try:
        info = await run_in_threadpool(state.service.resume, job_id, user=who.user)
    except (PermissionDenied, JobNotFound):
        raise _not_found(job_id) from None
    return _public_job(state, info)


_WATCHED = ("status", "stage", "cancel_requested", "documents", "chunks", "embedded", "skipped", "deleted",
            "partitions_done", "partitions_total", "error")


@jobs_router.get(
    "/jobs/{job_id}/events",
    summary="Server-Sent Events: the job each time its status, stage or counts change, until it ends",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(job_id: JobId, request: Request, who: Caller,
                     interval: Annotated[float, Query(ge=0.05, le=10)] = 0.25) -> StreamingResponse:
    state = _state(request)
    first = await run_in_threadpool(state.service.status, job_id, user=who.user)  # 404 before the stream starts
    secret = request.headers.get("authorization", "").partition(" ")[2].strip()
    if not state.streams.acquire(who.user):
        raise HTTPException(status_code=429, headers={"Retry-After": "5"},
                            detail=f"at most {state.streams.limit} event streams open at once per user")

    return _Stream(_job_stream(state, request, job_id, who.user, secret, interval, first),
                   on_close=lambda: state.streams.release(who.user),
                   media_type="text/event-stream", headers={"Cache-Control": "no-store"})


class _Stream(StreamingResponse):
    """A stream that gives its slot back however it ends: a client gone before the first event
    cancels the response before its generator ever starts, so a ``finally`` there never runs."""

    def __init__(self, *args, on_close, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _job_stream(state, request: Request, job_id: str, user: str, secret: str, interval: float, first):
    """The events of one job; ends when the job does, the client leaves, or its token stops
    being valid (revoked or expired while the stream is open: checked every second)."""
    info, last, quiet, checked = first, None, 0.0, 0.0
    while True:
        seen = tuple(getattr(info, k) for k in _WATCHED)
        if seen != last:
            last, quiet = seen, 0.0
            yield f"event: job\ndata: {json.dumps(_public_job(state, info), sort_keys=True)}\n\n"
            if info.status in FINAL_STATUSES:
                yield "event: end\ndata: {}\n\n"
                return
        elif quiet >= 15.0:
            quiet = 0.0
            yield ": keep-alive\n\n"
        if await request.is_disconnected():
            return
        await asyncio.sleep(interval)
        quiet += interval
        checked += interval
        if checked >= 1.0:
            checked = 0.0
            if await run_in_threadpool(state.tokens.authenticate, secret) is None:
                yield 'event: error\ndata: {"detail": "the token was revoked or has expired"}\n\n'
                return
        info = await run_in_threadpool(state.service.status, job_id, user=user)


@jobs_router.get("/quota", summary="Your tier, today's chunk quota and concurrency", tags=["quota"])
async def quota(request: Request, who: Caller) -> dict:
    state = _state(request)
    return (await run_in_threadpool(state.service.quota, who.user)).to_dict()


# ------------------------------------------------------------------------------ collections


def _missing(name: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no collection {name!r}")


@collections_router.get("/collections", summary="Your collections in one of the sinks")
async def list_collections(request: Request, who: Caller, sink: SinkName = "default") -> dict:
    state = _state(request)
    rows = await run_in_threadpool(state.search.list, who.user, sink)
    return {"user": who.user, "sink": sink, "collections": rows}


@collections_router.get("/collections/{name}", summary="One of your collections: model, dimensions, count")
async def get_collection(name: Name, request: Request, who: Caller, sink: SinkName = "default") -> dict:
    from embedfleet.server.search import NoSuchCollection

    state = _state(request)
    try:
        return await run_in_threadpool(state.search.describe, who.user, name, sink)
    except NoSuchCollection:
        raise _missing(name) from None


@collections_router.delete("/collections/{name}", summary="Drop one of your collections and every vector in it")
async def drop_collection(name: Name, request: Request, who: Caller, sink: SinkName = "default") -> dict:
    from embedfleet.server.search import NoSuchCollection

    state = _state(request)
    try:
        await run_in_threadpool(state.search.drop, who.user, name, sink)
    except NoSuchCollection:
        raise _missing(name) from None
    return {"dropped": name, "sink": sink}


@collections_router.post("/collections/{name}/search", response_model=SearchResponse,
                         summary="The k chunks nearest to the query, embedded with the collection's model")
async def search(name: Name, body: SearchRequest, request: Request, who: Caller) -> dict:
    from embedfleet.server.search import NoSuchCollection

    state = _state(request)
    await run_in_threadpool(state.rate.check, who.user)
    try:
        hits, cached = await run_in_threadpool(state.search.search, who.user, name, body.sink, body.query, body.k)
    except NoSuchCollection:
        raise _missing(name) from None
    return {"hits": hits, "cached": cached}


# ------------------------------------------------------------------------------- embeddings


@embeddings_router.post("/embeddings", summary="OpenAI-compatible embeddings with a model of embedfleet.models")
async def embeddings(body: EmbeddingsRequest, request: Request, who: Caller) -> dict:
    from embedfleet import config
    from embedfleet.server.embeddings import Overloaded

    state = _state(request)
    await run_in_threadpool(state.rate.check, who.user)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise HTTPException(status_code=400, detail="input is empty")
    if len(texts) > state.max_inputs:
        raise HTTPException(status_code=400, detail=f"at most {state.max_inputs} inputs per request, not {len(texts)}")
    if body.model not in (config.get("models", None) or {}):
        raise HTTPException(status_code=404, detail=f"no model {body.model!r}; models: {', '.join(sorted(config.get('models')))}")
    batcher = await run_in_threadpool(state.batcher, body.model)
    try:
        vectors, tokens = await batcher.embed(texts)
    except Overloaded as exc:
        raise HTTPException(status_code=429, detail=str(exc), headers={"Retry-After": str(int(exc.retry_after + 0.999))}) from None
    data = []
    for i, vector in enumerate(vectors):
        if body.encoding_format == "base64":
            value: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            value = vector.astype(float).tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
