"""The schedules file: a YAML list of recurring indexing runs, validated into :class:`Schedule` objects, and the cron arithmetic.

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

The firing loop is :mod:`embedfleet.schedulers.cron`.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from embedfleet import config
from embedfleet.errors import ConfigError, ScheduleError
from embedfleet.options import IndexOptions
from embedfleet.sinks.naming import check_part

__all__ = ["Schedule", "parse_schedules", "load_schedules", "latest_slot", "next_slot", "count_slots"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
# The job options a schedule names at its top level, as it always has; the others go under
# `options:`, by their kebab-case key (chunk-size) or field name (chunk_size).
_TOP_LEVEL_OPTIONS = ("collection", "sink", "mode")
_MODE = next(f for f in IndexOptions.fields() if f.name == "mode")
_OPTIONS = {f.key: f for f in IndexOptions.fields() if f.name not in _TOP_LEVEL_OPTIONS}
_SCHEDULE_KEYS = ("name", "cron", "timezone", "source", "user", *_TOP_LEVEL_OPTIONS, "priority", "enabled", "options")
_REQUIRED = ("name", "cron", "source", "user")
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


def count_slots(expr: str, tz: str, after: dt.datetime, until: dt.datetime) -> int:
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


