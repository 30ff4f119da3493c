"""Build a job's frozen :class:`JobSpec` from options, config and defaults, on the client."""

from __future__ import annotations

import uuid
from typing import Any

from embedfleet import config
from embedfleet.embedders.registry import check_backend
from embedfleet.options import IndexOptions
from embedfleet.pipeline.job import JobSpec
from embedfleet.sinks.catalog import default_sink_uri
from embedfleet.sinks.naming import check_part
from embedfleet.sinks.registry import make_spec

__all__ = ["build_job_spec", "new_job_id"]


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def build_job_spec(
    source: str,
    options: IndexOptions | None = None,
    *,
    job_id: str | None = None,
    user: str | None = None,
    data_dir: str | None = None,
    **fields: Any,
) -> JobSpec:
    """The spec of one job: ``options`` (with ``fields`` replacing its values, see
    :meth:`IndexOptions.merge`), each None resolved from config."""
    from embedfleet.datasets import source_spec

    options = IndexOptions.merge(options, **fields)
    config.validate()
    root = config.data_dir(data_dir)
    embedder = config.embedder_spec(
        model=options.model,
        backend=options.backend,
        precision=options.precision,
        batch_tokens=options.batch_tokens,
        quantize=options.quantize,
        cache_dir=str(config.local_dir(root) / "models"),  # a model cache is local, whatever the data dir
    )
    check_backend(embedder.backend)
    return JobSpec(
        job_id=job_id or new_job_id(),
        user=check_part("user id", user or config.get("user")),
        collection=check_part("collection name", options.collection or config.get("collection")),
        # The roots bind the workers too: every file is checked again where it is opened.
        source=source_spec(source, text_column=options.text_column, id_column=options.id_column,
                           allowed_roots=config.get("jobs.allowed-roots", None) or ()),
        sink=make_spec(options.sink or default_sink_uri(str(root))),
        chunk=config.chunk_spec(unit=options.chunk_unit, size=options.chunk_size, overlap=options.chunk_overlap,
                                structure=options.chunk_structure, heading_context=options.chunk_heading_context),
        embedder=embedder,
        data_dir=str(root),
        mode=options.mode or "sync",
        on_error=options.on_error or config.get("on-error"),
        chunks_per_partition=int(config.get("embed.chunks-per-partition")),
        retry=config.retry_spec(),
        max_delete_fraction=float(config.get("index.max-delete-fraction")),
        allow_mass_delete=options.allow_mass_delete,
        allow_mixed=options.allow_mixed,
    )
