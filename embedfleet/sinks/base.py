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
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Sequence

from typing import TYPE_CHECKING

from embedfleet.config import SECRET_KEYS, hide_url_password, redacted
from embedfleet.errors import CollectionMismatch, SinkError

if TYPE_CHECKING:  # a search reads no frames: pyarrow is imported where one is written
    import numpy as np
    import pyarrow as pa

__all__ = ["CollectionInfo", "Hit", "Sink", "SinkCollection", "SinkSpec", "keep_last", "metadata_for_store"]


@dataclass(frozen=True)
class CollectionInfo:
    """What a collection records about how its vectors were made. The model guard compares these."""

    model: str
    dimensions: int
    metric: str = "cosine"
    precision: str | None = None  # informational: mixing precisions of one model is allowed

    def check_compatible(self, existing: "CollectionInfo", *, collection: str) -> None:
        if existing.model != self.model or existing.dimensions != self.dimensions or existing.metric != self.metric:
            raise CollectionMismatch(
                f"collection {collection!r} was built with model {existing.model!r} "
                f"({existing.dimensions} dimensions, {existing.metric}); this job uses {self.model!r} "
                f"({self.dimensions} dimensions, {self.metric}). Use another collection name, or drop "
                f"it explicitly with `embedfleet collections drop`; it was left untouched."
            )

    def to_metadata(self) -> dict[str, Any]:
        out = {"embedfleet_model": self.model, "embedfleet_dimensions": self.dimensions, "embedfleet_metric": self.metric}
        if self.precision:
            out["embedfleet_precision"] = self.precision
        return out

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None) -> "CollectionInfo | None":
        if not metadata or "embedfleet_model" not in metadata:
            return None
        return cls(
            model=str(metadata["embedfleet_model"]),
            dimensions=int(metadata["embedfleet_dimensions"]),
            metric=str(metadata.get("embedfleet_metric", "cosine")),
            precision=metadata.get("embedfleet_precision"),
        )


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

    def open(self, name: str, *, info: CollectionInfo | None = None, create: bool = False) -> SinkCollection:
        """Open a collection by physical name.

        With ``create`` and ``info`` a missing collection is created recording ``info``; an
        existing one is checked against ``info`` (model guard) and refused on mismatch, never
        changed. Without ``create`` a missing collection raises SinkError.
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
            info.check_compatible(recorded, collection=name)
        return self._collection(name, handle, recorded)

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
