"""The job lifecycle: which status a job may move to from which, checked in one place.

Every status write in the service goes through :func:`moved`, so a new code path that would
move a job in a way nothing else expects (say, a finished job back to running) fails loudly
instead of leaving a record the dispatcher and the quota accounting were never written for.
"""

from __future__ import annotations

from embedfleet.errors import IllegalTransition

#: ``None`` is a job not yet recorded. A running job goes back to queued only when its owner
#: resumes it after its run died unrecorded (a SIGKILLed ``embedfleet index``).
TRANSITIONS: dict[str | None, frozenset[str]] = {
    None: frozenset({"queued", "running"}),
    "queued": frozenset({"running", "cancelled"}),
    "interrupted": frozenset({"running", "cancelled", "queued"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "interrupted", "queued"}),
    "failed": frozenset({"queued"}),
    "cancelled": frozenset({"queued"}),
    "succeeded": frozenset(),
}


def moved(source: str | None, target: str) -> str:
    """``target``, once the move from ``source`` is known to be allowed."""
    if target not in TRANSITIONS.get(source, frozenset()):
        raise IllegalTransition(f"a job cannot go from {source or 'unrecorded'} to {target}")
    return target


def moved_from_any(sources: tuple[str, ...], target: str) -> str:
    """``target`` for a bulk update whose WHERE admits every status in ``sources``."""
    for source in sources:
        moved(source, target)
    return target
