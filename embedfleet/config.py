"""embedfleet's configuration: ``embedfleet.*`` keys in dask.config.

The defaults in ``embedfleet.yaml`` are merged into ``dask.config`` when this module is
imported (as distributed does with ``distributed.yaml``), so any dask config file, the
``DASK_CONFIG`` directory and ``DASK_EMBEDFLEET__...`` environment variables override them.
Values are read when a settings object is built, never at import: a test or a notebook can
change ``dask.config`` and the next job sees it. Workers never read config: tasks receive the
frozen specs built here on the client.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit, urlunsplit

import dask.config
import yaml
from dask.utils import parse_bytes, parse_timedelta

from embedfleet.errors import ConfigError

__all__ = [
    "get",
    "validate",
    "data_dir",
    "local_dir",
    "check_database_url",
    "private_dir",
    "private_file",
    "SECRET_KEYS",
    "redacted",
    "hide_url_password",
    "ChunkSpec",
    "ModelSpec",
    "RemoteSpec",
    "EmbedderSpec",
    "RetrySpec",
    "model_spec",
    "embedder_spec",
    "chunk_spec",
    "retry_spec",
    "resolve_model_path",
    "bytes_value",
    "seconds_value",
]

_HERE = Path(__file__).parent
_DEFAULTS_FILE = _HERE / "embedfleet.yaml"
_SCHEMA_FILE = _HERE / "embedfleet-schema.yaml"

with open(_DEFAULTS_FILE) as _f:
    _DEFAULTS = yaml.safe_load(_f)

dask.config.update_defaults(_DEFAULTS)

ChunkUnit = Literal["tokens", "words", "chars"]
ChunkStructure = Literal["auto", "none"]
Precision = Literal["fp32", "bf16", "fp16", "auto"]
Device = Literal["cpu", "cuda", "auto"]
# Open: backends come from a registry (and entry points), not a closed list.
Backend = str

_MISSING = object()


def get(key: str, default: Any = _MISSING) -> Any:
    """``dask.config.get("embedfleet." + key)``."""
    if default is _MISSING:
        return dask.config.get(f"embedfleet.{key}")
    return dask.config.get(f"embedfleet.{key}", default)


def _canonical(obj: Any) -> Any:
    # Environment variables arrive as embedfleet.embed.batch_tokens; the schema speaks in dashes.
    if isinstance(obj, dict):
        return {str(k).replace("_", "-"): _canonical(v) for k, v in obj.items()}
    return obj


# The last config that validated, as its canonical JSON.
_last_valid: list[str | None] = [None]


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    with open(_SCHEMA_FILE) as f:
        return yaml.safe_load(f)


def validate() -> None:
    """Check the merged ``embedfleet`` config against the schema; raise ConfigError naming the key."""
    import jsonschema

    schema = _schema()
    config = {"embedfleet": _canonical(dask.config.get("embedfleet"))}
    # Models and tiers are keyed by user-chosen names, which may legitimately contain underscores.
    config["embedfleet"]["models"] = dask.config.get("embedfleet.models")
    config["embedfleet"]["jobs"]["tiers"] = {
        name: _canonical(tier) for name, tier in dask.config.get("embedfleet.jobs.tiers").items()
    }
    config["embedfleet"]["models"] = {
        name: _canonical(model) for name, model in config["embedfleet"]["models"].items()
    }
    config["embedfleet"]["backends"] = dict(dask.config.get("embedfleet.backends", None) or {})
    # Every job spec validates; the schema walk costs ~1 ms a submit, the config rarely changes.
    key = json.dumps(config, sort_keys=True, default=repr)
    if key == _last_valid[0]:
        return
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=str)
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path)
        raise ConfigError(f"invalid config key {where}: {first.message}")
    _last_valid[0] = key


def bytes_value(key: str) -> int:
    value = get(key)
    try:
        return int(parse_bytes(value)) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"embedfleet.{key}: {value!r} is not a size (e.g. 16MiB)") from exc


def seconds_value(key: str) -> float:
    value = get(key)
    try:
        return float(parse_timedelta(value, default="seconds"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"embedfleet.{key}: {value!r} is not a duration (e.g. 500ms)") from exc


def data_dir(override: str | os.PathLike | None = None) -> Path | str:
    """The data directory, absolute; created if missing, for its owner only (:func:`private_dir`).

    It holds every document's text (chunk frames), the job database and the default store.
    An fsspec URL (``s3://bucket/prefix``) is returned as it is, less a trailing ``/``: an
    object store has no folder to make, and its files are what every worker can see.
    """
    raw = override if override is not None else get("data-dir")
    if _is_url(raw):
        return str(raw).rstrip("/")
    return private_dir(Path(raw).expanduser().resolve())


def _is_url(path: Any) -> bool:
    if isinstance(path, os.PathLike):
        return False
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def local_dir(data: str | os.PathLike | None = None) -> Path:
    """Where this machine keeps what cannot live on object storage: the model cache, and the
    default SQLite job database and embedded store. The data dir itself when it is local;
    for an object-store data dir, a folder of ``embedfleet.storage.local-dir`` named after it.
    """
    root = data_dir(data)
    if isinstance(root, Path):
        return root
    import hashlib

    slug = hashlib.sha1(root.encode()).hexdigest()[:12]
    return private_dir(Path(get("storage.local-dir")).expanduser().resolve() / slug)


def check_database_url(url: str, data: str | os.PathLike | None = None) -> str:
    """``url``, unless it is an SQLite file on object storage (SQLite needs a local file's locks)."""
    if url.startswith("sqlite") and _is_url(url.split(":///", 1)[-1]):
        raise ConfigError(
            f"the job database {hide_url_password(url)} is an SQLite file on object storage, which SQLite cannot "
            "lock: use PostgreSQL (embedfleet.jobs.database-url, --db postgresql+psycopg://...) when several "
            "machines share the data dir, or leave it unset for a local SQLite file on this machine"
        )
    return url


def private_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory, created 0700 if missing (missing parents as usual).

    An existing directory keeps its mode: an operator may have shared it on purpose.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The umask can only take bits away from 0700, so no chmod (and no process-wide umask
        # change, which would race the dispatcher's threads) is needed.
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
    return path


def private_file(path: str | os.PathLike) -> Path:
    """``path`` as a file, created empty and 0600 if missing, in a :func:`private_dir`.

    For a SQLite database: SQLite gives its -wal, -shm and journal files the database file's
    mode, so creating the file first is enough. An existing file keeps its mode.
    """
    path = Path(path)
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    return path


#: Config keys and sink options whose values are credentials: masked wherever settings are
#: shown (:func:`redacted`) and never written into a job record (``SinkSpec.without_secrets``).
SECRET_KEYS = frozenset({
    "token", "password", "headers", "api-key",
    # fsspec storage options (embedfleet.storage.options.<protocol>): s3fs, gcsfs, adlfs
    "key", "secret", "session-token", "account-key", "sas-token", "connection-string", "client-secret",
})
_MASK = "***"


def hide_url_password(url: str) -> str:
    """``url`` with its password shown as ``***``, as SQLAlchemy's ``render_as_string(hide_password=True)``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL after all (an unclosed "[" host): all or nothing
        return _MASK if "@" in url else url
    if password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:{_MASK}@{hostport}"))


def redacted(value: Any, key: str | None = None) -> Any:
    """A copy of a config tree (or of the value of ``key``) that is safe to show.

    Values of :data:`SECRET_KEYS` become ``***`` (a mapping of headers keeps its names), and
    passwords in URLs (``jobs.database-url``, a sink URI) are hidden. Unset secrets stay
    visible as unset.
    """
    if key is not None and str(key).replace("_", "-") in SECRET_KEYS and value:
        return {name: _MASK for name in value} if isinstance(value, Mapping) else _MASK
    if isinstance(value, Mapping):
        return {k: redacted(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(v) for v in value)
    if isinstance(value, str):
        return hide_url_password(value)
    return value


@dataclass(frozen=True)
class ChunkSpec:
    unit: ChunkUnit = "tokens"
    size: int = 200
    overlap: int = 32
    structure: ChunkStructure = "auto"  # headings of Markdown, RST and HTML documents start chunks
    heading_context: bool = False  # the model embeds each chunk's section path before its text

    def __post_init__(self) -> None:
        from embedfleet.errors import ChunkingError

        if self.unit not in ("tokens", "words", "chars"):
            raise ChunkingError(f"chunk unit must be tokens, words or chars, not {self.unit!r}")
        if self.size < 1:
            raise ChunkingError(f"chunk size must be at least 1, not {self.size}")
        if self.overlap < 0 or self.overlap >= self.size:
            raise ChunkingError(
                f"chunk overlap must be at least 0 and smaller than the size ({self.size}), not {self.overlap}"
            )
        if self.structure not in ("auto", "none"):
            raise ChunkingError(f"chunk structure must be auto or none, not {self.structure!r}")


@dataclass(frozen=True)
class RemoteSpec:
    """How to call a model served over an OpenAI-compatible embeddings API (backend ``openai``).

    Only the *name* of the environment variable holding the key is kept: the key is read on
    the worker when a request is made, so it is in no spec, job record or log.
    """

    url: str  # requests go to {url}/embeddings
    model: str  # the provider's model name ("model" in each request)
    api_key_env: str | None = None
    send_dimensions: bool = False  # "dimensions" in each request, for models that shorten (text-embedding-3-*)
    max_inputs: int = 128  # texts per request
    max_request_bytes: int = 1 << 20  # UTF-8 bytes of the texts of one request
    concurrency: int = 4  # requests in flight per embedding task
    requests_per_minute: int | None = None  # for the whole job, all its tasks together
    tokens_per_minute: int | None = None
    timeout: float = 60.0
    retries: int = 6  # attempts per request on 429, 5xx, timeouts and connection errors
    retry_delay: float = 0.5  # first backoff; doubles per attempt, with jitter; Retry-After wins
    retry_max_delay: float = 30.0
    breaker_failures: int = 5  # consecutive failed attempts that open the provider's circuit
    breaker_cooldown: float = 30.0  # seconds open before one probe request is let through

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"remote model url must be http(s)://..., not {self.url!r}")
        for name in ("max_inputs", "max_request_bytes", "concurrency", "retries", "breaker_failures"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"remote model {name.replace('_', '-')} must be at least 1")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"remote model {name.replace('_', '-')} must be positive or null")

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/embeddings"


@dataclass(frozen=True)
class ModelSpec:
    """How to load one named model. Hashable: it keys the per-worker model cache.

    For a remote model (``remote`` set) ``path`` is its tokenizer (config key ``tokenizer``),
    which chunking and token counting use; there are no weights to load.
    """

    name: str
    path: str
    dimensions: int
    backend: Backend = "sentence-transformers"
    max_seq_length: int = 256
    normalize: bool = True
    metric: Literal["cosine", "ip", "l2"] = "cosine"
    query_prefix: str = ""
    document_prefix: str = ""
    remote: RemoteSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.remote, Mapping):  # from a stored job spec's JSON
            object.__setattr__(self, "remote", RemoteSpec(**self.remote))


@dataclass(frozen=True)
class EmbedderSpec:
    model: ModelSpec
    backend: Backend = "sentence-transformers"
    precision: Precision = "fp32"
    device: Device = "auto"
    batch_tokens: int = 0  # 0: the backend's tuned default for its device and precision
    threads: int | None = None
    quantize: Literal["int8"] | None = None
    cache_dir: str | None = None  # where derived artefacts (ONNX exports) are kept
    # Bounds of the per-worker-process model cache (embed.cache.*), carried in the spec
    # because workers never read dask.config.
    cache_max_models: int = 2
    cache_max_bytes: int = 4 * 2**30
    # "module:Class" of a backend named in embedfleet.backends, for workers that have no config.
    backend_path: str | None = None
    # The part of a remote model's job-wide request and token limits that one worker process
    # may use (set where the job's tasks are placed; 1.0 = all of it).
    rate_share: float = 1.0

    @property
    def cache_key(self) -> tuple:
        # batch_tokens, threads and the cache bounds change how a loaded model is driven or
        # kept, not the model itself.
        return (self.model, self.backend, self.precision, self.device, self.quantize)


@dataclass(frozen=True)
class RetrySpec:
    attempts: int = 5
    delay: float = 0.5
    max_delay: float = 20.0


_PACKAGE_PREFIX = "package:"


def resolve_model_path(path: str) -> str:
    """A model directory from ``package:MODULE`` (MODULE.get_model_path()) or a plain path.

    Runs where the model is used (driver and workers alike), so ``package:`` finds the
    package in that process's own Python. sentence-transformers rejects a Path object, so this
    always returns ``str``.
    """
    if path.startswith(_PACKAGE_PREFIX):
        import importlib

        module_name = path[len(_PACKAGE_PREFIX):]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"model path {path!r}: cannot import {module_name} ({exc})") from exc
        return str(module.get_model_path())
    resolved = Path(path).expanduser()
    if not resolved.exists():
        # Said on a worker too: the host tells a path missing there from a typo on the driver.
        raise ConfigError(
            f"model path {path!r} does not exist on {socket.gethostname()}; a model's path must exist on "
            "every machine that chunks or embeds (package:MODULE is found in each machine's own Python)"
        )
    return str(resolved.resolve())


def model_spec(name: str | None = None) -> ModelSpec:
    name = name or get("embed.model")
    models = get("models")
    if name not in models:
        raise ConfigError(f"unknown model {name!r}; configured models: {', '.join(sorted(models))}")
    raw = _canonical(models[name])
    remote = _remote_spec(name, raw)
    path = raw.get("tokenizer") if remote is not None else raw.get("path")
    if path is None:
        raise ConfigError(f"model {name!r} needs a {'tokenizer' if remote is not None else 'path'}")
    return ModelSpec(
        name=name,
        path=str(path),
        dimensions=int(raw["dimensions"]),
        backend=raw.get("backend", "sentence-transformers"),
        max_seq_length=int(raw.get("max-seq-length", 256)),
        normalize=bool(raw.get("normalize", True)),
        metric=raw.get("metric", "cosine"),
        query_prefix=raw.get("query-prefix", "") or "",
        document_prefix=raw.get("document-prefix", "") or "",
        remote=remote,
    )


#: Config keys of a remote model -> RemoteSpec fields (besides url and remote-model).
_REMOTE_KEYS = {
    "api-key-env": ("api_key_env", str),
    "send-dimensions": ("send_dimensions", bool),
    "max-inputs-per-request": ("max_inputs", int),
    "max-request-bytes": ("max_request_bytes", parse_bytes),
    "concurrent-requests": ("concurrency", int),
    "requests-per-minute": ("requests_per_minute", int),
    "tokens-per-minute": ("tokens_per_minute", int),
    "timeout": ("timeout", lambda v: float(parse_timedelta(v, default="seconds"))),
    "retries": ("retries", int),
    "retry-delay": ("retry_delay", lambda v: float(parse_timedelta(v, default="seconds"))),
    "retry-max-delay": ("retry_max_delay", lambda v: float(parse_timedelta(v, default="seconds"))),
    "breaker-failures": ("breaker_failures", int),
    "breaker-cooldown": ("breaker_cooldown", lambda v: float(parse_timedelta(v, default="seconds"))),
}
_TIKTOKEN_PREFIX = "tiktoken:"


def _remote_spec(name: str, raw: Mapping[str, Any]) -> RemoteSpec | None:
    if raw.get("url") is None:
        if raw.get("backend") == "openai":
            raise ConfigError(f"model {name!r} (backend openai) needs a url")
        return None
    tokenizer = str(raw.get("tokenizer") or "")
    if tokenizer.startswith(_TIKTOKEN_PREFIX):
        # Chunking needs character offsets from a tokenizers.Tokenizer; a tiktoken encoding is
        # downloaded on first use, which a machine without internet cannot do.
        raise ConfigError(
            f"model {name!r}: tokenizer {tokenizer!r} is not supported: chunking needs a tokenizer.json "
            "(character offsets), and tiktoken downloads its encodings on first use unless a cached encoding "
            "file is in TIKTOKEN_CACHE_DIR; give a local tokenizer (package:MODULE or a directory with "
            "tokenizer.json) that counts at least as many tokens as the provider's"
        )
    fields: dict[str, Any] = {}
    for key, (field_name, convert) in _REMOTE_KEYS.items():
        if raw.get(key) is not None:
            try:
                fields[field_name] = convert(raw[key])
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"model {name!r}: {key} {raw[key]!r} is not valid ({exc})") from exc
    return RemoteSpec(url=str(raw["url"]), model=str(raw.get("remote-model") or name), **fields)


def embedder_spec(
    *,
    model: str | None = None,
    backend: str | None = None,
    precision: str | None = None,
    device: str | None = None,
    batch_tokens: int | None = None,
    threads: int | None = None,
    quantize: str | None = None,
    cache_dir: str | None = None,
) -> EmbedderSpec:
    spec = model_spec(model)
    # Whether a backend of that name is installed is the embedders registry's to say
    # (embedfleet.embedders.registry.check_backend, called where a job spec is built).
    chosen_backend = backend or get("embed.backend") or spec.backend
    if (chosen_backend == "openai") != (spec.remote is not None):
        raise ConfigError(
            f"model {spec.name!r} is served remotely: its backend is openai, not {chosen_backend!r}" if spec.remote
            else f"backend openai needs a remote model (one with a url); {spec.name!r} has none"
        )
    # A remote model's precision is the provider's; what it returns is float32 here.
    chosen_precision = "fp32" if spec.remote else precision or get("embed.precision")
    if chosen_precision not in ("fp32", "bf16", "fp16", "auto"):
        raise ConfigError(f"precision must be fp32, bf16, fp16 or auto, not {chosen_precision!r}")
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize must be int8, not {quantize!r}")
    if quantize and chosen_backend not in ("onnx", "openvino"):
        raise ConfigError("--quantize int8 needs --backend onnx or openvino")
    chosen_device = device or get("embed.device")
    if chosen_precision == "fp16" and chosen_device == "cpu":
        # CPUs without AVX512-FP16 emulate fp16 matmuls: slower than fp32 and no more accurate.
        raise ConfigError("precision fp16 needs a CUDA device; on CPU use bf16 (or auto) or fp32")
    if chosen_backend in ("onnx", "openvino") and chosen_precision in ("bf16", "fp16"):
        raise ConfigError(f"the {chosen_backend} backend runs fp32 (or --quantize int8), not {chosen_precision}; "
                          "use --backend sentence-transformers for bf16/fp16")
    if chosen_backend == "openvino" and chosen_device not in (None, "auto", "cpu"):
        raise ConfigError(f"the openvino backend runs on the CPU, not {chosen_device}")
    return EmbedderSpec(
        model=spec,
        backend=chosen_backend,
        precision=chosen_precision,
        device=chosen_device,
        batch_tokens=int(batch_tokens or get("embed.batch-tokens") or 0),
        threads=threads if threads is not None else get("embed.threads"),
        quantize=quantize,
        cache_dir=cache_dir,
        cache_max_models=int(get("embed.cache.max-models")),
        cache_max_bytes=bytes_value("embed.cache.max-memory"),
        backend_path=(get("backends", None) or {}).get(chosen_backend),
    )


def chunk_spec(
    *,
    unit: str | None = None,
    size: int | None = None,
    overlap: int | None = None,
    structure: str | None = None,
    heading_context: bool = False,
) -> ChunkSpec:
    """The chunking of a job; ``heading_context=True`` turns it on, False leaves it to config."""
    return ChunkSpec(
        unit=unit or get("chunk.unit"),
        size=int(size if size is not None else get("chunk.size")),
        overlap=int(overlap if overlap is not None else get("chunk.overlap")),
        structure=structure or get("chunk.structure", "auto"),
        heading_context=bool(heading_context or get("chunk.heading-context", False)),
    )


def retry_spec() -> RetrySpec:
    return RetrySpec(
        attempts=max(1, int(get("write.retries"))),
        delay=seconds_value("write.retry-delay"),
        max_delay=seconds_value("write.retry-max-delay"),
    )
