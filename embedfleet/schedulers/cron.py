"""Cron schedules: a YAML file of recurring indexing runs, fired as jobs of the job service.

A schedules file::

    schedules:
      - name: nightly-docs              # unique in the job database; letters, digits, . _ -
        cron: "30 2 * * *"              # 5 fields (minute hour day month weekday) or "@daily" etc. (quote it)
        timezone: Europe/Berlin         # IANA name; default UTC. DST is handled by croniter
        source: /srv/docs               # folder, JSONL/CSV/Parquet file or built-in dataset;
                                        #   relative paths are relative to this file
        user: alice                     # the job's owner: her tier, quota and priority apply
        collection: kb                  # default embedfleet.collection
        sink: chroma:///srv/chroma      # default: the data dir's Chroma store
        mode: sync                      # sync | append | full
        priority: 60                    # base priority 0-100 (default embedfleet.jobs.priority.default)
        enabled: true
        options:                        # any other job option (embedfleet.options.IndexOptions), named
                                        #   like its `jobs submit` flag
          chunk-size: 128
          model: minilm

:func:`load_schedules` validates the whole file and raises one :class:`~embedfleet.errors.ScheduleError`
naming every problem with its line (from yaml's node marks), e.g.
``schedules.yaml, line 4: schedule 'nightly-docs': invalid cron expression '61 2 * * *': ...``.

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
import difflib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from embedfleet import config
from embedfleet.errors import ConfigError, EmbedfleetError, JobNotFound, PermissionDenied, QueueFull, QuotaExceeded, ScheduleError
from embedfleet.options import IndexOptions
from embedfleet.schedulers.models import ACTIVE_STATUSES, CronState, read_engine
from embedfleet.sinks.naming import check_part

__all__ = [
    "Schedule",
    "Firing",
    "ScheduleStatus",
    "CronScheduler",
    "parse_schedules",
    "load_schedules",
    "latest_slot",
    "next_slot",
]

log = logging.getLogger(__name__)

Outcome = Literal["submitted", "skipped", "refused", "error"]
Clock = Callable[[], dt.datetime]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
# The job options a schedule names at its top level, as it always has; the others go under
# `options:`, by their kebab-case key (chunk-size) or field name (chunk_size).
_TOP_LEVEL_OPTIONS = ("collection", "sink", "mode")
_MODE = next(f for f in IndexOptions.fields() if f.name == "mode")
_OPTIONS = {f.key: f for f in IndexOptions.fields() if f.name not in _TOP_LEVEL_OPTIONS}
_SCHEDULE_KEYS = ("name", "cron", "timezone", "source", "user", *_TOP_LEVEL_OPTIONS, "priority", "enabled", "options")
_REQUIRED = ("name", "cron", "source", "user")
# A claimed slot whose submit has not been recorded yet: another process is submitting it.
_FIRING_GRACE = dt.timedelta(minutes=2)
_MAX_COUNTED_MISSES = 100_000


# --------------------------------------------------------------------------------------------
# cron arithmetic


def _croniter(expr: str, start: dt.datetime):
    from croniter import croniter

    return croniter(expr, start)


def latest_slot(expr: str, tz: str | dt.tzinfo, now: dt.datetime) -> dt.datetime | None:
    """The latest time ``<= now`` that ``expr`` matches in timezone ``tz``, as aware UTC."""
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    # croniter's get_prev is exclusive of its start: start one second past now, at whole seconds.
    start = now.astimezone(zone).replace(microsecond=0) + dt.timedelta(seconds=1)
    try:
        slot = _croniter(expr, start).get_prev(dt.datetime)
    except Exception:  # CroniterBadDateError: no match in the searched past
        return None
    return slot.astimezone(dt.timezone.utc)


def next_slot(expr: str, tz: str | dt.tzinfo, after: dt.datetime) -> dt.datetime | None:
    """The first time ``> after`` that ``expr`` matches in timezone ``tz``, as aware UTC."""
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    try:
        slot = _croniter(expr, after.astimezone(zone)).get_next(dt.datetime)
    except Exception:  # CroniterBadDateError: never matches
        return None
    return slot.astimezone(dt.timezone.utc)


def _count_slots(expr: str, tz: str, after: dt.datetime, until: dt.datetime) -> int:
    """Slots in ``(after, until]`` (capped: a schedule down for years need not be counted exactly)."""
    it = _croniter(expr, after.astimezone(ZoneInfo(tz)))
    n = 0
    while n < _MAX_COUNTED_MISSES:
        when = it.get_next(dt.datetime).astimezone(dt.timezone.utc)
        if when > until:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# the schedules file


@dataclass(frozen=True)
class Schedule:
    """One validated schedule. ``options``: its other :class:`IndexOptions` fields, by field name."""

    name: str
    cron: str
    source: str
    user: str
    timezone: str = "UTC"
    collection: str | None = None
    sink: str | None = None
    mode: str = "sync"
    priority: int | None = None
    enabled: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    line: int = 0  # where it starts in its file (1-based; 0: not from a file)

    def latest_slot(self, now: dt.datetime) -> dt.datetime | None:
        return latest_slot(self.cron, self.timezone, now)

    def next_slot(self, after: dt.datetime) -> dt.datetime | None:
        return next_slot(self.cron, self.timezone, after)

    def submit_kwargs(self) -> dict[str, Any]:
        return dict(
            user=self.user,
            collection=self.collection,
            priority=self.priority,
            mode=self.mode,
            sink=self.sink,
            **dict(self.options),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cron": self.cron,
            "timezone": self.timezone,
            "source": self.source,
            "user": self.user,
            "collection": self.collection,
            "sink": self.sink,
            "mode": self.mode,
            "priority": self.priority,
            "enabled": self.enabled,
            "options": dict(self.options),
        }


class _Problems:
    def __init__(self, filename: str):
        self.filename = filename
        self.items: list[tuple[int, str]] = []

    def add(self, node: yaml.Node | None, message: str, *, line: int | None = None) -> None:
        if line is None:
            line = node.start_mark.line + 1 if node is not None else 1
        self.items.append((line, message))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        self.items.sort(key=lambda item: item[0])
        text = "; ".join(f"{self.filename}, line {line}: {message}" for line, message in self.items)
        error = ScheduleError(text)
        error.problems = list(self.items)  # type: ignore[attr-defined]
        error.line = self.items[0][0]  # type: ignore[attr-defined]
        raise error


def _value(node: yaml.Node) -> Any:
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _mapping_items(node: yaml.MappingNode, problems: _Problems, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """(key, key node, value node) of a mapping; duplicate and non-string keys are reported."""
    seen: dict[str, int] = {}
    items = []
    for key_node, value_node in node.value:
        key = _value(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            problems.add(key_node, f"{what}: keys must be strings, not {key!r}")
            continue
        if key in seen:
            problems.add(key_node, f"{what}: key {key!r} given twice (first on line {seen[key]})")
            continue
        seen[key] = key_node.start_mark.line + 1
        items.append((key, key_node, value_node))
    return items


def _check_cron(expr: str, tz: str) -> str | None:
    """Why ``expr`` is not a usable cron expression, or None."""
    from croniter import croniter

    text = expr.strip()
    if text.startswith("@"):
        if text.lower() not in _ALIASES:
            return f"unknown cron alias {expr!r}; use one of {', '.join(_ALIASES)}"
    elif len(text.split()) != 5:
        return (
            f"cron expression {expr!r} has {len(text.split())} fields; use 5 (minute hour day-of-month month "
            f"day-of-week), e.g. '30 2 * * *', or an alias like '@daily'"
        )
    try:
        croniter(text)
    except Exception as exc:  # croniter raises several ValueError subclasses
        return f"invalid cron expression {expr!r}: {exc}"
    if next_slot(text, tz, dt.datetime.now(dt.timezone.utc)) is None:
        return f"cron expression {expr!r} never matches a date"
    return None


def _schedule(node: yaml.Node, problems: _Problems, base_dir: Path | None) -> Schedule | None:
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, "each schedule must be a mapping with name, cron, source, user, ...")
        return None
    before = len(problems.items)
    items = _mapping_items(node, problems, "schedule")
    raw = {key: (key_node, value_node) for key, key_node, value_node in items}
    name_value = _value(raw["name"][1]) if "name" in raw else None
    label = f"schedule {name_value!r}" if isinstance(name_value, str) else "schedule"

    suggested = set()
    for key, key_node, _ in items:
        if key not in _SCHEDULE_KEYS:
            close = difflib.get_close_matches(key, _SCHEDULE_KEYS, n=1)
            suggested.update(close)
            hint = " (put job options under 'options:')" if key.replace("_", "-") in _OPTIONS else _suggest(key, _SCHEDULE_KEYS)
            problems.add(key_node, f"{label}: unknown key {key!r}{hint}; known keys: {', '.join(_SCHEDULE_KEYS)}")
    # A misspelt required key is reported once, where it is misspelt.
    missing = [key for key in _REQUIRED if key not in raw and key not in suggested]
    if missing:
        problems.add(node, f"{label}: missing {', '.join(repr(k) for k in missing)}")

    values: dict[str, Any] = {}

    def string(key: str, *, optional: bool = False) -> str | None:
        if key not in raw:
            return None
        value_node = raw[key][1]
        value = _value(value_node)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            problems.add(value_node, f"{label}: {key!r} must be a non-empty string, not {value!r}")
            return None
        return value.strip()

    name = string("name")
    if name is not None and not _NAME.match(name):
        problems.add(raw["name"][1], f"invalid schedule name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    values["name"] = name

    tz = string("timezone", optional=True) or "UTC"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        problems.add(raw["timezone"][1], f"{label}: unknown timezone {tz!r} (use an IANA name like 'Europe/Berlin' or 'UTC')")
        tz = "UTC"
    values["timezone"] = tz

    expr = string("cron")
    if expr is not None:
        why = _check_cron(expr, tz)
        if why:
            problems.add(raw["cron"][1], f"{label}: {why}")
    values["cron"] = expr

    source = string("source")
    if source is not None and base_dir is not None and not source.startswith("builtin:") and "://" not in source:
        path = Path(source).expanduser()
        # cron runs from anywhere, so paths are the file's; a bare name that is no path there
        # (python-docs) is left for the job service to read as a built-in dataset.
        if not path.is_absolute() and ((base_dir / path).exists() or os.sep in source or "." in source):
            source = str((base_dir / path).resolve())
    values["source"] = source

    for key, kind in (("user", "user id"), ("collection", "collection name")):
        value = string(key, optional=key == "collection")
        if value is not None:
            try:
                check_part(kind, value)
            except ConfigError as exc:
                problems.add(raw[key][1], f"{label}: {exc}")
        values[key] = value
    values["sink"] = string("sink", optional=True)

    mode = string("mode", optional=True) or "sync"
    why = _MODE.problem(mode)
    if why is not None:
        problems.add(raw["mode"][1], f"{label}: mode {why}")
    values["mode"] = mode

    if "priority" in raw:
        priority = _value(raw["priority"][1])
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 100):
            problems.add(raw["priority"][1], f"{label}: priority must be an integer from 0 to 100, not {priority!r}")
            priority = None
        values["priority"] = priority
    if "enabled" in raw:
        enabled = _value(raw["enabled"][1])
        if not isinstance(enabled, bool):
            problems.add(raw["enabled"][1], f"{label}: enabled must be true or false, not {enabled!r}")
            enabled = True
        values["enabled"] = enabled

    options: dict[str, Any] = {}
    if "options" in raw:
        options_key, options_node = raw["options"]
        if isinstance(options_node, yaml.MappingNode):
            options_before = len(problems.items)
            option_nodes: dict[str, yaml.Node] = {}
            for key, key_node, value_node in _mapping_items(options_node, problems, f"{label} options"):
                option = _OPTIONS.get(key.replace("_", "-"))
                if option is None:
                    hint = (
                        " (write it at the schedule's top level)" if key in _TOP_LEVEL_OPTIONS
                        else _suggest(key.replace("_", "-"), _OPTIONS)
                    )
                    problems.add(key_node, f"{label}: unknown option {key!r}{hint}; options: {', '.join(_OPTIONS)}")
                    continue
                option_nodes[option.name] = key_node
                value = _value(value_node)
                if value is None:
                    continue
                why = option.problem(value)
                if why is not None:
                    problems.add(value_node, f"{label}: option {key!r} {why}")
                    continue
                options[option.name] = value
            if len(problems.items) == options_before:  # chunking checked only once each option is valid
                try:
                    config.chunk_spec(
                        unit=options.get("chunk_unit"), size=options.get("chunk_size"), overlap=options.get("chunk_overlap")
                    )
                except ConfigError as exc:
                    at = next((option_nodes[o] for o in ("chunk_overlap", "chunk_size", "chunk_unit") if o in option_nodes), options_key)
                    problems.add(at, f"{label}: {exc}")
        elif _value(options_node) is not None:
            problems.add(options_node, f"{label}: options must be a mapping (e.g. chunk-size: 128)")
    values["options"] = options

    if len(problems.items) > before:
        return None
    return Schedule(line=node.start_mark.line + 1, **values)


def parse_schedules(text: str, *, filename: str = "<schedules>", base_dir: str | os.PathLike | None = None) -> list[Schedule]:
    """Validate a schedules document; raise ScheduleError listing every problem with its line.

    ``base_dir``: relative sources are resolved against it (the file's directory).
    """
    problems = _Problems(filename)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        problems.add(None, f"not valid YAML: {what}", line=mark.line + 1 if mark else 1)
        problems.raise_if_any()
    except yaml.YAMLError as exc:
        problems.add(None, f"not valid YAML: {exc}")
        problems.raise_if_any()

    entries: yaml.Node | None = None
    if root is None:
        problems.add(None, "the file is empty; expected a 'schedules:' list")
    elif isinstance(root, yaml.SequenceNode):
        entries = root
    elif isinstance(root, yaml.MappingNode):
        for key, key_node, value_node in _mapping_items(root, problems, "top level"):
            if key == "schedules":
                entries = value_node
            else:
                problems.add(key_node, f"unknown top-level key {key!r}{_suggest(key, ['schedules'])}; expected 'schedules:'")
        if entries is None and not problems.items:
            problems.add(root, "expected a 'schedules:' list")
    else:
        problems.add(root, "expected a 'schedules:' list of schedules")

    schedules: list[Schedule] = []
    if entries is not None:
        if isinstance(entries, yaml.SequenceNode):
            base = Path(base_dir).resolve() if base_dir is not None else None
            names: dict[str, int] = {}
            for node in entries.value:
                schedule = _schedule(node, problems, base)
                if schedule is None:
                    continue
                if schedule.name in names:
                    problems.add(node, f"schedule name {schedule.name!r} used twice (first on line {names[schedule.name]})")
                    continue
                names[schedule.name] = schedule.line
                schedules.append(schedule)
        elif _value(entries) is not None:
            problems.add(entries, "'schedules' must be a list (each item starting with '- name: ...')")
    problems.raise_if_any()
    return schedules


def load_schedules(path: str | os.PathLike) -> list[Schedule]:
    """Read and validate a schedules file (relative sources are relative to the file)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScheduleError(f"schedules file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScheduleError(f"cannot read schedules file {str(path)!r}: {exc}") from exc
    return parse_schedules(text, filename=str(path), base_dir=path.resolve().parent)


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
        if not job_id:
            return None
        try:
            return self.service.job(job_id).status
        except JobNotFound:
            return None

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
        engine = self.service.engine
        with Session(read_engine(engine)) as session, session.begin():
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

        coalesced = _count_slots(schedule.cron, schedule.timezone, last_slot, slot) - 1 if last_slot is not None else 0
        # Claim the slot: only the process whose compare-and-set succeeds fires it.
        with Session(engine) as session, session.begin():
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
        with Session(self.service.engine) as session, session.begin():
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
        with Session(self.service.engine) as session, session.begin():
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
        with Session(read_engine(self.service.engine)) as session, session.begin():
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
