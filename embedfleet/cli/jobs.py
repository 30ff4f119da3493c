"""``embedfleet jobs``: submit, dispatch, watch and cancel jobs of the job service."""

from __future__ import annotations

import sys

import click

from embedfleet.cli.client import as_info, remote, server_option
from embedfleet.cli.common import (
    EmbedfleetGroup,
    data_dir_option,
    db_option,
    emit_json,
    handle_errors,
    user_option,
)
from embedfleet.cli.options import index_options

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")


def _service(database_url, data_dir):
    from embedfleet.schedulers.service import JobService

    return JobService(database_url, data_dir=data_dir)


def _user(user):
    from embedfleet import config

    return user or config.get("user")


def _connect(**kwargs):
    """The cluster a dispatcher runs jobs on (a seam for tests)."""
    from embedfleet.pipeline.cluster import connect

    return connect(**kwargs)


def _remote_job(source: str, priority, options) -> dict:
    """The POST /v1/jobs body of a submit: the options set, ``--sink`` as one of the server's sink names."""
    import os

    body = {k: v for k, v in options.to_dict().items() if v is not None and v is not False}
    if "sink" in body:
        body["sink"] = str(body["sink"])
    # The server resolves paths on its own machine: send a local path absolute.
    body["source"] = os.path.abspath(source) if os.path.exists(source) else source
    if priority is not None:
        body["priority"] = priority
    return body


def _fmt_time(value) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}Z" if value is not None else "-"


def _describe(info) -> str:
    eff = "-" if info.effective_priority is None else f"{info.effective_priority:.1f}"
    rows = [
        ("job", info.id),
        ("user", info.user),
        ("status", info.status + (" (cancel requested)" if info.cancel_requested and info.status == "running" else "")),
        ("stage", info.stage),
        ("priority", f"{info.priority} (effective {eff})"),
        ("source", info.source),
        ("sink", f"{info.sink} collection {info.collection}"),
        ("model", f"{info.model}, {info.chunk_unit} {info.chunk_size}/{info.chunk_overlap}, mode {info.mode}"),
        ("documents", f"{info.documents:,} ({info.skipped_documents:,} skipped)"),
        (
            "chunks",
            f"{info.chunks:,} (embedded {info.embedded:,}, unchanged {info.skipped:,}, deleted {info.deleted:,}; "
            f"estimated to embed {info.estimated_chunks:,})",
        ),
        ("partitions", f"{info.partitions_done}/{info.partitions_total}"),
        ("created", _fmt_time(info.created_at)),
        ("started", _fmt_time(info.started_at)),
        ("finished", _fmt_time(info.finished_at)),
    ]
    if info.error:
        rows.append(("error", info.error))
    return "\n".join(f"{k + ':':<12}{v}" for k, v in rows)


def _table(infos) -> str:
    header = f"{'JOB':<12}  {'STATUS':<11}  {'STAGE':<10}  {'PRIO':>4}  {'EFF':>6}  {'EMBEDDED':>9}  {'CHUNKS':>9}  {'CREATED':<20}  SOURCE"
    lines = [header]
    for i in infos:
        eff = "-" if i.effective_priority is None else f"{i.effective_priority:.1f}"
        lines.append(
            f"{i.id:<12}  {i.status:<11}  {i.stage:<10}  {i.priority:>4}  {eff:>6}  {i.embedded:>9,}  {i.chunks:>9,}  "
            f"{_fmt_time(i.created_at):<20}  {i.source}"
        )
    return "\n".join(lines)


@click.group(cls=EmbedfleetGroup)
def jobs():
    """Queue indexing jobs and run them fairly on a shared cluster.

    Jobs wait in a database (SQLite in the data dir, or PostgreSQL with --db); `jobs run`
    dispatches them by effective priority within each user's tier limits. Users only see
    and cancel their own jobs.

    \b
    Examples:
      embedfleet jobs submit ./docs --user alice --collection kb --priority 70
      embedfleet jobs run --once
      embedfleet jobs list --user alice --status running
      embedfleet jobs status 3f2a9c1b7d4e --user alice --json
      embedfleet jobs cancel 3f2a9c1b7d4e --user alice
    """


@jobs.command("submit")
@click.argument("source")
@user_option
@click.option("--priority", type=click.IntRange(0, 100), default=None, help="Base priority 0-100 (default 50).")
@index_options
@db_option
@data_dir_option
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print the queued job as one JSON object.")
@handle_errors
def submit(source, user, priority, options, database_url, data_dir, server, as_json):
    """Queue SOURCE (a folder, a .jsonl/.csv/.parquet file, or a built-in dataset) for indexing.

    The job is refused if its estimated chunks exceed what is left of the user's daily quota
    (the message says how much is left), if the user already has too many jobs waiting, or if
    the source is outside the configured allowed roots. A sync or append into a collection
    that already holds chunks is checked only by the exact count after chunking, since
    unchanged chunks are free. A dispatcher (`jobs run`) runs it.

    \b
    Examples:
      embedfleet jobs submit ./docs --user alice --collection kb
      embedfleet jobs submit corpus.jsonl --user alice --collection kb --priority 70 --text-column body --json
      embedfleet jobs submit ./docs --user bob --collection wiki --mode full --chunk-size 128
      EMBEDFLEET_TOKEN=... embedfleet jobs submit /srv/corpus/handbook --server http://127.0.0.1:8000 --collection kb
    """
    client = remote(server, refused={"--user": user, "--db": database_url, "--data-dir": data_dir})
    if client is not None:
        with client:
            info = as_info(client.call("POST", "/v1/jobs", json=_remote_job(source, priority, options)))
    else:
        with _service(database_url, data_dir) as service:
            info = service.submit(source, user=_user(user), priority=priority, options=options)
    if as_json:
        emit_json(info.to_dict())
    else:
        click.echo(f"Queued job {info.id} for {info.user} (estimated {info.estimated_chunks:,} chunks to embed, priority {info.priority}).")


@jobs.command("run")
@click.option("--once", is_flag=True, help="Run until no job is queued or running, then exit.")
@click.option("--max-running", type=click.IntRange(min=1), default=None, help="Jobs run at once by this dispatcher (default embedfleet.jobs.max-running).")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="An existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: a local cluster).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Worker processes of the local cluster.")
@click.option("--gpu", is_flag=True, default=None, help="Start a dask_cuda.LocalCUDACluster.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, help="Serve Prometheus metrics on this port (e.g. 9108).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address the metrics endpoint listens on.")
@db_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="At exit, print the jobs this dispatcher ran as one JSON array.")
@handle_errors
def run(once, max_running, scheduler, workers, gpu, metrics_port, metrics_host, database_url, data_dir, as_json):
    """Dispatch queued jobs onto a Dask cluster (the job service's worker loop).

    Picks jobs by effective priority, never more than a user's tier allows at once nor
    --max-running in total, and runs several jobs on the cluster together. Small append jobs
    whose model and chunking agree run as one batch (one pass, a record each; see
    embedfleet.jobs.coalesce). Any number of dispatchers may share one PostgreSQL database. Ctrl-C (or SIGTERM) stops cleanly: jobs
    that do not finish first are marked interrupted and resumed by the next dispatcher. A
    second Ctrl-C or SIGTERM stops at once, even with a job stuck: its jobs are marked
    interrupted first, and the exit status is 128 + the signal (130, 143).

    \b
    Examples:
      embedfleet jobs run --once
      embedfleet jobs run --scheduler tcp://scheduler:8786 --max-running 8
      embedfleet jobs run --db postgresql+psycopg://jobs@db/embedfleet
      embedfleet jobs run --metrics-port 9108             # Prometheus: http://127.0.0.1:9108/metrics
    """
    from embedfleet.schedulers.dispatcher import Dispatcher, StopSignals

    # The signal handlers cover the cluster's start and close too: either can hang on a stuck
    # job thread, and a second signal must still end the process.
    with StopSignals() as signals, _service(database_url, data_dir) as service, _connect(
        scheduler_address=scheduler, workers=workers, gpu=gpu
    ) as client:
        from embedfleet.dashboard.data import record_dask_dashboard

        record_dask_dashboard(service, getattr(client, "dashboard_link", None))  # linked from `embedfleet dashboard`
        runner = endpoint = None
        if metrics_port is not None:
            from embedfleet.schedulers.metrics import DispatcherMetrics

            metrics = DispatcherMetrics(service)
            runner = metrics.instrument()
            endpoint = metrics.serve(metrics_port, host=metrics_host)
            click.echo(f"Prometheus metrics on {endpoint.url}", err=True)
        dispatcher = Dispatcher(service, client=client, max_running=max_running, runner=runner)
        signals.attach(dispatcher)
        click.echo(
            f"Dispatcher {dispatcher.name} running jobs from {service.url} "
            f"(max {dispatcher.max_running} at once; dashboard {getattr(client, 'dashboard_link', '-')})",
            err=True,
        )
        try:
            ran = dispatcher.run(once=once)
        except KeyboardInterrupt:
            click.echo("Interrupted: unfinished jobs were marked interrupted and will be resumed.", err=True)
            sys.exit(130)
        finally:
            if endpoint is not None:
                endpoint.stop()
    if as_json:
        emit_json([i.to_dict() for i in ran])
    else:
        counts: dict[str, int] = {}
        for info in ran:
            counts[info.status] = counts.get(info.status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no jobs"
        click.echo(f"Dispatcher stopped: {summary}.", err=True)


@jobs.command("list")
@user_option
@click.option("--status", "statuses", type=click.Choice(STATUSES), multiple=True, help="Only jobs in this status (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many jobs, newest first.")
@db_option
@data_dir_option
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
@handle_errors
def list_jobs(user, statuses, limit, database_url, data_dir, server, as_json):
    """List a user's jobs, newest first.

    \b
    Examples:
      embedfleet jobs list --user alice
      embedfleet jobs list --user alice --status queued --status running --json
    """
    client = remote(server, refused={"--user": user, "--db": database_url, "--data-dir": data_dir})
    if client is not None:
        with client:
            params = {"limit": limit, **({"status": list(statuses)} if statuses else {})}
            infos = [as_info(b) for b in client.call("GET", "/v1/jobs", params=params)]
    else:
        with _service(database_url, data_dir) as service:
            infos = service.list(user=_user(user), status=list(statuses) or None, limit=limit)
    if as_json:
        emit_json([i.to_dict() for i in infos])
    elif not infos:
        click.echo("No jobs.")
    else:
        click.echo(_table(infos))


@jobs.command("status")
@click.argument("job_id")
@user_option
@db_option
@data_dir_option
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print the job as one JSON object.")
@handle_errors
def status(job_id, user, database_url, data_dir, server, as_json):
    """Show one of your jobs: status, stage, counts, priority, times, error.

    \b
    Examples:
      embedfleet jobs status 3f2a9c1b7d4e --user alice
      embedfleet jobs status 3f2a9c1b7d4e --user alice --json
    """
    client = remote(server, refused={"--user": user, "--db": database_url, "--data-dir": data_dir})
    if client is not None:
        with client:
            info = as_info(client.call("GET", f"/v1/jobs/{job_id}"))
    else:
        with _service(database_url, data_dir) as service:
            info = service.status(job_id, user=_user(user))
    if as_json:
        emit_json(info.to_dict())
    else:
        click.echo(_describe(info))


@jobs.command("cancel")
@click.argument("job_id")
@user_option
@db_option
@data_dir_option
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print the job as one JSON object.")
@handle_errors
def cancel(job_id, user, database_url, data_dir, server, as_json):
    """Cancel one of your jobs: a queued job at once, a running one as soon as its dispatcher sees it.

    \b
    Examples:
      embedfleet jobs cancel 3f2a9c1b7d4e --user alice
    """
    client = remote(server, refused={"--user": user, "--db": database_url, "--data-dir": data_dir})
    if client is not None:
        with client:
            info = as_info(client.call("DELETE", f"/v1/jobs/{job_id}"))
    else:
        with _service(database_url, data_dir) as service:
            info = service.cancel(job_id, user=_user(user))
    if as_json:
        emit_json(info.to_dict())
    elif info.status == "running":
        click.echo(f"Cancel requested for job {info.id}; its dispatcher is stopping its tasks.")
    else:
        click.echo(f"Job {info.id} is {info.status}.")


@jobs.command("resume")
@click.argument("job_id")
@user_option
@db_option
@data_dir_option
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print the job as one JSON object.")
@handle_errors
def resume(job_id, user, database_url, data_dir, server, as_json):
    """Queue an interrupted, failed or cancelled job again under the same id.

    The pipeline skips the partitions the earlier run finished, so the job continues
    where it stopped.

    \b
    Examples:
      embedfleet jobs resume 3f2a9c1b7d4e --user alice
    """
    client = remote(server, refused={"--user": user, "--db": database_url, "--data-dir": data_dir})
    if client is not None:
        with client:
            info = as_info(client.call("POST", f"/v1/jobs/{job_id}/resume"))
    else:
        with _service(database_url, data_dir) as service:
            info = service.resume(job_id, user=_user(user))
    if as_json:
        emit_json(info.to_dict())
    else:
        click.echo(f"Job {info.id} queued again.")
