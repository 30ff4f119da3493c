"""Built-in dataset sources (:mod:`embedfleet.datasets.builtin`), read through its registry.

Partitioning
------------
The dataset's documents, sorted by key, in a few partitions.

Document ids
------------
``<name>/<key>``, with the metadata ``{<key_field>: key}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

from embedfleet.datasets.builtin import get_builtin
from embedfleet.datasets.formats.common import Estimator, Format, Rows, check_text, dumps
from embedfleet.datasets.source import SourceSpec

__all__ = ["BuiltinPart", "BUILTIN"]

# Built-in datasets are small; a few partitions still exercise the cluster.
_BUILTIN_PARTITIONS = 4


@dataclass(frozen=True)
class BuiltinPart:
    name: str
    keys: tuple[str, ...]
    bytes: int


def _plan(spec: SourceSpec) -> list[BuiltinPart]:
    dataset = get_builtin(spec.location)
    documents = dataset.load()
    keys = sorted(documents)
    sizes = {k: len(documents[k].encode("utf-8")) for k in keys}
    target = max(1, min(spec.partition_bytes, -(-sum(sizes.values()) // _BUILTIN_PARTITIONS)))
    parts: list[BuiltinPart] = []
    current: list[str] = []
    weight = 0
    for key in keys:
        if current and weight + sizes[key] > target:
            parts.append(BuiltinPart(name=dataset.name, keys=tuple(current), bytes=weight))
            current, weight = [], 0
        current.append(key)
        weight += sizes[key]
    if current or not parts:
        parts.append(BuiltinPart(name=dataset.name, keys=tuple(current), bytes=weight))
    return parts


def _read(spec: SourceSpec, part: BuiltinPart) -> pa.Table:
    dataset = get_builtin(part.name)
    documents = dataset.load()
    rows = Rows()
    for key in part.keys:
        doc_id = dataset.doc_id(key)
        meta = dumps({dataset.key_field: key})
        text = documents.get(key)
        if text is None:
            rows.fail(doc_id, f"{key!r} is not in this worker's copy of {dataset.name}", meta)
            continue
        problem = check_text(text, spec.max_document_bytes)
        if problem:
            rows.fail(doc_id, problem, meta)
        else:
            rows.ok(doc_id, text, meta)
    return rows.table()


def _estimate(spec: SourceSpec, parts: Sequence[BuiltinPart], chunks: Estimator) -> int:
    sizes: dict[str, dict[str, int]] = {}  # loaded once per dataset, however many parts
    total = 0
    for part in parts:
        if part.name not in sizes:
            sizes[part.name] = {k: len(v.encode("utf-8")) for k, v in get_builtin(part.name).load().items()}
        total += sum(chunks.document(sizes[part.name].get(k, 0)) for k in part.keys)
    return total


# Its location is the dataset's name, not a path.
BUILTIN = Format(partition=BuiltinPart, plan=_plan, read=_read, estimate=_estimate, on_disk=False)
