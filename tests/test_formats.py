"""The table of formats: every source kind has one entry, and each format's plan keeps its repr.

A job resumes only if ``sha256(repr(plan))`` matches what its first run recorded, so a plan's
repr is pinned here, character for character, for a source of each format.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedfleet.config import ChunkSpec
from embedfleet.datasets import BuiltinDataset, Partition, estimate_chunks, plan_partitions, read_partition, source_spec
from embedfleet.datasets import builtin as builtin_registry
from embedfleet.datasets.formats import FORMATS
from embedfleet.datasets.source import SourceKind
from embedfleet.errors import SourceError

CHUNKS = ChunkSpec(unit="tokens", size=20, overlap=4)


def write(path: Path, data: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data, encoding="utf-8")
    return path


def test_every_source_kind_has_one_format_and_every_partition_one_reader():
    assert set(FORMATS) == set(typing.get_args(SourceKind))
    partitions = [fmt.partition for fmt in FORMATS.values()]
    assert set(partitions) == set(typing.get_args(Partition)) and len(partitions) == len(set(partitions))


def test_files_plan_repr(tmp_path):
    write(tmp_path / "docs" / "a.txt", "alpha " * 50)
    write(tmp_path / "docs" / "sub" / "b.md", "# b\n\nbody")
    write(tmp_path / "docs" / "sub" / "c.rst", "c" * 5000)
    spec = source_spec(tmp_path / "docs", partition_bytes=8000)
    plan = plan_partitions(spec)
    assert repr(plan) == (
        "[FileGroup(files=(('a.txt', 300),)), FileGroup(files=(('sub/b.md', 9),)), "
        "FileGroup(files=(('sub/c.rst', 5000),))]"
    )
    assert estimate_chunks(spec, CHUNKS, plan=plan) == 5 + 1 + 78


def test_jsonl_plan_repr(tmp_path):
    path = write(tmp_path / "d.jsonl", "".join(f'{{"text": "record {i}"}}\n' for i in range(5)))
    spec = source_spec(path, partition_bytes=40)
    plan = plan_partitions(spec)
    assert repr(plan) == (
        "[ByteRange(path='d.jsonl', start=0, length=40), ByteRange(path='d.jsonl', start=40, length=40), "
        "ByteRange(path='d.jsonl', start=80, length=25)]"
    )
    assert [r["doc_id"] for p in plan for r in read_partition(spec, p).to_pylist()] == [f"d.jsonl:{i}" for i in range(1, 6)]
    assert estimate_chunks(spec, CHUNKS, plan=plan) == (1 + 1) + (1 + 1) + (1 + 1)
    assert repr(plan_partitions(source_spec(write(tmp_path / "e.jsonl", "")))) == "[ByteRange(path='e.jsonl', start=0, length=0)]"


def test_csv_plan_repr(tmp_path):
    path = write(tmp_path / "d.csv", "id,text\n1,one\n2,two\n")
    spec = source_spec(path, id_column="id")
    plan = plan_partitions(spec)
    assert repr(plan) == "[CsvFile(path='d.csv', bytes=20)]"
    assert estimate_chunks(spec, CHUNKS, plan=plan) == 1 + 1


def test_parquet_plan_repr(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    for name, n in (("part-0.parquet", 5), ("part-1.parquet", 2)):
        pq.write_table(pa.table({"text": [f"doc {i}" for i in range(n)], "n": list(range(n))}), root / name,
                       row_group_size=2)
    write(root / "_SUCCESS", "")
    spec = source_spec(root, partition_bytes=1)
    plan = plan_partitions(spec)

    def group_sizes(name: str, group: int) -> tuple[int, int]:
        row_group = pq.read_metadata(root / name).row_group(group)
        columns = [row_group.column(c) for c in range(row_group.num_columns)]
        return (sum(c.total_compressed_size for c in columns),
                sum(c.total_uncompressed_size for c in columns if c.path_in_schema == "text"))

    # Byte counts are pyarrow's (they change with its version), so they are read from the files.
    # ``bytes`` is pinned as the planner computes it: starting a file resets the running total
    # to that file's size (the first partition counts its file's size, and the partition still
    # open when the next file starts reports that file's size). Changing that changes every
    # Parquet plan's fingerprint, and so which jobs can resume.
    file_size = {name: (root / name).stat().st_size for name in ("part-0.parquet", "part-1.parquet")}
    compressed = {(name, g): group_sizes(name, g)[0] for name, g in
                  (("part-0.parquet", 0), ("part-0.parquet", 1), ("part-0.parquet", 2), ("part-1.parquet", 0))}
    pieces = [
        ("part-0.parquet", 0, 0, 2, file_size["part-0.parquet"] + compressed["part-0.parquet", 0]),
        ("part-0.parquet", 1, 2, 2, compressed["part-0.parquet", 1]),
        ("part-0.parquet", 2, 4, 1, file_size["part-1.parquet"]),
        ("part-1.parquet", 0, 0, 2, compressed["part-1.parquet", 0]),
    ]
    expected, chunks = [], 0
    for name, group, first, rows, nbytes in pieces:
        text = group_sizes(name, group)[1]
        expected.append(f"ParquetPieces(pieces=(ParquetPiece(path={name!r}, row_group={group}, first_row={first}, "
                        f"rows={rows}),), bytes={nbytes}, text_bytes={text})")
        chunks += math.ceil(math.ceil(text / 4) / 16) + rows  # the text as one stream, plus a chunk per row
    assert repr(plan) == "[" + ", ".join(expected) + "]"
    assert estimate_chunks(spec, CHUNKS, plan=plan) == chunks


def test_builtin_plan_repr(monkeypatch):
    dataset = BuiltinDataset(name="pinned", description="three documents",
                             load=lambda: {"b": "bee " * 30, "a": "ay", "c": "sea " * 10}, key_field="letter")
    monkeypatch.setitem(builtin_registry._REGISTRY, "pinned", dataset)
    spec = source_spec("builtin:pinned")
    plan = plan_partitions(spec)
    assert repr(plan) == (
        "[BuiltinPart(name='pinned', keys=('a',), bytes=2), BuiltinPart(name='pinned', keys=('b',), bytes=120), "
        "BuiltinPart(name='pinned', keys=('c',), bytes=40)]"
    )
    assert [r["doc_id"] for p in plan for r in read_partition(spec, p).to_pylist()] == ["pinned/a", "pinned/b", "pinned/c"]
    assert estimate_chunks(spec, CHUNKS, plan=plan) == 1 + (1 + 1) + 1


def test_unknown_partition_and_kind_are_refused(tmp_path):
    spec = source_spec(write(tmp_path / "a.txt", "x"))
    with pytest.raises(SourceError, match="^not a partition of a source: 'nope'$"):
        read_partition(spec, "nope")
    with pytest.raises(SourceError, match="^unknown source kind 'xml'$"):
        plan_partitions(dataclasses.replace(spec, kind="xml"))
