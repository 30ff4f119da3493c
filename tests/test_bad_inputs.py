"""Bad documents next to good ones: the good are indexed, each bad one is reported with its reason.

Through the CLI (click's CliRunner, on the session cluster via ``--scheduler``) with the fake
model: a folder with a binary file, invalid UTF-8, an empty file and a 20 MB single-line file;
a JSONL file with malformed lines, a record without its text field, non-object metadata. With
``--on-error fail`` the job stops with one clear line; duplicate doc ids fail listing them.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.config
import pytest
from click.testing import CliRunner

from embedfleet.cli import main
from tests import faults_helpers as fh

TWENTY_MB = 20 * 2**20
GOOD = {
    "guide/intro.md": "# Introduction\n\nThis guide explains how backups are rotated and verified every night.\n",
    "notes.txt": "Meeting notes: the harbor project ships in winter; the market analysis is due in summer.\n",
    "faq.rst": "FAQ\n===\n\nHow do I reset a password?\n   Use the account page; a link is sent by mail.\n",
}


def _write_huge(path: Path) -> None:
    """A 20 MB file on one line, like a hex dump: 154-character words, one [UNK] token each for
    MiniLM's WordPiece (over its 100-character word limit), so tokenizing it is as cheap as 20 MB
    of text can be."""
    word = "0123456789abcdef" * 9 + "0123456789"  # 154 characters
    line = (word + " ") * (TWENTY_MB // (len(word) + 1))
    path.write_text(line + "x" * (TWENTY_MB - len(line) - 1) + "\n", encoding="ascii")
    assert path.stat().st_size == TWENTY_MB


@pytest.fixture
def bad_folder(tmp_path):
    root = tmp_path / "folder"
    for rel, text in GOOD.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.\n".encode("latin-1"))
    (root / "empty.md").write_bytes(b"")
    _write_huge(root / "huge.txt")
    return root


JSONL_GOOD = {
    "a": {"id": "a", "text": "The first good record talks about rivers and stones.", "metadata": {"lang": "en"}},
    "b": {"id": "b", "text": "The second good record talks about gardens.", "author": "kim"},
    "c": {"id": "c", "text": "The third good record talks about windows and markets.", "metadata": None},
}


@pytest.fixture
def bad_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps(JSONL_GOOD["a"]).encode(),
        b'{"id": "broken", "text": "an unterminated string}',  # line 2: malformed JSON
        json.dumps({"id": "no-text", "body": "the text is in the wrong field"}).encode(),
        json.dumps(JSONL_GOOD["b"]).encode(),
        json.dumps({"id": "meta-list", "text": "metadata is a list", "metadata": [1, 2]}).encode(),
        json.dumps({"id": "meta-string", "text": "metadata is a JSON string", "metadata": '"just text"'}).encode(),
        b'["an", "array", "not", "an", "object"]',  # line 7
        b'{"id": "bad-utf8", "text": "caf\xe9"}',  # line 8
        b"",  # a blank line is not a document
        json.dumps(JSONL_GOOD["c"]).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _index(source: Path, data_dir: Path, scheduler: str, *extra: str):
    return CliRunner().invoke(main, ["index", str(source), "--collection", "kb", "--model", "fake", "--data-dir",
                                     str(data_dir), "--scheduler", scheduler, "--json", *extra])


def _stored_doc_ids(data_dir: Path) -> set[str]:
    return {row["metadata"]["doc_id"] for row in fh.read_chroma(f"chroma://{data_dir}/chroma", "local", "kb").values()}


def _one_error_line(outcome) -> str:
    assert outcome.exit_code != 0, outcome.output
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), outcome.stderr
    assert "Traceback" not in outcome.output
    return lines[0]


def test_bad_files_are_skipped_with_reasons(tmp_path, bad_folder, client, fake_model):
    data = tmp_path / "data"
    outcome = _index(bad_folder, data, client.scheduler.address)
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    result = json.loads(outcome.stdout)
    assert result["status"] == "succeeded"
    assert result["documents"] == len(GOOD)
    reasons = {s["doc_id"]: s["reason"] for s in result["skipped_documents"]}
    assert sorted(reasons) == ["binary.txt", "empty.md", "huge.txt", "latin1.txt"]
    assert reasons["binary.txt"].startswith("binary file (NUL byte at offset")
    assert reasons["latin1.txt"].startswith("invalid UTF-8 at byte 3")
    assert reasons["empty.md"] == "empty document"
    assert "over the limit of 10.00 MiB" in reasons["huge.txt"] and "max-document-bytes" in reasons["huge.txt"]
    assert _stored_doc_ids(data) == set(GOOD)


def test_bad_jsonl_records_are_skipped_with_reasons(tmp_path, bad_jsonl, client, fake_model):
    data = tmp_path / "data"
    outcome = _index(bad_jsonl, data, client.scheduler.address, "--id-column", "id")
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    result = json.loads(outcome.stdout)
    assert result["status"] == "succeeded" and result["documents"] == len(JSONL_GOOD)
    reasons = {s["doc_id"]: s["reason"] for s in result["skipped_documents"]}
    assert reasons == {
        "corpus.jsonl:2": reasons["corpus.jsonl:2"],
        "no-text": "no text field 'text'",
        "meta-list": "metadata must be a JSON object, not an array",
        "meta-string": "metadata must be a JSON object, not a string",
        "corpus.jsonl:7": "line is an array, not a JSON object",
        "corpus.jsonl:8": reasons["corpus.jsonl:8"],
    }
    assert reasons["corpus.jsonl:2"].startswith("malformed JSON line")
    assert reasons["corpus.jsonl:8"].startswith("invalid UTF-8 at byte")
    stored = fh.read_chroma(f"chroma://{data}/chroma", "local", "kb")
    assert {row["metadata"]["doc_id"] for row in stored.values()} == set(JSONL_GOOD)
    # Other fields and the metadata object both become metadata.
    by_doc = {row["metadata"]["doc_id"]: row["metadata"] for row in stored.values()}
    assert by_doc["a"]["lang"] == "en" and by_doc["b"]["author"] == "kim"


def test_missing_text_column_fails_the_source_in_one_line(tmp_path, client, fake_model):
    source = tmp_path / "table.csv"
    source.write_text("id,body\n1,some text\n2,more text\n")
    line = _one_error_line(_index(source, tmp_path / "data", client.scheduler.address, "--id-column", "id"))
    assert "no text column 'text'" in line and "id, body" in line and "--text-column" in line


def test_on_error_fail_stops_with_one_line(tmp_path, bad_jsonl, client, fake_model):
    data = tmp_path / "data"
    line = _one_error_line(_index(bad_jsonl, data, client.scheduler.address, "--id-column", "id", "--on-error", "fail"))
    # The first bad record of the partition, by its id and reason.
    assert line.startswith("Error: corpus.jsonl:2: malformed JSON line"), line
    [job] = json.loads(CliRunner().invoke(main, ["jobs", "list", "--user", "local", "--data-dir", str(data),
                                                 "--json"]).stdout)
    assert job["status"] == "failed" and job["error"] == line.removeprefix("Error: ")


def test_duplicate_doc_ids_fail_listing_them(tmp_path, client, fake_model):
    source = tmp_path / "dups.jsonl"
    records = [("x", "one"), ("dup-1", "two"), ("dup-2", "three"), ("dup-1", "four"), ("y", "five"), ("dup-2", "six")]
    source.write_text("".join(json.dumps({"id": i, "text": f"Record {t} has some text."}) + "\n" for i, t in records))
    line = _one_error_line(_index(source, tmp_path / "data", client.scheduler.address, "--id-column", "id"))
    assert "2 doc_id(s) occur more than once in the source: dup-1, dup-2" in line, line


@pytest.mark.slow
def test_twenty_megabyte_document_indexed_under_a_raised_limit(tmp_path, client, fake_model):
    from embedfleet.sinks.naming import physical_name
    from embedfleet.sinks.parquet import read_collection

    root = tmp_path / "big"
    root.mkdir()
    _write_huge(root / "huge.txt")
    (root / "notes.txt").write_text(GOOD["notes.txt"])
    store = tmp_path / "store"
    with dask.config.set({"embedfleet.read.max-document-bytes": "32MiB"}):
        # Large chunks and a Parquet sink: the point is the document's size, not Chroma's
        # full-text indexing of 20 MB (tokenizing it is most of this test's time already).
        outcome = _index(root, tmp_path / "data", client.scheduler.address, "--chunk-size", "250",
                         "--chunk-overlap", "0", "--sink", f"parquet://{store}")
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    result = json.loads(outcome.stdout)
    assert result["skipped_documents"] == [] and result["documents"] == 2
    stored = read_collection(store / physical_name("local", "kb"), columns=["doc_id", "start", "end"]).to_pylist()
    huge = sorted((row["start"], row["end"]) for row in stored if row["doc_id"] == "huge.txt")
    # The chunks cover the whole 20 MB line, end to end, without gaps.
    assert huge[0][0] == 0 and huge[-1][1] == TWENTY_MB
    assert all(a[1] == b[0] for a, b in zip(huge, huge[1:]))
    assert result["chunks"] == len(stored) == len(huge) + 1
