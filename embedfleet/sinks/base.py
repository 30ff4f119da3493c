"""The contract every vector store implements (DESIGN §4).

A :class:`Sink` is a connection to one store, addressed by URI. It opens collections by their
*physical* name (see :mod:`embedfleet.sinks.naming`): the user-facing name never reaches a
store directly. A :class:`SinkCollection` takes embedding frames (``pyarrow.Table`` with the
schema of :func:`embedfleet.frames.schemas.embeddings_schema`) and splits every request to stay
under the store's own limits.

Opening is the same for every store (:meth:`Sink.open`: look up, create, the model guard);
a store supplies the steps that touch it through the ``_lookup``, ``_create``,
``_recorded_info`` and ``_collection`` hooks.
"""

from __future__ import annotations

import abc
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Iterator, Mapping, Sequence

from typing import TYPE_CHECKING

from embedfleet.config import SECRET_KEYS, hide_url_password, redacted
from embedfleet.errors import CollectionMismatch, SinkError

if TYPE_CHECKING:  # a search reads no frames: pyarrow is imported where one is written
    import numpy as np
    import pyarrow as pa

logger = logging.getLogger(__name__)

__all__ = ["CollectionInfo", "FLOAT_FAMILY", "Hit", "QualityReport", "Sink", "SinkCollection", "SinkSpec", "keep_last",
           "metadata_for_store", "vector_family"]


#: Precisions whose vectors one query ranks alike, whatever the backend: torch fp32 and its
#: ONNX/OpenVINO fp32 exports agree to ~1e-6 cosine, bf16 and fp16 to ~1e-4 (ranks stay the
#: same). int8 vectors are only ~0.94-0.99 cosine to fp32 (embedfleet's measured report), and
#: two quantizations (ONNX dynamic, OpenVINO static) err differently: each int8 backend is a
#: family of its own.
FLOAT_PRECISIONS = frozenset({"fp32", "bf16", "fp16", "auto"})  # auto resolves to fp32 or bf16
FLOAT_FAMILY = "float"


def vector_family(precision: str | None, backend: str | None) -> str | None:
    """The family of vectors made at ``precision`` by ``backend``: ``float`` or ``int8-<backend>``.

    A collection holds one family unless its user allows mixing (``--allow-mixed``): vectors of
    two families sit at systematically different distances from one query vector, so one
    family's chunks outrank the other's for reasons that have nothing to do with the text.
    None when the precision is unknown (a collection made before precisions were recorded).
    """
    if not precision:
        return None
    if precision in FLOAT_PRECISIONS:
        return FLOAT_FAMILY
    # Before backends were recorded, ONNX was the only backend that quantized.
    return f"{precision}-{backend or 'onnx'}"


@dataclass(frozen=True)
class QualityReport:
    """How close a quantized collection's vectors are to fp32, measured by the job that embedded them
    on a sample of its own chunks (:mod:`embedfleet.embedders.quality`)."""

    family: str  # the vectors measured, e.g. int8-onnx
    samples: int  # chunks embedded both ways
    mean_cosine: float
    min_cosine: float
    top10_overlap: float  # each sampled chunk as a query over the sample: share of fp32's 10 nearest kept
    job_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "QualityReport":
        return cls(family=str(raw["family"]), samples=int(raw["samples"]), mean_cosine=float(raw["mean_cosine"]),
                   min_cosine=float(raw["min_cosine"]), top10_overlap=float(raw["top10_overlap"]),
                   job_id=raw.get("job_id"))

    def describe(self) -> str:
        return (f"{self.family}: cosine to fp32 on {self.samples} of the collection's chunks: mean {self.mean_cosine:.4f}, "
                f"min {self.min_cosine:.4f}, top-10 neighbour overlap {self.top10_overlap:.3f}")


@dataclass(frozen=True)
class CollectionInfo:
    """What a collection records about how its vectors were made. The model guard compares these.

    Stored as flat scalar metadata (:meth:`to_metadata`) that every store keeps: Chroma
    collection metadata, Milvus collection properties, the Parquet ``_collection.json``;
    ``embedfleet_families`` lists every family (comma-separated), the creator's first.
    """

    model: str
    dimensions: int
    metric: str = "cosine"
    precision: str | None = None  # what the creating job embedded at; mixing precisions of one family is allowed
    backend: str | None = None  # the creating job's backend
    #: Vector families added after the collection was made (with ``--allow-mixed``), in order.
    mixed_with: tuple[str, ...] = ()
    quality: QualityReport | None = None  # the latest quantized job's report

    @property
    def family(self) -> str | None:
        """The family of the vectors made at this precision on this backend (a job's, or the creator's)."""
        return vector_family(self.precision, self.backend)

    @property
    def families(self) -> tuple[str, ...]:
        """The vector families the collection holds, the one it was made with first; () when unknown."""
        return ((self.family,) if self.family else ()) + self.mixed_with

    @property
    def mixed(self) -> bool:
        return len(self.families) > 1

    def check_compatible(self, existing: "CollectionInfo", *, collection: str, allow_mixed: bool = False) -> None:
        """Refuse to add this job's vectors to ``existing`` when they would not compare with its own."""
        if existing.model != self.model or existing.dimensions != self.dimensions or existing.metric != self.metric:
            raise CollectionMismatch(
                f"collection {collection!r} was built with model {existing.model!r} "
                f"({existing.dimensions} dimensions, {existing.metric}); this job uses {self.model!r} "
                f"({self.dimensions} dimensions, {self.metric}). Use another collection name, or drop "
                f"it explicitly with `embedfleet collections drop`; it was left untouched."
            )
        if self.new_family(existing) and not allow_mixed:
            raise CollectionMismatch(
                f"collection {collection!r} holds {'+'.join(existing.families)} vectors; this job embeds "
                f"{self.family} ({self.precision} on {self.backend}), which rank differently against one query: "
                "use the collection's precision, another collection, or --allow-mixed to mix them; it was left untouched."
            )

    def new_family(self, existing: "CollectionInfo") -> str | None:
        """This job's family when ``existing`` holds another (a collection of unknown family takes any)."""
        if self.family is None or not existing.families or self.family in existing.families:
            return None
        return self.family

    def to_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"embedfleet_model": self.model, "embedfleet_dimensions": self.dimensions,
                               "embedfleet_metric": self.metric}
        if self.precision:
            out["embedfleet_precision"] = self.precision
        if self.backend:
            out["embedfleet_backend"] = self.backend
        if self.families:
            out["embedfleet_families"] = ",".join(self.families)
        if self.quality is not None:
            # One JSON string: Chroma and Milvus properties hold scalars only.
            out["embedfleet_quality"] = json.dumps(self.quality.to_dict(), sort_keys=True)
        return out

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None) -> "CollectionInfo | None":
        if not metadata or "embedfleet_model" not in metadata:
            return None
        precision, backend = metadata.get("embedfleet_precision"), metadata.get("embedfleet_backend")
        first = vector_family(precision, backend)
        families = [f for f in str(metadata.get("embedfleet_families") or "").split(",") if f]
        quality = metadata.get("embedfleet_quality")
        return cls(
            model=str(metadata["embedfleet_model"]),
            dimensions=int(metadata["embedfleet_dimensions"]),
            metric=str(metadata.get("embedfleet_metric", "cosine")),
            precision=precision,
            backend=backend,
            mixed_with=tuple(f for f in families if f != first),
            quality=QualityReport.from_dict(json.loads(quality)) if quality else None,
        )

    def describe(self) -> dict[str, Any]:
        """The recorded facts as ``collections info`` and ``GET /v1/collections`` show them."""
        return {"model": self.model, "dimensions": self.dimensions, "metric": self.metric, "precision": self.precision,
                "backend": self.backend, "families": list(self.families), "mixed": self.mixed,
                "quality": self.quality.to_dict() if self.quality else None}


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    chunk_index: int
    score: float  # higher is closer: cosine similarity for cosine collections
    text: str
    start: int | None = None
    end: int | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def section(self) -> str | None:
        """The heading path the chunk came from (``"Install > On Linux"``), where it has one."""
        value = self.metadata.get("section")
        return value if isinstance(value, str) and value else None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SinkSpec:
    """A picklable description of a sink: what tasks on workers receive instead of a connection.

    In memory it carries the sink's credentials (options named in ``config.SECRET_KEYS``):
    workers never read config, so the process that opens the store gets them here. A job
    record keeps :meth:`without_secrets`; they are filled in again from the config of the
    process that runs the job (``JobSpec.from_json``).
    """

    uri: str
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def without_secrets(self) -> "SinkSpec":
        return SinkSpec(uri=self.uri, options=tuple((k, v) for k, v in self.options if k not in SECRET_KEYS))

    def __repr__(self) -> str:
        # Specs travel into task graphs, logs and tracebacks: never show a credential.
        shown = tuple((k, redacted(v, k)) for k, v in self.options)
        return f"SinkSpec(uri={hide_url_password(self.uri)!r}, options={shown!r})"


def metadata_for_store(row_metadata: str | None) -> dict[str, Any]:
    """A chunk's source metadata (a JSON object) flattened to scalar values stores accept."""
    if not row_metadata:
        return {}
    try:
        parsed = json.loads(row_metadata)
    except ValueError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    flat: dict[str, Any] = {}
    for key, value in parsed.items():
        if isinstance(value, (str, bool, int, float)) and value is not None:
            flat[str(key)] = value
        elif value is not None:
            flat[str(key)] = json.dumps(value, sort_keys=True)
    return flat


def keep_last(frame: pa.Table) -> pa.Table:
    """``frame`` with one row per chunk_id: the last, which is the newest.

    Within one upsert a later row of an id replaces an earlier one, as a later upsert would;
    stores refuse a request that names an id twice (Chroma, Milvus' primary key).
    """
    ids = frame.column("chunk_id").to_pylist()
    last = {chunk_id: i for i, chunk_id in enumerate(ids)}
    if len(last) == len(ids):
        return frame
    import pyarrow as pa

    return frame.take(pa.array(sorted(last.values())))


class SinkCollection(abc.ABC):
    name: str
    info: CollectionInfo

    @property
    @abc.abstractmethod
    def max_batch_size(self) -> int:
        """Rows per write request this store accepts."""

    @abc.abstractmethod
    def upsert(self, frame: pa.Table) -> int:
        """Insert or replace rows by chunk_id; returns rows written. Idempotent."""

    @abc.abstractmethod
    def delete(self, ids: Sequence[str]) -> int:
        """Delete by chunk_id; unknown ids are ignored. Returns how many were asked to go."""

    @abc.abstractmethod
    def existing(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` present in the collection."""

    @abc.abstractmethod
    def iter_ids(self, batch_size: int) -> Iterator[pa.Table]:
        """Every row's ``doc_id, chunk_id``, at most ``batch_size`` rows a table.

        What mode ``full`` reconciles against, so it repairs a lost or damaged manifest.
        """

    @abc.abstractmethod
    def query(self, vector: np.ndarray, k: int) -> list[Hit]:
        """Top-k nearest chunks, best first."""

    @abc.abstractmethod
    def count(self) -> int: ...


class Sink(abc.ABC):
    """A connection to one vector store."""

    scheme: ClassVar[str]
    #: Embedded stores (Chroma PersistentClient, Milvus Lite) must be written by one process.
    single_writer: ClassVar[bool] = False

    def __init__(self, spec: SinkSpec):
        self.spec = spec
        #: The store's address in messages; a store may show it its own way (Milvus).
        self.display_uri = spec.uri

    @property
    def uri(self) -> str:
        return self.spec.uri

    def open(self, name: str, *, info: CollectionInfo | None = None, create: bool = False,
             allow_mixed: bool = False) -> SinkCollection:
        """Open a collection by physical name.

        With ``create`` and ``info`` a missing collection is created recording ``info``; an
        existing one is checked against ``info`` (model guard, vector families) and refused on
        mismatch, never changed. With ``allow_mixed`` a collection of another vector family is
        opened anyway, and records that it now holds both (before any vector of the new family
        is written, so the record is never behind the store). Without ``create`` a missing
        collection raises SinkError.
        """
        handle = self._lookup(name)
        if handle is None:
            if not (create and info):
                raise SinkError(f"collection {name!r} does not exist in {self.display_uri}")
            # Another worker may have created it since the lookup: _create returns whichever
            # collection now exists, and the guard below checks it like any existing one.
            handle = self._create(name, info)
        recorded = self._recorded_info(name, handle)
        if recorded is None:
            raise SinkError(
                f"collection {name!r} in {self.display_uri} was not made by embedfleet (no model recorded); refusing to use it"
            )
        if info is not None:
            info.check_compatible(recorded, collection=name, allow_mixed=allow_mixed)
            added = info.new_family(recorded)
            if added and create:
                recorded = replace(recorded, mixed_with=(*recorded.mixed_with, added))
                handle = self._record(name, handle, recorded)
                logger.info("collection %s in %s now holds %s vectors", name, self.display_uri, "+".join(recorded.families))
        return self._collection(name, handle, recorded)

    def record_quality(self, name: str, report: QualityReport) -> CollectionInfo:
        """Store ``report`` in collection ``name``'s metadata (replacing an earlier one); what it records now."""
        handle = self._lookup(name)
        recorded = None if handle is None else self._recorded_info(name, handle)
        if recorded is None:
            raise SinkError(f"collection {name!r} does not exist in {self.display_uri}")
        recorded = replace(recorded, quality=report)
        self._record(name, handle, recorded)
        return recorded

    # Not abstract: a store may override open() whole instead, as sinks registered through
    # entry points before these hooks existed do.

    def _lookup(self, name: str) -> Any:
        """The store's handle on collection ``name``, or None when it does not exist."""
        raise NotImplementedError

    def _create(self, name: str, info: CollectionInfo) -> Any:
        """Create ``name`` recording ``info``; the handle on the collection that exists afterwards.

        When a concurrent creator got there first, that is its collection, not an error.
        """
        raise NotImplementedError

    def _recorded_info(self, name: str, handle: Any) -> CollectionInfo | None:
        """The CollectionInfo the collection records; None when it records none."""
        raise NotImplementedError

    def _collection(self, name: str, handle: Any, info: CollectionInfo) -> SinkCollection:
        """The collection to write and read through, made with its recorded ``info``."""
        raise NotImplementedError

    def _record(self, name: str, handle: Any, info: CollectionInfo) -> Any:
        """Replace what collection ``name`` records with ``info`` (same model; families, quality
        report); the handle to use afterwards. Other metadata of the collection is kept."""
        raise NotImplementedError

    @abc.abstractmethod
    def list_collections(self) -> list[str]:
        """Physical names of the collections in the store."""

    @abc.abstractmethod
    def drop(self, name: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - most clients need nothing
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
