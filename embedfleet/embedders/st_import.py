"""``sentence_transformers``, imported without the scikit-learn it imports eagerly and never uses to embed.

sentence-transformers 6 imports ``sklearn.metrics.pairwise_distances`` as its package is
imported (``sentence_transformers.util.similarity``; only the Manhattan similarity of sparse
tensors calls it), and scikit-learn brings scipy.stats and pandas with it: 1.1 s of the 4.8-5.3 s
``import distributed, torch, transformers, sentence_transformers`` on the 2-core test machine,
paid by every new cluster's forkserver before its first worker can load the model. Imported
through this module, that one name is a stand-in that imports scikit-learn the first time it is
called. Nothing embedfleet runs calls it, so a worker never imports scikit-learn.

The stand-in module is in ``sys.modules`` only while sentence-transformers is imported, and
only when ``sklearn.metrics`` was not imported already: any other importer of
``sklearn.metrics`` gets the real module.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["SentenceTransformer", "DEFERRED"]

#: The module sentence-transformers imports eagerly that embedding never calls into.
DEFERRED = "sklearn.metrics"


class _CalledLater(types.ModuleType):
    """A module whose every public name is a function that imports the real module when called."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        module = self.__name__

        def call(*args, **kwargs):
            return getattr(importlib.import_module(module), attr)(*args, **kwargs)

        call.__name__ = call.__qualname__ = attr
        return call


@contextmanager
def _deferred(name: str) -> Iterator[None]:
    if name in sys.modules:
        yield
        return
    stand_in = _CalledLater(name)
    sys.modules[name] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]


def _import_sentence_transformers() -> types.ModuleType:
    if "sentence_transformers" not in sys.modules:
        with _deferred(DEFERRED):
            import sentence_transformers  # noqa: F401
    return sys.modules["sentence_transformers"]


SentenceTransformer = _import_sentence_transformers().SentenceTransformer
