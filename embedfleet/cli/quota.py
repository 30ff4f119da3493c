"""``embedfleet quota``: a user's daily chunk quota and concurrency."""

from __future__ import annotations

import click

from embedfleet.cli.client import remote, server_option
from embedfleet.cli.common import (
    EmbedfleetGroup,
    data_dir_option,
    db_option,
    emit_json,
    handle_errors,
    user_option,
)


@click.group(cls=EmbedfleetGroup)
def quota():
    """Daily chunk quotas (UTC days) and concurrency limits.

    \b
    Examples:
      embedfleet quota show --user alice
      embedfleet quota show --user alice --json
    """


@quota.command("show")
@user_option
@db_option
@data_dir_option
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def show(user, database_url, data_dir, server, as_json):
    """Show a user's tier, daily limit, chunks used today, remaining, and running jobs.

    Only embedded chunks are charged; unchanged chunks skipped by an incremental run are
    free. "Reserved" chunks are held by the user's queued and running jobs and not charged
    yet: a waiting job's estimate, a running job's exact count once checked after chunking.

    \b
    Examples:
      embedfleet quota show --user alice
      embedfleet quota show --user alice --json
    """
    client = remote(server, refused={"--user": user, "--db": database_url, "--data-dir": data_dir})
    if client is not None:
        import datetime as dt
        from types import SimpleNamespace

        with client:
            body = client.call("GET", "/v1/quota")
        info = SimpleNamespace(**{**body, "day": dt.date.fromisoformat(body["day"])})
        info.to_dict = lambda: body
    else:
        from embedfleet import config
        from embedfleet.schedulers.service import JobService

        with JobService(database_url, data_dir=data_dir) as service:
            info = service.quota(user or config.get("user"))
    if as_json:
        emit_json(info.to_dict())
        return
    limit = "unlimited" if info.daily_limit is None else f"{info.daily_limit:,}"
    remaining = "unlimited" if info.remaining is None else f"{info.remaining:,}"
    lines = [
        f"user:        {info.user}" + ("" if info.known_user else " (not seen yet: defaults shown)"),
        f"tier:        {info.tier}",
        f"day (UTC):   {info.day.isoformat()}",
        f"daily limit: {limit} chunks",
        f"used today:  {info.used_today:,}",
        f"reserved:    {info.reserved:,}",
        f"remaining:   {remaining}",
        f"running:     {info.running} of {info.concurrent_limit}",
        f"waiting:     {info.queued} of {info.queue_limit}",
    ]
    click.echo("\n".join(lines))
