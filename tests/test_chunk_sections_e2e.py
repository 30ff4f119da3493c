"""A chunk's section path end to end: ``embedfleet.index`` a folder of Markdown, HTML and text into
each embedded store, filter on ``section`` with the store's own client, and see it in
``embedfleet.search`` and the ``search`` command. With ``chunk_heading_context`` the vector is
the path and text together (the fake embedder hashes exactly what it is given)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import numpy as np
import pytest
from click.testing import CliRunner

import embedfleet
from embedfleet.cli import main
from embedfleet.sinks.naming import physical_name
from embedfleet.sinks.parquet import read_collection
from tests.fake_embedder import fake_vector
from tests.test_chunk_structure import GUIDE_HTML, GUIDE_MD

SECTION = "Install > On Linux"
NOTES = "# not a heading in a text file\n\nPlain notes.\n"


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "guide.md").write_text(GUIDE_MD)
    (root / "page.html").write_text(GUIDE_HTML)
    (root / "notes.txt").write_text(NOTES)
    return root


def _chroma(uri, name, section):
    import chromadb

    got = chromadb.PersistentClient(path=urlsplit(uri).path).get_collection(name).get(
        where={"section": section}, include=["documents", "metadatas", "embeddings"]
    )
    return [(m["doc_id"], t, np.asarray(e)) for t, m, e in zip(got["documents"], got["metadatas"], got["embeddings"])]


def _milvus(uri, name, section):
    from pymilvus import MilvusClient

    client = MilvusClient(uri=urlsplit(uri).path)
    try:
        client.load_collection(name)
        rows = client.query(name, filter=f'metadata["section"] == "{section}"', output_fields=["doc_id", "text", "embedding"])
    finally:
        client.close()
    return [(r["doc_id"], r["text"], np.asarray(r["embedding"], dtype=np.float32)) for r in rows]


def _parquet(uri, name, section):
    rows = read_collection(f"{urlsplit(uri).path}/{name}", ["doc_id", "text", "metadata", "embedding"]).to_pylist()
    return [(r["doc_id"], r["text"], np.asarray(r["embedding"], dtype=np.float32))
            for r in rows if json.loads(r["metadata"]).get("section") == section]


@pytest.mark.parametrize("kind", ["chroma", "milvus-lite", "parquet"])
@pytest.mark.parametrize("heading_context", [False, True])
def test_sections_reach_every_store_and_search(kind, heading_context, folder, tmp_path, client, fake_model):
    uri, read = {
        "chroma": (f"chroma://{tmp_path}/chroma", _chroma),
        "milvus-lite": (f"milvus://{tmp_path}/vectors.db", _milvus),
        "parquet": (f"parquet://{tmp_path}/vectors", _parquet),
    }[kind]
    data_dir = str(tmp_path / "data")
    common = {"collection": "kb", "sink": uri, "data_dir": data_dir}
    result = embedfleet.index(str(folder), **common, client=client, model=fake_model, chunk_size=48, chunk_overlap=8,
                              chunk_heading_context=heading_context)
    assert result.status == "succeeded" and result.chunks > 6

    rows = read(uri, physical_name("local", "kb"), SECTION)
    linux = GUIDE_MD[GUIDE_MD.index("## On Linux"):GUIDE_MD.index("### From source")]
    assert rows and {doc_id for doc_id, _, _ in rows} == {"guide.md"}
    assert "".join(text for _, text, _ in rows) == linux  # the section's chunks, nothing else
    html = read(uri, physical_name("local", "kb"), "User Guide > Install > On Linux")
    assert [(doc_id, text.split("\n")[0]) for doc_id, text, _ in html] == [("page.html", "On Linux")]
    for _, text, vector in rows:
        seen = f"{SECTION}\n\n{text}" if heading_context else text
        assert float(vector @ fake_vector(seen, vector.shape[0])) == pytest.approx(1.0, abs=1e-5)

    # Searching for exactly what the model saw of one chunk finds it, with its section.
    text = rows[0][1]
    query = f"{SECTION}\n\n{text}" if heading_context else text
    [hit] = embedfleet.search(query, **common, k=1)
    assert (hit.text, hit.section, hit.metadata["section"]) == (text, SECTION, SECTION)
    assert hit.score == pytest.approx(1.0, abs=1e-4)
    args = ["search", query, "--collection", "kb", "--sink", uri, "--data-dir", data_dir, "-k", "1"]
    out = CliRunner().invoke(main, [*args, "--json"], catch_exceptions=False).output
    assert [(h["doc_id"], h["section"]) for h in json.loads(out)] == [("guide.md", SECTION)]
    out = CliRunner().invoke(main, args, catch_exceptions=False).output
    assert out.splitlines()[0].endswith(f"guide.md #{hit.chunk_index}  [{SECTION}]")
    # A chunk with no section prints none.
    [plain] = embedfleet.search(NOTES, **common, k=1)
    assert plain.doc_id == "notes.txt" and plain.section is None


def test_a_renamed_heading_re_embeds_only_its_sections_chunks(folder, tmp_path, client, fake_model):
    common = {"collection": "kb", "sink": f"parquet://{tmp_path}/vectors", "data_dir": str(tmp_path / "data"),
              "client": client, "model": fake_model, "chunk_size": 48, "chunk_overlap": 8}
    first = embedfleet.index(str(folder), **common)
    again = embedfleet.index(str(folder), **common)
    assert (again.embedded, again.deleted) == (0, 0)
    # Same text, new path: the chunks under the renamed heading (and only they) are new.
    (folder / "guide.md").write_text(GUIDE_MD.replace("### From source", "### Building from source"))
    renamed = embedfleet.index(str(folder), **common)
    table = read_collection(f"{tmp_path}/vectors/{physical_name('local', 'kb')}", ["metadata"]).to_pylist()
    sections = [json.loads(r["metadata"]).get("section") for r in table]
    moved = sections.count("Install > On Linux > Building from source")
    assert moved >= 1 and "Install > On Linux > From source" not in sections
    # The heading line itself is in the text of the section's first chunk: it changes too.
    assert renamed.embedded == renamed.deleted == moved
    assert len(table) == first.chunks
