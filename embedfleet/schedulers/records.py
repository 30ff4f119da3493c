"""The job service's record types: what the owner API, the dispatcher's ledger and the readers hand out.

Plain frozen dataclasses over a job row; no session or engine here, so every side of the
service (:mod:`~embedfleet.schedulers.reads`, :mod:`~embedfleet.schedulers.admission`,
:mod:`~embedfleet.schedulers.ledger`, :mod:`~embedfleet.schedulers.service`) can import them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from embedfleet.schedulers.models import Job

if TYPE_CHECKING:
    from embedfleet.pipeline.job import Progress

__all__ = ["Candidate", "Claim", "Counts", "JobInfo", "QuotaInfo", "UserInfo", "iso"]


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class JobInfo:
    """One job as its owner sees it. ``to_dict()`` is what ``jobs status --json`` prints."""

    id: str
    user: str
    status: str
    stage: str
    priority: int
    effective_priority: float | None  # live for waiting jobs; as dispatched for the others
    source: str
    sink: str
    collection: str
    model: str
    mode: str
    chunk_unit: str
    chunk_size: int
    chunk_overlap: int
    documents: int
    chunks: int
    embedded: int
    skipped: int
    deleted: int
    skipped_documents: int
    partitions_done: int
    partitions_total: int
    estimated_chunks: int  # chunks to embed, estimated at submit (see JobService.submit)
    to_embed: int | None
    charged: int
    cancel_requested: bool
    attempt: int
    dispatcher: str | None
    created_at: dt.datetime
    queued_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    error: str | None
    batch: str | None = None  # the batch of coalesced jobs its latest run was part of

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = iso(value) if isinstance(value, dt.datetime) else value
        if out["effective_priority"] is not None:
            out["effective_priority"] = round(out["effective_priority"], 3)
        return out

    @classmethod
    def from_row(cls, job: Job, effective: float | None) -> JobInfo:
        return cls(
            id=job.id,
            user=job.owner,
            status=job.status,
            stage=job.stage,
            priority=job.priority,
            effective_priority=effective,
            source=job.source,
            sink=job.sink,
            collection=job.collection,
            model=job.model,
            mode=job.mode,
            chunk_unit=job.chunk_unit,
            chunk_size=job.chunk_size,
            chunk_overlap=job.chunk_overlap,
            documents=job.documents,
            chunks=job.chunks,
            embedded=job.embedded,
            skipped=job.skipped,
            deleted=job.deleted,
            skipped_documents=job.skipped_documents,
            partitions_done=job.partitions_done,
            partitions_total=job.partitions_total,
            estimated_chunks=job.estimated_chunks,
            to_embed=job.to_embed,
            charged=job.charged,
            cancel_requested=bool(job.cancel_requested),
            attempt=job.attempt,
            dispatcher=job.dispatcher,
            created_at=job.created_at,
            queued_at=job.queued_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            heartbeat_at=job.heartbeat_at,
            error=job.error,
            batch=job.batch,
        )


@dataclass(frozen=True)
class UserInfo:
    id: str
    tier: str
    created_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "tier": self.tier, "created_at": iso(self.created_at)}


@dataclass(frozen=True)
class QuotaInfo:
    user: str
    tier: str
    day: dt.date  # the UTC day the numbers are for
    daily_limit: int | None  # None: unlimited
    used_today: int  # chunks charged today
    reserved: int  # chunks the user's active jobs hold and were not charged for yet (HELD)
    remaining: int | None  # None: unlimited
    concurrent_limit: int
    running: int
    queued: int  # waiting: queued or interrupted
    queue_limit: int
    known_user: bool  # False: the user does not exist yet; these are the defaults they would get

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["day"] = self.day.isoformat()
        return out


@dataclass(frozen=True)
class Candidate:
    """A waiting job as the dispatcher ranks it."""

    id: str
    owner: str
    tier: str
    base: int
    effective: float
    queued_at: dt.datetime
    created_at: dt.datetime
    # Where it writes and how, for forming batches of coalesced jobs (pipeline/batch.py).
    sink: str = ""
    collection: str = ""
    mode: str = ""
    estimated_chunks: int = 0


@dataclass(frozen=True)
class Claim:
    """A job a dispatcher has just claimed: what it needs to run it."""

    id: str
    owner: str
    attempt: int
    spec: str  # JobSpec JSON
    priority: float  # effective priority at the claim


@dataclass(frozen=True)
class Counts:
    """Counts to store from a Progress or a JobResult."""

    stage: str | None = None
    documents: int | None = None
    chunks: int | None = None
    embedded: int | None = None
    skipped: int | None = None
    deleted: int | None = None
    skipped_documents: int | None = None
    partitions_done: int | None = None
    partitions_total: int | None = None

    @classmethod
    def from_progress(cls, p: Progress) -> Counts:
        return cls(
            stage=p.stage,
            documents=p.documents,
            chunks=p.chunks,
            embedded=p.embedded,
            skipped=p.skipped,
            deleted=p.deleted,
            skipped_documents=p.skipped_documents,
            partitions_done=p.partitions_done,
            partitions_total=p.partitions_total,
        )

    def values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
