"""The table of source formats: ``SourceSpec.kind`` -> its :class:`Format` (plan, read, estimate).

A new format is one module defining its partition descriptor and a ``Format``, and one entry
here (plus its name in :data:`embedfleet.datasets.source.SourceKind`). Shared pieces live in
:mod:`.common` (the interface, opening files, rows, limits, JSON), :mod:`.listing` (walking a
folder) and :mod:`.tables` (what JSONL, CSV and Parquet have in common).
"""

from __future__ import annotations

from embedfleet.datasets.formats.builtin import BUILTIN
from embedfleet.datasets.formats.common import Format
from embedfleet.datasets.formats.csv import CSV
from embedfleet.datasets.formats.files import FILES
from embedfleet.datasets.formats.jsonl import JSONL
from embedfleet.datasets.formats.parquet import PARQUET

__all__ = ["Format", "FORMATS"]

FORMATS: dict[str, Format] = {"files": FILES, "jsonl": JSONL, "csv": CSV, "parquet": PARQUET, "builtin": BUILTIN}
