"""What a source is: a frozen, picklable description built on the client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["SourceSpec", "SourceKind"]

SourceKind = Literal["files", "jsonl", "csv", "parquet", "builtin"]


@dataclass(frozen=True)
class SourceSpec:
    kind: SourceKind
    location: str  # absolute path, or the built-in dataset's name
    text_column: str | None = None
    id_column: str | None = None
    extensions: tuple[str, ...] = (".txt", ".md", ".rst", ".html", ".htm")
    max_document_bytes: int = 10 * 2**20
    partition_bytes: int = 16 * 2**20

    @property
    def display(self) -> str:
        return self.location if self.kind != "builtin" else f"builtin:{self.location}"
