"""What a source is: a frozen, picklable description built on the client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["SourceSpec", "SourceKind"]

SourceKind = Literal["files", "jsonl", "csv", "parquet", "builtin"]


@dataclass(frozen=True)
class SourceSpec:
    kind: SourceKind
    location: str  # real path (resolved when the spec was built), or the built-in dataset's name
    text_column: str | None = None
    id_column: str | None = None
    extensions: tuple[str, ...] = (".txt", ".md", ".rst", ".html", ".htm")
    max_document_bytes: int = 10 * 2**20
    partition_bytes: int = 16 * 2**20
    max_metadata_bytes: int = 64 * 2**10
    # Real paths every file read must lie under, checked where it is opened; empty: anywhere.
    allowed_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A spec read back from a stored job's JSON holds a list: the spec must stay hashable.
        object.__setattr__(self, "allowed_roots", tuple(self.allowed_roots))

    @property
    def display(self) -> str:
        return self.location if self.kind != "builtin" else f"builtin:{self.location}"
