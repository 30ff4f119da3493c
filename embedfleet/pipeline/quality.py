"""A quantized job's quality report: measured beside its embedding, stored in its collection.

int8 is opt-in because it moves the vectors; how far is measured on this job's own chunks
(:mod:`embedfleet.tasks.quality`) by one task on an embedding worker, submitted when the
embed stage starts, so it runs between the job's embedding tasks instead of after them. Once
the job's vectors are written the report goes into the collection's metadata (every store:
:meth:`embedfleet.sinks.base.Sink.record_quality`, replacing an older one) and into the job's
result, which ``embedfleet index`` prints.

Jobs that are not quantized, or embed nothing, measure nothing. Nor does a run that embeds
fewer chunks than the sample would hold, into a collection that has a report of its family
already (a small incremental sync): measuring costs embedding the sample twice, ~10 s of one
worker on this project's loaded 2-core machine, more than such a run's own embedding. Its
result carries the stored report, whose ``job_id`` names the job that measured it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from embedfleet.pipeline.embedding import TASK_RETRIES
from embedfleet.pipeline.follow import Follower
from embedfleet.pipeline.job import JobResult, JobSpec
from embedfleet.pipeline.jobdir import JobDir
from embedfleet.pipeline.placement import Placement
from embedfleet.sinks.base import CollectionInfo, QualityReport
from embedfleet.sinks.registry import open_sink
from embedfleet.tasks import stages
from embedfleet.tasks.quality import SAMPLE, quality_stage

logger = logging.getLogger(__name__)

__all__ = ["QualityCheck", "start_quality_check"]


@dataclass
class QualityCheck:
    future: Any  # None: not measured, ``stored`` stands
    family: str
    stored: QualityReport | None = None

    def finish(self, spec: JobSpec, follower: Follower, collection: str, result: JobResult) -> QualityReport:
        """Wait for the measurement, store it in the collection's metadata and the job's result."""
        if self.future is None:
            result.quality = self.stored.to_dict()
            return self.stored
        raw = follower.result_of(self.future)
        report = QualityReport(family=self.family, samples=int(raw["samples"]), mean_cosine=float(raw["mean_cosine"]),
                               min_cosine=float(raw["min_cosine"]), top10_overlap=float(raw["top10_overlap"]),
                               job_id=spec.job_id)

        def record() -> None:
            with open_sink(spec.sink) as sink:
                sink.record_quality(collection, report)

        stages.with_retries(record, retry=spec.retry, what=f"recording the quality report in {collection}")
        result.quality = report.to_dict()
        logger.info("job %s: %s", spec.job_id, report.describe())
        return report


def start_quality_check(spec: JobSpec, follower: Follower, placement: Placement, chunk_paths: list[str],
                        info: CollectionInfo, collection: str, *, chunks: int, embeds: int) -> QualityCheck | None:
    """Submit the measurement of a quantized job that embeds anything; None for any other job."""
    if not spec.embedder.quantize or not embeds or not chunk_paths:
        return None
    if embeds < min(SAMPLE, chunks):
        stored = _stored_report(spec, collection)
        if stored is not None and stored.family == info.family:
            return QualityCheck(future=None, family=info.family, stored=stored)
    future = follower.client.submit(
        quality_stage, chunk_paths, embedder=placement.embedder, heading_context=spec.chunk.heading_context,
        out_path=str(JobDir(spec.job_dir).quality), key=f"quality-{spec.job_id}", priority=follower.priority,
        retries=TASK_RETRIES, pure=False, resources=placement.resources,
    )
    return QualityCheck(future=future, family=info.family)


def _stored_report(spec: JobSpec, collection: str) -> QualityReport | None:
    with open_sink(spec.sink) as sink:
        return sink.open(collection).info.quality
