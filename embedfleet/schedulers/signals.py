"""Signals for a dispatcher process (``embedfleet jobs run``): a clean stop, then a stop at once."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Protocol

__all__ = ["StopSignals"]

log = logging.getLogger(__name__)


class _Stoppable(Protocol):
    """What the signals need of :class:`~embedfleet.schedulers.dispatcher.Dispatcher` (not
    imported: the dispatcher module imports this one)."""

    def stop(self) -> None: ...

    def abort(self, why: str, *, timeout: float = 10.0) -> list[str]: ...


class StopSignals:
    """SIGTERM and SIGINT for a dispatcher process (``embedfleet jobs run``), as a context manager.

    The first signal asks for the clean stop: SIGTERM calls :meth:`Dispatcher.stop`, SIGINT
    raises KeyboardInterrupt as Ctrl-C always did (:meth:`Dispatcher.run` stops the same way).
    That stop waits for the job threads, which a job stuck for good (two threads deadlocked
    building a graph, say) never ends, and closing the cluster can hang on such a thread too.
    The second signal, of either kind, marks this dispatcher's running jobs interrupted
    (:meth:`Dispatcher.abort`), flushes the logs and ends the process at once with exit status
    ``128 + signal``. A first SIGTERM that comes while the cluster is still starting stops the
    dispatcher as soon as it is attached. Outside the main thread nothing is installed:
    signals only reach that thread.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.dispatcher: _Stoppable | None = None
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def attach(self, dispatcher: _Stoppable) -> None:
        self.dispatcher = dispatcher
        if self.received:
            dispatcher.stop()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)
        name = signal.Signals(signum).name
        if len(self.received) > 1:
            self._exit_now(name, 128 + signum)
        log.warning("%s: stopping; running jobs that do not finish are marked interrupted (%s again: stop at once)",
                    name, name)
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt

    def _exit_now(self, name: str, status: int) -> None:
        if self.dispatcher is not None:
            self.dispatcher.abort(f"stopped at once by a second {name}")
        _flush_logs()
        os._exit(status)


def _flush_logs() -> None:
    """What the logging handlers and standard streams hold, written out before an ``os._exit``."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
