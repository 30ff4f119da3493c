"""``embedfleet serve``: the authenticated HTTP API over the job service, search and embeddings.

:func:`~embedfleet.server.app.create_app` builds the FastAPI app over a
:class:`~embedfleet.server.state.ServerState`; :func:`~embedfleet.server.main.serve` runs it on
uvicorn beside a dispatcher and a Dask cluster in one process.
"""

from embedfleet.server.app import create_app
from embedfleet.server.state import ServerState

__all__ = ["ServerState", "create_app"]
