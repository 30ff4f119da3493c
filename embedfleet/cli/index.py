"""``embedfleet index``: one corpus into one collection, now, on a Dask cluster."""

from __future__ import annotations

import logging
import sys

import click

from embedfleet.cli.common import (
    data_dir_option,
    db_option,
    emit_json,
    handle_errors,
    user_option,
)
from embedfleet.cli.options import index_options

logger = logging.getLogger(__name__)


class _ProgressBar:
    """A tqdm bar on stderr that follows the job's stages: partitions while chunking, chunks while embedding."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bar = None
        self._stage = None

    def __call__(self, progress) -> None:
        if progress.stage != self._stage:
            self._stage = progress.stage
            self.close()
            if progress.stage == "chunking":
                self._bar = self._tqdm(total=progress.partitions_total or None, desc="chunking", unit="part", file=sys.stderr)
            elif progress.stage == "embedding":
                self._bar = self._tqdm(total=progress.chunks_to_embed or 0, desc="embedding", unit="chunk", file=sys.stderr)
        if self._bar is None:
            return
        done = progress.partitions_done if progress.stage == "chunking" else progress.embedded
        self._bar.update(max(0, done - self._bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@click.command()
@click.argument("source")
@index_options
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Use an existing Dask scheduler, e.g. tcp://10.0.0.5:8786.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Worker processes of the local cluster (default one per core, up to 8).")
@click.option("--gpu", is_flag=True, default=None, help="Start a dask_cuda.LocalCUDACluster (pip install 'embedfleet[gpu]').")
@user_option
@data_dir_option
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result.")
@handle_errors
def index(source, options, scheduler, workers, gpu, user, data_dir, database_url, as_json):
    """Chunk, embed and store SOURCE: a folder, a .jsonl/.csv/.parquet file, or python-docs.

    Running it again is incremental: unchanged chunks are not embedded again, and chunks of
    edited or removed documents are replaced or deleted. A document that exists but cannot be
    read now is reported as skipped and keeps its vectors. A run that would delete more than
    half of the collection's documents (embedfleet.index.max-delete-fraction), or delete from a
    source with no readable document, stops before deleting; --allow-mass-delete confirms.

    \b
    Examples:
      embedfleet index ./docs
      embedfleet index corpus.jsonl --text-column body --id-column url --collection kb
      embedfleet index python-docs --collection pydocs --json
      embedfleet index ./docs --sink milvus:///srv/vectors.db --collection kb
      embedfleet index ./docs --scheduler tcp://scheduler:8786 --precision auto
    """
    import embedfleet

    bar = _ProgressBar() if sys.stderr.isatty() and not as_json else None

    def announce(client) -> None:
        # For whoever watches the progress bar; a script's stderr holds only what went wrong.
        if bar is not None:
            click.echo(f"Dask dashboard: {client.dashboard_link}", err=True)
        else:
            logger.info("Dask dashboard: %s", client.dashboard_link)

    try:
        result = embedfleet.index(
            source, options=options, user=user, data_dir=data_dir, scheduler=scheduler, workers=workers, gpu=gpu,
            database_url=database_url, on_progress=bar, on_cluster=announce,
        )
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        emit_json(result.to_dict())
        return
    _print_summary(result)
    if result.status != "succeeded":
        sys.exit(1)


def _print_summary(result) -> None:
    from embedfleet.sinks.base import QualityReport

    click.echo(
        f"{result.status}: {result.documents} documents -> {result.chunks} chunks; "
        f"embedded {result.embedded}, unchanged {result.skipped}, deleted {result.deleted} "
        f"in {result.seconds:.1f}s"
    )
    if result.embedded and result.chunks_per_second:
        efficiency = f", padding efficiency {result.padding_efficiency:.0%}" if result.padding_efficiency else ""
        click.echo(
            f"embedding: {result.chunks_per_second:.1f} chunks/s, {result.tokens_per_second:.0f} tokens/s"
            f" at {result.precision}{efficiency}"
        )
    click.echo(f"collection {result.collection!r} of user {result.user!r} in {result.sink} (job {result.job_id})")
    if result.quality:
        # int8 is opt-in because it moves the vectors: say by how much, on this corpus.
        click.echo(QualityReport.from_dict(result.quality).describe())
    if result.skipped_documents:
        click.echo(f"skipped {len(result.skipped_documents)} unreadable documents:", err=True)
        for skipped in result.skipped_documents[:10]:
            click.echo(f"  {skipped.doc_id}: {skipped.reason}", err=True)
        if len(result.skipped_documents) > 10:
            click.echo("  ... (--json lists them all)", err=True)
