"""Import an embedding backend's heavy modules in the background as a worker process starts.

``import sentence_transformers`` alone takes ~4 s on this project's test machine (it pulls in
scikit-learn and scipy), ~8 s with torch and transformers: on a fresh LocalCluster that was
the largest fixed cost of a small job, paid by the first embedding partition. A
:class:`WarmImports` worker plugin starts those imports in a daemon thread the moment the
worker starts, so they overlap with the cluster's start-up, the job's admission, reading and
chunking. A task that imports the same module meanwhile just waits for the import in progress
(Python's per-module import lock); nothing is loaded twice.

Only clusters embedfleet starts itself get the plugin (:func:`embedfleet.pipeline.cluster.connect`);
an existing cluster's workers are not touched.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import threading
import time

from distributed.diagnostics.plugin import WorkerPlugin

logger = logging.getLogger(__name__)

__all__ = ["WarmImports", "warm_imports", "backend_modules", "BACKEND_MODULES", "exit_without_final_collection"]

#: What each built-in backend imports when it loads a model. Any other backend (registered,
#: configured in ``embedfleet.backends`` or an entry point) says so itself in a
#: ``warm_modules`` attribute of its factory; none means nothing to warm.
BACKEND_MODULES: dict[str, tuple[str, ...]] = {
    "sentence-transformers": ("torch", "transformers", "sentence_transformers"),
    "onnx": ("onnxruntime", "tokenizers"),
    "openvino": ("openvino", "sentence_transformers", "optimum.intel.openvino"),
    "openai": ("httpx",),
}


def backend_modules(backend: str) -> tuple[str, ...]:
    if backend in BACKEND_MODULES:
        return BACKEND_MODULES[backend]
    from embedfleet.embedders.registry import backend_factory

    return tuple(getattr(backend_factory(backend), "warm_modules", ()))


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
    """The plugin for the backend jobs will use: ``backend``, else ``embed.backend``, else ``model``'s.

    None when that backend has nothing heavy to import, or cannot be resolved (the job then
    fails with the proper error on its own).
    """
    from embedfleet import config

    try:
        backend = backend or config.get("embed.backend") or config.model_spec(model).backend
        modules = backend_modules(backend)
    except Exception:  # noqa: BLE001 - an unknown or broken backend is the job's error to report
        return None
    return WarmImports(modules) if modules else None


def exit_without_final_collection() -> None:
    """Skip the interpreter's last garbage collections when this process exits.

    With torch, transformers and sentence-transformers imported, Python's shutdown spent
    1.8-2.6 s in its final full collections over their millions of objects (measured on the
    2-core test machine); a Dask worker that took over 4 s to exit was killed by its nanny, so
    every cluster close waited 4 s. Freezing the heap at exit (atexit runs before those
    collections) moves every object to the permanent generation they skip: exit took 0.2 s.
    Nothing is lost that an exit would keep: memory goes back with the process, and objects
    the process still references are finalised as before, by reference counting.
    """
    if not getattr(exit_without_final_collection, "registered", False):
        atexit.register(gc.freeze)
        exit_without_final_collection.registered = True
