"""embedfleet: batch-indexing of text embeddings on Dask.

>>> import embedfleet
>>> result = embedfleet.index("./docs", collection="kb")          # doctest: +SKIP
>>> embedfleet.search("how do I rotate a log file", collection="kb")  # doctest: +SKIP
"""

from embedfleet import config  # noqa: F401  (loads the embedfleet.* defaults into dask.config first)
from embedfleet.api import index, search
from embedfleet.errors import *  # noqa: F403 - every error embedfleet raises is public (errors.__all__)
from embedfleet.errors import __all__ as _errors
from embedfleet.options import IndexOptions
from embedfleet.pipeline.job import JobResult, JobSpec, Progress, SkippedDocument
from embedfleet.sinks.base import Hit

__all__ = [
    *_errors,
    "Hit",
    "IndexOptions",
    "JobResult",
    "JobService",
    "JobSpec",
    "Progress",
    "SkippedDocument",
    "config",
    "index",
    "search",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The job service pulls in SQLAlchemy; load it when a notebook asks for it, not on import.
    if name == "JobService":
        from embedfleet.schedulers import JobService

        return JobService
    raise AttributeError(f"module 'embedfleet' has no attribute {name!r}")
