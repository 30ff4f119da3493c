"""embedfleet: batch-indexing of text embeddings on Dask."""

from embedfleet import config  # noqa: F401  (loads the embedfleet.* defaults into dask.config first)
from embedfleet.errors import EmbedfleetError

__all__ = ["EmbedfleetError", "config"]
__version__ = "0.1.0"
