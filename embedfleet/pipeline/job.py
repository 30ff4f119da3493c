"""A job's frozen description and its result.

:class:`JobSpec` is everything one indexing run needs, resolved on the client from config and
options (DESIGN §7: one frozen settings object per job). It is what the job service stores
(as JSON, :meth:`JobSpec.to_json`, which leaves out the sink's credentials) and what
:func:`embedfleet.pipeline.run.run_job` executes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from embedfleet.config import ChunkSpec, EmbedderSpec, ModelSpec, RetrySpec
from embedfleet.datasets.source import SourceSpec
from embedfleet.options import Mode, OnError
from embedfleet.sinks.base import SinkSpec
from embedfleet.sinks.registry import make_spec

__all__ = ["JobSpec", "Progress", "JobResult", "Mode", "Stage", "SkippedDocument"]

Stage = Literal["queued", "reading", "chunking", "embedding", "writing", "committing", "done"]


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    user: str
    collection: str  # the user-facing name; the store sees physical_name(user, collection)
    source: SourceSpec
    sink: SinkSpec
    chunk: ChunkSpec
    embedder: EmbedderSpec
    data_dir: str
    mode: Mode = "sync"
    on_error: OnError = "skip"
    chunks_per_partition: int = 512
    retry: RetrySpec = RetrySpec()
    #: A sync (or full run) that would delete more than this share of the collection's
    #: documents, or delete from an empty source, stops before deleting unless allowed.
    max_delete_fraction: float = 0.5
    allow_mass_delete: bool = False
    #: Add vectors of another family (float / int8 of a backend) to a collection, recording it as mixed.
    allow_mixed: bool = False

    @property
    def job_dir(self) -> str:
        return f"{self.data_dir}/jobs/{self.job_id}"

    def to_json(self) -> str:
        """The job's record (the job database, ``spec.json``): everything but the sink's credentials."""
        return json.dumps(asdict(replace(self, sink=self.sink.without_secrets())), sort_keys=True, default=list)

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        """The spec of a record, to run it: the sink's credentials come from this process's
        ``embedfleet.sinks.<scheme>`` config (the record's other sink options win)."""
        raw = json.loads(text)
        embedder = raw["embedder"]
        embedder["model"] = ModelSpec(**embedder["model"])
        source = raw["source"]
        source["extensions"] = tuple(source.get("extensions") or ())
        return cls(
            job_id=raw["job_id"],
            user=raw["user"],
            collection=raw["collection"],
            source=SourceSpec(**source),
            sink=make_spec(raw["sink"]["uri"], dict(_tuplify(raw["sink"]["options"]))),
            chunk=ChunkSpec(**raw["chunk"]),
            embedder=EmbedderSpec(**embedder),
            data_dir=raw["data_dir"],
            mode=raw["mode"],
            on_error=raw["on_error"],
            chunks_per_partition=raw["chunks_per_partition"],
            retry=RetrySpec(**raw["retry"]),
            max_delete_fraction=raw.get("max_delete_fraction", cls.max_delete_fraction),
            allow_mass_delete=raw.get("allow_mass_delete", cls.allow_mass_delete),
            allow_mixed=raw.get("allow_mixed", cls.allow_mixed),
        )


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


@dataclass(frozen=True)
class SkippedDocument:
    doc_id: str
    reason: str


@dataclass
class Progress:
    """Counts while a job runs; handed to the progress callback after every finished task."""

    stage: Stage = "reading"
    documents: int = 0
    chunks: int = 0
    embedded: int = 0  # chunks embedded in this run
    skipped: int = 0  # chunks unchanged since the last run, not embedded again
    deleted: int = 0  # stale chunks removed from the sink
    written: int = 0  # chunks written to the sink
    skipped_documents: int = 0
    tokens: int = 0  # real (unpadded) tokens embedded
    partitions_done: int = 0
    partitions_total: int = 0
    chunks_to_embed: int | None = None  # known after chunking: what the embed stage will do


@dataclass
class JobResult:
    job_id: str
    status: Literal["succeeded", "failed", "cancelled"]
    user: str
    sink: str
    collection: str
    documents: int = 0
    chunks: int = 0
    embedded: int = 0
    skipped: int = 0
    deleted: int = 0
    skipped_documents: list[SkippedDocument] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0
    tokens: int = 0
    tokens_per_second: float = 0.0
    chunks_per_second: float = 0.0
    padding_efficiency: float | None = None
    precision: str | None = None
    error: str | None = None
    # A remote model's bill: tokens the provider embedded (its count where it reports one) and
    # HTTP requests made, retries included. 0 for in-process models.
    tokens_sent: int = 0
    requests: int = 0
    # A quantized job's report (QualityReport.to_dict()): its vectors against fp32 on a sample
    # of its chunks; also stored in the collection's metadata.
    quality: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["skipped_documents"] = [asdict(s) for s in self.skipped_documents]
        return out
