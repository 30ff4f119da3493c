"""Following a job's Dask futures: results as they finish, progress, cancellation, first error.

A future is followed under a small typed event that says what it stands for (a chunked
partition, an embedded slice, a written slice); the handler gets the event and the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import queue
import threading
from typing import Any, Callable, Iterator

from embedfleet.errors import JobCancelled
from embedfleet.pipeline.job import Progress

__all__ = ["Chunked", "Embedded", "Written", "Follower", "CANCEL_CHECK_SECONDS"]

#: How often a follower waiting for the next result looks at the job's cancel event.
CANCEL_CHECK_SECONDS = 0.2


@dataclasses.dataclass(frozen=True)
class Chunked:
    partition: int


@dataclasses.dataclass(frozen=True)
class Embedded:
    slot: int  # the job's embedding partition (slice) number


@dataclasses.dataclass(frozen=True)
class Written:
    slot: int


Handler = Callable[[Any, Any], None]


class Follower:
    """Submits nothing; follows what the job submitted. One per job run."""

    def __init__(self, client, *, priority: int, cancel: threading.Event | None,
                 on_progress: Callable[[Progress], None] | None, progress: Progress):
        self.client = client
        self.priority = priority
        self.cancel = cancel
        self.on_progress = on_progress
        self.progress = progress
        # Futures arrive here as they finish (done callbacks). Polling with
        # ``distributed.wait(timeout=...)`` instead left, at each time-out, a TimeoutError whose
        # traceback held a list of every followed future until the garbage collector ran: the
        # finished chunk tasks stayed wanted, and a lost worker made the scheduler redo them.
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._watched: set[str] = set()
        self._alongside: tuple[dict, Handler] | None = None

    def report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(dataclasses.replace(self.progress))

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise JobCancelled("job cancelled")

    @contextlib.contextmanager
    def alongside(self, futures: dict, on_done: Handler) -> Iterator[None]:
        """While inside, every :meth:`follow` also handles ``futures`` (the job's embedding and
        writes), so their finished tasks are replaced at once, not after that wait."""
        self._alongside = (futures, on_done)
        try:
            yield
        finally:
            self._alongside = None

    def follow(self, futures: dict, on_done: Handler, *, until: Callable[[], bool] | None = None) -> None:
        """Wait for ``futures`` (future -> event), calling ``on_done(event, result)`` as each finishes.

        Finished futures are removed from ``futures``; ``on_done`` may add new ones, which are
        followed too. With ``until``, returns as soon as it is true, leaving the rest running.
        On any error or cancel, ``futures`` are cancelled on the cluster and the error raised.
        """
        alongside = self._alongside
        other, on_other = alongside if alongside is not None and alongside[0] is not futures else ({}, None)
        future = None
        try:
            while futures and not (until is not None and until()):
                self.check_cancel()
                self._watch(futures, other)
                try:
                    future = self._finished.get(timeout=CANCEL_CHECK_SECONDS)
                except queue.Empty:
                    continue
                # One the job dropped (cancelled, or of a stage it has left) is in neither.
                if future in futures:
                    on_done(futures.pop(future), future.result())  # re-raises the task's error
                elif future in other:
                    on_other(other.pop(future), future.result())
                future = None  # handled: not held while waiting for the next
                self.report()
        except BaseException:
            # A cancelled or failed job must not keep the cluster busy, and nothing half-done
            # is left looking finished (outputs are atomic).
            self.cancel_all(futures)
            if future is not None:
                # The failed task's future, already out of ``futures``: released too, or a
                # resume in this process (the error still held by a traceback) submitting the
                # same key would be handed this error again.
                self.client.cancel([future], force=True)
            raise

    def result_of(self, future) -> Any:
        """Follow one future to its result."""
        found: list = []
        self.follow({future: None}, lambda _event, value: found.append(value))
        return found[0]

    def _watch(self, *groups: dict) -> None:
        for pending in itertools.chain(*groups):
            if pending.key not in self._watched:
                self._watched.add(pending.key)
                pending.add_done_callback(self._finished.put)

    def cancel_all(self, futures: dict) -> None:
        if futures:
            self.client.cancel(list(futures), force=True)
            futures.clear()
