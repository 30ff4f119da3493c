"""The job lifecycle: which status a job may move to from which, and the columns each move writes.

Every status write in the service goes through :func:`transition`, so a new code path that
would move a job in a way nothing else expects (say, a finished job back to running), or that
forgets a column its move must reset (a claim that keeps the last run's error, an end that
leaves the lease running), fails loudly instead of leaving a record the dispatcher and the
quota accounting were never written for.

A move is named for what happens to the job, not for the pair of statuses: a run that ends
through its dispatcher (``end``) keeps the dispatcher that ran it, one nobody was left to
record (``abandon``) clears it, and both go from ``running`` to ``cancelled``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from embedfleet.errors import IllegalTransition
from embedfleet.schedulers.models import STATUSES, Job

__all__ = ["COUNTS", "MOVES", "RECORD", "TRANSITIONS", "Move", "moved", "transition"]

#: What a run reports as it goes (:class:`~embedfleet.schedulers.records.Counts`); written
#: when known, by a heartbeat or at the end of a run.
COUNTS = frozenset(
    {"stage", "documents", "chunks", "embedded", "skipped", "deleted", "skipped_documents", "partitions_done",
     "partitions_total"}
)
#: A new record: every column is written.
RECORD = frozenset(c.key for c in Job.__table__.columns) - {"status"}
#: What a charge writes at a run's end (the ledger's settle), when the run embedded something
#: not charged yet; what the run held (``reserved``) is let go either way.
CHARGE = frozenset({"charged"})
#: A run's lease and the dispatcher holding it, let go when the run stops.
_LET_GO = frozenset({"dispatcher", "reserved", "heartbeat_at", "error"})


@dataclass(frozen=True)
class Move:
    """A named move: from any of ``sources`` to any of ``targets``, writing exactly ``writes``
    (and, when given, columns of ``may_write``) besides the status."""

    name: str
    sources: tuple[str | None, ...]
    targets: tuple[str, ...]
    writes: frozenset[str]
    may_write: frozenset[str] = frozenset()


MOVES: dict[str, Move] = {
    m.name: m
    for m in (
        # Submitted (queued), or admitted running by an inline run (``embedfleet index``).
        Move("record", (None,), ("queued", "running"), RECORD),
        # A dispatcher takes a waiting job: a new attempt, its lease, nothing left of the last run.
        Move("claim", ("queued", "interrupted"), ("running",), frozenset(
            {"stage", "attempt", "dispatcher", "started_at", "heartbeat_at", "finished_at", "dispatch_priority",
             "cancel_requested", "reserved", "to_embed", "error", "batch"})),
        # The owner cancels a job that is not running: it ends now.
        Move("cancel", ("queued", "interrupted"), ("cancelled",), frozenset({"finished_at", "error", "dispatcher"})),
        # The owner queues a job again; a running one only when its run died unrecorded.
        Move("resume", ("interrupted", "failed", "cancelled", "running"), ("queued",), frozenset(
            {"stage", "queued_at", "finished_at", "heartbeat_at", "error", "dispatcher", "cancel_requested",
             "reserved"})),
        # A run ends through the dispatcher running it, which stays on the record.
        Move("end", ("running",), ("succeeded", "failed", "cancelled"),
             frozenset({"error", "reserved", "heartbeat_at", "finished_at"}), COUNTS | CHARGE),
        # A run stops before its end (its dispatcher stops, its lease expired, its process is
        # gone): the job waits again, from now, to be resumed by any dispatcher.
        Move("requeue", ("running",), ("interrupted",), _LET_GO | {"queued_at"}, COUNTS | CHARGE),
        # A run nobody is left to record ends for good: cancelled (its owner had asked) or failed
        # (a new run on its collection replaced it).
        Move("abandon", ("running",), ("cancelled", "failed"), _LET_GO | {"finished_at"}),
    )
}


def _table() -> dict[str | None, frozenset[str]]:
    out: dict[str | None, set[str]] = {None: set(), **{s: set() for s in STATUSES}}
    for move in MOVES.values():
        for source in move.sources:
            out[source].update(move.targets)
    return {source: frozenset(targets) for source, targets in out.items()}


#: ``None`` is a job not yet recorded: which status may follow which, over every move.
TRANSITIONS: dict[str | None, frozenset[str]] = _table()


def _unrecorded(source: str | None) -> str:
    return source or "unrecorded"


def transition(move: str, source: str | None | Iterable[str | None], target: str,
               values: Mapping[str, Any]) -> dict[str, Any]:
    """The column values of ``move`` from ``source`` to ``target``, status included, once the
    move is allowed and ``values`` writes exactly its columns.

    ``source``: the job's status, or, for a bulk update whose WHERE admits several, a tuple of
    every status it admits. Raises :class:`IllegalTransition` for a move the table does not
    have, a source or target it does not allow, a column it does not write or one it must
    write and ``values`` leaves out.
    """
    m = MOVES.get(move)
    if m is None:
        raise IllegalTransition(f"no job move {move!r}; moves: {', '.join(MOVES)}")
    sources = tuple(source) if isinstance(source, (tuple, list, frozenset, set)) else (source,)
    for s in sources:
        if target not in TRANSITIONS.get(s, frozenset()):
            raise IllegalTransition(f"a job cannot go from {_unrecorded(s)} to {target}")
        if s not in m.sources or target not in m.targets:
            raise IllegalTransition(f"a job cannot {move} from {_unrecorded(s)} to {target}")
    columns = set(values)
    if "status" in columns:
        raise IllegalTransition(f"{move}: the status is the move's to write, not the caller's")
    missing, extra = m.writes - columns, columns - m.writes - m.may_write
    if missing or extra:
        problems = [f"must write {', '.join(sorted(missing))}"] if missing else []
        problems += [f"does not write {', '.join(sorted(extra))}"] if extra else []
        raise IllegalTransition(f"job move {move} ({_unrecorded(sources[0])} -> {target}) {'; '.join(problems)}")
    return {**values, "status": target}


def moved(source: str | None, target: str) -> str:
    """``target``, once some move from ``source`` to it is allowed (the status alone)."""
    if target not in TRANSITIONS.get(source, frozenset()):
        raise IllegalTransition(f"a job cannot go from {_unrecorded(source)} to {target}")
    return target
