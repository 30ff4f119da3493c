"""Incremental re-indexing through the CLI: exactly the changed chunks are embedded or deleted.

Every expectation is computed from chunk ids: the ids a run produced (its chunk frames under
``<data-dir>/jobs/<job-id>/chunks``) against the previous run's. A chunk id is a hash of the
doc id, the chunk index and the chunk text, so "the chunks whose text changed" is exactly
"after - before", and "stale" is exactly "before - after". What was embedded is read from the
job's embedding frames, what the store holds from Chroma itself.

The commands run in-process through click's CliRunner against the session cluster
(``--scheduler``), except one real ``python -m embedfleet.cli`` subprocess, so the fake model
is configured both in this process (``fake_model``) and for the subprocess (``DASK_CONFIG``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embedfleet.cli import main
from tests.fake_embedder import fake_vector
from tests import faults_helpers as fh
from tests.conftest import FAKE_DIMENSIONS

CHUNK_ARGS = ["--chunk-size", "48", "--chunk-overlap", "8"]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    fh.make_corpus(root, documents=6, words=320, seed=11)
    return root


class Indexer:
    """``embedfleet index CORPUS`` into one data dir, on the session cluster."""

    def __init__(self, corpus: Path, data_dir: Path, scheduler: str):
        self.corpus, self.data_dir, self.scheduler = corpus, data_dir, scheduler

    def args(self, *extra: str) -> list[str]:
        return ["index", str(self.corpus), "--collection", "kb", "--model", "fake", "--data-dir", str(self.data_dir),
                "--scheduler", self.scheduler, *CHUNK_ARGS, *extra]

    def json(self, *extra: str) -> dict:
        outcome = CliRunner().invoke(main, self.args("--json", *extra))
        assert outcome.exit_code == 0, (outcome.output, outcome.exception)
        result = json.loads(outcome.stdout)
        assert result["status"] == "succeeded", result
        return result

    def chunks(self, job_id: str) -> dict[str, str]:
        """chunk id -> doc id of everything the job's source chunked into."""
        return _ids(self.data_dir / "jobs" / job_id / "chunks")

    def embedded(self, job_id: str) -> dict[str, str]:
        """chunk id -> doc id of what the job embedded."""
        return _ids(self.data_dir / "jobs" / job_id / "embeddings")

    def stored(self) -> dict[str, dict]:
        return fh.read_chroma(f"chroma://{self.data_dir}/chroma", "local", "kb")


def _ids(folder: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path, columns=["chunk_id", "doc_id"])
        for chunk_id, doc_id in zip(table.column("chunk_id").to_pylist(), table.column("doc_id").to_pylist()):
            assert chunk_id not in out, f"chunk {chunk_id} twice in {folder}"
            out[chunk_id] = doc_id
    return out


def _check_vectors(stored: dict[str, dict]) -> None:
    for row in stored.values():
        np.testing.assert_allclose(row["embedding"], fake_vector(row["document"], FAKE_DIMENSIONS), atol=1e-6)


@pytest.fixture
def indexer(tmp_path, corpus, client, fake_model):
    return Indexer(corpus, tmp_path / "data", client.scheduler.address)


def _replace_middle_word(path: Path) -> None:
    """Swap one word in the middle of ``path`` for another single-token word: the text changes
    but no token moves, so only the chunks that contain the word change."""
    words = path.read_text().split(" ")
    middle = len(words) // 2
    while words[middle] not in fh.WORDS or "\n" in words[middle]:
        middle += 1
    words[middle] = "stone" if words[middle] != "stone" else "cloud"
    path.write_text(" ".join(words))


@pytest.mark.slow  # a real `python -m embedfleet.cli` process
def test_unchanged_rerun_embeds_nothing_and_says_so(tmp_path, indexer, client):
    first = indexer.json()
    assert first["embedded"] == first["chunks"] > 0 and first["deleted"] == 0
    before = indexer.stored()

    # The real CLI in a fresh process, human-readable summary.
    env = fh.cli_env(fh.write_dask_config(tmp_path / "dask-config"))
    again = fh.run_cli(*indexer.args(), env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    summary = again.stdout
    assert f"-> {first['chunks']} chunks; embedded 0, unchanged {first['chunks']}, deleted 0" in summary, summary

    third = indexer.json()
    assert (third["embedded"], third["skipped"], third["deleted"]) == (0, first["chunks"], 0)
    assert third["chunks"] == first["chunks"] and third["documents"] == first["documents"]
    assert indexer.embedded(third["job_id"]) == {}
    after = indexer.stored()
    fh.assert_same_collection(after, before)


def test_edit_one_file_and_delete_another(indexer, corpus):
    first = indexer.json()
    before = indexer.chunks(first["job_id"])
    edited, removed = "doc-002.txt", "doc-004.txt"
    _replace_middle_word(corpus / edited)
    (corpus / removed).unlink()

    # The human-readable summary this time; its job id leads to the job's frames.
    outcome = CliRunner().invoke(main, indexer.args())
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    match = re.search(r"embedded (\d+), unchanged (\d+), deleted (\d+)", outcome.stdout)
    job_id = re.search(r"\(job (\w+)\)", outcome.stdout).group(1)
    embedded, unchanged, deleted = map(int, match.groups())

    after = indexer.chunks(job_id)
    new = {c: d for c, d in after.items() if c not in before}
    stale = {c: d for c, d in before.items() if c not in after}
    edited_chunks = [c for c, d in after.items() if d == edited]
    # Only the edited file has new chunks, and only those whose text changed, not all of them.
    assert set(new.values()) == {edited}
    assert 0 < len(new) < len(edited_chunks)
    assert set(indexer.embedded(job_id)) == set(new)
    assert (embedded, unchanged, deleted) == (len(new), len(after) - len(new), len(stale))
    # Stale: the edited file's replaced chunks and every chunk of the removed file.
    assert set(stale.values()) == {edited, removed}
    assert {c for c, d in stale.items() if d == removed} == {c for c, d in before.items() if d == removed}

    stored = indexer.stored()
    assert set(stored) == set(after)
    assert removed not in {row["metadata"]["doc_id"] for row in stored.values()}
    _check_vectors(stored)


def test_append_never_deletes_and_a_later_sync_cleans_up(indexer, corpus):
    first = indexer.json()
    before = indexer.chunks(first["job_id"])
    removed, edited = corpus / "doc-001.txt", corpus / "doc-003.txt"
    removed.unlink()
    edited.write_text(edited.read_text() + "A new closing sentence about the harbor in winter.\n")

    appended = indexer.json("--mode", "append")
    after = indexer.chunks(appended["job_id"])
    new = set(after) - set(before)
    assert new and {after[c] for c in new} == {"doc-003.txt"}
    assert appended["deleted"] == 0
    assert appended["embedded"] == len(new) and set(indexer.embedded(appended["job_id"])) == new
    stored = indexer.stored()
    assert set(stored) == set(before) | set(after)  # nothing deleted: old doc-003 chunks, all of doc-001
    _check_vectors(stored)

    # Append kept the old chunks in the manifest, so a sync run knows to delete them now.
    synced = indexer.json()
    assert synced["embedded"] == 0
    assert synced["deleted"] == len(set(before) - set(after)) > 0
    assert set(indexer.stored()) == set(after)


def test_full_mode_reembeds_everything(indexer, corpus):
    first = indexer.json()
    before = indexer.chunks(first["job_id"])
    (corpus / "doc-000.txt").unlink()

    full = indexer.json("--mode", "full")
    after = indexer.chunks(full["job_id"])
    assert full["embedded"] == full["chunks"] == len(after) and full["skipped"] == 0
    assert set(indexer.embedded(full["job_id"])) == set(after)
    # Full still leaves the collection equal to the source: the removed file's chunks go.
    assert full["deleted"] == len(set(before) - set(after)) == sum(1 for d in before.values() if d == "doc-000.txt")
    stored = indexer.stored()
    assert set(stored) == set(after)
    _check_vectors(stored)
