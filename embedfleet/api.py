"""The Python API notebooks and scripts use: ``embedfleet.index`` and ``embedfleet.search``."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from embedfleet import config
from embedfleet.options import IndexOptions

if TYPE_CHECKING:  # the job types import every source format's reader; search needs none
    from embedfleet.pipeline.job import JobResult, Progress
    from embedfleet.sinks.base import Hit

logger = logging.getLogger(__name__)

__all__ = ["index", "search"]


def index(
    source: str,
    *,
    options: IndexOptions | None = None,
    user: str | None = None,
    data_dir: str | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    gpu: bool | None = None,
    client=None,
    database_url: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_cluster: Callable[[object], None] | None = None,
    **fields,
) -> JobResult:
    """Index ``source`` (a folder, a JSONL/CSV/Parquet file, or ``python-docs``) into a collection.

    The job's options are ``options`` (an :class:`~embedfleet.options.IndexOptions`) with
    ``fields`` (``collection="kb"``, ``chunk_size=128``, any of its fields) replacing its values.
    The run is recorded as a job of ``user`` (default ``local``) in the job service, so
    ``embedfleet jobs list`` shows it. Re-running is incremental (mode ``sync``): only new
    or changed chunks are embedded and chunks of removed documents are deleted.

    >>> result = embedfleet.index("python-docs", collection="pydocs")  # doctest: +SKIP
    >>> result.chunks, result.embedded  # doctest: +SKIP
    """
    from embedfleet.datasets import source_spec
    from embedfleet.pipeline.unchanged import run_unchanged
    from embedfleet.schedulers.dispatcher import run_inline
    from embedfleet.schedulers.service import JobService

    options = IndexOptions.merge(options, **fields)
    # Cheap checks first: a typo in the source or the chunking should not cost a cluster start.
    source_spec(source, text_column=options.text_column, id_column=options.id_column)
    config.chunk_spec(unit=options.chunk_unit, size=options.chunk_size, overlap=options.chunk_overlap)

    with JobService(database_url=database_url, data_dir=data_dir) as service:
        if client is not None:
            return run_inline(service, source, user=user, client=client, on_progress=on_progress, options=options)

        def run_here(spec, **kwargs) -> JobResult:
            # A source unchanged since the last commit needs no cluster and no model.
            known = run_unchanged(spec, **kwargs)
            if known is not None:
                return known
            from embedfleet.pipeline.cluster import connect, start_local_workers

            # The workers' imports now, beside the driver's own (the job's modules, the scheduler).
            start_local_workers(scheduler_address=scheduler, gpu=gpu, backend=options.backend, model=options.model)
            from embedfleet.pipeline.run import run_job

            with connect(scheduler_address=scheduler, workers=workers, gpu=gpu, backend=options.backend,
                         model=options.model) as own_client:
                if on_cluster is not None:
                    on_cluster(own_client)
                return run_job(spec, **{**kwargs, "client": own_client})

        return run_inline(service, source, user=user, client=None, runner=run_here, on_progress=on_progress,
                          options=options)


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
    collection), in this process: by ONNX Runtime where an ONNX export of that model exists
    in the data dir's model cache (verified to 0.9999 cosine of torch's vectors when made),
    which answers without importing torch; else by the configured backend. The query of an
    int8 collection too: fp32 queries over int8 vectors were measured closer to fp32's own
    ranking than int8 queries (README, "Queries stay fp32 on an int8 collection").
    """
    from embedfleet.errors import ConfigError
    from embedfleet.sinks.catalog import default_sink_uri
    from embedfleet.sinks.naming import check_part, physical_name
    from embedfleet.sinks.registry import make_spec, open_sink

    if k < 1:
        raise ConfigError(f"k must be at least 1, not {k}")
    user = check_part("user id", user or config.get("user"))
    collection = check_part("collection name", collection or config.get("collection"))
    sink_spec = make_spec(sink or default_sink_uri(data_dir))
    # Loading the model in a thread while Chroma opens was measured no faster (both are
    # mostly Python imports under one GIL).
    cache_dir = str(config.local_dir(data_dir) / "models")
    with open_sink(sink_spec) as store:
        opened = store.open(physical_name(user, collection))
        recorded = opened.info
        embedder = _query_embedder(config.embedder_spec(model=recorded.model, cache_dir=cache_dir))
        if embedder.dimensions != recorded.dimensions:
            raise ConfigError(
                f"collection {collection!r} has {recorded.dimensions}-dimensional vectors but model "
                f"{recorded.model!r} is configured with {embedder.dimensions}"
            )
        return opened.query(embedder.embed_query(query), k)


def _onnx_export_for(spec):
    """The ONNX export to embed queries with for ``spec``, if it can stand in for it."""
    if spec.backend != "sentence-transformers" or spec.precision != "fp32" or spec.device not in ("auto", "cpu"):
        return None
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    from embedfleet.embedders.onnx import find_export

    try:
        return find_export(spec.model.name, config.resolve_model_path(spec.model.path), spec.cache_dir)
    except (OSError, ValueError):
        return None


def _query_embedder(spec):
    """The embedder for one query: the model's ONNX export where one exists and gives the same vectors.

    The torch backend at fp32 and its verified ONNX export agree to 0.9999 cosine (ranks and
    printed scores are the same), and ONNX Runtime starts in a fraction of the time torch
    and sentence-transformers take to import. Another precision, a quantized or remote
    model, or no export: the configured backend, as a job would embed.
    """
    from dataclasses import replace

    from embedfleet.embedders.cache import get_embedder

    if _onnx_export_for(spec) is not None:
        return get_embedder(replace(spec, backend="onnx", device="cpu"))
    return get_embedder(spec)
