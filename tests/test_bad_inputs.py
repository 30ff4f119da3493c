"""Bad documents next to good ones: the good are indexed, each bad one is reported with its reason.

Through the CLI (click's CliRunner, on the session cluster via ``--scheduler``) with the fake
model: a folder with a binary file, invalid UTF-8, an empty file, a 20 MB single-line file,
symlink loops and a dangling symlink; a JSONL file with malformed lines, a record without its
text field, non-object metadata; a CSV with a 2 MB field and malformed rows. With
``--on-error fail`` the job stops with one clear line; duplicate doc ids fail listing them.

Sources that change under a job: a folder and a file made unreadable (real permissions, the CLI
run without root's read-override capabilities) keep their vectors; a folder replaced by a
symlink out of the allowed roots, after planning or after submitting, indexes nothing from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import dask.config
import pytest
from click.testing import CliRunner

from embedfleet.cli import main
from tests import faults_helpers as fh
from tests.unprivileged import SETPRIV, no_access

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
    os.symlink("self.txt", root / "self.txt")
    os.symlink("b-loop.md", root / "guide" / "a-loop.md")
    os.symlink("a-loop.md", root / "guide" / "b-loop.md")
    os.symlink("moved-away.txt", root / "dangling.txt")
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
    assert sorted(reasons) == ["binary.txt", "dangling.txt", "empty.md", "guide/a-loop.md", "guide/b-loop.md",
                               "huge.txt", "latin1.txt", "self.txt"]
    loop = "symlink loop (Too many levels of symbolic links)"
    assert [reasons[k] for k in ("self.txt", "guide/a-loop.md", "guide/b-loop.md")] == [loop] * 3
    assert reasons["dangling.txt"] == "dangling symlink to moved-away.txt"
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


def test_csv_with_a_long_field_and_malformed_rows(tmp_path, client, fake_model):
    long_text = "The harbor project report, in full. " * 60_000  # 2.2 MB, under the 10 MiB limit
    source = tmp_path / "table.csv"
    source.write_text(
        "id,text,year\n"
        f'long,"{long_text}",2020\n'
        "shifted,a stray comma,in the text,2021\n"  # line 3: four fields
        "short,only two\n"  # line 4
        "ok,A short record about gardens.,2022\n"
    )
    data = tmp_path / "data"
    store = tmp_path / "store"
    # A Parquet sink: the point is reading the long field, not Chroma's full-text index of it.
    outcome = _index(source, data, client.scheduler.address, "--id-column", "id", "--sink", f"parquet://{store}")
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    result = json.loads(outcome.stdout)
    assert result["status"] == "succeeded" and result["documents"] == 2
    assert result["skipped_documents"] == [
        {"doc_id": "table.csv:2", "reason": "malformed CSV row at line 3: 4 fields, the header has 3"},
        {"doc_id": "table.csv:3", "reason": "malformed CSV row at line 4: 2 fields, the header has 3"},
    ]
    from embedfleet.sinks.naming import physical_name
    from embedfleet.sinks.parquet import read_collection

    stored = read_collection(store / physical_name("local", "kb"), columns=["doc_id", "end"]).to_pylist()
    assert {row["doc_id"] for row in stored} == {"long", "ok"}
    assert max(row["end"] for row in stored if row["doc_id"] == "long") == len(long_text)


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


# --------------------------------------------------------------------------- sources that change


@pytest.mark.slow
def test_unreadable_folder_and_file_keep_their_vectors(tmp_path, client, fake_model):
    """Index a folder, make a subfolder and a file unreadable, sync again without root's
    read-override capabilities (its own CLI process and cluster): both are reported, nothing
    is deleted, the collection still holds their chunks."""
    source = tmp_path / "src"
    fh.make_corpus(source, documents=3, words=80, seed=1)
    fh.make_corpus(source / "sub", documents=3, words=80, seed=2, prefix="sub")
    data = tmp_path / "data"
    first = _index(source, data, client.scheduler.address)
    assert first.exit_code == 0, (first.output, first.exception)
    indexed = json.loads(first.stdout)
    everything = {"doc-000.txt", "doc-001.txt", "doc-002.txt", "sub/sub-000.txt", "sub/sub-001.txt", "sub/sub-002.txt"}
    assert _stored_doc_ids(data) == everything and indexed["chunks"] > 0

    env = fh.cli_env(fh.write_dask_config(tmp_path / "dask-config"), DASK_EMBEDFLEET__CLUSTER__WORKERS="1")
    with no_access(source / "sub", source / "doc-001.txt"):
        again = subprocess.run(
            [*SETPRIV, *fh.cli_command("index", str(source), "--collection", "kb", "--model", "fake",
                                       "--data-dir", str(data), "--json")],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        )
    assert again.returncode == 0, again.stderr
    result = fh.last_json(again.stdout)
    assert result["status"] == "succeeded"
    assert result["skipped_documents"] == [
        {"doc_id": "doc-001.txt", "reason": "cannot read the file: Permission denied"},
        {"doc_id": "sub/", "reason": "cannot list the folder: Permission denied"},
    ]
    assert result["deleted"] == 0
    assert _stored_doc_ids(data) == everything
    stored = fh.read_chroma(f"chroma://{data}/chroma", "local", "kb")
    assert len(stored) == indexed["chunks"]


SECRET = "The vault combination is 31-41-59; never index this file."


def _allowed_and_secret(tmp_path: Path) -> tuple[Path, Path, Path]:
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    docs = allowed / "docs"
    for rel, text in GOOD.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(text)
    secret.mkdir()
    (secret / "intro.md").write_text(SECRET)
    (secret / "plans.txt").write_text(SECRET)
    return allowed.resolve(), docs.resolve(), secret.resolve()


def test_folder_swapped_for_a_symlink_after_planning_is_not_read(tmp_path, client, fake_model, monkeypatch):
    """The real pipeline on the session cluster: between the driver's plan and the workers'
    reads, a subfolder becomes a symlink to a folder outside the allowed roots holding files of
    the planned names. Those are skipped with the real path they resolve to; the rest is indexed."""
    import embedfleet.datasets as datasets
    from embedfleet.pipeline.run import run_job
    from embedfleet.pipeline.spec import build_job_spec

    allowed, docs, secret = _allowed_and_secret(tmp_path)
    data = tmp_path / "data"
    spec = build_job_spec(str(docs), collection="kb", model=fake_model, data_dir=str(data))
    spec = dataclasses.replace(spec, source=dataclasses.replace(spec.source, allowed_roots=(str(allowed),)))
    plan_partitions = datasets.plan_partitions

    def plan_then_swap(source):
        plan = plan_partitions(source)
        if not (docs / "guide").is_symlink():
            (docs / "guide").rename(allowed / "guide-before")
            (docs / "guide").symlink_to(secret)
        return plan

    monkeypatch.setattr(datasets, "plan_partitions", plan_then_swap)
    result = run_job(spec, client=client)
    assert result.status == "succeeded" and result.documents == 2
    assert [(s.doc_id, s.reason) for s in result.skipped_documents] == [
        ("guide/intro.md", f"resolves to {secret / 'intro.md'}, outside the allowed roots ({allowed})")
    ]
    stored = fh.read_chroma(f"chroma://{data}/chroma", "local", "kb")
    assert {row["metadata"]["doc_id"] for row in stored.values()} == {"notes.txt", "faq.rst"}
    assert not any("vault" in row["document"] for row in stored.values())


def test_folder_swapped_for_a_symlink_after_submit_fails_the_job_in_one_line(tmp_path, client, fake_model):
    """The issue's reproduction: submit a folder under the allowed roots, replace it by a
    symlink to a secret folder, run the queue. The job fails saying so; nothing is indexed."""
    allowed, docs, secret = _allowed_and_secret(tmp_path)
    data = tmp_path / "data"
    runner = CliRunner()
    with dask.config.set({"embedfleet.jobs.allowed-roots": [str(allowed)]}):
        submitted = runner.invoke(main, ["jobs", "submit", str(docs), "--user", "alice", "--collection", "kb",
                                         "--model", "fake", "--data-dir", str(data), "--json"])
        assert submitted.exit_code == 0, submitted.output
        docs.rename(allowed / "docs-before")
        docs.symlink_to(secret)
        ran = runner.invoke(main, ["jobs", "run", "--once", "--json", "--data-dir", str(data),
                                   "--scheduler", client.scheduler.address])
    assert ran.exit_code == 0, ran.output
    [job] = fh.last_json(ran.stdout)
    assert job["status"] == "failed"
    assert job["error"] == (f"source folder {docs} now resolves to {secret} (part of its path was replaced by a "
                            "symlink since the job was submitted); submit the job again")
    # Refused while planning: not a file was read, not a chunk made.
    assert (job["documents"], job["chunks"], job["embedded"]) == (0, 0, 0)
    assert not list((data / "jobs" / job["id"] / "chunks").glob("*.parquet"))
