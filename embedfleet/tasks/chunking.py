"""Token-aware chunking: documents frame -> chunk frame (DESIGN §2).

Pure functions, testable without a cluster; :func:`chunk_partition` is what a Dask worker runs.

The algorithm (:func:`chunk_text`)
----------------------------------
1. The document is cut into *units*: the model tokenizer's tokens (``tokens``), ``\\S+`` runs
   (``words``) or characters (``chars``, by arithmetic: no per-character objects).
2. Windows of ``size`` units; the next window starts ``overlap`` units before the previous
   window's end, and always at least one unit after the previous window's start.
3. A window's characters run from the start of its first unit (the first chunk starts at 0)
   to the start of the first unit after it (the last chunk ends at ``len(text)``), so the
   chunks cover every character, whitespace included, and ``text[start:end]`` is the chunk.
4. With a tokenizer, ``n_tokens`` is the token count of the chunk text itself (re-tokenised,
   no special tokens). If it exceeds ``max_tokens`` the window shrinks by one unit and is
   tried again. Re-tokenising a substring can differ from the document's tokenisation at
   word-piece boundaries, so the count that is checked is the one the model will see: no chunk
   is ever longer than ``max_tokens``. A window always ends at least one unit past the previous
   window (a chunk inside its predecessor would add nothing): if the limit leaves no room for
   the full overlap plus a new unit, the window starts one unit later (less overlap, down to
   none). A single unit that is alone too long (a 5,000-character "word") is cut at character
   positions into pieces that fit; consecutive pieces do not overlap. For ``words``/``chars``
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

import bisect
import functools
import hashlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pyarrow as pa

from embedfleet.config import ChunkSpec, resolve_model_path
from embedfleet.errors import ChunkingError
from embedfleet.frames.schemas import CHUNKS, DOCUMENTS, check_schema

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "chunk_id",
    "load_tokenizer",
    "reserved_tokens",
    "chunk_text",
    "chunk_partition",
    "validate_for_model",
]

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\S+")
_INT32_MAX = 2**31 - 1
# Re-tokenisation is batched (encode_batch_fast, parallel in Rust) over every chunk of a
# partition. A window that turns out too long moves every later window of its document, so
# the plan is redone with the new counts; after this many rounds the stragglers are finished
# one encode at a time.
_PREFETCH_ROUNDS = 4
_UNKNOWN = -1
# Documents are tokenised in batches of about this many characters: encode_batch runs in
# parallel within a batch, and the offsets held for planning stay bounded (a 16 MiB partition
# would otherwise hold several hundred MB of encodings at once).
_BATCH_CHARS = 1_000_000


# --------------------------------------------------------------------------- ids


def chunk_id(doc_id: str, chunk_index: int, text: str) -> str:
    """Deterministic id of a chunk: blake2b-128 (hex) of its doc_id, index and text.

    Each field is length-prefixed, so ``("a", "bc")`` and ``("ab", "c")`` never collide.
    """
    h = hashlib.blake2b(digest_size=16)
    for field in (doc_id.encode("utf-8"), str(int(chunk_index)).encode("ascii"), text.encode("utf-8")):
        h.update(len(field).to_bytes(8, "big"))
        h.update(field)
    return h.hexdigest()


# --------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_path: str) -> Tokenizer:
    """The model's fast tokenizer, loaded once per process, with truncation and padding off.

    ``model_path`` is the model's path as configured (``ModelSpec.path``): ``package:MODULE``
    or a directory, resolved here by :func:`embedfleet.config.resolve_model_path`, as the
    embedders resolve it. Chunk tasks are given that form rather than the driver's resolved
    directory, which need not exist on a worker whose Python lives elsewhere. The directory's
    ``tokenizer.json`` is read with :mod:`tokenizers`; without one, transformers' fast
    tokenizer for the directory is used. The file may ask for truncation/padding (MiniLM's
    truncates at 128): both are switched off, otherwise counts would silently stop at the
    truncation length.
    """
    from tokenizers import Tokenizer

    model_path = resolve_model_path(model_path)
    path = Path(model_path) / "tokenizer.json"
    if path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
    else:
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(model_path, use_fast=True)
            tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        except Exception as exc:  # transformers raises many types for a missing/odd model dir
            raise ChunkingError(f"cannot load a fast tokenizer from {model_path}: {exc}") from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _as_tokenizer(tokenizer: Any) -> Tokenizer:
    # Accept transformers' fast tokenizers too; never mutate a caller's object (another thread
    # may be encoding with it), copy it if it truncates or pads.
    inner = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(inner, "encode_batch"):
        raise ChunkingError(f"chunking needs a fast (tokenizers) tokenizer, not {type(tokenizer).__name__}")
    if inner.truncation is not None or inner.padding is not None:
        from tokenizers import Tokenizer

        inner = Tokenizer.from_str(inner.to_str())
        inner.no_truncation()
        inner.no_padding()
    return inner


def reserved_tokens(model_path: str, *, prefix: str = "") -> int:
    """Tokens the embedder adds to every chunk: special tokens plus the document prefix.

    The chunk budget is ``max_seq_length - reserved_tokens(...)``.
    """
    tokenizer = load_tokenizer(model_path)
    extra = len(tokenizer.encode(prefix, add_special_tokens=False)) if prefix else 0
    return tokenizer.num_special_tokens_to_add(False) + extra


def validate_for_model(
    chunk_spec: ChunkSpec,
    max_tokens: int,
    *,
    model_name: str | None = None,
    max_seq_length: int | None = None,
) -> None:
    """Refuse a token chunk size the model cannot take whole.

    ``max_tokens`` is the chunk budget (the model's max sequence length less its reserved
    tokens). Word and character chunks are not refused: their windows shrink to fit.
    """
    if max_tokens < 1:
        raise ChunkingError(f"the model leaves no room for chunk text (max_tokens={max_tokens})")
    if chunk_spec.unit == "tokens" and chunk_spec.size > max_tokens:
        model = f"model {model_name!r}" if model_name else "the model"
        limit = f"max sequence length {max_seq_length}" if max_seq_length is not None else "its limit"
        reserved = (
            f", less {max_seq_length - max_tokens} special/prefix tokens"
            if max_seq_length is not None and max_seq_length != max_tokens
            else ""
        )
        raise ChunkingError(
            f"chunk size {chunk_spec.size} tokens is larger than the {max_tokens} tokens {model} can embed "
            f"({limit}{reserved}); it would silently truncate the tail of every full chunk. "
            f"Use a chunk size of at most {max_tokens} (embedfleet.chunk.size / --chunk-size)."
        )


# --------------------------------------------------------------------------- units


class _Units:
    """Unit boundaries of one document, and the document-tokenisation estimate of a window."""

    __slots__ = ("text", "unit", "n", "length", "bounds", "tok_starts", "tok_ends", "continues")

    def __init__(self, text: str, unit: str, tokens: _DocTokens | None = None):
        self.text = text
        self.unit = unit
        self.length = len(text)
        self.tok_starts = tokens.starts if tokens is not None else None
        # For clean_cut(), BERT-style tokenizers only: running max of token ends, and whether
        # each token continues the previous token's pre-tokenizer word.
        self.tok_ends = tokens.ends if tokens is not None else None
        self.continues = tokens.continues if tokens is not None else None
        tok_starts = self.tok_starts
        if unit == "chars":
            self.n = len(text)
            self.bounds = None
            return
        if unit == "tokens":
            starts = tok_starts if tok_starts is not None else []
        else:
            starts = [m.start() for m in _WORD.finditer(text)]
        self.n = len(starts)
        # bounds[u] is where a window starting at unit u starts; the first chunk starts at 0
        # and the last one ends at len(text), so leading/trailing whitespace is covered.
        self.bounds = [0, *starts[1:], self.length] if starts else [0]

    def bound(self, u: int) -> int:
        if self.bounds is None:
            return u
        return self.bounds[u]

    def max_end(self, i: int, budget: int) -> int:
        """Largest window end j (a unit) such that [bound(i), bound(j)) holds about ``budget``
        tokens of the document's tokenisation."""
        if self.unit == "tokens":
            return i + budget
        limit = self.approx_end(self.bound(i), budget)
        if self.bounds is None:
            return min(limit, self.n)
        return bisect.bisect_right(self.bounds, limit) - 1

    def clean_cut(self, p: int) -> bool:
        """True if no pre-tokenizer word spans position ``p`` (only known for BERT-style tokenizers)."""
        if self.continues is None:
            return False
        if p <= 0 or p >= self.length:
            return True
        starts, continues = self.tok_starts, self.continues
        k = bisect.bisect_left(starts, p)  # first token starting at or after p
        if k < len(starts) and starts[k] == p:
            return not continues[k]
        if k > 0 and self.tok_ends[k - 1] > p:
            return False  # inside a token
        # Between two tokens (whitespace, or characters the normaliser drops): clean unless
        # both tokens belong to one word ("x\u200by" is one word, "x" "##y").
        return k >= len(starts) or not continues[k]

    def doc_count(self, s: int, e: int) -> int:
        """Document tokens starting in [s, e): the exact count of text[s:e] at clean cuts."""
        starts = self.tok_starts
        return bisect.bisect_left(starts, e) - bisect.bisect_left(starts, s)

    def approx_end(self, a: int, budget: int) -> int:
        """The start of the document token that would be the ``budget + 1``-th of text[a:]."""
        starts = self.tok_starts
        first = bisect.bisect_left(starts, a)
        target = first + budget
        # Text that starts inside a token (chars windows do) re-tokenises its tail as one more
        # token; whitespace is never inside a token.
        if (first == len(starts) or starts[first] != a) and a < self.length and not self.text[a].isspace():
            target -= 1
        return starts[target] if target < len(starts) else self.length


class _DocTokens:
    """What the window planner needs from a document's own tokenisation."""

    __slots__ = ("starts", "ends", "continues")

    def __init__(self, encoding: Any, length: int, *, words: bool):
        import numpy as np

        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        # Normalisers can emit non-monotonic offsets in corner cases; boundaries must never go
        # backwards, and never past the text.
        self.starts: list[int] = np.minimum(np.maximum.accumulate(offsets[:, 0]), length).tolist() if len(offsets) else []
        self.ends: list[int] | None = None
        self.continues: list[bool] | None = None
        if words and len(offsets):
            self.ends = np.maximum.accumulate(offsets[:, 1]).tolist()
            ids = np.array(encoding.word_ids, dtype=float)  # None (a token outside words) -> nan
            continues = np.zeros(len(ids), dtype=bool)
            continues[1:] = ids[1:] == ids[:-1]  # nan never equals: such tokens start a word
            self.continues = continues.tolist()


_CONTEXT_FREE: dict[int, tuple[Any, bool]] = {}


def _context_free(tokenizer: Tokenizer) -> bool:
    """Is tokenisation a concatenation over pre-tokenizer words (so clean cuts need no re-encode)?"""
    cached = _CONTEXT_FREE.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    import json

    try:
        pipeline = json.loads(tokenizer.to_str())
        normalizer = pipeline.get("normalizer") or {}
        verdict = (
            normalizer.get("type", "BertNormalizer") == "BertNormalizer"
            and (pipeline.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
            and (pipeline.get("model") or {}).get("type") == "WordPiece"
        )
    except (ValueError, AttributeError):
        verdict = False
    if len(_CONTEXT_FREE) > 16:
        _CONTEXT_FREE.clear()
    _CONTEXT_FREE[id(tokenizer)] = (tokenizer, verdict)
    return verdict


def _estimate_tokens(text: str, s: int, e: int) -> int:
    return -(-(e - s) // 4)


# --------------------------------------------------------------------------- planning


def _plan_document(
    text: str,
    units: _Units,
    *,
    size: int,
    overlap: int,
    max_tokens: int | None,
    count: Callable[[int, int], int],
    tokenized: bool,
) -> list[list[int]]:
    """The chunks of one document as ``[start, end, n_tokens]`` (see the module docstring).

    ``count(s, e)`` is the token count of ``text[s:e]``; during prefetch rounds it may answer
    ``_UNKNOWN``, which is treated as fitting (the round only collects what to count).
    """
    out: list[list[int]] = []
    pending: int | None = None  # start of leading blank text, given to the first real chunk

    def blank(s: int, e: int, c: int) -> bool:
        return s >= e or (tokenized and c == 0) or text[s:e].isspace()

    def fits(c: int) -> bool:
        return max_tokens is None or c <= max_tokens

    def emit(s: int, e: int, c: int) -> None:
        nonlocal pending
        if blank(s, e, c):
            if out:
                ps, pe, _ = out[-1]
                if e > pe:
                    merged = count(ps, e)
                    if fits(merged):
                        out[-1] = [ps, e, merged]
                    else:
                        logger.debug("dropping blank text [%d, %d): merging it would exceed %s tokens", pe, e, max_tokens)
            elif pending is None:
                pending = s
            return
        if pending is not None:
            if pending < s:
                merged = count(pending, e)
                if fits(merged):
                    s, c = pending, merged
            pending = None
        out.append([s, e, c])

    n = units.n
    i, prev_i, prev_j = 0, -1, 0
    while i < n:
        # A window starts after the previous window's start and ends after its end, in
        # characters: a chunk inside its predecessor would add nothing. (Units can share a
        # start: byte-level tokenizers give several tokens to one character.)
        if prev_i >= 0:
            floor = units.bound(prev_i)
            while i < n and units.bound(i) <= floor:
                i += 1
        covered = units.bound(prev_j) if prev_i >= 0 else 0
        lo = max(i + 1, prev_j + 1)
        while lo < n and units.bound(lo) <= covered:
            lo += 1
        if i >= n or units.bound(lo) <= covered:
            break
        j = min(i + size, n)
        if max_tokens is not None:
            j = min(j, units.max_end(i, max_tokens))
        j = max(j, lo)
        s = units.bound(i)
        e = units.bound(j)
        c = count(s, e)
        while not fits(c) and j > lo:
            j -= 1
            e = units.bound(j)
            c = count(s, e)
        if not fits(c) and i < prev_j:
            i += 1  # the limit leaves no room for this much overlap and a new unit
            continue
        if fits(c):
            emit(s, e, c)
        else:  # no overlap left to give up, and the smallest window with new text is over the limit
            for piece in _split_unit(s, e, units=units, count=count, max_tokens=max_tokens):
                emit(*piece)
        prev_i, prev_j = i, j
        if j >= n:
            break
        i = max(j - overlap, i + 1)
    return out


def _split_unit(
    s: int, e: int, *, units: _Units, count: Callable[[int, int], int], max_tokens: int
) -> list[tuple[int, int, int]]:
    """Cut one unit that alone exceeds ``max_tokens`` into consecutive pieces that fit."""
    pieces = []
    a = s
    while a < e:
        z = max(a + 1, min(e, units.approx_end(a, max_tokens)))
        c = count(a, z)
        if c > max_tokens:
            lo, hi = a + 1, z
            c_lo = count(a, lo)
            if c_lo > max_tokens:
                raise ChunkingError(
                    f"the character at offset {a} alone is {c_lo} tokens, more than max_tokens={max_tokens}"
                )
            # Token counts of growing prefixes are monotone in practice, not in theory: the
            # search may settle for a shorter piece, never for one that does not fit.
            while hi - lo > 1:
                mid = (lo + hi) // 2
                cm = count(a, mid)
                if 0 <= cm <= max_tokens or cm == _UNKNOWN:
                    lo, c_lo = mid, cm
                else:
                    hi = mid
            z, c = lo, c_lo
        pieces.append((a, z, c))
        a = z
    return pieces


def _chunk_texts(
    texts: Sequence[str],
    *,
    unit: str,
    size: int,
    overlap: int,
    tokenizer: Tokenizer | None,
    max_tokens: int | None,
) -> list[list[list[int]]]:
    ChunkSpec(unit=unit, size=size, overlap=overlap)  # the same validation as config
    if max_tokens is not None and max_tokens < 1:
        raise ChunkingError(f"max_tokens must be at least 1, not {max_tokens}")
    if tokenizer is None:
        if unit == "tokens":
            raise ChunkingError("chunking by tokens needs the model's tokenizer (model_path)")
        if max_tokens is not None:
            raise ChunkingError("max_tokens can only be enforced with the model's tokenizer (model_path)")
        return [
            _plan_document(
                text,
                _Units(text, unit, None),
                size=size,
                overlap=overlap,
                max_tokens=None,
                count=functools.partial(_estimate_tokens, text),
                tokenized=False,
            )
            for text in texts
        ]

    tokenizer = _as_tokenizer(tokenizer)
    results: list[list[list[int]]] = []
    batch: list[str] = []
    chars = 0
    for text in texts:
        if batch and chars + len(text) > _BATCH_CHARS:
            results.extend(_chunk_batch(batch, unit=unit, size=size, overlap=overlap, tokenizer=tokenizer, max_tokens=max_tokens))
            batch, chars = [], 0
        batch.append(text)
        chars += len(text)
    if batch:
        results.extend(_chunk_batch(batch, unit=unit, size=size, overlap=overlap, tokenizer=tokenizer, max_tokens=max_tokens))
    return results


def _chunk_batch(
    texts: Sequence[str],
    *,
    unit: str,
    size: int,
    overlap: int,
    tokenizer: Tokenizer,
    max_tokens: int | None,
) -> list[list[list[int]]]:
    # The document's own tokenisation gives the token units, and for words/chars the first
    # guess of each window's size, so that shrinking is rare.
    if unit == "tokens" or max_tokens is not None:
        context_free = _context_free(tokenizer)
        units = [
            _Units(text, unit, _DocTokens(enc, len(text), words=context_free))
            for text, enc in zip(texts, tokenizer.encode_batch(list(texts), add_special_tokens=False))
        ]
    else:
        units = [_Units(text, unit, None) for text in texts]
    caches: list[dict[tuple[int, int], int]] = [{} for _ in texts]
    results: list[list[list[int]] | None] = [None] * len(texts)

    def plan(d: int, count: Callable[[int, int], int]) -> list[list[int]]:
        return _plan_document(
            texts[d], units[d], size=size, overlap=overlap, max_tokens=max_tokens, count=count, tokenized=True
        )

    todo = [d for d in range(len(texts)) if units[d].n]
    for d in range(len(texts)):
        if not units[d].n:
            results[d] = []
    for _ in range(_PREFETCH_ROUNDS):
        if not todo:
            break
        wanted: list[tuple[int, int, int]] = []
        still = []
        for d in todo:
            cache = caches[d]
            missing: list[tuple[int, int, int]] = []

            def lookup(s: int, e: int, cache=cache, missing=missing, d=d, u=units[d]) -> int:
                c = cache.get((s, e))
                if c is None:
                    if u.clean_cut(s) and u.clean_cut(e):
                        c = cache[(s, e)] = u.doc_count(s, e)
                        return c
                    missing.append((d, s, e))
                    return _UNKNOWN
                return c

            result = plan(d, lookup)
            if missing:
                wanted.extend(missing)
                still.append(d)
            else:
                results[d] = result
        if wanted:
            wanted = list(dict.fromkeys(wanted))
            encoded = tokenizer.encode_batch_fast([texts[d][s:e] for d, s, e in wanted], add_special_tokens=False)
            for (d, s, e), enc in zip(wanted, encoded):
                caches[d][(s, e)] = len(enc)
        todo = still
    for d in todo:
        cache, text = caches[d], texts[d]

        def exact(s: int, e: int, cache=cache, text=text, u=units[d]) -> int:
            c = cache.get((s, e))
            if c is None:
                if u.clean_cut(s) and u.clean_cut(e):
                    c = u.doc_count(s, e)
                else:
                    c = len(tokenizer.encode(text[s:e], add_special_tokens=False))
                cache[(s, e)] = c
            return c

        results[d] = plan(d, exact)
    return results  # type: ignore[return-value]


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
) -> pa.Table:
    """Chunk one documents partition into a chunk frame (schema ``CHUNKS``).

    Rows with an ``error`` (documents the reader could not read) are skipped. ``model_path``
    gives the tokenizer (required for ``unit="tokens"`` and for ``max_tokens``); ``max_tokens``
    is the chunk budget, already net of the model's special tokens (:func:`reserved_tokens`).
    Chunk metadata is the document's metadata, unchanged.
    """
    documents = check_schema(documents, DOCUMENTS, stage="chunk input")
    tokenizer = load_tokenizer(model_path) if model_path else None
    doc_ids = documents.column("doc_id").to_pylist()
    texts_all = documents.column("text").to_pylist()
    metas_all = documents.column("metadata").to_pylist()
    errors = documents.column("error").to_pylist()
    keep = [k for k in range(len(doc_ids)) if errors[k] is None and texts_all[k] is not None]
    texts = [texts_all[k] for k in keep]
    for k, text in zip(keep, texts):
        if len(text) > _INT32_MAX:
            raise ChunkingError(f"{doc_ids[k]}: {len(text)} characters do not fit the int32 offsets of the chunk frame")
    planned = _chunk_texts(texts, unit=unit, size=size, overlap=overlap, tokenizer=tokenizer, max_tokens=max_tokens)

    columns: dict[str, list] = {name: [] for name in CHUNKS.names}
    for k, text, chunks in zip(keep, texts, planned):
        doc_id, meta = doc_ids[k], metas_all[k]
        for index, (s, e, c) in enumerate(chunks):
            piece = text[s:e]
            columns["chunk_id"].append(chunk_id(doc_id, index, piece))
            columns["doc_id"].append(doc_id)
            columns["chunk_index"].append(index)
            columns["text"].append(piece)
            columns["start"].append(s)
            columns["end"].append(e)
            columns["n_tokens"].append(c)
            columns["metadata"].append(meta)
    table = pa.Table.from_pydict(columns, schema=CHUNKS)
    logger.debug("chunked %d documents into %d chunks", len(keep), table.num_rows)
    return check_schema(table, CHUNKS, stage="chunk")
