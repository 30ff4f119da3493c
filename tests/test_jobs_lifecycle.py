"""The lifecycle table: every allowed move passes, every other one raises."""

import pytest

from embedfleet.errors import JobError
from embedfleet.errors import IllegalTransition
from embedfleet.schedulers.lifecycle import TRANSITIONS, moved, moved_from_any
from embedfleet.schedulers.models import FINAL_STATUSES, STATUSES, WAITING_STATUSES

ALLOWED = {
    (None, "queued"),
    (None, "running"),
    ("queued", "running"),
    ("interrupted", "running"),
    ("queued", "cancelled"),
    ("interrupted", "cancelled"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("running", "interrupted"),
    ("running", "queued"),
    ("interrupted", "queued"),
    ("failed", "queued"),
    ("cancelled", "queued"),
}


def test_table_covers_every_status():
    assert set(TRANSITIONS) == {None, *STATUSES}
    assert all(targets <= set(STATUSES) for targets in TRANSITIONS.values())


@pytest.mark.parametrize("source", [None, *STATUSES])
@pytest.mark.parametrize("target", STATUSES)
def test_every_pair(source, target):
    if (source, target) in ALLOWED:
        assert moved(source, target) == target
    else:
        with pytest.raises(IllegalTransition, match="cannot go from"):
            moved(source, target)


def test_succeeded_is_final_and_illegal_is_a_job_error():
    assert TRANSITIONS["succeeded"] == frozenset()
    assert all("running" not in TRANSITIONS[s] for s in FINAL_STATUSES)
    assert issubclass(IllegalTransition, JobError)


def test_bulk_move_checks_every_source():
    assert moved_from_any(WAITING_STATUSES, "running") == "running"
    with pytest.raises(IllegalTransition):
        moved_from_any(("queued", "succeeded"), "running")
