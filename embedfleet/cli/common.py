"""What every command shares: error handling, JSON output, common options."""

from __future__ import annotations

import errno
import functools
import json
import logging
import sys
import traceback
from typing import Any

import click

from embedfleet.errors import EmbedfleetError

__all__ = [
    "EmbedfleetGroup", "OneLineFormatter", "handle_errors", "emit_json", "data_dir_option", "db_option", "user_option",
]


def handle_errors(func):
    """Turn an error into one line on stderr and an exit code; the traceback only with -v."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EmbedfleetError as exc:
            _report(exc)
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
            click.echo(f"Error: {_describe(exc)}", err=True)
            sys.exit(1)

    return wrapper


def _report(exc: EmbedfleetError) -> None:
    if _verbose():
        click.echo("".join(traceback.format_exception(exc)), err=True, nl=False)
    click.echo(f"Error: {exc}", err=True)


def _describe(exc: Exception) -> str:
    full = _no_space(exc)
    if full is not None:
        # Only the writer knows what it was writing: pyarrow's and file.write()'s errors name no file.
        where = f"writing {full.filename}" if full.filename else f"({_summary(full)})"
        return f"no space left on device {where} (run with -v for the traceback)"
    return f"unexpected {_summary(exc)} (run with -v for the traceback)"


def _no_space(exc: BaseException | None) -> OSError | None:
    """The full-disk OSError behind ``exc``: itself (a worker's, as Dask re-raises it) or a cause."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _summary(exc: BaseException) -> str:
    """``Type: message`` on one line (database drivers' messages run on for lines)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("verbose"))


class OneLineFormatter(logging.Formatter):
    """Each log record on one line: a logged exception is named after the message, its traceback
    left for -v (a job's failure is the command's `Error:` line; a traceback per record buried it)."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            line += f" ({_summary(exc)})"
        return line


class EmbedfleetGroup(click.Group):
    """A click group whose commands get :func:`handle_errors`."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EmbedfleetError as exc:
            _report(exc)
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
