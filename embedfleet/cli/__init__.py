"""The ``embedfleet`` command line: one module per command group, thin over the Python API."""

from __future__ import annotations

import importlib

import click

from embedfleet.cli.common import EmbedfleetGroup, OneLineFormatter

__all__ = ["main"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

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
    "tokens": "embedfleet.cli.tokens:tokens",
    "serve": "embedfleet.cli.serve:serve",
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

    import dask.config

    from embedfleet.exiting import exit_without_final_collection

    exit_without_final_collection()

    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    handler = logging.StreamHandler()
    handler.setFormatter((logging.Formatter if verbose else OneLineFormatter)(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    if not verbose:
        # Dask logs each failed task attempt with its traceback (a worker's "Compute Failed",
        # once per retry) where the command reports the failure once, as its `Error:` line.
        # distributed sets its loggers from dask config when first imported: in this process
        # after this (commands import it lazily), and in each worker process a LocalCluster
        # spawns, which reads dask config from the environment its nanny gives it.
        dask.config.set({
            "logging.distributed": "critical",
            "distributed.nanny.pre-spawn-environ.DASK_LOGGING__DISTRIBUTED": "critical",
        })
    # Silent without -v where the errors are ours to report: distributed's failed tasks and
    # pymilvus's failed requests, logged with tracebacks that our retries already handle.
    silent = ("distributed", "pymilvus")
    for noisy in ("distributed", "pymilvus", "chromadb", "httpx", "sentence_transformers", "transformers"):
        quiet = logging.CRITICAL if noisy in silent else logging.WARNING
        logging.getLogger(noisy).setLevel(level if verbose else quiet)
