"""What every command shares: error handling, JSON output, common options."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

import click

from embedfleet.errors import EmbedfleetError

__all__ = ["EmbedfleetGroup", "handle_errors", "emit_json", "data_dir_option", "db_option", "user_option"]


def handle_errors(func):
    """Turn an EmbedfleetError into one line on stderr and the error's exit code; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EmbedfleetError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            # A failure we did not anticipate (often from a worker or a store client): one line
            # for the user, the traceback for whoever runs it again with -v.
            if _verbose():
                raise
            click.echo(f"Error: unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)", err=True)
            sys.exit(1)

    return wrapper


def _verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("verbose"))


class EmbedfleetGroup(click.Group):
    """A click group whose commands get :func:`handle_errors`."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EmbedfleetError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def _default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def emit_json(obj: Any) -> None:
    """Exactly one JSON document on stdout."""
    click.echo(json.dumps(obj, default=_default, sort_keys=True))


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Data directory (config embedfleet.data-dir, default ./embedfleet-data).",
)
db_option = click.option(
    "--db",
    "database_url",
    default=None,
    metavar="URL",
    help="Job database SQLAlchemy URL (config embedfleet.jobs.database-url; default SQLite in the data dir).",
)
user_option = click.option("--user", default=None, help="User id (config embedfleet.user, default 'local').")
