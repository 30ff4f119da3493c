"""The lifecycle table: every allowed move passes, every other one raises, and each move writes
exactly its columns (checked on the table and on the records the service writes)."""

import pytest

from embedfleet.errors import IllegalTransition, JobError
from embedfleet.schedulers.lifecycle import MOVES, TRANSITIONS, moved, transition
from embedfleet.schedulers.models import FINAL_STATUSES, STATUSES, WAITING_STATUSES, Job
from embedfleet.schedulers.records import Counts
from tests.db import clock, db_url, estimator, service  # noqa: F401

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
    assert transition("claim", WAITING_STATUSES, "running", _claim_values())["status"] == "running"
    with pytest.raises(IllegalTransition):
        transition("claim", ("queued", "succeeded"), "running", _claim_values())


# --------------------------------------------------------------------------------------------
# the columns each move writes

COLUMNS = {c.key for c in Job.__table__.columns}


def test_moves_name_real_columns_and_derive_the_table():
    for move in MOVES.values():
        assert move.writes | move.may_write <= COLUMNS - {"status"}, move.name
        assert not move.writes & move.may_write, move.name
    assert MOVES["record"].writes == COLUMNS - {"status"}  # a new record writes every column
    assert {(s, t) for s, targets in TRANSITIONS.items() for t in targets} == ALLOWED


def _claim_values(**extra):
    return dict.fromkeys(MOVES["claim"].writes, None) | extra


def test_transition_writes_exactly_the_moves_columns():
    values = transition("claim", "queued", "running", _claim_values())
    assert values["status"] == "running" and set(values) == MOVES["claim"].writes | {"status"}
    with pytest.raises(IllegalTransition, match="must write started_at"):
        transition("claim", "queued", "running", {k: v for k, v in _claim_values().items() if k != "started_at"})
    with pytest.raises(IllegalTransition, match="does not write charged"):
        transition("claim", "queued", "running", _claim_values(charged=3))
    with pytest.raises(IllegalTransition, match="status is the move's"):
        transition("claim", "queued", "running", _claim_values(status="running"))
    # The counts a run reports are optional at its end; its lease and end time are not.
    end = dict.fromkeys(MOVES["end"].writes, None)
    assert transition("end", "running", "failed", end | {"embedded": 4})["embedded"] == 4
    with pytest.raises(IllegalTransition, match="must write finished_at"):
        transition("end", "running", "succeeded", {k: v for k, v in end.items() if k != "finished_at"})


def test_transition_checks_the_move_and_every_bulk_source():
    requeue = dict.fromkeys(MOVES["requeue"].writes, None)
    assert transition("requeue", "running", "interrupted", requeue)["status"] == "interrupted"
    with pytest.raises(IllegalTransition, match="cannot end from running to interrupted"):
        transition("end", "running", "interrupted", dict.fromkeys(MOVES["end"].writes, None))
    with pytest.raises(IllegalTransition, match="cannot go from succeeded to running"):
        transition("claim", ("queued", "succeeded"), "running", _claim_values())
    with pytest.raises(IllegalTransition, match="no job move"):
        transition("restart", "failed", "running", {})


def _row(svc, job_id) -> dict:
    with svc.store.read() as session:
        job = session.get(Job, job_id)
        return {c: getattr(job, c) for c in COLUMNS}


def _changed(before: dict, after: dict) -> set[str]:
    return {c for c in COLUMNS if before[c] != after[c]} - {"status"}


def test_each_service_write_changes_only_its_moves_columns(service, clock):  # noqa: F811
    job = service.submit("/srv", user="fred", collection="kb")
    queued = _row(service, job.id)
    clock.advance(seconds=5)
    [candidate] = service.ledger.rank()
    claim = service.ledger.claim(candidate, dispatcher="test")
    running = _row(service, job.id)
    assert running["status"] == "running" and _changed(queued, running) <= MOVES["claim"].writes
    assert {"attempt", "dispatcher", "started_at", "heartbeat_at", "stage"} <= _changed(queued, running)

    clock.advance(seconds=5)
    assert service.ledger.finish(claim, status="failed", counts=Counts(documents=2), error="boom")
    failed = _row(service, job.id)
    assert failed["status"] == "failed" and _changed(running, failed) <= MOVES["end"].writes | MOVES["end"].may_write
    assert failed["dispatcher"] == "test" and failed["finished_at"] is not None and failed["heartbeat_at"] is None

    service.resume(job.id, user="fred")
    again = _row(service, job.id)
    assert again["status"] == "queued" and _changed(failed, again) <= MOVES["resume"].writes
    service.cancel(job.id, user="fred")
    cancelled = _row(service, job.id)
    assert cancelled["status"] == "cancelled" and _changed(again, cancelled) <= MOVES["cancel"].writes

    second = service.submit("/srv", user="fred", collection="kb")
    [candidate] = service.ledger.rank()
    claim = service.ledger.claim(candidate, dispatcher="gone")
    before = _row(service, second.id)
    assert service.ledger.interrupt_dispatcher("gone") == [second.id]
    interrupted = _row(service, second.id)
    assert interrupted["status"] == "interrupted" and _changed(before, interrupted) <= MOVES["requeue"].writes
    assert interrupted["dispatcher"] is None and interrupted["finished_at"] is None
