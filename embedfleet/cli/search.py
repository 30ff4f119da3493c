"""``embedfleet search``: nearest chunks to a query in one collection."""

from __future__ import annotations

import click

from embedfleet.cli.common import data_dir_option, emit_json, handle_errors, user_option


@click.command()
@click.argument("query")
@click.option("--collection", default=None, help="Collection name (default 'default').")
@click.option("--sink", default=None, metavar="URI", help="Vector store URI (default chroma://<data-dir>/chroma).")
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="How many chunks.")
@user_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {doc_id, chunk_id, chunk_index, score, text}.")
@handle_errors
def search(query, collection, sink, k, user, data_dir, as_json):
    """Find the K chunks nearest to QUERY, embedded with the collection's own model.

    \b
    Examples:
      embedfleet search "how do I rotate a log file" --collection kb -k 5
      embedfleet search "context managers" --collection pydocs --json
    """
    import embedfleet

    hits = embedfleet.search(query, collection=collection, sink=sink, user=user, k=k, data_dir=data_dir)
    if as_json:
        emit_json([
            {"doc_id": h.doc_id, "chunk_id": h.chunk_id, "chunk_index": h.chunk_index, "score": h.score,
             "text": h.text, "start": h.start, "end": h.end}
            for h in hits
        ])
        return
    if not hits:
        click.echo("no results")
    for rank, hit in enumerate(hits, 1):
        snippet = " ".join(hit.text.split())
        snippet = snippet[:200] + ("..." if len(snippet) > 200 else "")
        click.echo(f"{rank}. {hit.score:.3f}  {hit.doc_id} #{hit.chunk_index}\n   {snippet}")
