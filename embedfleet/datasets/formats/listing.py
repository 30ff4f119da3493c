"""What a source folder holds: its files by relative path, and what could not be examined.

The second half matters as much as the first (see :mod:`embedfleet.datasets.readers`): a
document left out of a listing counts as gone, and a sync deletes its vectors.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

from embedfleet.errors import SourceError

__all__ = ["iter_files", "list_files", "is_unlisted", "suffix_of", "is_data_sidecar"]


def suffix_of(rel: str) -> str:
    return os.path.splitext(rel)[1].lower()


def is_data_sidecar(rel: str) -> bool:
    # Spark/Hive/pyarrow datasets carry _SUCCESS, _metadata, _common_metadata beside their
    # .parquet files; they do not make a Parquet folder a folder of text files.
    return rel.rsplit("/", 1)[-1].startswith("_")


def is_unlisted(rel: str) -> bool:
    """Whether ``rel`` stands for a folder that could not be listed (``"sub/"``)."""
    return rel.endswith("/")


def iter_files(root: Path) -> Iterator[tuple[str, int]]:
    """(relative POSIX path, size) of the files under ``root``, in no particular order.

    Hidden entries (``.git``, ``.DS_Store``) are skipped and symlinked folders are not followed
    (no cycles). What exists but cannot be examined is listed with size 0 so that reading it
    reports why: a folder that cannot be listed as ``"<path>/"``, a symlink that loops or
    dangles, a file that cannot be stat'ed. Symlinked files are listed wherever they point: the
    reader checks where the file it opens really is.
    """
    try:
        with os.scandir(root) as it:
            top = list(it)
    except OSError as exc:
        raise SourceError(f"cannot list the source folder {root}: {exc.strerror or exc}") from exc
    stack: list[tuple[str, list[os.DirEntry]]] = [("", top)]
    while stack:
        rel, entries = stack.pop()
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except FileNotFoundError:  # removed while we were listing
                continue
            except OSError:  # its folder can be read but not searched
                yield child, 0
                continue
            if is_dir:
                try:
                    with os.scandir(entry.path) as it:
                        stack.append((child, list(it)))
                except (FileNotFoundError, NotADirectoryError):  # removed or replaced meanwhile
                    continue
                except OSError:
                    yield child + "/", 0
                continue
            try:
                info = entry.stat()
            except FileNotFoundError:
                if entry.is_symlink():  # dangling
                    yield child, 0
                continue
            except OSError:  # a symlink loop, or a file in a folder that cannot be searched
                yield child, 0
                continue
            if stat.S_ISREG(info.st_mode):
                yield child, info.st_size


def list_files(root: Path) -> list[tuple[str, int]]:
    """:func:`iter_files` sorted by relative path: the order every plan lists files in."""
    return sorted(iter_files(root))
