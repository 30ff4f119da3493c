"""Import an embedding backend's heavy modules in the background as a worker process starts.

``import sentence_transformers`` alone took ~4 s on this project's test machine (it pulls in
scikit-learn and scipy: :mod:`embedfleet.embedders.st_import` leaves them out), ~8 s with torch and transformers: on a fresh LocalCluster that was
the largest fixed cost of a small job, paid by the first embedding partition. A
:class:`WarmImports` worker plugin starts those imports in a daemon thread the moment the
worker starts, so they overlap with the cluster's start-up, the job's admission, reading and
chunking. A task that imports the same module meanwhile just waits for the import in progress
(Python's per-module import lock); nothing is loaded twice.

Only clusters embedfleet starts itself get the plugin (:func:`embedfleet.pipeline.cluster.connect`);
an existing cluster's workers are not touched.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time

from distributed.diagnostics.plugin import WorkerPlugin

from embedfleet.exiting import exit_without_final_collection

logger = logging.getLogger(__name__)

__all__ = ["WarmImports", "warm_imports"]


class WarmImports(WorkerPlugin):
    name = "embedfleet-warm-imports"

    def __init__(self, modules: tuple[str, ...]):
        self.modules = tuple(modules)

    def setup(self, worker) -> None:
        exit_without_final_collection()
        if self.modules:
            threading.Thread(target=self._import, name="embedfleet-warm-imports", daemon=True).start()

    def _import(self) -> None:
        started = time.perf_counter()
        for module in self.modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - a missing extra is reported by the embed task, clearly
                logger.debug("warm import of %s failed: %s", module, exc)
                return
        logger.debug("warm imports %s done in %.1fs", self.modules, time.perf_counter() - started)


def warm_imports(*, backend: str | None = None, model: str | None = None) -> WarmImports | None:
    """The plugin for the backend jobs will use (:func:`embedfleet.embedders.registry.job_backend_modules`);
    None when it has nothing to import early."""
    from embedfleet.embedders.registry import job_backend_modules

    modules = job_backend_modules(backend=backend, model=model)
    return WarmImports(modules) if modules else None
