"""``embedfleet collections``: list, inspect and drop a user's collections."""

from __future__ import annotations

import sys

import click

from embedfleet.cli.client import remote, server_option
from embedfleet.cli.common import (
    EmbedfleetGroup,
    data_dir_option,
    emit_json,
    handle_errors,
    user_option,
)
from embedfleet.errors import ConfigError, SinkError

__all__ = ["collections"]

sink_option = click.option(
    "--sink",
    "sink_uri",
    default=None,
    metavar="URI",
    help="Vector store (config embedfleet.sink; default chroma://<data-dir>/chroma), e.g. "
    "chroma://host:8000, milvus:///abs/file.db, milvus://host:19530, parquet:///abs/dir.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


def _user(user: str | None) -> str:
    from embedfleet import config
    from embedfleet.sinks.naming import check_part

    return check_part("user id", user or str(config.get("user")))


def _open(sink_uri: str | None, data_dir: str | None):
    from embedfleet.sinks.catalog import default_sink_uri
    from embedfleet.sinks.registry import open_sink

    return open_sink(sink_uri or default_sink_uri(data_dir))


def _interactive() -> bool:
    return sys.stdin.isatty()


@click.group(cls=EmbedfleetGroup)
def collections() -> None:
    """List, inspect and drop your collections.

    Collection names are per user: every command works on the collections of --user only
    (config embedfleet.user), whatever the store holds for other users.

    \b
    Examples:
      embedfleet collections list --user alice
      embedfleet collections info kb --user alice --json
      embedfleet collections drop kb --user alice --sink milvus:///srv/vectors.db --yes
    """


@collections.command("list")
@user_option
@sink_option
@data_dir_option
@server_option
@json_option
@handle_errors
def list_cmd(user: str | None, sink_uri: str | None, data_dir: str | None, server: str | None, as_json: bool) -> None:
    """List the user's collections with their model and size.

    \b
    Examples:
      embedfleet collections list --user alice
      embedfleet collections list --user alice --sink parquet:///data/export --json
    """
    client = remote(server, refused={"--user": user, "--data-dir": data_dir})
    if client is not None:
        with client:
            body = client.call("GET", "/v1/collections", params={"sink": sink_uri or "default"}, what="collection")
        _print_list(body, body["user"], body["sink"], as_json)
        return
    from embedfleet.sinks.catalog import (
        describe_user_collection,
        display_uri,
        list_user_collections,
    )

    user = _user(user)
    with _open(sink_uri, data_dir) as sink:
        rows = []
        for name in list_user_collections(sink, user):
            try:
                rows.append(describe_user_collection(sink, user, name))
            except SinkError as exc:
                # One unreadable collection must not hide the others.
                rows.append({"name": name, "user": user, "error": str(exc)})
        _print_list({"user": user, "sink": display_uri(sink.uri), "collections": rows}, user, display_uri(sink.uri), as_json)


def _print_list(body: dict, user: str, where: str, as_json: bool) -> None:
    rows = body["collections"]
    if as_json:
        emit_json(body)
        return
    if not rows:
        click.echo(f"No collections for user {user!r} in {where}.", err=True)
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        if "error" in r:
            click.echo(f"{r['name']:<{width}}  error: {r['error']}")
        else:
            families = "+".join(r.get("families") or ()) or "unknown"
            mixed = " MIXED" if r.get("mixed") else ""
            click.echo(f"{r['name']:<{width}}  {r['count']:>9} chunks  {r['model']} ({r['dimensions']}d, {r['metric']}, "
                       f"{families}){mixed}")


@collections.command("info")
@click.argument("name")
@user_option
@sink_option
@data_dir_option
@server_option
@json_option
@handle_errors
def info_cmd(name: str, user: str | None, sink_uri: str | None, data_dir: str | None, server: str | None,
             as_json: bool) -> None:
    """Show a collection: model, dimensions, metric, vector families, an int8 job's quality report,
    chunk count, physical name and store.

    \b
    Examples:
      embedfleet collections info kb --user alice
      embedfleet collections info kb --user alice --sink chroma://localhost:8000 --json
    """
    client = remote(server, refused={"--user": user, "--data-dir": data_dir})
    if client is not None:
        with client:
            described = client.call("GET", f"/v1/collections/{name}", params={"sink": sink_uri or "default"},
                                    what="collection")
    else:
        from embedfleet.sinks.catalog import describe_user_collection

        user = _user(user)
        with _open(sink_uri, data_dir) as sink:
            described = describe_user_collection(sink, user, name)
    if as_json:
        emit_json(described)
        return
    for key in ("name", "user", "model", "dimensions", "metric", "precision", "backend", "count", "physical_name", "sink"):
        if described.get(key) is not None:
            click.echo(f"{key + ':':<15}{described[key]}")
    if described.get("families"):
        mixed = " (mixed: created with the first; --allow-mixed added the others)" if described.get("mixed") else ""
        click.echo(f"{'families:':<15}{'+'.join(described['families'])}{mixed}")
    if described.get("quality"):
        from embedfleet.sinks.base import QualityReport

        report = QualityReport.from_dict(described["quality"])
        click.echo(f"{'quality:':<15}{report.describe()} (job {report.job_id})")


@collections.command("drop")
@click.argument("name")
@user_option
@sink_option
@data_dir_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask; required when stdin is not a terminal.")
@server_option
@handle_errors
def drop_cmd(name: str, user: str | None, sink_uri: str | None, data_dir: str | None, yes: bool, server: str | None) -> None:
    """Drop a collection and every vector in it. This cannot be undone.

    Asks for confirmation on a terminal; elsewhere (scripts, cron) --yes is required.

    \b
    Examples:
      embedfleet collections drop kb --user alice
      embedfleet collections drop kb --user alice --sink milvus://milvus:19530 --yes
    """
    client = remote(server, refused={"--user": user, "--data-dir": data_dir})
    if client is not None:
        sink_name = sink_uri or "default"
        with client:
            if not yes:
                if not _interactive():
                    raise ConfigError(f"refusing to drop collection {name!r} without --yes (stdin is not a terminal)")
                count = client.call("GET", f"/v1/collections/{name}", params={"sink": sink_name}, what="collection")["count"]
                click.confirm(f"Drop collection {name!r} ({count} chunks) from sink {sink_name} of {server}?", abort=True)
            client.call("DELETE", f"/v1/collections/{name}", params={"sink": sink_name}, what="collection")
        click.echo(f"Dropped collection {name!r} from sink {sink_name} of {server}.", err=True)
        return
    from embedfleet import config
    from embedfleet.pipeline.manifest import Manifest
    from embedfleet.sinks.catalog import (
        display_uri,
        drop_user_collection,
        open_user_collection,
    )

    user = _user(user)
    with _open(sink_uri, data_dir) as sink:
        where = display_uri(sink.uri)
        if not yes:
            if not _interactive():
                raise ConfigError(f"refusing to drop collection {name!r} without --yes (stdin is not a terminal)")
            count = open_user_collection(sink, user, name).count()
            click.confirm(f"Drop collection {name!r} of user {user!r} ({count} chunks) from {where}?", abort=True)
        physical = drop_user_collection(sink, user, name)
        # Its manifest describes vectors that are gone: kept, the next sync would embed nothing.
        Manifest(str(config.data_dir(data_dir)), sink.uri, physical).drop()
    click.echo(f"Dropped collection {name!r} of user {user!r} ({physical}) from {where}.", err=True)
