"""Build a job's frozen :class:`JobSpec` from options, config and defaults, on the client."""

from __future__ import annotations

import uuid
from typing import Any

from embedfleet import config
from embedfleet.errors import ConfigError
from embedfleet.pipeline.job import JobSpec
from embedfleet.sinks.catalog import default_sink_uri
from embedfleet.sinks.naming import check_part
from embedfleet.sinks.registry import make_spec

__all__ = ["build_job_spec", "new_job_id"]

MODES = ("sync", "append", "full")


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def build_job_spec(
    source: str,
    *,
    job_id: str | None = None,
    user: str | None = None,
    collection: str | None = None,
    sink: str | None = None,
    sink_options: dict[str, Any] | None = None,
    model: str | None = None,
    chunk_size: int | None = None,
    chunk_overlap: int | None = None,
    chunk_unit: str | None = None,
    mode: str | None = None,
    on_error: str | None = None,
    data_dir: str | None = None,
    text_column: str | None = None,
    id_column: str | None = None,
    precision: str | None = None,
    backend: str | None = None,
    batch_tokens: int | None = None,
    quantize: str | None = None,
    allow_mass_delete: bool = False,
) -> JobSpec:
    from embedfleet.datasets import source_spec

    config.validate()
    root = config.data_dir(data_dir)
    mode = mode or "sync"
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    on_error = on_error or config.get("on-error")
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on-error must be skip or fail, not {on_error!r}")
    return JobSpec(
        job_id=job_id or new_job_id(),
        user=check_part("user id", user or config.get("user")),
        collection=check_part("collection name", collection or config.get("collection")),
        # The roots bind the workers too: every file is checked again where it is opened.
        source=source_spec(source, text_column=text_column, id_column=id_column,
                           allowed_roots=config.get("jobs.allowed-roots", None) or ()),
        sink=make_spec(sink or default_sink_uri(str(root)), sink_options),
        chunk=config.chunk_spec(unit=chunk_unit, size=chunk_size, overlap=chunk_overlap),
        embedder=config.embedder_spec(
            model=model,
            backend=backend,
            precision=precision,
            batch_tokens=batch_tokens,
            quantize=quantize,
            cache_dir=str(root / "models"),
        ),
        data_dir=str(root),
        mode=mode,  # type: ignore[arg-type]
        on_error=on_error,  # type: ignore[arg-type]
        chunks_per_partition=int(config.get("embed.chunks-per-partition")),
        retry=config.retry_spec(),
        max_delete_fraction=float(config.get("index.max-delete-fraction")),
        allow_mass_delete=bool(allow_mass_delete),
    )
