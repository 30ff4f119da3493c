"""Effective priority and tiers: the formula of DESIGN §5, read from config."""

from __future__ import annotations

import datetime as dt

import dask.config
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedfleet.errors import ConfigError
from embedfleet.schedulers.priority import PrioritySettings, effective_priority, tier, tiers

S = PrioritySettings()


def test_defaults_come_from_config():
    assert PrioritySettings.from_config() == PrioritySettings(50, 2, 30, 2, 20)
    t = tiers()
    assert (t["free"].daily_chunks, t["free"].concurrent_jobs, t["free"].multiplier) == (1000, 2, 1.0)
    assert (t["premium"].daily_chunks, t["premium"].concurrent_jobs, t["premium"].multiplier) == (10000, 5, 2.0)
    assert (t["enterprise"].daily_chunks, t["enterprise"].concurrent_jobs, t["enterprise"].multiplier) == (100000, 20, 3.0)
    assert t["unlimited"].daily_chunks is None


def test_formula():
    # 60 * 2 - min(30, 2*4) + min(20, 2*3)
    assert effective_priority(60, multiplier=2.0, recent_jobs=4, waiting=dt.timedelta(minutes=3), settings=S) == 118
    # penalty and bonus are capped
    assert effective_priority(50, multiplier=1.0, recent_jobs=100, waiting=0, settings=S) == 20
    assert effective_priority(50, multiplier=1.0, recent_jobs=0, waiting=dt.timedelta(hours=5), settings=S) == 70
    # fractional minutes count
    assert effective_priority(50, multiplier=1.0, recent_jobs=0, waiting=90, settings=S) == 53


def test_floored_at_zero_and_not_capped():
    assert effective_priority(5, multiplier=1.0, recent_jobs=20, waiting=0, settings=S) == 0
    assert effective_priority(100, multiplier=3.0, recent_jobs=0, waiting=dt.timedelta(minutes=30), settings=S) == 320
    premium = effective_priority(100, multiplier=2.0, recent_jobs=0, waiting=0, settings=S)
    enterprise = effective_priority(100, multiplier=3.0, recent_jobs=0, waiting=0, settings=S)
    assert enterprise > premium > 100


def test_config_overrides_are_read_when_asked():
    with dask.config.set({"embedfleet.jobs.priority.age-bonus": 5, "embedfleet.jobs.priority.age-bonus-max": 50}):
        s = PrioritySettings.from_config()
        assert effective_priority(50, multiplier=1.0, recent_jobs=0, waiting=dt.timedelta(minutes=4), settings=s) == 70
    with dask.config.set({"embedfleet.jobs.tiers.gold": {"daily-chunks": 7, "concurrent-jobs": 1, "multiplier": 4}}):
        assert tier("gold").multiplier == 4.0
    with pytest.raises(ConfigError, match="unknown tier 'gold'; configured tiers: enterprise, free, premium, unlimited"):
        tier("gold")


@given(
    base=st.integers(0, 100),
    multiplier=st.sampled_from([1.0, 2.0, 3.0]),
    recent=st.integers(0, 100),
    minutes=st.floats(0, 600),
    more=st.floats(0, 600),
)
def test_properties(base, multiplier, recent, minutes, more):
    p = effective_priority(base, multiplier=multiplier, recent_jobs=recent, waiting=minutes * 60, settings=S)
    assert p >= 0
    # waiting longer never lowers a job; more recent jobs never raise it
    assert effective_priority(base, multiplier=multiplier, recent_jobs=recent, waiting=(minutes + more) * 60, settings=S) >= p
    assert effective_priority(base, multiplier=multiplier, recent_jobs=recent + 1, waiting=minutes * 60, settings=S) <= p
    # the bonus and penalty are bounded
    raw = base * multiplier
    assert max(0, raw - 30) <= p <= raw + 20
