"""The live jobs dashboard (``embedfleet dashboard``): a Bokeh server page over the job database.

* :mod:`embedfleet.dashboard.data` — snapshots of the job database (jobs, usage vs quota,
  rates) and the Dask dashboard link a dispatcher records; no Bokeh import.
* :mod:`embedfleet.dashboard.app` — the Bokeh application and :class:`DashboardServer`.

Importing this package imports neither Bokeh nor Tornado::

    from embedfleet.dashboard import DashboardServer
    with DashboardServer(service, port=8790) as server:
        print(server.url)
"""

from __future__ import annotations

from typing import Any

__all__ = ["DashboardServer", "take_snapshot", "record_dask_dashboard"]


def __getattr__(name: str) -> Any:
    if name == "DashboardServer":
        from embedfleet.dashboard.app import DashboardServer

        return DashboardServer
    if name in ("take_snapshot", "record_dask_dashboard"):
        from embedfleet.dashboard import data

        return getattr(data, name)
    raise AttributeError(name)
