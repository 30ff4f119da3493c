"""The ``embedfleet`` command line: one module per command group, thin over the Python API."""

from __future__ import annotations

import importlib

import click

from embedfleet.cli.common import EmbedfleetGroup

__all__ = ["main"]

# command name -> "module:attribute"; imported only when that command runs, so `--help` and
# quick commands do not pay for torch.
COMMANDS = {
    "index": "embedfleet.cli.index:index",
    "search": "embedfleet.cli.search:search",
    "users": "embedfleet.cli.users:users",
    "jobs": "embedfleet.cli.jobs:jobs",
    "quota": "embedfleet.cli.quota:quota",
    "collections": "embedfleet.cli.collections:collections",
    "cron": "embedfleet.cli.cron:cron",
    "dashboard": "embedfleet.cli.dashboard:dashboard",
    "config": "embedfleet.cli.config_cmd:config_group",
}


class LazyGroup(EmbedfleetGroup):
    def list_commands(self, ctx):
        return sorted(name for name, target in COMMANDS.items() if _importable(target))

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, _, attr = target.partition(":")
        return getattr(importlib.import_module(module_name), attr)


def _importable(target: str) -> bool:
    module_name = target.partition(":")[0]
    return importlib.util.find_spec(module_name) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="embedfleet")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Index folders and datasets into vector stores on a Dask cluster.

    \b
    Examples:
      embedfleet index ./docs
      embedfleet index corpus.jsonl --text-column body --id-column url --collection kb
      embedfleet search "how do I rotate a log file" --collection kb -k 5
      embedfleet jobs submit ./docs --user alice --collection kb
    """
    import logging

    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # distributed sets its loggers to INFO from dask config when it is first imported, which
    # happens after this (commands import it lazily): set that config, not only the loggers.
    # pymilvus logs failed requests with tracebacks that our retries already handle.
    if not verbose:
        import dask.config

        dask.config.set({"logging.distributed": "warning"})
    for noisy in ("distributed", "pymilvus", "chromadb", "httpx", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(level if verbose else logging.WARNING)
    if not verbose:
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
