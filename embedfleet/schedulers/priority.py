"""Tiers and effective priority (DESIGN §5), read from ``embedfleet.jobs.*`` when asked for.

Effective priority of a waiting job::

    base * tier multiplier
      - min(usage-penalty-max, usage-penalty * the user's jobs started in the last hour)
      + min(age-bonus-max, age-bonus * minutes waiting)

floored at 0 and not capped (a cap at 100 would make premium and enterprise equal). "Jobs in
the last hour" counts the user's jobs whose latest start was within the hour (running or
finished): users who have just had the cluster wait behind those who have not. "Waiting" is
measured from submission, or from the last re-queue for a resumed or interrupted job.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from embedfleet import config
from embedfleet.errors import ConfigError

__all__ = ["Tier", "PrioritySettings", "tiers", "tier", "effective_priority", "RECENT_WINDOW"]

RECENT_WINDOW = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Tier:
    name: str
    daily_chunks: int | None  # None: unlimited
    concurrent_jobs: int
    multiplier: float


def _canonical(raw: dict) -> dict:
    return {str(k).replace("_", "-"): v for k, v in (raw or {}).items()}


def tiers() -> dict[str, Tier]:
    """Every configured tier (``embedfleet.jobs.tiers``)."""
    out: dict[str, Tier] = {}
    for name, raw in (config.get("jobs.tiers") or {}).items():
        raw = _canonical(raw)
        try:
            daily = raw.get("daily-chunks")
            out[str(name)] = Tier(
                name=str(name),
                daily_chunks=None if daily is None else int(daily),
                concurrent_jobs=int(raw["concurrent-jobs"]),
                multiplier=float(raw["multiplier"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"embedfleet.jobs.tiers.{name}: {exc!r}; needs daily-chunks, concurrent-jobs, multiplier") from exc
    return out


def tier(name: str) -> Tier:
    """The tier called ``name``; ConfigError listing the known tiers otherwise."""
    known = tiers()
    if name not in known:
        raise ConfigError(f"unknown tier {name!r}; configured tiers: {', '.join(sorted(known)) or '(none)'}")
    return known[name]


@dataclass(frozen=True)
class PrioritySettings:
    default: float = 50
    usage_penalty: float = 2
    usage_penalty_max: float = 30
    age_bonus: float = 2  # per minute waiting
    age_bonus_max: float = 20

    @classmethod
    def from_config(cls) -> "PrioritySettings":
        raw = _canonical(config.get("jobs.priority") or {})
        base = cls()
        return cls(
            default=float(raw.get("default", base.default)),
            usage_penalty=float(raw.get("usage-penalty", base.usage_penalty)),
            usage_penalty_max=float(raw.get("usage-penalty-max", base.usage_penalty_max)),
            age_bonus=float(raw.get("age-bonus", base.age_bonus)),
            age_bonus_max=float(raw.get("age-bonus-max", base.age_bonus_max)),
        )


def effective_priority(
    base: float,
    *,
    multiplier: float,
    recent_jobs: int,
    waiting: dt.timedelta | float,
    settings: PrioritySettings,
) -> float:
    """The effective priority; ``waiting`` is a timedelta or seconds."""
    seconds = waiting.total_seconds() if isinstance(waiting, dt.timedelta) else float(waiting)
    minutes = max(0.0, seconds) / 60.0
    penalty = min(settings.usage_penalty_max, settings.usage_penalty * max(0, recent_jobs))
    bonus = min(settings.age_bonus_max, settings.age_bonus * minutes)
    return max(0.0, float(base) * multiplier - penalty + bonus)
