"""``embedfleet users``: users and their tiers (admin commands)."""

from __future__ import annotations

import click

from embedfleet.cli.common import EmbedfleetGroup, data_dir_option, db_option, emit_json, handle_errors


def _service(database_url, data_dir):
    from embedfleet.schedulers.service import JobService

    return JobService(database_url, data_dir=data_dir)


def _tiers_help() -> str:
    return "A tier from embedfleet.jobs.tiers (free, premium, enterprise, unlimited by default)."


@click.group(cls=EmbedfleetGroup)
def users():
    """Users of the job service and their tiers (admin commands).

    A tier sets a user's daily chunk quota, concurrent jobs and priority multiplier. Users
    first seen at `jobs submit` are created at embedfleet.jobs.default-tier; only these
    commands change a tier.

    \b
    Examples:
      embedfleet users add alice --tier premium
      embedfleet users set-tier alice enterprise
      embedfleet users list --json
      embedfleet users show alice
    """


@users.command("add")
@click.argument("user")
@click.option("--tier", default=None, help=_tiers_help() + " Default embedfleet.jobs.default-tier.")
@db_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the user as one JSON object.")
@handle_errors
def add(user, tier, database_url, data_dir, as_json):
    """Create USER at a tier.

    \b
    Examples:
      embedfleet users add alice --tier premium
      embedfleet users add bob --db postgresql+psycopg://jobs@db/embedfleet
    """
    with _service(database_url, data_dir) as service:
        info = service.add_user(user, tier=tier)
    if as_json:
        emit_json(info.to_dict())
    else:
        click.echo(f"Added user {info.id} (tier {info.tier}).")


@users.command("set-tier")
@click.argument("user")
@click.argument("tier")
@db_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the user as one JSON object.")
@handle_errors
def set_tier(user, tier, database_url, data_dir, as_json):
    """Move USER to TIER (applies to the next submit and the next dispatch).

    \b
    Examples:
      embedfleet users set-tier alice enterprise
    """
    with _service(database_url, data_dir) as service:
        info = service.set_tier(user, tier)
    if as_json:
        emit_json(info.to_dict())
    else:
        click.echo(f"User {info.id} is now on tier {info.tier}.")


@users.command("list")
@db_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
@handle_errors
def list_users(database_url, data_dir, as_json):
    """List every user with their tier.

    \b
    Examples:
      embedfleet users list
      embedfleet users list --json
    """
    with _service(database_url, data_dir) as service:
        infos = service.list_users()
    if as_json:
        emit_json([i.to_dict() for i in infos])
        return
    if not infos:
        click.echo("No users.")
        return
    width = max(4, *(len(i.id) for i in infos))
    click.echo(f"{'USER':<{width}}  {'TIER':<12}  CREATED")
    for i in infos:
        click.echo(f"{i.id:<{width}}  {i.tier:<12}  {i.created_at:%Y-%m-%d %H:%M:%S}Z")


@users.command("show")
@click.argument("user")
@db_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the user as one JSON object.")
@handle_errors
def show(user, database_url, data_dir, as_json):
    """Show USER's tier.

    \b
    Examples:
      embedfleet users show alice --json
    """
    from embedfleet.errors import ConfigError

    with _service(database_url, data_dir) as service:
        info = service.get_user(user)
    if info is None:
        raise ConfigError(f"unknown user {user!r}")
    if as_json:
        emit_json(info.to_dict())
    else:
        click.echo(f"{info.id}: tier {info.tier}, created {info.created_at:%Y-%m-%d %H:%M:%S}Z")
