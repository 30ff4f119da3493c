"""Knowing, before any cluster or model, that a sync run would change nothing.

A committed sync or full run records next to its manifest version (``source.json``) a
fingerprint of what it read: the job's spec (minus its id) and the source's state as the
planners see it — for a local source every file's relative path, size, mtime and ctime (a
same-size edit and a chmod both show), for an object store the plan, whose entries carry each
object's ETag, for a built-in dataset its plan and embedfleet's version. A later sync run
whose fingerprint is the same would read the same documents, make the same chunk ids, find
them all in the manifest and embed, write and delete nothing: it returns that result without
starting a cluster or loading the model.

Not recorded (so the next run does the full work): a run that skipped unreadable documents
(they may be readable now), and an append (its collection is more than its source). The
record lives inside the manifest version, so a commit by any other job, which makes a new
version, retires it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedfleet.frames.io import read_json, write_json_atomic
from embedfleet.pipeline.job import JobResult, JobSpec, Progress
from embedfleet.pipeline.jobdir import JobDir
from embedfleet.pipeline.manifest import Manifest
from embedfleet.sinks.naming import physical_name
from embedfleet.sinks.writer_lock import exclusive_writer

logger = logging.getLogger(__name__)

__all__ = ["fingerprint", "record", "recorded_result", "run_unchanged"]

_UNSET = object()

RECORD = "source.json"
# Bump when what the fingerprint covers changes: older records then never match.
FORMAT = 1


def _spec_part(spec: JobSpec) -> dict[str, Any]:
    raw = json.loads(spec.to_json())
    raw.pop("job_id", None)
    raw.pop("retry", None)  # how failures are retried changes no chunk
    raw.pop("allow_mixed", None)  # a permission: the same spec and source still embed nothing
    embedder = raw.get("embedder", {})
    for runtime in ("batch_tokens", "threads", "cache_max_models", "cache_max_bytes"):
        embedder.pop(runtime, None)
    return raw


def _local_state(location: str) -> list:
    from embedfleet.datasets.formats.listing import list_files

    root = Path(location)
    if not root.is_dir():
        st = root.stat()
        return [[root.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns]]
    out = []
    for rel, size in list_files(root):
        try:
            st = (root / rel).stat()
        except OSError:
            out.append([rel, size, None, None])  # unreadable now: the listing says so again next time
            continue
        out.append([rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def fingerprint(spec: JobSpec) -> str | None:
    """The fingerprint of ``spec`` and its source as they are now; None where it cannot be known."""
    from embedfleet.frames.storage import is_url

    source = spec.source
    try:
        if source.kind == "builtin":
            from importlib.metadata import version

            from embedfleet.datasets import plan_partitions

            # The dataset ships with the package: a new version may bring other documents.
            state: Any = [version("embedfleet"), repr(plan_partitions(source))]
        elif is_url(source.location):
            from embedfleet.datasets import plan_partitions

            state = repr(plan_partitions(source))
        else:
            state = _local_state(source.location)
    except Exception:  # noqa: BLE001 - a source the planner refuses, or gone: the real run says why
        return None
    body = json.dumps([FORMAT, _spec_part(spec), state], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _manifest(spec: JobSpec) -> Manifest:
    return Manifest(spec.data_dir, spec.sink.uri, physical_name(spec.user, spec.collection))


def record(spec: JobSpec, result: JobResult, fingerprint_: str | None) -> None:
    """After a commit: what this run read, for the next run to compare with."""
    if fingerprint_ is None or spec.mode == "append" or result.skipped_documents or result.status != "succeeded":
        return
    current = _manifest(spec).current_if_readable()
    if current is None:
        return
    write_json_atomic({
        "fingerprint": fingerprint_,
        "documents": result.documents,
        "chunks": result.chunks,
    }, current / RECORD)


def recorded_result(spec: JobSpec, fingerprint_: str | None) -> JobResult | None:
    """The result a sync run of ``spec`` would have, when its source is known unchanged; else None."""
    if fingerprint_ is None or spec.mode != "sync":
        return None
    current = _manifest(spec).current_if_readable()
    if current is None:
        return None
    try:
        recorded = read_json(current / RECORD)
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("fingerprint") != fingerprint_:
        return None
    chunks = int(recorded["chunks"])
    return JobResult(
        job_id=spec.job_id, status="succeeded", user=spec.user, sink=spec.sink.uri, collection=spec.collection,
        documents=int(recorded["documents"]), chunks=chunks, embedded=0, skipped=chunks, deleted=0,
    )


def run_unchanged(spec: JobSpec, *, source_fingerprint: object = _UNSET,
                  on_progress: Callable[[Progress], None] | None = None,
                  before_embed: Callable[[int], None] | None = None, **_ignored: Any) -> JobResult | None:
    """Finish ``spec`` now if its source is known unchanged, returning its result; else None.

    ``source_fingerprint``: one :func:`fingerprint` took already. Needs no cluster, and imports none of the pipeline: ``embedfleet index`` calls it before
    starting one. Takes :func:`~embedfleet.pipeline.run.run_job`'s keyword arguments and
    ignores those about the cluster.
    """
    started = time.perf_counter()
    job_dir = JobDir(spec.job_dir)
    if job_dir.spec.exists():
        # A resumed job: its own outputs and its recorded diff base decide (the pipeline's
        # checks refuse a resume across another job's commit), not another job's record.
        return None
    taken = fingerprint(spec) if source_fingerprint is _UNSET else source_fingerprint
    with exclusive_writer(spec.sink.uri):
        known = recorded_result(spec, taken)  # type: ignore[arg-type]
    if known is None:
        return None
    if before_embed is not None:
        before_embed(0)  # a quota refuses as it would after chunking
    if on_progress is not None:
        on_progress(Progress(stage="done", documents=known.documents, chunks=known.chunks, skipped=known.skipped,
                             chunks_to_embed=0))
    known.seconds = time.perf_counter() - started
    job_dir.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json.loads(spec.to_json()), job_dir.spec)
    write_json_atomic(known.to_dict(), job_dir.result)
    logger.info("job %s: source unchanged since the last commit; nothing to do", spec.job_id)
    return known

