"""Milvus through pymilvus' ``MilvusClient``.

``milvus:///abs/path/file.db`` is Milvus Lite: an embedded store in a local file (a
directory, despite the suffix) served by a thread of the writing process. One process at a
time may open it, so the sink says ``single_writer = True``. ``milvus://host:port`` is a
Milvus server (https with the option ``secure: true``) that takes parallel writes.

Credentials come from the sink options (config ``embedfleet.sinks.milvus.token`` /
``user`` / ``password``) or the environment (``MILVUS_TOKEN``, ``MILVUS_USER``,
``MILVUS_PASSWORD``), read where the connection is made; never from the command line, and
never written to logs, error messages or job records (a queued job gets them from the config
of the process that runs it). A server started with authorization (``common.security.
authorizationEnabled``) that refuses them, or gets none, is reported as such, not as the
"server unavailable" pymilvus says.

On a server every open collection is loaded (``load_collection``; at once when it already
is): a server answers searches from loaded collections only, an upsert does not load one, and
an application querying right after a job must find it searchable.

Collection layout (the field names are the embedding frame's, so the Parquet sink's part
files can be bulk-imported into a collection this sink created)::

    chunk_id        VARCHAR(64), primary key        upsert by id is idempotent
    doc_id          VARCHAR(65535)
    chunk_index     INT32
    text            VARCHAR(text-max-length)        see "Long texts" below
    start, end      INT32                           character offsets into the document
    n_tokens        INT32
    metadata        JSON                            the chunk's source metadata object
    embedding       FLOAT_VECTOR(dimensions)        index with the collection's metric
    text_truncated  BOOL                            true when ``text`` was cut

Long texts: Milvus measures a VARCHAR's ``max_length`` in bytes (UTF-8) and refuses a row
whose value is longer. A chunk's text longer than the ``text`` field's limit (option
``text-max-length``, at most 65,535; fixed when the collection is created) is cut to the
longest prefix that fits *at a character boundary* and stored with ``text_truncated =
true``; the embedding is always the one of the whole chunk. Search hits of such rows carry
``metadata["text_truncated"] = True``. Milvus Lite counts characters rather than bytes; the
byte rule is stricter, so a collection written through Lite moves to a server unchanged.

The model guard: the :class:`CollectionInfo` (model, dimensions, metric) is stored as
collection *properties* at creation (one request, so a collection never exists without
them) and again as JSON in the collection description (Milvus Lite keeps properties but
drops descriptions; a server keeps both). A collection without either is not embedfleet's
and is refused. What a collection learns later (a second vector family after ``--allow-mixed``,
an int8 job's quality report) alters its properties; the description keeps what it was created
with, and is read only when the properties hold nothing.

Options (``embedfleet.sinks.milvus.*``): ``max-request-bytes`` (default 32 MiB: under the
64 MiB gRPC message limit), ``max-batch-size`` (rows per request, default 1000),
``text-max-length`` (65535), ``index-type`` (AUTOINDEX; on Milvus Lite AUTOINDEX becomes
FLAT, exact search, because Lite's AUTOINDEX is an approximate per-segment HNSW and Lite
collections are small), ``secure``, ``db-name``, ``timeout`` (seconds per request).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from embedfleet.errors import BackendUnavailableError, ConfigError, SinkError
from embedfleet.sinks.base import CollectionInfo, Hit, Sink, SinkCollection, SinkSpec, keep_last, metadata_for_store

logger = logging.getLogger(__name__)

__all__ = ["MilvusSink", "MilvusCollection", "truncate_utf8", "estimate_row_bytes", "plan_batches"]

ID_MAX_BYTES = 64
VARCHAR_MAX_BYTES = 65535
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
DEFAULT_MAX_BATCH_SIZE = 1000
#: ids per ``chunk_id in [...]`` expression: keeps the expression (and the reply) small.
QUERY_BATCH = 512
#: Milvus caps one query's limit (so a query iterator's batch) at 16,384 rows.
ITERATOR_BATCH = 16384
#: Milvus' limit on ``limit`` (topk) of one search.
MAX_TOPK = 16384

_METRICS = {"cosine": "COSINE", "ip": "IP", "l2": "L2"}
_RESERVED = ("doc_id", "chunk_index", "start", "end")
_OUTPUT_FIELDS = ["chunk_id", "doc_id", "chunk_index", "text", "start", "end", "metadata", "text_truncated"]
# Per-row overhead beyond the variable parts: ints, the bool, protobuf framing.
_ROW_OVERHEAD = 64


class _AtDebug(logging.Handler):
    """pymilvus logs every failed request, with its traceback, through stderr handlers of its
    own (its loggers do not propagate): one server outage printed hundreds of lines around the
    job's one error line. The sink raises each failure as a SinkError, which the job retries
    and reports once, so pymilvus' records go to this module's logger at DEBUG instead."""

    def emit(self, record: logging.LogRecord) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("pymilvus %s: %s", record.levelname, record.getMessage(), exc_info=record.exc_info)


_PYMILVUS_LOGGERS = ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer")


def _pymilvus():
    try:
        import pymilvus
    except ImportError as exc:
        raise BackendUnavailableError("the milvus sink", "milvus", str(exc)) from exc
    for name in _PYMILVUS_LOGGERS:
        pymilvus_logger = logging.getLogger(name)
        if not any(isinstance(h, _AtDebug) for h in pymilvus_logger.handlers):
            pymilvus_logger.handlers[:] = [_AtDebug()]
    return pymilvus


def truncate_utf8(text: str, max_bytes: int) -> tuple[str, bool]:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes without splitting a character."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text, False
    # errors="ignore" drops only the partial multi-byte sequence left at the cut.
    return encoded[:max_bytes].decode("utf-8", errors="ignore"), True


def _size_value(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, str):
        from dask.utils import parse_bytes

        try:
            return int(parse_bytes(value))
        except ValueError as exc:
            raise ConfigError(f"milvus sink: {value!r} is not a size (e.g. 32MiB)") from exc
    return int(value)


def estimate_row_bytes(*, dimensions: int, text_bytes: int, metadata_bytes: int, id_bytes: int) -> int:
    """What one row adds to an insert request: the vector, the strings and fixed overhead."""
    return 4 * dimensions + text_bytes + metadata_bytes + id_bytes + _ROW_OVERHEAD


def plan_batches(row_bytes: Sequence[int], *, max_rows: int, max_bytes: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` slices of consecutive rows, each within ``max_rows`` and ``max_bytes``.

    A single row larger than ``max_bytes`` goes alone: splitting cannot make it smaller, and
    the configured budget is kept well under the server's hard limit.
    """
    start = 0
    size = 0
    for i, nbytes in enumerate(row_bytes):
        if i > start and (i - start >= max_rows or size + nbytes > max_bytes):
            yield start, i
            start, size = i, 0
        size += nbytes
    if start < len(row_bytes):
        yield start, len(row_bytes)


def _quote(value: str) -> str:
    # A JSON string is a valid Milvus string literal, escapes included.
    return json.dumps(value, ensure_ascii=False)


def _ids_filter(ids: Sequence[str]) -> str:
    return f"chunk_id in [{', '.join(_quote(i) for i in ids)}]"


class MilvusCollection(SinkCollection):
    def __init__(
        self,
        sink: "MilvusSink",
        name: str,
        info: CollectionInfo,
        *,
        text_max_length: int,
    ):
        self._sink = sink
        self._client = sink._client
        self.name = name
        self.info = info
        self.text_max_length = text_max_length
        self._loaded = False

    @property
    def max_batch_size(self) -> int:
        return self._sink.max_batch_size

    @property
    def max_request_bytes(self) -> int:
        return self._sink.max_request_bytes

    def _fail(self, action: str, exc: Exception) -> SinkError:
        return SinkError(f"Milvus {action} on {self.name!r} at {self._sink.display_uri} failed: {_reason(exc)}")

    # -- writes -------------------------------------------------------------------------

    def rows(self, frame: pa.Table) -> tuple[list[dict[str, Any]], list[int]]:
        """Milvus rows for an embedding frame and each row's estimated request bytes."""
        dimensions = frame.schema.field("embedding").type.list_size
        if dimensions != self.info.dimensions:
            raise SinkError(
                f"frame has {dimensions}-dimensional embeddings; collection {self.name!r} holds "
                f"{self.info.dimensions} ({self.info.model})"
            )
        cols = {name: frame.column(name).to_pylist() for name in frame.schema.names if name != "embedding"}
        vectors = frame.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = vectors.reshape(frame.num_rows, dimensions).astype(np.float32, copy=False)
        rows: list[dict[str, Any]] = []
        sizes: list[int] = []
        truncated = 0
        for i in range(frame.num_rows):
            chunk_id = cols["chunk_id"][i]
            id_bytes = len(chunk_id.encode("utf-8"))
            if id_bytes > ID_MAX_BYTES:
                raise SinkError(f"chunk id {chunk_id[:80]!r}... is longer than Milvus' {ID_MAX_BYTES}-byte primary key")
            doc_id = cols["doc_id"][i]
            doc_bytes = len(doc_id.encode("utf-8"))
            if doc_bytes > VARCHAR_MAX_BYTES:
                raise SinkError(f"doc_id {doc_id[:80]!r}... is longer than Milvus' {VARCHAR_MAX_BYTES}-byte VARCHAR")
            text, cut = truncate_utf8(cols["text"][i] or "", self.text_max_length)
            truncated += cut
            raw_meta = cols["metadata"][i]
            metadata = _parse_object(raw_meta)
            rows.append(
                {
                    "chunk_id": chunk_id,
                    "doc_id": doc_id,
                    "chunk_index": int(cols["chunk_index"][i]),
                    "text": text,
                    "start": int(cols["start"][i]),
                    "end": int(cols["end"][i]),
                    "n_tokens": int(cols["n_tokens"][i]),
                    "metadata": metadata,
                    "embedding": vectors[i].tolist(),
                    "text_truncated": cut,
                }
            )
            sizes.append(
                estimate_row_bytes(
                    dimensions=dimensions,
                    text_bytes=len(text.encode("utf-8")),
                    metadata_bytes=len(raw_meta.encode("utf-8")) if raw_meta else 2,
                    id_bytes=id_bytes + doc_bytes,
                )
            )
        if truncated:
            logger.info(
                "%d chunk text(s) longer than %d bytes were cut for Milvus collection %s (text_truncated=true)",
                truncated,
                self.text_max_length,
                self.name,
            )
        return rows, sizes

    def upsert(self, frame: pa.Table) -> int:
        if frame.num_rows == 0:
            return 0
        rows, sizes = self.rows(keep_last(frame))
        written = 0
        for start, stop in plan_batches(sizes, max_rows=self.max_batch_size, max_bytes=self.max_request_bytes):
            try:
                self._client.upsert(self.name, rows[start:stop], timeout=self._sink.timeout)
            except Exception as exc:
                raise self._fail("upsert", exc) from exc
            written += stop - start
        return written

    def delete(self, ids: Sequence[str]) -> int:
        ids = list(ids)
        for i in range(0, len(ids), QUERY_BATCH):
            try:
                self._client.delete(self.name, filter=_ids_filter(ids[i : i + QUERY_BATCH]), timeout=self._sink.timeout)
            except Exception as exc:
                raise self._fail("delete", exc) from exc
        return len(ids)

    # -- reads --------------------------------------------------------------------------

    def existing(self, ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(ids))
        found: set[str] = set()
        if ids:
            self._ensure_loaded()  # a server answers queries from loaded collections only
        for i in range(0, len(ids), QUERY_BATCH):
            try:
                got = self._client.query(
                    self.name,
                    filter=_ids_filter(ids[i : i + QUERY_BATCH]),
                    output_fields=["chunk_id"],
                    consistency_level="Strong",
                    timeout=self._sink.timeout,
                )
            except Exception as exc:
                raise self._fail("query", exc) from exc
            found.update(row["chunk_id"] for row in got)
        return found

    def iter_ids(self, batch_size: int) -> Iterator[pa.Table]:
        self._ensure_loaded()
        try:
            iterator = self._client.query_iterator(
                self.name, batch_size=max(1, min(batch_size, ITERATOR_BATCH)), filter="",
                output_fields=["doc_id", "chunk_id"], timeout=self._sink.timeout,
            )
        except Exception as exc:
            raise self._fail("query", exc) from exc
        try:
            while True:
                try:
                    rows = iterator.next()
                except Exception as exc:
                    raise self._fail("query", exc) from exc
                if not rows:
                    return
                yield pa.table({"doc_id": pa.array([str(r["doc_id"]) for r in rows], pa.string()),
                                "chunk_id": pa.array([str(r["chunk_id"]) for r in rows], pa.string())})
        finally:
            iterator.close()

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        try:
            self._client.load_collection(self.name, timeout=self._sink.timeout)
        except Exception as exc:
            raise self._fail("load", exc) from exc
        self._loaded = True

    def query(self, vector: np.ndarray, k: int) -> list[Hit]:
        if k < 1:
            return []
        self._ensure_loaded()
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        try:
            result = self._client.search(
                self.name,
                data=[vector.tolist()],
                anns_field="embedding",
                limit=min(int(k), MAX_TOPK),
                output_fields=_OUTPUT_FIELDS,
                search_params={"metric_type": _METRICS[self.info.metric]},
                consistency_level="Strong",
                timeout=self._sink.timeout,
            )
        except Exception as exc:
            raise self._fail("search", exc) from exc
        hits = []
        for found in result[0] if result else []:
            entity = found.get("entity") or {}
            distance = float(found.get("distance", 0.0))
            # COSINE and IP are similarities already; L2 is a (squared) distance.
            score = -distance if self.info.metric == "l2" else distance
            meta = {
                k: v
                for k, v in metadata_for_store(json.dumps(entity.get("metadata") or {})).items()
                if k not in _RESERVED
            }
            if entity.get("text_truncated"):
                meta["text_truncated"] = True
            hits.append(
                Hit(
                    chunk_id=str(entity.get("chunk_id", found.get("id"))),
                    doc_id=str(entity.get("doc_id", "")),
                    chunk_index=int(entity.get("chunk_index", -1)),
                    score=score,
                    text=entity.get("text") or "",
                    start=entity.get("start"),
                    end=entity.get("end"),
                    metadata=meta,
                )
            )
        return hits

    def count(self) -> int:
        # count(*) rather than collection stats: stats include deleted rows until compaction.
        self._ensure_loaded()
        try:
            got = self._client.query(
                self.name, filter="", output_fields=["count(*)"], consistency_level="Strong", timeout=self._sink.timeout
            )
        except Exception as exc:
            raise self._fail("count", exc) from exc
        return int(got[0]["count(*)"]) if got else 0


def _fields(described: dict) -> dict[str, dict]:
    return {f["name"]: f for f in described.get("fields", [])}


def _parse_object(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


class _UnimplementedProbes(logging.Filter):
    """Milvus Lite serves pymilvus over gRPC in this process without every method, and pymilvus
    calls some anyway, taking "unimplemented" for an answer (``alloc_timestamp``, which a
    synchronous create_index starts its wait with, is ``@ignore_unimplemented``); grpc logs each
    such call as an ERROR with a traceback ("AllocTimestamp ... Method not implemented!")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], NotImplementedError))


_LITE_PROBES = _UnimplementedProbes()


def _reason(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(message).splitlines()[0]


def _refused_credentials(exc: BaseException) -> str | None:
    """The server's reason when it refused this client's credentials (gRPC UNAUTHENTICATED).

    pymilvus reports a refused login as "Fail connecting to server ... or server unavailable";
    the gRPC error under it says what happened. The server's text never holds the password.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "code", None)
        if callable(code):
            try:
                name = getattr(code(), "name", "")
            except Exception:  # noqa: BLE001 - not a gRPC error after all
                name = ""
            if name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                details = getattr(current, "details", None)
                return str(details() if callable(details) else name).splitlines()[0]
        current = current.__cause__ or current.__context__
    return None


def _credentials(spec: SinkSpec) -> dict[str, str]:
    token = spec.option("token") or os.environ.get("MILVUS_TOKEN")
    user = spec.option("user") or os.environ.get("MILVUS_USER")
    password = spec.option("password") or os.environ.get("MILVUS_PASSWORD")
    out: dict[str, str] = {}
    if token:
        out["token"] = str(token)
    elif user or password:
        if not (user and password):
            raise ConfigError("milvus sink: set both user and password (or a token), not only one")
        out["user"], out["password"] = str(user), str(password)
    return out


class MilvusSink(Sink):
    scheme = "milvus"

    def __init__(self, spec: SinkSpec):
        super().__init__(spec)
        parts = urlsplit(spec.uri)
        self.max_request_bytes = _size_value(spec.option("max-request-bytes"), DEFAULT_MAX_REQUEST_BYTES)
        self.max_batch_size = int(spec.option("max-batch-size") or DEFAULT_MAX_BATCH_SIZE)
        self.text_max_length = int(spec.option("text-max-length") or VARCHAR_MAX_BYTES)
        if self.max_request_bytes < 1 or self.max_batch_size < 1:
            raise ConfigError("milvus sink: max-request-bytes and max-batch-size must be positive")
        if not 1 <= self.text_max_length <= VARCHAR_MAX_BYTES:
            raise ConfigError(f"milvus sink: text-max-length must be 1-{VARCHAR_MAX_BYTES} bytes, not {self.text_max_length}")
        timeout = spec.option("timeout")
        self.timeout = float(timeout) if timeout else None
        self.index_type = str(spec.option("index-type") or "AUTOINDEX").upper()
        kwargs: dict[str, Any] = {}
        if parts.netloc:
            if not parts.hostname:
                raise ConfigError(f"sink {spec.uri!r}: expected milvus://host:port")
            scheme = "https" if spec.option("secure") else "http"
            target = f"{scheme}://{parts.hostname}:{parts.port or 19530}"
            kwargs.update(_credentials(spec))
            self.lite = False
            self.display_uri = f"milvus://{parts.hostname}:{parts.port or 19530}"
        else:
            if not parts.path.startswith("/") or not parts.path.endswith(".db"):
                raise ConfigError(f"sink {spec.uri!r}: Milvus Lite needs an absolute path ending in .db, milvus:///abs/file.db")
            target = parts.path
            self.lite = True
            self.display_uri = spec.uri
            logging.getLogger("grpc._server").addFilter(_LITE_PROBES)  # the same filter is added once
            os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
            if self.index_type == "AUTOINDEX":
                self.index_type = "FLAT"
        # An instance attribute, as for Chroma: only the Lite form has one writer.
        self.single_writer = self.lite
        if spec.option("db-name"):
            kwargs["db_name"] = str(spec.option("db-name"))
        pymilvus = _pymilvus()
        new_store = self.lite and not os.path.exists(target)
        try:
            self._client = pymilvus.MilvusClient(uri=target, timeout=self.timeout, **kwargs)
        except Exception as exc:
            refused = None if self.lite else _refused_credentials(exc)
            if refused is not None:
                given = "token" in kwargs or "user" in kwargs
                raise SinkError(
                    f"Milvus at {self.display_uri} {'refused the credentials' if given else 'requires credentials'} "
                    f"({refused}): set embedfleet.sinks.milvus.token (user:password) or user and password, or "
                    "MILVUS_TOKEN / MILVUS_USER and MILVUS_PASSWORD"
                ) from None  # pymilvus' chained errors only repeat "server unavailable"
            hint = ""
            if self.lite and "lock" in str(exc).lower():
                hint = " (a Milvus Lite file is open in one process at a time; use a Milvus server for parallel access)"
            raise SinkError(f"cannot connect to Milvus at {self.display_uri}: {_reason(exc)}{hint}") from exc
        if new_store:
            # Milvus Lite makes its store with the umask's mode (a directory in milvus-lite 3;
            # the mode suits whichever it made), and it holds every chunk's text: a new one is
            # its owner's only.
            os.chmod(target, 0o700 if os.path.isdir(target) else 0o600)
        self._pymilvus = pymilvus

    # -- collections --------------------------------------------------------------------

    def _lookup(self, name: str) -> dict | None:
        try:
            if not self._client.has_collection(name, timeout=self.timeout):
                return None
            return self._client.describe_collection(name, timeout=self.timeout)
        except Exception as exc:
            raise SinkError(f"cannot read Milvus collection {name!r} at {self.display_uri}: {_reason(exc)}") from exc

    def _recorded_info(self, name: str, described: dict) -> CollectionInfo | None:
        info = CollectionInfo.from_metadata(described.get("properties") or {})
        if info is None:
            try:
                info = CollectionInfo.from_metadata(json.loads(described.get("description") or "{}"))
            except (ValueError, TypeError, AttributeError):
                info = None
        if info is None:
            return None
        fields = _fields(described)
        if "text" not in fields or "embedding" not in fields or "chunk_id" not in fields:
            raise SinkError(f"collection {name!r} in {self.display_uri} does not have embedfleet's fields; refusing to use it")
        return info

    def _collection(self, name: str, described: dict, info: CollectionInfo) -> MilvusCollection:
        # The text limit the collection was created with, which may differ from this sink's option.
        text_max = int((_fields(described)["text"].get("params") or {}).get("max_length", self.text_max_length))
        collection = MilvusCollection(self, name, info, text_max_length=text_max)
        if not self.lite:
            # A server searches loaded collections only, and an upsert does not load one: a
            # collection someone released (or a server still loading it after a restart) would
            # take a job's writes and then fail the application's first search. Loading an
            # already loaded collection returns at once.
            collection._ensure_loaded()
        return collection

    def _record(self, name: str, described: dict, info: CollectionInfo) -> dict:
        # Properties only: a collection's description is fixed at creation (and Lite drops it);
        # _recorded_info reads the properties first.
        try:
            self._client.alter_collection_properties(name, properties={k: str(v) for k, v in info.to_metadata().items()},
                                                     timeout=self.timeout)
        except Exception as exc:
            raise SinkError(f"cannot update the properties of Milvus collection {name!r} at {self.display_uri}: "
                            f"{_reason(exc)}") from exc
        return self._lookup(name) or described

    def _schema(self, info: CollectionInfo):
        DataType = self._pymilvus.DataType
        schema = self._pymilvus.MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description=json.dumps(info.to_metadata(), sort_keys=True)
        )
        schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=VARCHAR_MAX_BYTES)
        schema.add_field("chunk_index", DataType.INT32)
        schema.add_field("text", DataType.VARCHAR, max_length=self.text_max_length)
        schema.add_field("start", DataType.INT32)
        schema.add_field("end", DataType.INT32)
        schema.add_field("n_tokens", DataType.INT32)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=info.dimensions)
        schema.add_field("text_truncated", DataType.BOOL)
        return schema

    def _create(self, name: str, info: CollectionInfo) -> dict:
        if info.metric not in _METRICS:
            raise ConfigError(f"metric {info.metric!r} is not one of {', '.join(sorted(_METRICS))}")
        try:
            index_params = self._client.prepare_index_params()
            index_params.add_index(field_name="embedding", index_type=self.index_type, metric_type=_METRICS[info.metric])
            properties = {k: str(v) for k, v in info.to_metadata().items()}
            self._client.create_collection(
                name,
                schema=self._schema(info),
                index_params=index_params,
                properties=properties,
                consistency_level="Strong",
                timeout=self.timeout,
            )
        except Exception as exc:
            # Another worker may have created it between our check and our request.
            described = self._lookup(name)
            if described is None:
                raise SinkError(f"cannot create Milvus collection {name!r} at {self.display_uri}: {_reason(exc)}") from exc
            return described
        described = self._lookup(name)
        if described is None:  # pragma: no cover - the server just said it created it
            raise SinkError(f"Milvus collection {name!r} vanished right after creation")
        logger.info("created Milvus collection %s at %s (%s)", name, self.display_uri, info.model)
        return described

    def list_collections(self) -> list[str]:
        try:
            return sorted(self._client.list_collections())
        except Exception as exc:
            raise SinkError(f"cannot list collections at {self.display_uri}: {_reason(exc)}") from exc

    def drop(self, name: str) -> None:
        if self._lookup(name) is None:
            raise SinkError(f"collection {name!r} does not exist in {self.display_uri}")
        try:
            self._client.drop_collection(name, timeout=self.timeout)
        except Exception as exc:
            raise SinkError(f"cannot drop Milvus collection {name!r}: {_reason(exc)}") from exc

    def close(self) -> None:
        # The Lite server thread stays up for the process (pymilvus shares it between clients
        # of the same file); only this client's connection is released.
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover - closing is best effort
                logger.debug("closing the Milvus client failed", exc_info=True)
