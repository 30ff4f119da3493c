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


# Loaded when first asked for, not on import: the job service pulls in SQLAlchemy, and the job
# types the readers of every source format (pyarrow, httpx), which a search never needs.
_LAZY = {
    "JobService": "embedfleet.schedulers",
    "JobResult": "embedfleet.pipeline.job",
    "JobSpec": "embedfleet.pipeline.job",
    "Progress": "embedfleet.pipeline.job",
    "SkippedDocument": "embedfleet.pipeline.job",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'embedfleet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
