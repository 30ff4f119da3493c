"""``embedfleet serve``: the HTTP API, a dispatcher and a warm cluster in one process."""

from __future__ import annotations

import click

from embedfleet.cli.common import data_dir_option, db_option, handle_errors


@click.command()
@click.option("--host", default=None, help="Address to listen on (default embedfleet.server.host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port (default embedfleet.server.port, 8000; 0: any free port).")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="An existing Dask scheduler (default: a local cluster).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Worker processes of the local cluster.")
@click.option("--gpu", is_flag=True, default=None, help="Start a dask_cuda.LocalCUDACluster.")
@click.option("--max-running", type=click.IntRange(min=1), default=None, help="Jobs run at once (default embedfleet.jobs.max-running).")
@click.option("--no-dispatch", is_flag=True, help="Serve the API only; another process (`jobs run`) runs the jobs.")
@db_option
@data_dir_option
@handle_errors
def serve(host, port, scheduler, workers, gpu, max_running, no_dispatch, database_url, data_dir):
    """Serve the authenticated HTTP API (jobs, search, embeddings) and run its jobs.

    Every /v1 request needs `Authorization: Bearer TOKEN` (`embedfleet tokens create`).
    It listens on loopback by default; to serve others, put a TLS proxy in front. SIGTERM
    stops it cleanly: unfinished jobs are marked interrupted and can be resumed.

    \b
    Examples:
      embedfleet serve
      embedfleet serve --host 127.0.0.1 --port 8000 --scheduler tcp://scheduler:8786
      curl -H "Authorization: Bearer $EMBEDFLEET_TOKEN" http://127.0.0.1:8000/v1/jobs
    """
    from embedfleet import config
    from embedfleet.server.main import serve as run_server

    run_server(host=host or str(config.get("server.host")), port=int(port if port is not None else config.get("server.port")),
               database_url=database_url, data_dir=data_dir, scheduler=scheduler, workers=workers, gpu=gpu,
               max_running=max_running, dispatch=not no_dispatch)
