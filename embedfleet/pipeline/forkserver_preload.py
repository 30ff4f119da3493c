"""The one module a LocalCluster's forkserver preloads: it imports the workers' modules with the
cyclic garbage collector paused, then freezes what they made (:func:`embedfleet.pipeline.cluster._start_forkserver`).

Importing distributed, torch, transformers and sentence-transformers makes ~440,000 container
objects, and Python's collector, triggered every 700 allocations, walks the growing heap again
and again while they are made: on the 2-core test machine those imports took 4.0-4.8 s with the
collector on and 2.9-3.3 s with it off (5 interleaved rounds), the whole difference on the
critical path of a new cluster, since no worker can fork before the forkserver has imported.
Python's documentation gives the recipe for a pre-fork server: collector off while the parent
builds its heap, ``gc.freeze()`` before forking, collector back on. The frozen objects sit in
the permanent generation, which no collection scans: forked workers do not walk the imported
modules either, and do not write to those pages (copy-on-write keeps them shared).

The forkserver learns which modules to import from :data:`MODULES_VARIABLE` in its
environment (and removes it); imported anywhere that variable is not set (a test, a tool
listing modules), this module does nothing.
"""

from __future__ import annotations

import gc
import importlib
import os
from collections.abc import Iterable

__all__ = ["MODULES_VARIABLE", "import_with_collector_paused"]

#: Comma-separated module names, set in the forkserver's environment only.
MODULES_VARIABLE = "EMBEDFLEET_FORKSERVER_MODULES"


def import_with_collector_paused(modules: Iterable[str]) -> None:
    """Import ``modules`` in turn without cyclic collections, then freeze the heap and resume them.

    An ImportError skips that module, as multiprocessing's own preload loop does: a worker that
    needs it fails with the reason when it imports it.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


# Popped: the workers forked from here inherit this environment, and nothing of theirs needs it.
_modules = os.environ.pop(MODULES_VARIABLE, "")
if _modules:
    import_with_collector_paused(name for name in _modules.split(",") if name)
