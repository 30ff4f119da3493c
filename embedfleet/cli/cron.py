"""``embedfleet cron``: fire schedules from a YAML file as jobs of the job service."""

from __future__ import annotations

import threading

import click

from embedfleet.cli.common import EmbedfleetGroup, data_dir_option, db_option, emit_json, handle_errors

schedules_option = click.option(
    "--schedules",
    "schedules_path",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Schedules YAML file (config embedfleet.cron.schedules).",
)


def _schedules_path(path):
    from embedfleet import config

    path = path or config.get("cron.schedules", None)
    if not path:
        raise click.UsageError("no schedules file: pass --schedules FILE or set embedfleet.cron.schedules")
    return path


def _service(database_url, data_dir):
    from embedfleet.schedulers.service import JobService

    return JobService(database_url, data_dir=data_dir)


def _connect(**kwargs):
    """The cluster an in-process dispatcher runs jobs on (a seam for tests)."""
    from embedfleet.pipeline.cluster import connect

    return connect(**kwargs)


def _fmt(value) -> str:
    return f"{value:%Y-%m-%d %H:%M}Z" if value is not None else "-"


def _describe_firing(f) -> str:
    slot = f"{f.slot:%Y-%m-%d %H:%M}Z"
    extra = f" ({f.coalesced} missed run(s) coalesced)" if f.coalesced else ""
    if f.outcome == "submitted":
        return f"{f.schedule}: submitted job {f.job_id} for the run of {slot}{extra}"
    return f"{f.schedule}: run of {slot} {f.outcome}: {f.message}{extra}"


@click.group(cls=EmbedfleetGroup)
def cron():
    """Run indexing jobs on cron schedules from a YAML file.

    Each due schedule becomes a job of its user through the job service (tiers, quotas and
    priority apply); a dispatcher (`embedfleet jobs run`, or `cron run --dispatch`) runs it.
    A run that is due while the schedule's previous job is still active is skipped and
    recorded; runs missed during downtime fire once. State is kept in the job database.

    \b
    A schedules file:
      schedules:
        - name: nightly-docs
          cron: "30 2 * * *"
          timezone: Europe/Berlin
          source: /srv/docs
          user: alice
          collection: kb
          mode: sync
          options: {chunk-size: 128}

    \b
    Examples:
      embedfleet cron run --schedules schedules.yaml --dispatch
      embedfleet cron tick --schedules schedules.yaml        # from system cron: * * * * *
      embedfleet cron list --schedules schedules.yaml --json
    """


@cron.command("check")
@schedules_option
@click.option("--json", "as_json", is_flag=True, help="Print the validated schedules as one JSON array.")
@handle_errors
def check(schedules_path, as_json):
    """Validate a schedules file; errors name the line at fault.

    \b
    Examples:
      embedfleet cron check --schedules schedules.yaml
    """
    from embedfleet.schedulers.schedules import load_schedules

    schedules = load_schedules(_schedules_path(schedules_path))
    if as_json:
        emit_json([s.to_dict() for s in schedules])
    else:
        click.echo(f"{len(schedules)} schedule(s) OK: {', '.join(s.name for s in schedules) or '-'}")


@cron.command("list")
@schedules_option
@db_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
@handle_errors
def list_schedules(schedules_path, database_url, data_dir, as_json):
    """Show each schedule's next run, last run and last status.

    The last status is the status of the job the last run submitted (queued, running,
    succeeded, ...), or `skipped` (the previous job was still active), `refused` (quota,
    queue limit) or `error`, or `never`.

    \b
    Examples:
      embedfleet cron list --schedules schedules.yaml
      embedfleet cron list --schedules schedules.yaml --json
    """
    from embedfleet.schedulers.cron import CronScheduler

    with _service(database_url, data_dir) as service:
        statuses = CronScheduler(service, _schedules_path(schedules_path)).status()
    if as_json:
        emit_json([s.to_dict() for s in statuses])
        return
    if not statuses:
        click.echo("No schedules.")
        return
    click.echo(f"{'NAME':<20}  {'CRON':<16}  {'TZ':<14}  {'USER':<10}  {'NEXT RUN':<17}  {'LAST RUN':<17}  {'LAST STATUS':<11}  JOB")
    for s in statuses:
        sched = s.schedule
        nxt = _fmt(s.next_run) if sched.enabled else "disabled"
        click.echo(
            f"{sched.name:<20}  {sched.cron:<16}  {sched.timezone:<14}  {sched.user:<10}  {nxt:<17}  "
            f"{_fmt(s.last_slot):<17}  {s.last_status:<11}  {s.last_job_id or '-'}"
        )


@cron.command("tick")
@schedules_option
@db_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print what fired as one JSON array.")
@handle_errors
def tick(schedules_path, database_url, data_dir, as_json):
    """Submit the jobs of every schedule that is due now, then exit.

    For system cron or a Kubernetes CronJob: run it every minute. Any number of `tick`
    and `run` processes may share one job database; each due run is submitted once.

    \b
    Examples:
      embedfleet cron tick --schedules schedules.yaml
      * * * * *  /opt/embedfleet/bin/embedfleet cron tick --schedules /etc/embedfleet/schedules.yaml
    """
    from embedfleet.schedulers.cron import CronScheduler

    with _service(database_url, data_dir) as service:
        fired = CronScheduler(service, _schedules_path(schedules_path)).tick()
    if as_json:
        emit_json([f.to_dict() for f in fired])
    elif not fired:
        click.echo("Nothing due.", err=True)
    else:
        for f in fired:
            click.echo(_describe_firing(f))


@cron.command("run")
@schedules_option
@click.option("--dispatch", is_flag=True, help="Also run a dispatcher in this process, so submitted jobs run here.")
@click.option("--max-running", type=click.IntRange(min=1), default=None, help="With --dispatch: jobs run at once.")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="With --dispatch: an existing Dask scheduler (default: a local cluster).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="With --dispatch: worker processes of the local cluster.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, help="With --dispatch: serve Prometheus metrics on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address the metrics endpoint listens on.")
@click.option("--poll-seconds", type=click.FloatRange(min=0.1), default=None, help="Re-check at least this often (default embedfleet.cron.poll-seconds).")
@db_option
@data_dir_option
@handle_errors
def run(schedules_path, dispatch, max_running, scheduler, workers, metrics_port, metrics_host, poll_seconds,
        database_url, data_dir):
    """Fire due schedules as jobs until stopped (Ctrl-C or SIGTERM).

    It submits jobs; a dispatcher runs them: start `embedfleet jobs run` beside it, or pass
    --dispatch to run one in this process. The schedules file is re-read when it changes
    (an invalid edit is logged and the previous schedules kept).

    \b
    Examples:
      embedfleet cron run --schedules schedules.yaml
      embedfleet cron run --schedules schedules.yaml --dispatch --metrics-port 9108
      embedfleet cron run --schedules schedules.yaml --dispatch --scheduler tcp://scheduler:8786
    """
    import contextlib
    import signal

    from embedfleet.schedulers.cron import CronScheduler

    given = [flag for flag, value in (("--max-running", max_running), ("--scheduler", scheduler), ("--workers", workers),
                                      ("--metrics-port", metrics_port)) if value is not None]
    if given and not dispatch:
        raise click.UsageError(f"{', '.join(given)} only make(s) sense with --dispatch (a dispatcher in this process)")
    path = _schedules_path(schedules_path)
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(_service(database_url, data_dir))
        scheduler_loop = CronScheduler(service, path)
        dispatcher = thread = None
        if dispatch:
            from embedfleet.dashboard.data import record_dask_dashboard
            from embedfleet.schedulers.dispatcher import Dispatcher

            client = stack.enter_context(_connect(scheduler_address=scheduler, workers=workers))
            record_dask_dashboard(service, getattr(client, "dashboard_link", None))
            runner = None
            if metrics_port is not None:
                from embedfleet.schedulers.metrics import DispatcherMetrics

                metrics = DispatcherMetrics(service)
                runner = metrics.instrument()
                endpoint = metrics.serve(metrics_port, host=metrics_host)
                stack.callback(endpoint.stop)
                click.echo(f"Prometheus metrics on {endpoint.url}", err=True)
            dispatcher = Dispatcher(service, client=client, max_running=max_running, runner=runner)
            thread = threading.Thread(target=dispatcher.run, name="embedfleet-dispatcher", daemon=True)
            thread.start()

        def stop(*_):
            scheduler_loop.stop()
            if dispatcher is not None:
                dispatcher.stop()

        previous = None
        try:
            previous = signal.signal(signal.SIGTERM, stop)
        except ValueError:  # not the main thread
            pass
        click.echo(
            f"cron: {len(scheduler_loop.schedules)} schedule(s) from {path}; jobs go to {service.url}"
            + (f"; dispatching on {getattr(client, 'dashboard_link', '-')}" if dispatch else "; run `embedfleet jobs run` to run them"),
            err=True,
        )
        try:
            scheduler_loop.run(poll_seconds=poll_seconds, on_fire=lambda f: click.echo(_describe_firing(f), err=True))
        finally:
            # Ctrl-C lands here too (handle_errors then exits 130): the dispatcher marks its
            # unfinished jobs interrupted before the cluster goes away.
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if thread is not None:
                stop()
                thread.join()
