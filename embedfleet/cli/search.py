"""``embedfleet search``: nearest chunks to a query in one collection."""

from __future__ import annotations

import click

from embedfleet.cli.client import remote, server_option
from embedfleet.cli.common import data_dir_option, emit_json, handle_errors, user_option


@click.command()
@click.argument("query")
@click.option("--collection", default=None, help="Collection name (default 'default').")
@click.option("--sink", default=None, metavar="URI", help="Vector store URI (default chroma://<data-dir>/chroma).")
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="How many chunks.")
@user_option
@data_dir_option
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {doc_id, chunk_id, chunk_index, score, text}.")
@handle_errors
def search(query, collection, sink, k, user, data_dir, server, as_json):
    """Find the K chunks nearest to QUERY, embedded with the collection's own model.

    \b
    Examples:
      embedfleet search "how do I rotate a log file" --collection kb -k 5
      embedfleet search "context managers" --collection pydocs --json
      embedfleet search "rotate logs" --collection kb --server http://127.0.0.1:8000   # token in EMBEDFLEET_TOKEN

    With --server the query goes to `embedfleet serve` (a warm model, a result cache) and
    --sink names one of the server's sinks.
    """
    client = remote(server, refused={"--user": user, "--data-dir": data_dir})
    if client is not None:
        from types import SimpleNamespace

        from embedfleet import config

        with client:
            body = client.call("POST", f"/v1/collections/{collection or config.get('collection')}/search",
                               json={"query": query, "k": k, "sink": sink or "default"}, what="collection")
        hits = [SimpleNamespace(**{"section": None, **h}) for h in body["hits"]]
    else:
        import embedfleet

        hits = embedfleet.search(query, collection=collection, sink=sink, user=user, k=k, data_dir=data_dir)
    if as_json:
        emit_json([
            {"doc_id": h.doc_id, "chunk_id": h.chunk_id, "chunk_index": h.chunk_index, "score": h.score,
             "text": h.text, "start": h.start, "end": h.end, "section": h.section}
            for h in hits
        ])
        return
    if not hits:
        click.echo("no results")
    for rank, hit in enumerate(hits, 1):
        snippet = " ".join(hit.text.split())
        snippet = snippet[:200] + ("..." if len(snippet) > 200 else "")
        section = f"  [{hit.section}]" if hit.section else ""
        click.echo(f"{rank}. {hit.score:.3f}  {hit.doc_id} #{hit.chunk_index}{section}\n   {snippet}")
