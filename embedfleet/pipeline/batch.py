"""Coalesced small jobs: many append jobs, of one collection or several, in one pipeline pass.

The job service runs jobs of one collection one at a time (they diff against and commit one
manifest), so a user adding one media item per job is limited to one pipeline pass per item,
and for a one-document job that pass is nearly all fixed cost: the model guard, a diff, an
embedding task, a write and a manifest commit. A batch runs waiting ``append`` jobs whose
options agree (:func:`coalescing_key`), of any users and collections, as one pass:

* each job keeps its own job dir, read partitions, chunk files and embedding partitions, named
  as a job running alone names them, so each job is charged for exactly what it embedded
  (its own partitions on disk) and resumes from them, in whatever batch it runs next;
* per collection (a :class:`_Group`): one model guard, one diff of its jobs' chunks against
  its manifest, one write, one manifest commit; a collection that fails (its model guard, its
  store) fails its own jobs only;
* for the whole pass: a few read+chunk tasks, one exact quota check, and embedding tasks that
  are micro-batches: the slices of many jobs, whoever's, embedded in one model call
  (:func:`~embedfleet.tasks.stages.embed_many_stage`), each slice still its own job's file,
  so no vector can reach another job's collection;
* a job whose source fails (a missing file with ``on_error=fail``, a source that changed
  since its last run), that is over its quota, or is cancelled before the writes, ends on its
  own and nothing of it is written; the others go on.

Each job's counts are those of the job run alone against the collection as it was before the
batch: two jobs of one batch that carry the same chunk (the same document name and text) each
embed it, and the collection holds it once.

A batch commits once: before the manifest switch every member's outcome is recorded in the
batch dir, after it each member's ``committed.json``. A member whose batch committed but that
was not recorded finished (the dispatcher was killed in between) finds that out when it runs
next and ends with the outcome recorded for it, embedding nothing again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from embedfleet.config import resolve_model_path
from embedfleet.errors import DuplicateDocumentError, EmbedfleetError, JobCancelled, JobError
from embedfleet.frames.io import (
    is_done,
    parquet_rows,
    read_json,
    sidecar,
    write_json_atomic,
)
from embedfleet.frames.storage import location
from embedfleet.pipeline import incremental
from embedfleet.pipeline.embedding import MIN_ROWS_PER_SLICE, TASK_RETRIES, embed_task_key, rows_per_slice
from embedfleet.pipeline.follow import Follower
from embedfleet.pipeline.job import JobResult, JobSpec, Progress, SkippedDocument
from embedfleet.pipeline.jobdir import JobDir
from embedfleet.pipeline.manifest import Manifest
from embedfleet.pipeline.placement import Placement
from embedfleet.pipeline.visibility import start_check
from embedfleet.sinks.base import CollectionInfo
from embedfleet.sinks.naming import physical_name
from embedfleet.sinks.writer_lock import exclusive_writer
from embedfleet.tasks import stages

logger = logging.getLogger(__name__)

__all__ = ["BatchMember", "coalescing_key", "run_batch", "was_batched"]

#: ``<data-dir>/batches/<batch-id>/``: a batch's own files (its diff, outcomes, commit marker).
BATCHES = "batches"
#: In a member's job dir: the batch it last ran in.
BATCH_MARKER = "batch.json"
#: In a batch dir: every member's result, recorded before the manifest switch.
OUTCOMES = "outcomes.json"


def coalescing_key(spec_json: str) -> str | None:
    """What jobs must share to run in one batch; None for a job that runs alone.

    Only ``append`` jobs coalesce: a sync job's source is the whole collection, so two queued
    sync jobs of one collection with different sources contradict each other, and run one
    after the other as submitted. Built-in datasets are not small jobs. What the shared tasks
    use must agree: the model and its settings, chunking, mode, data dir, partition size. The
    job's id, its source's location (and the roots it may read, which the dispatcher sets per
    job), its owner, store and collection may differ: each collection of a batch has its own
    diff, writes and commit.
    """
    raw = json.loads(spec_json)
    source = raw.get("source") or {}
    if raw.get("mode") != "append" or source.get("kind") == "builtin":
        return None
    for own in ("job_id", "user", "collection", "sink"):
        raw.pop(own, None)
    source = dict(source)
    source.pop("location", None)
    source.pop("allowed_roots", None)
    raw["source"] = source
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:24]


def was_batched(spec_json: str) -> bool:
    """Whether the job ran in a batch before: it then runs in one again (a batch of its own if
    need be), which knows whether that batch committed before the job's end was recorded."""
    raw = json.loads(spec_json)
    return (location(f"{raw['data_dir']}/jobs/{raw['job_id']}") / BATCH_MARKER).exists()


@dataclasses.dataclass
class BatchMember:
    """One job of a batch, as the job service hands it over, and what the batch made of it.

    ``cancel`` is the member's own flag (its owner cancelled it, or its claim was lost): set
    before the batch writes, the member ends ``cancelled`` and nothing of it is written.
    ``result`` is filled in by :func:`run_batch`; ``error`` is why it failed on its own.
    """

    spec: JobSpec
    on_progress: Callable[[Progress], None] | None = None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: JobResult | None = None
    error: BaseException | None = None
    # Working state of the pass.
    progress: Progress = dataclasses.field(default_factory=Progress)
    plan: list = dataclasses.field(default_factory=list)
    chunk_paths: list[str] = dataclasses.field(default_factory=list)
    chunk_stats: dict[int, dict] = dataclasses.field(default_factory=dict)
    embed_inputs: list[str] = dataclasses.field(default_factory=list)
    slices: list[tuple[str, int, int, str]] = dataclasses.field(default_factory=list)
    embedded_files: list[str] = dataclasses.field(default_factory=list)
    precisions: set[str] = dataclasses.field(default_factory=set)

    @property
    def job_dir(self) -> JobDir:
        return JobDir(self.spec.job_dir)

    @property
    def active(self) -> bool:
        return self.result is None and self.error is None

    def report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(dataclasses.replace(self.progress))


def batch_dir(data_dir: str, batch_id: str):
    return location(data_dir) / BATCHES / batch_id


Reserve = Callable[[list[tuple["BatchMember", int]]], list[BaseException | None]]


def run_batch(members: list[BatchMember], *, client, batch_id: str, priority: int = 0,
              cancel: threading.Event | None = None, reserve: Reserve | None = None) -> None:
    """Run ``members`` (jobs with one :func:`coalescing_key`) as one pass on ``client``'s cluster.

    Fills in each member's ``result`` (succeeded or cancelled) or ``error`` (it failed on its
    own). A failure of the pass itself (the store, the model guard, an embedding task) is
    raised for the caller to record on every member still without a result; setting
    ``cancel`` (the dispatcher stops) raises :class:`JobCancelled` the same way.
    ``reserve([(member, chunks), ...])`` is called once, after the diff, with the exact number
    of chunks each member is about to embed, and answers with each one's refusal (an
    exception, e.g. QuotaExceeded) or None: the exact quota check, for the batch in one go.
    """
    if not members:
        return
    keys = {coalescing_key(m.spec.to_json()) for m in members}
    if len(keys) != 1 or None in keys:
        raise ValueError("a batch needs append jobs whose options agree (coalescing_key)")
    for member in members:
        member.result, member.error = None, None
        member.progress = Progress(stage="reading")
    with contextlib.ExitStack() as stack:
        for uri in sorted({m.spec.sink.uri for m in members}):  # one order, whichever batch takes them
            stack.enter_context(exclusive_writer(uri))
        _Batch(members, client=client, batch_id=batch_id, priority=priority, cancel=cancel, reserve=reserve).run()


class _Group:
    """The jobs of a batch that write one collection: their diff, writes and commit, and the
    collection's own files (``<data-dir>/batches/<batch-id>-<n>/``)."""

    def __init__(self, batch: "_Batch", number: int, members: list[BatchMember]):
        self.members = members
        self.lead = members[0].spec
        self.id = f"{batch.batch_id}-{number:02d}"
        # The group's own spec and dir: its diff, the manifest version it commits, its markers.
        self.spec = dataclasses.replace(self.lead, job_id=self.id)
        self.dir = JobDir(batch_dir(self.lead.data_dir, self.id))
        self.collection = physical_name(self.lead.user, self.lead.collection)
        self.manifest = Manifest(self.lead.data_dir, self.lead.sink.uri, self.collection)
        self.diffed: set[str] = set()
        self.diff: incremental.Diff | None = None
        self.single_writer = False

    def active(self) -> list[BatchMember]:
        return [m for m in self.members if m.active]

    def fail(self, exc: BaseException) -> None:
        """The collection itself failed (its model guard, its store): its jobs end, the batch goes on."""
        for member in self.active():
            member.error = exc
        logger.info("batch group %s (collection %r) failed: %s", self.id, self.lead.collection, exc)


class _Batch:
    def __init__(self, members: list[BatchMember], *, client, batch_id: str, priority: int,
                 cancel: threading.Event | None, reserve: Reserve | None):
        self.members = members
        self.reserve = reserve
        self.started = time.perf_counter()
        self.lead = members[0].spec
        self.batch_id = batch_id
        self.progress = Progress(stage="reading")
        self.follower = Follower(client, priority=priority, cancel=cancel, on_progress=None, progress=self.progress)
        self.client = client
        by_collection: dict[tuple[str, str, str], list[BatchMember]] = {}
        for member in members:
            by_collection.setdefault((member.spec.user, member.spec.sink.uri, member.spec.collection), []).append(member)
        self.groups = [_Group(self, n, group) for n, group in enumerate(by_collection.values())]
        self.group_of = {id(m): g for g in self.groups for m in g.members}
        self.dir = JobDir(batch_dir(self.lead.data_dir, batch_id))
        self.futures: dict = {}

    # -- the pass --------------------------------------------------------------------------

    def run(self) -> None:
        self._finish_committed_earlier()
        if not self._active():
            return
        self._prepare()
        try:
            self._chunk()
            for group in self.groups:
                self._diff(group)
            self._reserve()
            self._embed()
            for group in self.groups:
                self._write(group)
        except BaseException:
            self.follower.cancel_all(self.futures)
            concurrent.futures.wait([g.opening for g in self.groups], timeout=30.0)
            raise
        for group in self.groups:
            self._commit(group)
        if any(g.single_writer for g in self.groups):
            stages.forget_collections()

    def _active(self) -> list[BatchMember]:
        return [m for m in self.members if m.active]

    def _set_stage(self, stage: str, members: list[BatchMember] | None = None) -> None:
        for member in members if members is not None else self._active():
            member.progress.stage = stage  # type: ignore[assignment]
            member.report()

    def _fail(self, member: BatchMember, exc: BaseException) -> None:
        member.error = exc
        logger.info("job %s (batch %s) failed on its own: %s", member.spec.job_id, self.batch_id, exc)

    def _honour_cancels(self, members: list[BatchMember] | None = None) -> None:
        for member in members if members is not None else self._active():
            if member.active and member.cancel.is_set():
                member.result = self._result(member, "cancelled")
                logger.info("job %s cancelled within batch %s; nothing of it is written", member.spec.job_id,
                            self.batch_id)

    def _result(self, member: BatchMember, status: str) -> JobResult:
        spec, progress = member.spec, member.progress
        result = JobResult(job_id=spec.job_id, status=status, user=spec.user, sink=spec.sink.uri,  # type: ignore[arg-type]
                           collection=spec.collection)
        result.documents, result.chunks = progress.documents, progress.chunks
        result.embedded, result.skipped, result.tokens = progress.embedded, progress.skipped, progress.tokens
        result.skipped_documents = [
            SkippedDocument(**s) for i in sorted(member.chunk_stats) for s in member.chunk_stats[i]["skipped_documents"]
        ]
        result.precision = ",".join(sorted(member.precisions)) or None
        result.seconds = time.perf_counter() - self.started  # the pass's time so far: the job's wall time
        return result

    # -- a member whose batch committed before it could be recorded ---------------------------

    def _finish_committed_earlier(self) -> None:
        for group in self.groups:
            current = group.manifest.current_if_readable()
            for member in group.members:
                job_dir = member.job_dir
                if job_dir.committed.exists() and job_dir.result.exists():
                    member.result = _result_from(read_json(job_dir.result))
                    continue
                marker = job_dir.root / BATCH_MARKER
                if not marker.exists():
                    continue
                earlier = read_json(marker)["batch"]
                earlier_dir = JobDir(batch_dir(self.lead.data_dir, earlier))
                committed = earlier_dir.committed.exists() or (
                    current is not None and current.name.startswith(f"v-{earlier}-"))
                outcomes = earlier_dir.root / OUTCOMES
                if committed and outcomes.exists():
                    outcome = read_json(outcomes).get(member.spec.job_id)
                    if outcome is not None:
                        member.result = _result_from(outcome)
                        write_json_atomic(outcome, job_dir.result)
                        write_json_atomic({"batch": earlier}, job_dir.committed)
                        logger.info("job %s: its batch %s had committed; recorded it now", member.spec.job_id,
                                    earlier)

    # -- before any task --------------------------------------------------------------------

    def _prepare(self) -> None:
        from embedfleet.datasets import plan_partitions
        from embedfleet.pipeline.run import check_plan_unchanged, open_sink_in_thread
        from embedfleet.tasks.chunking import reserved_tokens, validate_for_model

        spec, client = self.lead, self.client
        model = spec.embedder.model
        self.max_tokens = model.max_seq_length - reserved_tokens(resolve_model_path(model.path),
                                                                 prefix=model.document_prefix)
        validate_for_model(spec.chunk, self.max_tokens, model_name=model.name, max_seq_length=model.max_seq_length)
        self.placement = Placement(client, spec.embedder)
        warm = self.placement.preload(priority=self.follower.priority)
        self.dir.make()
        write_json_atomic({"members": [m.spec.job_id for m in self.members]}, self.dir.root / "members.json")
        # One probe of the data dir for the batch; the members' sources are probed at their
        # common folder, which is where one user's small jobs' files live.
        sources = [m.spec.source.location for m in self.members if "://" not in str(m.spec.source.location)]
        self.visibility = start_check(client, token_path=self.dir.visible, priority=self.follower.priority,
                                      source=_common_folder(sources))
        if self.visibility.gates:
            self.visibility.verify()

        def prepare(member: BatchMember) -> None:
            job_dir = member.job_dir
            try:
                job_dir.make()
                write_json_atomic(json.loads(member.spec.to_json()), job_dir.spec)
                write_json_atomic({"batch": self.group_of[id(member)].id}, job_dir.root / BATCH_MARKER)
                member.plan = plan_partitions(member.spec.source)
                check_plan_unchanged(member.plan, job_dir)
            except EmbedfleetError as exc:
                self._fail(member, exc)
                return
            member.chunk_paths = [str(job_dir.chunk_file(i)) for i in range(len(member.plan))]
            member.progress.partitions_total = len(member.plan)

        _each(self._active(), prepare)
        info = CollectionInfo(model=model.name, dimensions=model.dimensions, metric=model.metric,
                              precision=warm.precision(), backend=spec.embedder.backend)
        for group in self.groups:
            group.dir.make()
            group.info = info
            group.write_kwargs = {"sink": group.lead.sink, "collection": group.collection, "info": info,
                                  "retry": group.lead.retry}
            # The model guard of each collection, beside reading and chunking.
            # allow_mixed is part of the coalescing key: every member of the batch has the lead's.
            group.opening = open_sink_in_thread(group.lead.sink, group.collection, info,
                                                allow_mixed=group.lead.allow_mixed)

    # -- read + chunk -----------------------------------------------------------------------

    def _chunk(self) -> None:
        self._set_stage("chunking")
        spec = self.lead
        pending = []
        for m, member in enumerate(self.members):
            if not member.active:
                continue
            for i, path in enumerate(member.chunk_paths):
                if is_done(path):
                    self._count_chunks(member, i, read_json(sidecar(path)))
                else:
                    pending.append((m, i))
        # A few tasks for the whole batch, not one per job: each reads and chunks the
        # partitions of several small jobs (every worker thread gets one).
        threads = sum(w.get("nthreads", 1) for w in self.client.scheduler_info(n_workers=-1)["workers"].values())
        per_task = max(1, -(-len(pending) // max(1, threads)))
        chunking = [pending[k:k + per_task] for k in range(0, len(pending), per_task)]
        for g, part in enumerate(chunking):
            items = [(self.members[m].spec.source, self.members[m].plan[i], self.members[m].chunk_paths[i],
                      self.members[m].spec.on_error) for m, i in part]
            future = self.client.submit(
                read_chunk_many, items, chunk=spec.chunk, model_path=spec.embedder.model.path,
                max_tokens=self.max_tokens, key=f"chunk-{self.batch_id}-{g}", priority=self.follower.priority,
                retries=TASK_RETRIES, pure=False,
            )
            self.futures[future] = part

        def chunked(part: list[tuple[int, int]], values: list[Any]) -> None:
            self.visibility.verify()
            for (m, i), value in zip(part, values):
                member = self.members[m]
                if not member.active:
                    continue
                if isinstance(value, BaseException):
                    self._fail(member, value)
                    continue
                self._count_chunks(member, i, value)
                member.report()

        self.follower.follow(self.futures, chunked)
        self.visibility.verify()
        self._honour_cancels()

    def _count_chunks(self, member: BatchMember, i: int, stats: dict) -> None:
        member.chunk_stats[i] = stats
        progress = member.progress
        progress.documents += stats["documents"]
        progress.chunks += stats["chunks"]
        progress.skipped_documents += len(stats["skipped_documents"])
        progress.partitions_done += 1

    # -- one diff for every collection --------------------------------------------------------

    def _diff(self, group: _Group) -> None:
        paths: list[str] = []
        origin_member: list[int] = []
        for m, member in enumerate(group.members):
            if member.active:
                for i, path in enumerate(member.chunk_paths):
                    if member.chunk_stats[i]["chunks"]:
                        paths.append(path)
                        origin_member.append(m)
        if not group.active():
            return
        try:
            if group.opening.done():
                group.opening.result()  # a refused collection stops its jobs before the diff
            diff = incremental.diff(group.spec, self.follower, group.manifest, paths, group.dir, protected=[],
                                    store=group.opening.result, write_kwargs=group.write_kwargs,
                                    groups=origin_member)
        except DuplicateDocumentError as exc:
            # A doc_id repeated within one job's source: that job fails, the others are diffed again.
            self._fail_duplicates(group, exc, paths, origin_member)
            return self._diff(group)
        except (JobCancelled, JobError):
            raise
        except EmbedfleetError as exc:  # the collection's model guard or store: its jobs only
            group.fail(exc)
            return
        group.diff = diff
        group.diffed = {m.spec.job_id for m in group.active()}
        origins = diff.embed_origins if diff.embed_origins is not None else list(range(len(diff.embed_inputs)))
        for path, origin in zip(diff.embed_inputs, origins):
            group.members[origin_member[origin]].embed_inputs.append(path)
        for member in group.active():
            to_embed = sum(parquet_rows(p) for p in member.embed_inputs)
            member.progress.chunks_to_embed = to_embed
            member.progress.skipped = member.progress.chunks - to_embed

    def _fail_duplicates(self, group: _Group, exc: DuplicateDocumentError, paths: list[str],
                         origin_member: list[int]) -> None:
        from embedfleet.frames.io import read_table, remove_tree

        repeated = set(exc.duplicates)
        for m in sorted(set(origin_member)):
            ids = {d for p, g in zip(paths, origin_member) if g == m
                   for d in read_table(p, columns=["doc_id"]).column("doc_id").to_pylist()}
            if repeated & ids:
                self._fail(group.members[m], DuplicateDocumentError(sorted(repeated & ids)))
        remove_tree(group.dir.diff)
        for member in group.members:
            member.embed_inputs = []

    # -- the exact quota check, for the whole batch ------------------------------------------------

    def _reserve(self) -> None:
        asks, earlier_files = [], {}
        _each(self._active(), self._plan_slices)
        for member in self._active():
            done = [s[3] for s in member.slices if is_done(s[3])]
            stats = [read_json(sidecar(path)) for path in done]
            left = (member.progress.chunks_to_embed or 0) - sum(s["rows"] for s in stats)
            member.progress.chunks_to_embed = left
            asks.append((member, left))
            earlier_files[id(member)] = (done, stats)
        refusals = self.reserve(asks) if self.reserve is not None else [None] * len(asks)
        for (member, _), refused in zip(asks, refusals):
            if refused is not None:  # QuotaExceeded, or its claim was lost
                self._fail(member, refused)
                continue
            done, stats = earlier_files[id(member)]
            member.precisions.update(s["precision"] for s in stats)
            member.embedded_files.extend(done)
        self.follower.check_cancel()
        self._honour_cancels()

    def _plan_slices(self, member: BatchMember) -> None:
        member.slices = self._slices(member)

    def _slices(self, member: BatchMember) -> list[tuple[str, int, int, str]]:
        to_embed = member.progress.chunks_to_embed or 0
        if not to_embed:
            return []
        rows = rows_per_slice(member.job_dir, to_embed, member.spec.chunks_per_partition,
                              max(1, len(self.placement.workers)))
        out = []
        for path in member.embed_inputs:
            n = parquet_rows(path)
            out.extend((path, start, min(n, start + rows), str(member.job_dir.embedding_file(path, si)))
                       for si, start in enumerate(range(0, n, rows)))
        return out

    # -- embed: micro-batches of every job's slices, whoever's ------------------------------------

    def _embed(self) -> None:
        self._set_stage("embedding")
        pending = [(m, s) for m, member in enumerate(self.members) if member.active
                   for s in member.slices if not is_done(s[3])]
        for member in self._active():
            member.progress.partitions_total = len(member.slices)
            member.progress.partitions_done = sum(1 for s in member.slices if is_done(s[3]))
        if not pending:
            return
        packs = _pack(pending, most=self.lead.chunks_per_partition, tasks=max(1, len(self.placement.workers)))
        waiting = list(enumerate(packs))
        running: dict = {}

        def submit() -> None:
            if waiting:
                self.placement.refresh_if_stale()
            while waiting:
                free, worker = self.placement.next_worker()
                if not free:
                    return
                slot, pack = waiting.pop(0)
                future = self.client.submit(
                    stages.embed_many_stage, [s for _, s in pack], embedder=self.placement.embedder,
                    heading_context=self.lead.chunk.heading_context,
                    key=embed_task_key(self.batch_id, f"pack-{slot:04d}"), priority=self.follower.priority,
                    retries=TASK_RETRIES, pure=False, **self.placement.submit_options(worker),
                )
                running[future] = slot
                self.placement.assign(slot, worker)

        def embedded(slot: int, values: list[dict]) -> None:
            self.placement.release(slot)
            submit()
            for (m, s), value in zip(packs[slot], values):
                member = self.members[m]
                progress = member.progress
                progress.embedded += value["rows"]
                progress.tokens += value["real_tokens"]
                progress.partitions_done += 1
                member.precisions.add(value["precision"])
                member.embedded_files.append(s[3])
                member.report()

        submit()
        self.follower.follow(running, embedded)

    # -- write: one stream per collection ------------------------------------------------------

    def _write(self, group: _Group) -> None:
        if not group.active():
            return
        try:
            group.single_writer = group.opening.result()
        except EmbedfleetError as exc:
            group.fail(exc)
            return
        self._honour_cancels(group.active())  # the last point a cancel keeps a job out of the collection
        writing = group.active()
        self._set_stage("writing", writing)
        paths, markers = [], []
        for member in writing:
            for path in sorted(member.embedded_files):
                paths.append(path)
                markers.append(str(member.job_dir.written_marker(path)))
        if not paths:
            return
        try:
            if group.single_writer:
                stages.write_many_stage(paths, markers=markers, **group.write_kwargs)
            else:
                self.follower.result_of(self.client.submit(
                    stages.write_many_stage, paths, markers=markers, key=f"write-{group.id}",
                    priority=self.follower.priority, pure=False, **group.write_kwargs))
        except (JobCancelled, JobError):
            raise
        except EmbedfleetError as exc:  # the store gave up (after its retries): this collection's jobs fail
            group.fail(exc)
            return
        for member in writing:
            member.progress.written = sum(parquet_rows(p) for p in member.embedded_files)

    # -- commit: one manifest version per collection ------------------------------------------------

    def _commit(self, group: _Group) -> None:
        from embedfleet.frames.io import copy_file

        writing = group.active()
        if not writing or group.diff is None:
            return
        self._set_stage("committing", writing)
        outcomes = {m.spec.job_id: self._result(m, "succeeded").to_dict() for m in writing}
        write_json_atomic(outcomes, group.dir.root / OUTCOMES)
        version = group.manifest.new_version(group.id)
        version.mkdir(parents=True, exist_ok=True)
        written_paths = [p for m in writing for p in m.embed_inputs]
        # A job diffed but not written (over its quota, cancelled): its new ids are in the
        # diff's manifest, and must not be in the one committed.
        excluded = bool(group.diffed - {m.spec.job_id for m in writing})
        old = group.manifest.files()
        if group.diff.manifest is not None and not excluded:
            for i, path in enumerate(group.diff.manifest):  # the diff wrote it: the old ids and every job's new ones
                copy_file(path, version / f"part-{i:05d}.parquet")
        else:
            # The old ids, and the new ones of the jobs that are written: one task.
            for i, path in enumerate(old):
                copy_file(path, version / f"part-{i:05d}.parquet")
            if written_paths:
                self.follower.result_of(self.client.submit(
                    stages.manifest_stage, written_paths, out_path=str(version / f"part-{len(old):05d}.parquet"),
                    key=f"manifest-{group.id}", priority=self.follower.priority, pure=False))
        group.manifest.commit(version)
        write_json_atomic({"version": version.name}, group.dir.committed)

        def record(member: BatchMember) -> None:
            outcome = outcomes[member.spec.job_id]
            write_json_atomic(outcome, member.job_dir.result)
            write_json_atomic({"version": version.name, "batch": group.id}, member.job_dir.committed)
            member.progress.stage = "done"
            member.result = _result_from(outcome)
            member.report()

        _each(writing, record)


def read_chunk_many(items: list[tuple[Any, Any, str, str]], **chunk_options: Any) -> list[Any]:
    """:func:`~embedfleet.tasks.stages.read_chunk_stage` for ``(source, partition, out_path,
    on_error)`` of several jobs in one task: each one's stats, or the error it raised (one job's
    failure, such as a document it must not skip, is not the batch's)."""
    out: list[Any] = []
    for source, descriptor, out_path, on_error in items:
        try:
            out.append(stages.read_chunk_stage(source, descriptor, out_path=out_path, on_error=on_error,
                                               **chunk_options))
        except EmbedfleetError as exc:
            out.append(EmbedfleetError(str(exc)))  # the message is what the job's record keeps
        except (OSError, ValueError) as exc:
            out.append(EmbedfleetError(f"{type(exc).__name__}: {exc}"))
    return out


def _pack(pending: list[tuple[int, tuple[str, int, int, str]]], *, most: int, tasks: int) -> list[list]:
    """Embedding tasks for ``pending`` slices: consecutive slices, up to ``most`` rows a task,
    and at least ``tasks`` tasks (one per embedding worker) where there are rows enough."""
    rows = [s[2] - s[1] for _, s in pending]
    total = sum(rows)
    target = max(MIN_ROWS_PER_SLICE // 4, min(most, -(-total // max(1, tasks))))
    groups: list[list] = [[]]
    size = 0
    for item, n in zip(pending, rows):
        if groups[-1] and size + n > target:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return groups


#: Threads writing the members' small files at once: each write is a fsync'd rename, and a batch
#: of 64 jobs writes a few hundred of them.
FILE_THREADS = 8


def _each(members: list[BatchMember], fn: Callable[[BatchMember], None]) -> None:
    """``fn`` for every member, on a few threads: per-member files are independent."""
    if len(members) <= 1:
        for member in members:
            fn(member)
        return
    with concurrent.futures.ThreadPoolExecutor(min(FILE_THREADS, len(members)),
                                               thread_name_prefix="embedfleet-batch-files") as pool:
        for future in [pool.submit(fn, m) for m in members]:
            future.result()


def _common_folder(paths: list[str]) -> str | None:
    import os

    if not paths:
        return None
    try:
        common = os.path.commonpath([os.path.abspath(p) for p in paths])
    except ValueError:
        return None
    return common


def _result_from(raw: dict) -> JobResult:
    raw = dict(raw)
    raw["skipped_documents"] = [SkippedDocument(**s) for s in raw.get("skipped_documents", [])]
    return JobResult(**raw)
