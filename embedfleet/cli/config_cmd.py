"""``embedfleet config``: the embedfleet.* settings as resolved from files and environment."""

from __future__ import annotations

import click
import yaml

from embedfleet.cli.common import emit_json, handle_errors


@click.group("config")
def config_group():
    """Show the resolved configuration.

    \b
    Examples:
      embedfleet config show
      DASK_EMBEDFLEET__EMBED__BATCH_TOKENS=4096 embedfleet config show --json
    """


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
@handle_errors
def show(as_json):
    """Print every embedfleet.* key after defaults, config files and DASK_EMBEDFLEET__* variables, validated.

    Credentials (sink tokens, passwords and headers, the database URL's password) show as ***.
    """
    import dask.config

    from embedfleet import config

    config.validate()
    resolved = {"embedfleet": config.redacted(dask.config.get("embedfleet"))}
    if as_json:
        emit_json(resolved)
    else:
        click.echo(yaml.safe_dump(resolved, sort_keys=False).rstrip())
