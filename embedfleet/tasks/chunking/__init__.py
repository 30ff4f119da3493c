"""Token-aware chunking: documents frame -> chunk frame (DESIGN §2).

Pure functions, testable without a cluster; :func:`chunk_partition` is what a Dask worker runs.

The algorithm (:func:`chunk_text`)
----------------------------------
1. The document is cut into *units*: the model tokenizer's tokens (``tokens``), ``\\S+`` runs
   (``words``) or characters (``chars``, by arithmetic: no per-character objects).
2. Windows of at most ``size`` units (and, with a tokenizer, about ``max_tokens`` tokens of
   the document's own tokenisation). A window ends at the best *boundary* inside that: a word
   start after a paragraph break (a blank line), then after a line break, then after a sentence
   end (``.!?…`` and the CJK stops, maybe closed by a quote or bracket), then after any
   whitespace. A higher-ranked boundary is taken if it keeps at least 80% (paragraph), 92%
   (line) or 90% (sentence) of the full window (``windows._MIN_SHARE``), so chunks stay close
   to the requested size; among equals the later one. A window is cut inside a word only when
   it holds no word start at all, i.e. one word alone is over the budget.
3. The next window starts ``overlap`` units before the previous window's end, moved forward
   to the next word start (so the overlap is at most ``overlap`` units and never starts inside
   a word), and always at least one unit after the previous window's start. A window's
   characters run from the start of its first unit (the first chunk starts at 0) to the start
   of the first unit after it (the last chunk ends at ``len(text)``), so the chunks cover every
   character, whitespace included, and ``text[start:end]`` is the chunk. Token starts are moved
   back over characters the tokenizer drops (control, zero-width) to where their word starts.
4. With a tokenizer, ``n_tokens`` is the token count of the chunk text itself (re-tokenised,
   no special tokens). If it exceeds ``max_tokens`` the window ends at the best boundary before
   the one tried, and is counted again. Re-tokenising a substring can differ from the
   document's tokenisation at word-piece boundaries, so the count that is checked is the one
   the model will see: no chunk is ever longer than ``max_tokens``. A window always ends at
   least one unit past the previous window (a chunk inside its predecessor would add nothing):
   if no boundary fits beside the overlap, the window starts at the next word start instead
   (less overlap, down to none), before any word is cut. A word that is alone over the budget
   is cut at the last unit that fits (with ``words`` units: at character positions, into
   pieces that fit; consecutive pieces do not overlap). For ``words``/``chars``
   the first window is sized from the document's own tokenisation, so shrinking is the
   exception, not a search.
   Re-tokenising is skipped only where it provably changes nothing: for BERT-style
   tokenizers (BertNormalizer, BertPreTokenizer, WordPiece), whose pre-tokenizer splits on
   whitespace and punctuation without context, a chunk whose two ends fall outside every
   pre-tokenized word has exactly the document's tokens for its span, so those are counted
   instead. Every other chunk (ends inside a word, any other tokenizer) is re-tokenised.
5. A window whose text is blank (whitespace only, or zero tokens: e.g. only control
   characters, which BERT-style tokenizers drop) is not a chunk of its own: it is merged into
   the previous chunk (leading blank text into the next one), so coverage holds and no chunk
   the model sees is empty. Only if the merge would push a chunk over ``max_tokens`` (possible
   with tokenizers that turn whitespace into tokens) is the blank text dropped instead. A
   document that is blank as a whole gives no chunks.

Without a tokenizer (``words``/``chars`` only) ``n_tokens`` is an *estimate*,
``ceil(len(chunk) / 4)``, and no token limit can be enforced.

``max_tokens`` counts the chunk's own tokens. The model adds special tokens (``[CLS]``,
``[SEP]``) and possibly a document prefix: use :func:`reserved_tokens` to subtract them from
the model's max sequence length before passing ``max_tokens``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pyarrow as pa

from embedfleet.errors import ChunkingError
from embedfleet.frames.schemas import CHUNKS, DOCUMENTS, check_schema
from embedfleet.tasks.chunking.batch import _chunk_texts
from embedfleet.tasks.chunking.structure import (
    SEPARATOR,
    Section,
    document_sections,
    embedded_text,
    section_of,
    with_section,
)
from embedfleet.tasks.chunking.tokenizer import (
    load_tokenizer,
    reserved_tokens,
    validate_for_model,
)

__all__ = [
    "chunk_id",
    "chunk_partition",
    "chunk_text",
    "load_tokenizer",
    "reserved_tokens",
    "validate_for_model",
]

logger = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1
# Re-plans of a section whose chunks, with the section path before them, re-tokenise longer than
# the two counted apart (never with BERT-style tokenizers, whose words split at whitespace).
_CONTEXT_ROUNDS = 4


# --------------------------------------------------------------------------- ids


def chunk_id(doc_id: str, chunk_index: int, text: str, section: str = "", heading_context: bool = False) -> str:
    """Deterministic id of a chunk: blake2b-128 (hex) of its doc_id, index and text, and of its
    section path and whether the model sees it (so a renamed heading, or turning
    ``chunk.heading-context`` on, re-embeds the chunks it changes; a chunk with no section has
    the id it always had).

    Each field is length-prefixed, so ``("a", "bc")`` and ``("ab", "c")`` never collide.
    """
    h = hashlib.blake2b(digest_size=16)
    fields = [doc_id.encode("utf-8"), str(int(chunk_index)).encode("ascii"), text.encode("utf-8")]
    if section:
        fields.append(section.encode("utf-8"))
        if heading_context:
            fields.append(b"heading-context")
    for field in fields:
        h.update(len(field).to_bytes(8, "big"))
        h.update(field)
    return h.hexdigest()


# --------------------------------------------------------------------------- public


def chunk_text(
    text: str,
    *,
    unit: str,
    size: int,
    overlap: int,
    tokenizer: Any = None,
    max_tokens: int | None = None,
) -> list[tuple[int, int, int]]:
    """Chunks of ``text`` as ``(start, end, n_tokens)``; the chunk is ``text[start:end]``.

    ``unit`` is ``tokens`` (needs ``tokenizer``), ``words`` or ``chars``; ``size`` and
    ``overlap`` are in units. With a tokenizer, ``n_tokens`` is the exact token count of the
    chunk text (no special tokens) and no chunk exceeds ``max_tokens``; without one it is the
    estimate ``ceil(len(chunk) / 4)``. See the module docstring for the exact rules.
    """
    [chunks] = _chunk_texts([text], unit=unit, size=size, overlap=overlap, tokenizer=tokenizer, max_tokens=max_tokens)
    return [(s, e, c) for s, e, c in chunks]


def chunk_partition(
    documents: pa.Table,
    *,
    unit: str,
    size: int,
    overlap: int,
    model_path: str | None,
    max_tokens: int | None,
    structure: str = "auto",
    heading_context: bool = False,
) -> pa.Table:
    """Chunk one documents partition into a chunk frame (schema ``CHUNKS``).

    Rows with an ``error`` (documents the reader could not read) are skipped. ``model_path``
    gives the tokenizer (required for ``unit="tokens"`` and for ``max_tokens``); ``max_tokens``
    is the chunk budget, already net of the model's special tokens (:func:`reserved_tokens`).

    ``structure="auto"``: a Markdown, reStructuredText or HTML document is chunked section by
    section (a heading always starts a chunk; :mod:`.structure`), and its chunks' metadata is
    the document's plus ``section``, the heading path joined by ``" > "``. Other documents, and
    every document with ``structure="none"``, carry the document's metadata unchanged.

    ``heading_context=True``: the model will embed each chunk's ``section`` before its text
    (:func:`structure.embedding_texts`); the budget of each chunk is what that leaves, and its
    ``n_tokens`` counts the section too (what the model sees). A path that would take more than
    half the budget is shortened (outer headings first) in the chunk's ``section``.
    """
    if structure not in ("auto", "none"):
        raise ChunkingError(f"chunk structure must be auto or none, not {structure!r}")
    documents = check_schema(documents, DOCUMENTS, stage="chunk input")
    tokenizer = load_tokenizer(model_path) if model_path else None
    doc_ids = documents.column("doc_id").to_pylist()
    texts_all = documents.column("text").to_pylist()
    metas_all = documents.column("metadata").to_pylist()
    errors = documents.column("error").to_pylist()
    keep = [k for k in range(len(doc_ids)) if errors[k] is None and texts_all[k] is not None]
    for k in keep:
        if len(texts_all[k]) > _INT32_MAX:
            raise ChunkingError(f"{doc_ids[k]}: {len(texts_all[k])} characters do not fit the int32 offsets of the chunk frame")

    # Every section of every document is chunked as a text of its own, in one batch per budget.
    pieces: list[tuple[int, Section, str | None, str]] = []  # (document, section, metadata, context)
    for k in keep:
        for section, meta in document_sections(doc_ids[k], texts_all[k], metas_all[k], structure):
            context = section_of(meta) if heading_context else ""
            if context and tokenizer is not None and max_tokens is not None:
                short = _fit_context(context, tokenizer, max_tokens // 2)
                if short != context:
                    meta, context = with_section(meta, short), short
            pieces.append((k, section, meta, context))
    planned = _plan_pieces(pieces, texts_all, unit=unit, size=size, overlap=overlap, tokenizer=tokenizer, max_tokens=max_tokens)

    columns: dict[str, list] = {name: [] for name in CHUNKS.names}
    index = 0
    for p, (k, section, meta, context) in enumerate(pieces):
        doc_id, text = doc_ids[k], texts_all[k]
        if p == 0 or pieces[p - 1][0] != k:
            index = 0
        label = section_of(meta) if section.path or context else ""
        for s, e, c in planned[p]:
            s, e = s + section.start, e + section.start
            piece = text[s:e]
            columns["chunk_id"].append(chunk_id(doc_id, index, piece, label, heading_context))
            columns["doc_id"].append(doc_id)
            columns["chunk_index"].append(index)
            columns["text"].append(piece)
            columns["start"].append(s)
            columns["end"].append(e)
            columns["n_tokens"].append(c)
            columns["metadata"].append(meta)
            index += 1
    table = pa.Table.from_pydict(columns, schema=CHUNKS)
    logger.debug("chunked %d documents into %d chunks", len(keep), table.num_rows)
    return check_schema(table, CHUNKS, stage="chunk")


def _fit_context(context: str, tokenizer: Any, limit: int) -> str:
    """``context`` shortened until its prefix takes at most ``limit`` tokens: outer headings go
    first, then the innermost title loses characters."""
    def cost(value: str) -> int:
        return len(tokenizer.encode(embedded_text("", value), add_special_tokens=False).ids)

    if cost(context) <= limit:
        return context
    titles = context.split(SEPARATOR)
    while len(titles) > 1 and cost(SEPARATOR.join(titles)) > limit:
        titles.pop(0)
    title = titles[0]
    while title and cost(title) > limit:
        title = title[: len(title) * 3 // 4].rstrip()
    return title


def _plan_pieces(pieces, texts, *, unit, size, overlap, tokenizer, max_tokens) -> list[list[list[int]]]:
    """The windows of each piece; with heading context, within what its prefix leaves, checked
    again with the prefix (re-tokenising the two together may differ from adding them up)."""
    planned: list[list[list[int]] | None] = [None] * len(pieces)
    costs: dict[str, int] = {"": 0}
    for _, _, _, context in pieces:
        if context not in costs:
            costs[context] = (
                len(tokenizer.encode(embedded_text("", context), add_special_tokens=False).ids) if tokenizer else 0
            )
    budgets = [None if max_tokens is None else max_tokens - costs[c] for *_, c in pieces]
    todo = list(range(len(pieces)))
    for _ in range(_CONTEXT_ROUNDS):
        groups: dict[int | None, list[int]] = {}
        for p in todo:
            groups.setdefault(budgets[p], []).append(p)
        for budget, members in groups.items():
            if budget is not None and budget < 1:
                raise ChunkingError(f"a section path leaves no room for chunk text (budget {budget})")
            found = _chunk_texts(
                [texts[pieces[p][0]][pieces[p][1].start:pieces[p][1].end] for p in members],
                unit=unit, size=size, overlap=overlap, tokenizer=tokenizer, max_tokens=budget,
            )
            for p, windows in zip(members, found):
                planned[p] = windows
        todo = []
        if tokenizer is None or not any(c for *_, c in pieces):
            break
        checks = [(p, w) for p in range(len(pieces)) if pieces[p][3] for w in planned[p]]
        section_texts = [texts[pieces[p][0]][pieces[p][1].start:pieces[p][1].end] for p in range(len(pieces))]
        seen = tokenizer.encode_batch_fast(
            [embedded_text(section_texts[p][s:e], pieces[p][3]) for p, (s, e, _) in checks], add_special_tokens=False
        )
        over = {}
        for (p, w), enc in zip(checks, seen):
            w[2] = len(enc)
            if max_tokens is not None and len(enc) > max_tokens:
                over[p] = max(over.get(p, 0), len(enc) - max_tokens)
        for p, excess in over.items():
            budgets[p] -= excess
        todo = sorted(over)
        if not todo:
            break
    if todo:
        raise ChunkingError(f"cannot fit chunks beside their section paths within {max_tokens} tokens")
    return planned  # type: ignore[return-value]
