"""``embedfleet tokens``: API tokens of ``embedfleet serve`` (an administrator's command).

Like ``embedfleet users``, this works on the job database directly: whoever can open it is
the administrator. A token's secret is printed once, at ``create``, and never again.
"""

from __future__ import annotations

import datetime as dt

import click

from embedfleet.cli.common import (
    EmbedfleetGroup,
    data_dir_option,
    db_option,
    emit_json,
    handle_errors,
)
from embedfleet.errors import ConfigError

__all__ = ["tokens"]


def _store(database_url, data_dir):
    from embedfleet.schedulers.service import JobService
    from embedfleet.schedulers.tokens import TokenStore

    service = JobService(database_url, data_dir=data_dir)
    return service, TokenStore(service)


def _lifetime(value: str | None) -> dt.timedelta | None:
    if value is None or value in ("never", "none"):
        return None
    from dask.utils import parse_timedelta

    try:
        seconds = float(parse_timedelta(value, default="days"))
    except (TypeError, ValueError, KeyError):
        raise ConfigError(f"--expires must be a duration such as 30d, 12h or 90m (or 'never'), not {value!r}") from None
    return dt.timedelta(seconds=seconds)


def _fmt(value) -> str:
    return f"{value:%Y-%m-%d %H:%M}Z" if value is not None else "-"


@click.group(cls=EmbedfleetGroup)
def tokens():
    """Create, list and revoke the bearer tokens of `embedfleet serve`.

    Each token belongs to one user; --admin adds the scope for users, tiers and tokens over
    the API. The secret is shown once and stored only as a hash.

    \b
    Examples:
      embedfleet tokens create alice --expires 30d --json
      embedfleet tokens create ops --admin
      embedfleet tokens list
      embedfleet tokens revoke 3
    """


@tokens.command("create")
@click.argument("user")
@click.option("--admin", is_flag=True, help="Admin scope: users, tiers and tokens over the API.")
@click.option("--expires", default=None, metavar="DURATION", help="Lifetime, e.g. 30d, 12h (default: never).")
@click.option("--note", default=None, help="What the token is for (shown by `tokens list`).")
@db_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help='Print {"id", "token", "user", ...} as one JSON object.')
@handle_errors
def create(user, admin, expires, note, database_url, data_dir, as_json):
    """Create a token for USER (created at the default tier if unknown) and print it once.

    \b
    Examples:
      embedfleet tokens create alice --expires 30d
      export EMBEDFLEET_TOKEN=$(embedfleet tokens create alice --json | jq -r .token)
    """
    lifetime = _lifetime(expires)
    service, store = _store(database_url, data_dir)
    with service:
        info, secret = store.create(user, admin=admin, expires_in=lifetime, note=note)
    if as_json:
        emit_json({**info.to_dict(), "token": secret})
        return
    click.echo(secret)
    scope = "admin" if info.admin else "user"
    click.echo(f"Token {info.id} for {info.user} ({scope} scope, expires {_fmt(info.expires_at)}); "
               "it is shown only this once.", err=True)


@tokens.command("list")
@click.option("--user", default=None, help="Only this user's tokens.")
@db_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
@handle_errors
def list_cmd(user, database_url, data_dir, as_json):
    """List tokens (never their secrets): id, user, scope, state, expiry, last use."""
    service, store = _store(database_url, data_dir)
    with service:
        infos = store.list(user=user)
    if as_json:
        emit_json([i.to_dict() for i in infos])
        return
    if not infos:
        click.echo("No tokens.")
        return
    click.echo(f"{'ID':>4}  {'USER':<16}  {'SCOPE':<5}  {'STATE':<7}  {'CREATED':<17}  {'EXPIRES':<17}  {'LAST USED':<17}  NOTE")
    for i in infos:
        click.echo(f"{i.id:>4}  {i.user:<16}  {'admin' if i.admin else 'user':<5}  {i.state():<7}  {_fmt(i.created_at):<17}  "
                   f"{_fmt(i.expires_at):<17}  {_fmt(i.last_used_at):<17}  {i.note or ''}")


@tokens.command("revoke")
@click.argument("token_id", type=int)
@db_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the token as one JSON object.")
@handle_errors
def revoke(token_id, database_url, data_dir, as_json):
    """Revoke token TOKEN_ID at once: the next request with it is refused (401)."""
    service, store = _store(database_url, data_dir)
    with service:
        info = store.revoke(token_id)
    if as_json:
        emit_json(info.to_dict())
    else:
        click.echo(f"Token {info.id} of {info.user} revoked.")
