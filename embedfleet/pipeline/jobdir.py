"""A job's directory, ``<data-dir>/jobs/<job-id>/``: every file and folder in it, named once.

Each stage writes its outputs here atomically (:mod:`embedfleet.frames.io`), and the markers
record decisions a resumed run must repeat exactly (the plan's fingerprint, the manifest the
diff ran against, the embedding slice size, the commit). What exists here is what is done.

The data dir may be an object-store URL: every name here is then a
:class:`~embedfleet.frames.storage.Remote`, which answers the same calls.
"""

from __future__ import annotations

from pathlib import Path

from embedfleet.frames.storage import Remote, location

__all__ = ["JobDir"]


class JobDir:
    def __init__(self, path: str | Path | Remote):
        self.root = location(path)
        self.chunks = self.root / "chunks"  # part-<i>.parquet (+ .json stats): one per read partition
        self.embeddings = self.root / "embeddings"  # e-<input>-<slice>.parquet (+ .json stats)
        self.written = self.root / "written"  # <embeddings file>.json: that file is in the store
        self.deleted = self.root / "deleted"  # <stale ids file>.json: those ids are gone from the store
        self.diff = self.root / "diff"  # the diff's outputs (tasks/diff.py); complete once diff_done exists
        self.spec = self.root / "spec.json"  # the job's spec, without credentials
        self.plan = self.root / "plan.json"  # the source plan's fingerprint
        self.diff_base = self.root / "diff.json"  # the manifest version the diff compares with
        self.embed_plan = self.root / "embed-plan.json"  # chunks per embedding task
        self.committed = self.root / "committed.json"  # the manifest version the job committed
        self.result = self.root / "result.json"  # a succeeded job's result
        self.quality = self.root / "quality.json"  # a quantized job's report (tasks/quality.py)
        self.visible = self.root / "visible.json"  # the token every worker reads back at start (pipeline/visibility.py)

    @property
    def diff_done(self) -> Path | Remote:
        return self.diff / "_SUCCESS.json"

    @property
    def job_id(self) -> str:
        return self.root.name

    def make(self) -> None:
        for folder in (self.chunks, self.embeddings, self.written, self.deleted):
            folder.mkdir(parents=True, exist_ok=True)

    def chunk_file(self, partition: int) -> Path | Remote:
        return self.chunks / f"part-{partition:05d}.parquet"

    def embedding_file(self, input_path: str | Path | Remote, slice_index: int) -> Path | Remote:
        return self.embeddings / f"e-{location(input_path).stem}-{slice_index:04d}.parquet"

    def embedding_sidecars(self) -> list[Path | Remote]:
        """The stats of every embedding partition finished so far, over all runs of the job."""
        return sorted(self.embeddings.glob("*.parquet.json"))

    def written_marker(self, embeddings_file: str | Path | Remote) -> Path | Remote:
        return self.written / f"{location(embeddings_file).name}.json"

    def deleted_marker(self, stale_file: str | Path | Remote) -> Path | Remote:
        return self.deleted / f"{location(stale_file).name}.json"
