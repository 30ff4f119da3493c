"""Coalesced small jobs (pipeline/batch.py, schedulers/batching.py) on the session's LocalCluster.

Append jobs of one collection with equal options run as one pass, each with its own record,
counts, charge and result; a cancelled or refused job of a batch ends on its own, with nothing
of it in the collection; fairness across users holds; jobs of different collections never mix.
"""

from __future__ import annotations

import json
import threading

import chromadb
import dask.config
import pytest

from embedfleet.pipeline.batch import coalescing_key
from embedfleet.pipeline.jobdir import JobDir
from embedfleet.pipeline.manifest import Manifest
from embedfleet.schedulers.dispatcher import Dispatcher, run_once
from embedfleet.schedulers.service import JobService
from embedfleet.sinks.naming import physical_name
from tests.db import db_url  # noqa: F401

PARAGRAPH = ("The command reads each named file and writes it, in order, to standard output; with no file, "
             "or when the file is -, it reads standard input. ")


@pytest.fixture
def jobs(db_url, data_dir, fake_model):  # noqa: F811
    with dask.config.set({"embedfleet.embed.model": fake_model}):
        service = JobService(db_url, data_dir=data_dir)
        yield service
        service.close()


def _item(root, i: int, text: str | None = None):
    folder = root / f"item-{i}"
    folder.mkdir(parents=True)
    (folder / f"item-{i}.md").write_text(text or f"# Item {i}\n\n{PARAGRAPH * 3}")
    return folder


def _submit(service, source, user, collection="media", **kw):
    return service.submit(str(source), user=user, collection=collection, mode="append", chunk_size=24,
                          chunk_overlap=4, **kw)


def _store(data_dir, user, collection="media"):
    store = chromadb.PersistentClient(path=str(data_dir / "chroma"))
    return store.get_collection(physical_name(user, collection))


def _batches(service, ids):
    from sqlalchemy import select

    from embedfleet.schedulers.models import Job

    with service.store.read() as session:
        return dict(session.execute(select(Job.id, Job.batch).where(Job.id.in_(ids))).all())


def test_the_coalescing_key_ignores_only_the_id_and_the_source_location(jobs, tmp_path):
    a = jobs.submit(str(_item(tmp_path, 1)), user="u", collection="c", mode="append")
    b = jobs.submit(str(_item(tmp_path, 2)), user="u", collection="c", mode="append")
    c = jobs.submit(str(_item(tmp_path, 3)), user="u", collection="c", mode="append", chunk_size=64)
    d = jobs.submit(str(_item(tmp_path, 4)), user="u", collection="c")  # sync: never coalesced
    from sqlalchemy import select

    from embedfleet.schedulers.models import Job

    with jobs.store.read() as session:
        rows = session.execute(select(Job.id, Job.spec).where(Job.id.in_([a.id, b.id, c.id, d.id]))).all()
    keys = {job_id: coalescing_key(spec) for job_id, spec in rows}
    assert keys[a.id] == keys[b.id] is not None
    assert keys[c.id] not in (None, keys[a.id])
    assert keys[d.id] is None


def test_coalesced_jobs_each_get_their_own_counts_charges_and_results(jobs, client, data_dir, tmp_path):
    jobs.add_user("ana", tier="enterprise")
    submitted = [_submit(jobs, _item(tmp_path, i), "ana") for i in range(6)]
    ran = run_once(jobs, client=client, max_running=4)
    assert {r.status for r in ran} == {"succeeded"}
    batches = _batches(jobs, [j.id for j in submitted])
    assert len(set(batches.values())) == 1 and None not in batches.values()  # one pass for all six

    total = 0
    for job in submitted:
        info = jobs.status(job.id, user="ana")
        result = json.loads((JobDir(data_dir / "jobs" / job.id).result).read_text())
        assert info.documents == result["documents"] == 1
        assert 0 < result["seconds"] == pytest.approx((info.finished_at - info.started_at).total_seconds(), abs=2.0)
        assert info.chunks == result["chunks"] == info.embedded > 0
        assert info.skipped == 0
        total += info.embedded
        # Its own embedding partitions, in its own job dir: what it was charged for.
        rows = sum(json.loads(p.read_text())["rows"] for p in JobDir(data_dir / "jobs" / job.id).embedding_sidecars())
        assert rows == info.embedded
    assert jobs.quota("ana").used_today == total
    assert _store(data_dir, "ana").count() == total
    # One manifest commit, holding every chunk once.
    manifest = Manifest(str(data_dir), jobs.status(submitted[0].id, user="ana").sink, physical_name("ana", "media"))
    assert manifest.current.name.startswith(f"v-{batches[submitted[0].id]}-00-")


def test_a_second_batch_appends_and_skips_what_the_collection_has(jobs, client, data_dir, tmp_path):
    jobs.add_user("ben", tier="enterprise")
    first = [_submit(jobs, _item(tmp_path / "a", i), "ben") for i in range(3)]
    run_once(jobs, client=client)
    # The same documents again (append: known chunks are skipped), and two new ones.
    again = [_submit(jobs, tmp_path / "a" / f"item-{i}", "ben") for i in range(2)]
    new = [_submit(jobs, _item(tmp_path / "b", i + 10), "ben") for i in range(2)]
    run_once(jobs, client=client)
    for job in again:
        info = jobs.status(job.id, user="ben")
        assert info.status == "succeeded" and info.embedded == 0 and info.skipped == info.chunks > 0
    for job in new:
        info = jobs.status(job.id, user="ben")
        assert info.status == "succeeded" and info.embedded == info.chunks > 0
    expected = sum(jobs.status(j.id, user="ben").chunks for j in first + new)
    assert _store(data_dir, "ben").count() == expected
    assert jobs.quota("ben").used_today == expected


def test_jobs_of_two_users_share_a_pass_but_never_a_collection(jobs, client, data_dir, tmp_path):
    for name in ("cy", "di"):
        jobs.add_user(name, tier="enterprise")
    # The same file names and texts for both users: only the collection tells them apart.
    mine = [_submit(jobs, _item(tmp_path / "cy", i), "cy") for i in range(3)]
    theirs = [_submit(jobs, _item(tmp_path / "di", i), "di") for i in range(3)]
    run_once(jobs, client=client, max_running=4)
    batches = _batches(jobs, [j.id for j in mine + theirs])
    assert len(set(batches.values())) == 1  # one pass, its embedding tasks shared by both users
    for user, own in (("cy", mine), ("di", theirs)):
        docs = {m["doc_id"] for m in _store(data_dir, user).get(include=["metadatas"])["metadatas"]}
        assert docs == {f"item-{i}.md" for i in range(3)}
        texts = _store(data_dir, user).get(include=["documents"])["documents"]
        assert len(texts) == sum(jobs.status(j.id, user=user).chunks for j in own)


def test_a_job_with_other_options_runs_on_its_own(jobs, client, tmp_path):
    jobs.add_user("ed", tier="enterprise")
    alike = [_submit(jobs, _item(tmp_path, i), "ed") for i in range(2)]
    other = jobs.submit(str(_item(tmp_path, 9)), user="ed", collection="media", mode="append", chunk_size=40,
                        chunk_overlap=4)
    run_once(jobs, client=client)
    batches = _batches(jobs, [j.id for j in alike] + [other.id])
    assert batches[alike[0].id] == batches[alike[1].id]
    assert batches[other.id] != batches[alike[0].id]
    assert jobs.status(other.id, user="ed").status == "succeeded"


def test_a_cancelled_job_of_a_batch_ends_cancelled_and_nothing_of_it_is_written(jobs, client, data_dir, tmp_path):
    from embedfleet.pipeline.batch import run_batch

    jobs.add_user("flo", tier="enterprise")
    submitted = [_submit(jobs, _item(tmp_path, i), "flo") for i in range(4)]
    victim = submitted[1]
    cancelled = threading.Event()

    def runner(members, *, reserve, **kwargs):
        # The owner cancels one job once the batch has diffed: its monitor sees it at its next tick.
        def reserve_after_cancel(asks):
            jobs.cancel(victim.id, user="flo")
            cancelled.wait(5)
            return reserve(asks)

        run_batch(members, reserve=reserve_after_cancel, **kwargs)

    watcher = threading.Thread(target=lambda: _wait_cancel_flag(jobs, victim.id, cancelled), daemon=True)
    watcher.start()
    d = Dispatcher(jobs, client=client, batch_runner=runner, tick=0.05, poll_seconds=0.05)
    d.run(once=True)
    assert jobs.status(victim.id, user="flo").status == "cancelled"
    others = [j for j in submitted if j is not victim]
    assert {jobs.status(j.id, user="flo").status for j in others} == {"succeeded"}
    docs = {m["doc_id"] for m in _store(data_dir, "flo").get(include=["metadatas"])["metadatas"]}
    assert docs == {f"item-{i}.md" for i in (0, 2, 3)}
    manifest = Manifest(str(data_dir), jobs.status(victim.id, user="flo").sink, physical_name("flo", "media"))
    import pyarrow.parquet as pq

    ids = {d for p in manifest.files() for d in pq.read_table(p).column("doc_id").to_pylist()}
    assert ids == {f"item-{i}.md" for i in (0, 2, 3)}


def _wait_cancel_flag(service, job_id, event):
    from sqlalchemy import select

    from embedfleet.schedulers.models import Job

    import time

    for _ in range(500):
        with service.store.read() as session:
            if session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar():
                time.sleep(0.3)  # a monitor tick or more
                event.set()
                return
        time.sleep(0.01)
    event.set()


def test_a_refused_collection_fails_its_own_jobs_and_the_pass_goes_on(jobs, client, data_dir, tmp_path):
    from embedfleet.sinks.base import CollectionInfo
    from embedfleet.sinks.registry import make_spec, open_sink

    for name in ("gil", "hal"):
        jobs.add_user(name, tier="enterprise")
    # gil's collection was made by another model: the model guard refuses it.
    with open_sink(make_spec(f"chroma://{data_dir}/chroma", {})) as sink:
        sink.open(physical_name("gil", "media"), create=True,
                  info=CollectionInfo(model="another-model", dimensions=8, metric="cosine"))
    refused = [_submit(jobs, _item(tmp_path / "gil", i), "gil") for i in range(2)]
    fine = [_submit(jobs, _item(tmp_path / "hal", i), "hal") for i in range(2)]
    run_once(jobs, client=client)
    batches = _batches(jobs, [j.id for j in refused + fine])
    assert len(set(batches.values())) == 1
    for job in refused:
        info = jobs.status(job.id, user="gil")
        assert info.status == "failed" and "another-model" in info.error, info.error
        assert info.charged == 0
    assert {jobs.status(j.id, user="hal").status for j in fine} == {"succeeded"}
    assert _store(data_dir, "gil").count() == 0
    assert _store(data_dir, "hal").count() == sum(jobs.status(j.id, user="hal").chunks for j in fine)


def test_a_job_over_its_quota_fails_alone_and_the_rest_of_the_batch_is_charged_exactly(jobs, client, tmp_path):
    jobs.add_user("ivy", tier="free")
    with dask.config.set({"embedfleet.jobs.tiers.free.daily-chunks": 60}):
        # A collection with chunks in it: appends to it are checked by their exact count only.
        _submit(jobs, _item(tmp_path, 8), "ivy")
        run_once(jobs, client=client)
        small = [_submit(jobs, _item(tmp_path, i), "ivy") for i in range(2)]
        big_folder = _item(tmp_path, 9)
        big = _submit(jobs, big_folder, "ivy")
        # Its file grew after the submit: the exact count after chunking is over what is left.
        (big_folder / "item-9.md").write_text("# Big\n\n" + PARAGRAPH * 120)
        run_once(jobs, client=client)
        infos = [jobs.status(j.id, user="ivy") for j in small]
        assert {i.status for i in infos} == {"succeeded"}, [i.error for i in infos]
        over = jobs.status(big.id, user="ivy")
        assert over.status == "failed" and "quota exceeded" in over.error and over.charged == 0
        assert over.batch == infos[0].batch == infos[1].batch
        everything = jobs.list(user="ivy")
        assert jobs.quota("ivy").used_today == sum(i.charged for i in everything) == sum(i.embedded for i in everything)


def test_a_symlink_swapped_after_submit_reads_nothing_outside_the_roots_in_a_shared_pass(jobs, client, data_dir,
                                                                                        tmp_path):
    allowed = tmp_path / "allowed"
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "item-0.md").write_text("# Secret\n\nthe other tenant's payroll numbers " * 5)
    with dask.config.set({"embedfleet.jobs.allowed-roots": [str(allowed)]}):
        for name in ("kim", "lou"):
            jobs.add_user(name, tier="enterprise")
        mallory = _item(allowed / "kim", 0)
        theirs = [_submit(jobs, _item(allowed / "lou", i), "lou") for i in range(2)]
        swapped = _submit(jobs, mallory, "kim")
        # After the submit, kim's file becomes a symlink to a file outside every allowed root.
        (mallory / "item-0.md").unlink()
        (mallory / "item-0.md").symlink_to(secret / "item-0.md")
        run_once(jobs, client=client)
        info = jobs.status(swapped.id, user="kim")
        assert info.embedded == 0 and info.skipped_documents == 1, info
        assert {jobs.status(j.id, user="lou").status for j in theirs} == {"succeeded"}
        assert len(set(_batches(jobs, [swapped.id] + [j.id for j in theirs]).values())) == 1
    for user in ("kim", "lou"):
        try:
            texts = _store(data_dir, user).get(include=["documents"])["documents"]
        except Exception:  # kim's collection may hold nothing at all
            texts = []
        assert not any("payroll" in t for t in texts)
