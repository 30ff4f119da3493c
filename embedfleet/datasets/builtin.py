"""Built-in datasets: small corpora that ship with Python, for demos, tests and benchmarks.

A dataset is a name in a registry and a loader returning ``{key: text}``. Documents get the id
``<name>/<key>`` and the metadata ``{<key_field>: key}``. Loaders run on the driver (to plan:
keys and sizes) and on workers (to read), so they must be cheap and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from embedfleet.errors import SourceError

__all__ = ["BuiltinDataset", "register_builtin", "get_builtin", "known_builtins"]


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    load: Callable[[], Mapping[str, str]]
    key_field: str = "key"

    def doc_id(self, key: str) -> str:
        return f"{self.name}/{key}"


def _python_docs() -> Mapping[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data from their Python
        raise SourceError(f"built-in dataset python-docs needs the standard library's pydoc_data ({exc})") from exc
    return topics


_REGISTRY: dict[str, BuiltinDataset] = {}


def register_builtin(dataset: BuiltinDataset, *, replace: bool = False) -> None:
    """Add a dataset to the registry (refuses to shadow an existing name unless ``replace``)."""
    if dataset.name in _REGISTRY and not replace:
        raise SourceError(f"built-in dataset {dataset.name!r} is already registered")
    _REGISTRY[dataset.name] = dataset


def get_builtin(name: str) -> BuiltinDataset:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SourceError(
            f"unknown built-in dataset {name!r}; known: {', '.join(known_builtins()) or '(none)'}"
        ) from None


def known_builtins() -> list[str]:
    return sorted(_REGISTRY)


register_builtin(
    BuiltinDataset(
        name="python-docs",
        description="the Python reference's help topics (pydoc_data.topics), one document per topic",
        load=_python_docs,
        key_field="topic",
    )
)
