"""Cron schedules fired as jobs of the job service (the file format: :mod:`embedfleet.schedulers.schedules`).

:class:`CronScheduler` does the firing. Rules:

* **Due.** A schedule is due when its latest cron time (its *slot*, in its timezone) is after
  the last slot it handled. A schedule seen for the first time (or whose expression or
  timezone changed) starts at its next slot: a past slot never fires on first sight.
* **Submit, don't run.** A due slot becomes a job of the schedule's user through
  :meth:`JobService.submit` (queue limit, quota and priority apply); a dispatcher runs it.
  A refused submit (quota, queue limit, allowed roots, a missing source) is recorded as the
  slot's outcome, and the schedule tries again at its next slot.
* **No overlap.** If the job of the schedule's previous run is still queued, interrupted or
  running, the due slot is skipped and recorded (``skipped``), not queued behind it.
* **Coalescing.** Slots missed while nothing was ticking (downtime) fire once, as the latest
  of them; ``coalesced`` says how many earlier ones were folded in.
* **One firing per slot**, across any number of ``cron run``/``cron tick`` processes sharing a
  database: a slot is claimed with a compare-and-set on ``ef_cron_state.last_slot`` before
  anything is submitted. The price is at-most-once: a process that dies between the claim and
  the submit loses that slot (logged; the next slot fires normally).

State lives in the ``ef_cron_state`` table of the job database (schema version 2, see
:mod:`embedfleet.schedulers.models`); schedule names are therefore global per database.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from embedfleet import config
from embedfleet.errors import EmbedfleetError, PermissionDenied, QueueFull, QuotaExceeded, ScheduleError
from embedfleet.schedulers.models import ACTIVE_STATUSES, CronState
from embedfleet.schedulers.schedules import Schedule, count_slots, load_schedules, parse_schedules

# parse_schedules/load_schedules live in schedules.py; notebooks import them from here, as before the split.
__all__ = ["Firing", "ScheduleStatus", "CronScheduler", "parse_schedules", "load_schedules"]

log = logging.getLogger(__name__)

Outcome = Literal["submitted", "skipped", "refused", "error"]
Clock = Callable[[], dt.datetime]

# A claimed slot whose submit has not been recorded yet: another process is submitting it.
_FIRING_GRACE = dt.timedelta(minutes=2)


# --------------------------------------------------------------------------------------------
# firing


@dataclass(frozen=True)
class Firing:
    """What one due slot of one schedule became."""

    schedule: str
    slot: dt.datetime
    outcome: Outcome
    job_id: str | None = None
    message: str | None = None
    coalesced: int = 0  # earlier missed slots folded into this one

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "slot": self.slot.isoformat(),
            "outcome": self.outcome,
            "job_id": self.job_id,
            "message": self.message,
            "coalesced": self.coalesced,
        }


@dataclass(frozen=True)
class ScheduleStatus:
    """A schedule with its next run and its last run, as ``cron list`` shows it."""

    schedule: Schedule
    next_run: dt.datetime | None
    due: bool  # a slot is waiting to fire (nothing has ticked since it passed)
    last_slot: dt.datetime | None
    last_run_at: dt.datetime | None
    last_outcome: str | None
    last_job_id: str | None
    last_job_status: str | None
    last_error: str | None
    coalesced: int
    runs: int
    skips: int

    @property
    def last_status(self) -> str:
        """The job's status for a submitted run, else the outcome (skipped/refused/error), or 'never'."""
        if self.last_outcome is None:
            return "never"
        if self.last_outcome == "submitted":
            return self.last_job_status or "submitted"
        return self.last_outcome

    def to_dict(self) -> dict[str, Any]:
        iso = lambda v: v.isoformat() if v is not None else None  # noqa: E731
        out = self.schedule.to_dict()
        out.update(
            next_run=iso(self.next_run),
            due=self.due,
            last_run=iso(self.last_slot),
            last_run_at=iso(self.last_run_at),
            last_status=self.last_status,
            last_outcome=self.last_outcome,
            last_job_id=self.last_job_id,
            last_job_status=self.last_job_status,
            last_error=self.last_error,
            coalesced=self.coalesced,
            runs=self.runs,
            skips=self.skips,
        )
        return out


class CronScheduler:
    """Fires due schedules as jobs of a :class:`~embedfleet.schedulers.service.JobService`.

    :param service: the job service (its database holds the cron state).
    :param schedules: a list of :class:`Schedule`, or the path of a schedules file (re-read by
        :meth:`run` when it changes; an invalid edit is logged and the previous schedules kept).
    :param clock: aware-UTC "now"; default the service's clock (tests share a fake one).
    """

    def __init__(
        self,
        service: Any,
        schedules: Sequence[Schedule] | str | os.PathLike,
        *,
        clock: Clock | None = None,
    ):
        self.service = service
        self.clock: Clock = clock or service.clock
        self._path: Path | None = None
        self._mtime: float | None = None
        if isinstance(schedules, (str, os.PathLike)):
            self._path = Path(schedules).expanduser()
            self._mtime = self._stat()
            self.schedules = load_schedules(self._path)
        else:
            self.schedules = list(schedules)
        self._stop = threading.Event()

    # -- plumbing -------------------------------------------------------------------------

    def _stat(self) -> float | None:
        try:
            return self._path.stat().st_mtime if self._path else None
        except OSError:
            return None

    def reload(self) -> bool:
        """Re-read the schedules file if it changed; True if the schedules were replaced."""
        if self._path is None:
            return False
        mtime = self._stat()
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            schedules = load_schedules(self._path)
        except ScheduleError as exc:
            log.error("schedules file changed but is invalid; keeping the previous schedules: %s", exc)
            return False
        self.schedules = schedules
        log.info("reloaded %d schedules from %s", len(schedules), self._path)
        return True

    def _state(self, session: Session, name: str) -> CronState | None:
        return session.get(CronState, name)

    def _job_status(self, job_id: str | None) -> str | None:
        return self.service.reads.job_status(job_id)

    # -- one tick -------------------------------------------------------------------------

    def tick(self, now: dt.datetime | None = None) -> list[Firing]:
        """Fire every enabled schedule that is due at ``now`` (default: the clock); return what happened."""
        now = now or self.clock()
        fired = []
        for schedule in self.schedules:
            if not schedule.enabled:
                continue
            firing = self._tick_one(schedule, now)
            if firing is not None:
                fired.append(firing)
        return fired

    def _tick_one(self, schedule: Schedule, now: dt.datetime) -> Firing | None:
        slot = schedule.latest_slot(now)
        if slot is None:
            return None
        with self.service.store.read() as session:
            state = self._state(session, schedule.name)
            previous = None if state is None else (
                state.cron, state.timezone, state.last_slot, state.last_outcome, state.last_run_at, state.last_job_id
            )
        if previous is None or previous[:2] != (schedule.cron, schedule.timezone):
            self._baseline(schedule, slot, now, exists=previous is not None)
            return None
        _, _, last_slot, last_outcome, last_run_at, last_job_id = previous
        if last_slot is not None and slot <= last_slot:
            return None

        coalesced = count_slots(schedule.cron, schedule.timezone, last_slot, slot) - 1 if last_slot is not None else 0
        # Claim the slot: only the process whose compare-and-set succeeds fires it.
        with self.service.store.write() as session:
            claimed = session.execute(
                update(CronState)
                .where(
                    CronState.name == schedule.name,
                    CronState.last_slot.is_(None) if last_slot is None else CronState.last_slot == last_slot,
                )
                .values(last_slot=slot, last_run_at=now, last_outcome="firing", coalesced=max(0, coalesced))
                .execution_options(synchronize_session=False)
            ).rowcount
        if claimed != 1:
            log.debug("schedule %s: slot %s taken by another process", schedule.name, slot)
            return None
        if coalesced > 0:
            log.info("schedule %s: %d missed run(s) coalesced into the run of %s", schedule.name, coalesced, slot)

        # No overlap: the previous run's job (or another process's submit in flight) is still active.
        active = None
        if last_outcome == "firing" and last_run_at is not None and now - last_run_at < _FIRING_GRACE:
            active = "the previous run is still being submitted"
        else:
            status = self._job_status(last_job_id)
            if status in ACTIVE_STATUSES:
                active = f"job {last_job_id} of the previous run is still {status}"
        if active is not None:
            message = f"skipped: {active}"
            self._record(schedule, slot, outcome="skipped", error=message, skips=1)
            log.warning("schedule %s: run of %s %s", schedule.name, slot.isoformat(), message)
            return Firing(schedule.name, slot, "skipped", job_id=last_job_id, message=message, coalesced=max(0, coalesced))

        try:
            job = self.service.submit(schedule.source, **schedule.submit_kwargs())
        except EmbedfleetError as exc:
            outcome: Outcome = "refused" if isinstance(exc, (QuotaExceeded, QueueFull, PermissionDenied)) else "error"
            self._record(schedule, slot, outcome=outcome, error=str(exc))
            log.warning("schedule %s: run of %s %s: %s", schedule.name, slot.isoformat(), outcome, exc)
            return Firing(schedule.name, slot, outcome, message=str(exc), coalesced=max(0, coalesced))
        except Exception as exc:
            try:
                self._record(schedule, slot, outcome="error", error=f"{type(exc).__name__}: {exc}")
            except SQLAlchemyError:  # the database is what failed; the slot stays 'firing'
                pass
            raise
        self._record(schedule, slot, outcome="submitted", job_id=job.id, runs=1)
        log.info("schedule %s: submitted job %s for %s (slot %s)", schedule.name, job.id, schedule.user, slot.isoformat())
        return Firing(schedule.name, slot, "submitted", job_id=job.id, coalesced=max(0, coalesced))

    def _baseline(self, schedule: Schedule, slot: dt.datetime, now: dt.datetime, *, exists: bool) -> None:
        """First sight (or a changed expression): remember the current slot so only later ones fire."""
        with self.service.store.write() as session:
            state = session.get(CronState, schedule.name, with_for_update=True)
            if state is None:
                session.add(
                    CronState(
                        name=schedule.name,
                        cron=schedule.cron,
                        timezone=schedule.timezone,
                        created_at=now,
                        last_slot=slot,
                        coalesced=0,
                        runs=0,
                        skips=0,
                    )
                )
            elif (state.cron, state.timezone) != (schedule.cron, schedule.timezone):
                state.cron, state.timezone = schedule.cron, schedule.timezone
                if state.last_slot is None or slot > state.last_slot:
                    state.last_slot = slot
        if exists:
            log.info("schedule %s: expression or timezone changed; next run at its next slot", schedule.name)
        else:
            log.info("schedule %s: first seen; next run %s", schedule.name, schedule.next_slot(now))

    def _record(
        self,
        schedule: Schedule,
        slot: dt.datetime,
        *,
        outcome: Outcome,
        job_id: str | None = None,
        error: str | None = None,
        runs: int = 0,
        skips: int = 0,
    ) -> None:
        values: dict[str, Any] = dict(last_outcome=outcome, last_error=error)
        if job_id is not None:
            values["last_job_id"] = job_id
        if runs:
            values["runs"] = CronState.runs + runs
        if skips:
            values["skips"] = CronState.skips + skips
        with self.service.store.write() as session:
            session.execute(
                update(CronState)
                .where(CronState.name == schedule.name, CronState.last_slot == slot)
                .values(**values)
                .execution_options(synchronize_session=False)
            )

    # -- reporting ------------------------------------------------------------------------

    def status(self, now: dt.datetime | None = None) -> list[ScheduleStatus]:
        """Every schedule with its next run and its last run (read-only)."""
        now = now or self.clock()
        names = [s.name for s in self.schedules]
        with self.service.store.read() as session:
            rows = {r.name: r for r in session.execute(select(CronState).where(CronState.name.in_(names))).scalars()} if names else {}
            session.expunge_all()
        out = []
        for schedule in self.schedules:
            row = rows.get(schedule.name)
            same = row is not None and (row.cron, row.timezone) == (schedule.cron, schedule.timezone)
            latest = schedule.latest_slot(now)
            due = bool(
                schedule.enabled and same and latest is not None and (row.last_slot is None or latest > row.last_slot)
            )
            out.append(
                ScheduleStatus(
                    schedule=schedule,
                    next_run=schedule.next_slot(now) if schedule.enabled else None,
                    due=due,
                    # A baseline slot (first sight) was never run: no last run to show.
                    last_slot=row.last_slot if row and row.last_outcome else None,
                    last_run_at=row.last_run_at if row and row.last_outcome else None,
                    last_outcome=row.last_outcome if row else None,
                    last_job_id=row.last_job_id if row else None,
                    last_job_status=self._job_status(row.last_job_id) if row else None,
                    last_error=row.last_error if row else None,
                    coalesced=row.coalesced if row else 0,
                    runs=row.runs if row else 0,
                    skips=row.skips if row else 0,
                )
            )
        return out

    # -- the loop -------------------------------------------------------------------------

    def next_wakeup(self, now: dt.datetime) -> dt.datetime | None:
        """The earliest next slot of any enabled schedule."""
        slots = [s.next_slot(now) for s in self.schedules if s.enabled]
        slots = [s for s in slots if s is not None]
        return min(slots) if slots else None

    def stop(self) -> None:
        self._stop.set()

    def run(
        self,
        *,
        poll_seconds: float | None = None,
        wait: Callable[[float], Any] | None = None,
        on_fire: Callable[[Firing], None] | None = None,
    ) -> None:
        """Tick until :meth:`stop`: at every slot, and at least every ``poll_seconds``
        (default ``embedfleet.cron.poll-seconds``) to pick up file edits and clock jumps.

        ``wait(seconds)`` sleeps (default: until :meth:`stop` or the timeout); injected by tests.
        A database error is logged and retried at the next wakeup.
        """
        poll = float(poll_seconds if poll_seconds is not None else config.seconds_value("cron.poll-seconds"))
        wait = wait or self._stop.wait
        log.info("cron: %d schedules; polling every %.0fs", len(self.schedules), poll)
        while not self._stop.is_set():
            self.reload()
            try:
                for firing in self.tick():
                    if on_fire is not None:
                        on_fire(firing)
            except SQLAlchemyError as exc:
                log.error("cron: job database error, retrying at the next wakeup: %s", exc)
            if self._stop.is_set():
                break
            now = self.clock()
            nxt = self.next_wakeup(now)
            # Wake just after the slot so the slot is already in the past when the tick looks.
            delay = poll if nxt is None else min(poll, max(0.0, (nxt - now).total_seconds()) + 0.05)
            wait(delay)
