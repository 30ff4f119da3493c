"""The Python API notebooks and scripts use: ``embedfleet.index`` and ``embedfleet.search``."""

from __future__ import annotations

import logging
from typing import Callable

from embedfleet import config
from embedfleet.pipeline.job import JobResult, Progress
from embedfleet.sinks.base import Hit

logger = logging.getLogger(__name__)

__all__ = ["index", "search"]


def index(
    source: str,
    *,
    collection: str | None = None,
    sink: str | None = None,
    user: str | None = None,
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
    scheduler: str | None = None,
    workers: int | None = None,
    gpu: bool | None = None,
    client=None,
    database_url: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_cluster: Callable[[object], None] | None = None,
) -> JobResult:
    """Index ``source`` (a folder, a JSONL/CSV/Parquet file, or ``python-docs``) into a collection.

    The run is recorded as a job of ``user`` (default ``local``) in the job service, so
    ``embedfleet jobs list`` shows it. Re-running is incremental (mode ``sync``): only new
    or changed chunks are embedded and chunks of removed documents are deleted.

    >>> result = embedfleet.index("python-docs", collection="pydocs")  # doctest: +SKIP
    >>> result.chunks, result.embedded  # doctest: +SKIP
    """
    from embedfleet.datasets import source_spec
    from embedfleet.pipeline.cluster import connect
    from embedfleet.schedulers.service import JobService

    # Cheap checks first: a typo in the source or the chunking should not cost a cluster start.
    source_spec(source, text_column=text_column, id_column=id_column)
    config.chunk_spec(unit=chunk_unit, size=chunk_size, overlap=chunk_overlap)

    options = dict(
        collection=collection,
        sink=sink,
        model=model,
        chunk_size=chunk_size,
        chunk_overlap=chunk_overlap,
        chunk_unit=chunk_unit,
        mode=mode or "sync",
        on_error=on_error,
        text_column=text_column,
        id_column=id_column,
        precision=precision,
        backend=backend,
        batch_tokens=batch_tokens,
        quantize=quantize,
        allow_mass_delete=allow_mass_delete,
    )
    with JobService(database_url=database_url, data_dir=data_dir) as service:
        if client is not None:
            return service.run_inline(source, user=user, client=client, on_progress=on_progress, **options)
        with connect(scheduler_address=scheduler, workers=workers, gpu=gpu, backend=backend, model=model) as own_client:
            if on_cluster is not None:
                on_cluster(own_client)
            return service.run_inline(source, user=user, client=own_client, on_progress=on_progress, **options)


def search(
    query: str,
    *,
    collection: str | None = None,
    sink: str | None = None,
    user: str | None = None,
    k: int = 5,
    data_dir: str | None = None,
) -> list[Hit]:
    """The ``k`` chunks of ``collection`` nearest to ``query``, best first.

    The query is embedded with the model the collection was built with (recorded in the
    collection), in this process.
    """
    from embedfleet.embedders.cache import get_embedder
    from embedfleet.errors import ConfigError
    from embedfleet.sinks.catalog import default_sink_uri
    from embedfleet.sinks.naming import check_part, physical_name
    from embedfleet.sinks.registry import make_spec, open_sink

    if k < 1:
        raise ConfigError(f"k must be at least 1, not {k}")
    user = check_part("user id", user or config.get("user"))
    collection = check_part("collection name", collection or config.get("collection"))
    sink_spec = make_spec(sink or default_sink_uri(data_dir))
    with open_sink(sink_spec) as store:
        opened = store.open(physical_name(user, collection))
        recorded = opened.info
        embedder = get_embedder(config.embedder_spec(model=recorded.model, cache_dir=str(config.data_dir(data_dir) / "models")))
        if embedder.dimensions != recorded.dimensions:
            raise ConfigError(
                f"collection {collection!r} has {recorded.dimensions}-dimensional vectors but model "
                f"{recorded.model!r} is configured with {embedder.dimensions}"
            )
        return opened.query(embedder.embed_query(query), k)
