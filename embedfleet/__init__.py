"""embedfleet: batch-indexing of text embeddings on Dask.

>>> import embedfleet
>>> result = embedfleet.index("./docs", collection="kb")          # doctest: +SKIP
>>> embedfleet.search("how do I rotate a log file", collection="kb")  # doctest: +SKIP
"""

from embedfleet import config  # noqa: F401  (loads the embedfleet.* defaults into dask.config first)
from embedfleet.api import index, search
from embedfleet.errors import (
    CollectionMismatch,
    ConfigError,
    EmbedfleetError,
    JobNotFound,
    PermissionDenied,
    QuotaExceeded,
    SinkError,
)
from embedfleet.pipeline.job import JobResult, JobSpec, Progress

__all__ = [
    "CollectionMismatch",
    "ConfigError",
    "EmbedfleetError",
    "JobNotFound",
    "JobResult",
    "JobSpec",
    "PermissionDenied",
    "Progress",
    "QuotaExceeded",
    "SinkError",
    "config",
    "index",
    "search",
    "JobService",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The job service pulls in SQLAlchemy; load it when a notebook asks for it, not on import.
    if name == "JobService":
        from embedfleet.schedulers import JobService

        return JobService
    raise AttributeError(f"module 'embedfleet' has no attribute {name!r}")
