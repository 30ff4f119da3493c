"""One ``embedfleet serve`` process: the Dask cluster, a dispatcher, and the API on uvicorn.

The dispatcher runs in a thread beside the event loop, on the same client, so models stay
resident on the cluster's workers between jobs, and the server's own process keeps the models
of search and embeddings. SIGTERM (or Ctrl-C) stops uvicorn; then the dispatcher stops like
``embedfleet jobs run`` does: jobs that do not finish within its grace are marked
interrupted, and ``POST /v1/jobs/{id}/resume`` or the next dispatcher continues them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from embedfleet.errors import ConfigError

__all__ = ["serve"]

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve(*, host: str, port: int, database_url: str | None = None, data_dir: str | None = None,
          scheduler: str | None = None, workers: int | None = None, gpu: bool | None = None,
          max_running: int | None = None, dispatch: bool = True, announce=None) -> None:
    import uvicorn

    from embedfleet.pipeline.cluster import connect
    from embedfleet.schedulers.dispatcher import Dispatcher
    from embedfleet.schedulers.metrics import DispatcherMetrics
    from embedfleet.schedulers.service import JobService
    from embedfleet.server.app import create_app
    from embedfleet.server.state import ServerState

    announce = announce or (lambda line: print(line, file=sys.stderr, flush=True))
    sock = _bind(host, port)
    with JobService(database_url, data_dir=data_dir) as service:
        metrics = DispatcherMetrics(service)
        with connect(scheduler_address=scheduler, workers=workers, gpu=gpu) if dispatch else _no_cluster() as client:
            dispatcher = thread = None
            if dispatch:
                dispatcher = Dispatcher(service, client=client, max_running=max_running, runner=metrics.instrument())
                thread = threading.Thread(target=_dispatch, args=(dispatcher,), name="embedfleet-dispatcher", daemon=True)
                thread.start()
            state = ServerState(service, registry=metrics.registry, dispatcher=dispatcher)
            app = create_app(state)
            bound_host, bound_port = sock.getsockname()[:2]
            config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                    timeout_graceful_shutdown=10, server_header=False)
            server = uvicorn.Server(config)
            url = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
            announce(f"embedfleet serve on {url} (jobs from {service.url}; dispatcher "
                     f"{dispatcher.name if dispatcher else 'off'}; dashboard {getattr(client, 'dashboard_link', '-')})")
            received: list[int] = []
            # uvicorn stops on SIGTERM/SIGINT and then raises the signal again for the handler it
            # found: this one records it, so the dispatcher below still gets its clean stop.
            previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _SIGNALS}
            try:
                server.run(sockets=[sock])
            finally:
                for sig in _SIGNALS:
                    signal.signal(sig, _exit_now)
                if dispatcher is not None:
                    announce("stopping: running jobs that do not finish are marked interrupted (resume them later)")
                    dispatcher.stop()
                    thread.join()
                state.close()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    announce("embedfleet serve stopped")


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _exit_now(signum, frame) -> None:
    # A second signal while the dispatcher stops: end now. Its running jobs' leases expire and
    # the next dispatcher marks them interrupted.
    print(f"{signal.Signals(signum).name} again: stopping at once", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _dispatch(dispatcher) -> None:
    try:
        dispatcher.run()
    except BaseException:
        log.exception("dispatcher %s stopped", dispatcher.name)


class _no_cluster:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None
