"""``embedfleet dashboard``: the live jobs page in the browser."""

from __future__ import annotations

import threading

import click

from embedfleet.cli.common import data_dir_option, db_option, handle_errors


@click.command("dashboard")
@click.option("--port", type=click.IntRange(0, 65535), default=8790, show_default=True, help="Port of the page (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; the page shows every user's jobs, so keep it local unless it is behind access control.")
@click.option("--dask-dashboard", "dask_dashboard", default=None, metavar="URL", help="Dask dashboard to link to (default: the one the dispatcher recorded).")
@click.option("--user", default=None, help="Only this user's jobs and usage.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--allow-websocket-origin", "origins", multiple=True, metavar="HOST:PORT", help="Another host:port the page may be opened under (behind a proxy). Repeatable.")
@db_option
@data_dir_option
@handle_errors
def dashboard(port, host, dask_dashboard, user, interval, origins, database_url, data_dir):
    """Serve a live page of the job service: jobs, usage vs quota, chunks/s.

    The jobs table (user, tier, status, stage, effective priority, progress, rate) and
    today's usage per user against the tier's quota refresh every second; chunks/s is
    plotted over time; the page links to the Dask dashboard of the cluster the dispatcher
    uses. Ctrl-C stops it.

    \b
    Examples:
      embedfleet dashboard --port 8790
      embedfleet dashboard --db postgresql+psycopg://jobs@db/embedfleet --host 0.0.0.0
      embedfleet dashboard --dask-dashboard http://scheduler:8787/status
    """
    from embedfleet.dashboard.app import DashboardServer
    from embedfleet.schedulers.service import JobService

    with JobService(database_url, data_dir=data_dir) as service:
        server = DashboardServer(
            service,
            host=host,
            port=port,
            interval=interval,
            dask_dashboard=dask_dashboard,
            user=user,
            allow_websocket_origin=list(origins),
        ).start()
        stopped = threading.Event()
        try:
            # Inside the try: a Ctrl-C right after the announcement must still stop the server.
            click.echo(f"Jobs dashboard at {server.url} (jobs from {service.url}); Ctrl-C stops it.", err=True)
            # wait() with a timeout keeps the main thread responsive to Ctrl-C.
            while not stopped.wait(0.5):
                pass
        finally:
            server.stop()
