"""Incremental indexing (DESIGN §6): what a job embeds and deletes, and the manifest it commits.

The comparison itself is plain pyarrow tasks over buckets (:mod:`embedfleet.tasks.diff`); this
module submits them, applies the decisions that need the whole picture (duplicate doc ids, a
mass deletion), and records the outcome in the job dir so a resumed job repeats it exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

from embedfleet.errors import DuplicateDocumentError, JobError, MassDeleteRefused
from embedfleet.frames.io import (
    copy_file,
    parquet_rows,
    read_json,
    remove_tree,
    write_json_atomic,
)
from embedfleet.frames.storage import Remote, location
from embedfleet.pipeline.embedding import TASK_RETRIES
from embedfleet.pipeline.follow import Follower
from embedfleet.pipeline.job import JobSpec
from embedfleet.pipeline.jobdir import JobDir
from embedfleet.pipeline.manifest import Manifest
from embedfleet.tasks import stages

__all__ = ["Diff", "check_manifest_unchanged", "commit_manifest", "diff"]


def check_manifest_unchanged(manifest: Manifest, job_dir: JobDir) -> None:
    """A resumed job must diff against the manifest its first run diffed against.

    Its embedding partitions are slices of that diff. Had another job committed to the
    collection in between, a new diff would give other slices under the same partition names:
    the resume would take partitions embedded from other chunks as done (chunks never embedded,
    yet in the manifest) and delete chunks the other job kept. Refused, like a changed source.
    A version this job committed itself (killed before recording it) is its own: allowed.
    """
    current = manifest.current
    name = current.name if current is not None else None
    recorded = job_dir.diff_base
    if not recorded.exists():
        write_json_atomic({"manifest": name}, recorded)
        return
    own = name is not None and (name == f"v-{job_dir.job_id}" or name.startswith(f"v-{job_dir.job_id}-"))
    if name != read_json(recorded)["manifest"] and not own:
        raise JobError(
            f"the collection changed since job {job_dir.job_id} started (another job committed to it), so it cannot "
            "be resumed consistently; submit a new job (it embeds only what changed)"
        )


@dataclasses.dataclass(frozen=True)
class Diff:
    embed_inputs: list[str]  # chunk files, or the part of one the collection lacks
    stale: list[str]  # files of chunk ids to delete from the store
    manifest: list[str] | None  # the collection's next manifest; None: the job's chunk ids
    # The index in the diff's chunk paths of each embed input (a diff recorded before this
    # field existed has every input in order: the default).
    embed_origins: list[int] | None = None


def diff(spec: JobSpec, follower: Follower, manifest: Manifest, chunk_paths: list[str], job_dir: JobDir, *,
         protected: list[str], store: Callable[[], bool], write_kwargs: dict,
         groups: list[int] | None = None) -> Diff:
    """What to embed, what to delete and the next manifest, for the job's mode (tasks/diff.py).

    Mode full compares with the ids the store holds, not the manifest, so it also repairs a
    lost or damaged manifest. Documents that could not be read now (``protected``) keep their
    chunks in the store and the manifest. Raises before anything is written or deleted when
    the source repeats a doc_id, or when the job would delete most of the collection.
    ``groups`` (coalesced jobs: the job of each chunk path) limits the doc_id check to each job.
    """
    from embedfleet.tasks import diff as diffing

    out, done = job_dir.diff, job_dir.diff_done
    if spec.mode != "full":
        check_manifest_unchanged(manifest, job_dir)
    if done.exists():
        return Diff(**read_json(done))
    if out.exists():
        remove_tree(out)  # what an interrupted diff left; its inputs may have changed since
    check_duplicates = spec.source.id_column is not None
    old = _store_ids(follower, out / "store", single_writer=store(), write_kwargs=write_kwargs) \
        if spec.mode == "full" else manifest.files()
    if not old and not check_duplicates:
        return Diff(embed_inputs=chunk_paths, stale=[], manifest=None, embed_origins=list(range(len(chunk_paths))))

    client, job_id = follower.client, spec.job_id
    task = dict(priority=follower.priority, retries=TASK_RETRIES, pure=False)
    rows = {path: parquet_rows(path) for path in [*old, *chunk_paths]}
    buckets = diffing.bucket_count(max(sum(rows[p] for p in old), sum(rows[p] for p in chunk_paths)))
    new = list(enumerate(chunk_paths))
    if buckets == 1:
        old_in, new_in = {0: old}, {0: new}
    else:
        old_in, new_in = {}, {}
        splits = {
            client.submit(diffing.split_stage, path, columns=columns, out_dir=str(out / side), tag=f"{n:05d}",
                          buckets=buckets, key=f"diff-split-{side}-{job_id}-{n}", **task): (side, n)
            for side, columns, paths in (("old", diffing.IDS.names, enumerate(old)), ("new", diffing.NEW_COLUMNS, new))
            for n, path in paths
        }

        def split(key: tuple[str, int], written: dict[int, str]) -> None:
            side, n = key
            for bucket, path in written.items():
                if side == "old":
                    old_in.setdefault(bucket, []).append(path)
                else:
                    new_in.setdefault(bucket, []).append((n, path))

        follower.follow(splits, split)
        # Each bucket's files in origin order, so a bucket's result does not depend on timing.
        old_in = {b: sorted(paths) for b, paths in old_in.items()}
        new_in = {b: sorted(pairs) for b, pairs in new_in.items()}

    counts: dict[int, dict] = {}
    follower.follow({
        client.submit(diffing.diff_bucket_stage, old_in.get(b, []), new_in.get(b, []), mode=spec.mode,
                      protected=tuple(protected), check_duplicates=check_duplicates, out_dir=str(out), bucket=b,
                      groups=tuple(groups) if groups is not None else None, key=f"diff-{job_id}-{b}", **task): b
        for b in range(buckets)
    }, counts.__setitem__)
    duplicates = sorted(d for c in counts.values() for d in c["duplicates"])
    if duplicates:
        raise DuplicateDocumentError(duplicates)
    if spec.mode != "append":
        _check_mass_delete(spec, counts.values(), readable=follower.progress.documents)

    embed_inputs: dict[int, str] = {}
    selects = {}
    for n, path in new:
        fresh = {b: c["fresh"][n] for b, c in counts.items() if n in c["fresh"]}
        if spec.mode == "full" or sum(fresh.values()) == rows[path]:
            embed_inputs[n] = path
        elif fresh:
            # One folder per origin: coalesced jobs' chunk files share names (part-00000), and an
            # input's name is what its embedding partitions are named after.
            embed_inputs[n] = str(out / "todo" / f"{n:05d}" / location(path).name)
            ids = [str(out / "fresh" / f"{n:05d}-b{b:04d}.parquet") for b in sorted(fresh)]
            selects[client.submit(diffing.select_stage, path, ids, out_path=embed_inputs[n],
                                  key=f"diff-select-{job_id}-{n}", **task)] = n
    follower.follow(selects, lambda *_: None)
    result = Diff(
        embed_inputs=[embed_inputs[n] for n in sorted(embed_inputs)],
        embed_origins=sorted(embed_inputs),
        stale=sorted(str(p) for p in (out / "stale").glob("*.parquet")),
        manifest=sorted(str(p) for p in (out / "manifest").glob("*.parquet")),
    )
    write_json_atomic(dataclasses.asdict(result), done)
    return result


def _store_ids(follower: Follower, out_dir: Path | Remote, *, single_writer: bool, write_kwargs: dict) -> list[str]:
    """The files of every id the job's collection holds (:func:`stages.store_ids_stage`)."""
    from embedfleet.tasks.diff import BUCKET_ROWS

    kwargs = dict(write_kwargs, out_dir=str(out_dir), rows_per_file=BUCKET_ROWS)
    if single_writer:
        return stages.store_ids_stage(**kwargs)  # an embedded store is read by its one process
    return follower.result_of(follower.client.submit(stages.store_ids_stage, **kwargs, priority=follower.priority,
                                                     pure=False))


def _check_mass_delete(spec: JobSpec, counts: Iterable[dict], *, readable: int) -> None:
    """Stop a job that would delete most of its collection, or delete from an empty source.

    Counted in documents, not chunks: a changed document replaces its chunks and loses
    nothing. An unmounted share or a wrong path looks like a source whose documents were all
    removed; the user confirms with ``--allow-mass-delete`` if they were.
    """
    counts = list(counts)
    before = sum(c["documents_before"] for c in counts)
    gone = sum(c["documents_gone"] for c in counts)
    if not gone or spec.allow_mass_delete:
        return
    examples = ", ".join(sorted(e for c in counts for e in c["gone_examples"])[:3])
    confirm = "nothing was deleted; run again with --allow-mass-delete if they are really gone"
    if readable == 0:
        raise MassDeleteRefused(
            f"the source has no readable document, so this {spec.mode} run would delete all {gone} documents of "
            f"collection {spec.collection!r} (an unmounted share, or the wrong path?); {confirm}"
        )
    if gone > spec.max_delete_fraction * before:
        raise MassDeleteRefused(
            f"this {spec.mode} run would delete {gone} of the {before} documents of collection {spec.collection!r} "
            f"({gone / before:.0%}; e.g. {examples}), more than embedfleet.index.max-delete-fraction "
            f"({spec.max_delete_fraction:.0%}) allows; {confirm}"
        )


def commit_manifest(spec: JobSpec, follower: Follower, manifest: Manifest, chunk_paths: list[str],
                    next_manifest: list[str] | None) -> None:
    marker = JobDir(spec.job_dir).committed
    if marker.exists():
        return
    version = manifest.new_version(spec.job_id)
    version.mkdir(parents=True, exist_ok=True)
    if next_manifest is not None:
        for i, path in enumerate(next_manifest):  # the diff wrote it
            copy_file(path, version / f"part-{i:05d}.parquet")
    elif chunk_paths:
        # The new manifest is this job's chunk ids: one small task per chunk file.
        futures = {
            follower.client.submit(stages.manifest_stage, path, out_path=str(version / f"part-{i:05d}.parquet"),
                                   key=f"manifest-{spec.job_id}-{i}", priority=follower.priority, pure=False): i
            for i, path in enumerate(chunk_paths)
        }
        follower.follow(futures, lambda *_: None)
    manifest.commit(version)
    write_json_atomic({"version": version.name}, marker)
