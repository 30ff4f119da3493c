"""Chunking many documents at once: one batched tokenisation, and batched re-encoding of the
windows whose counts are not known from the document's own tokens."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from embedfleet.config import ChunkSpec
from embedfleet.errors import ChunkingError
from embedfleet.tasks.chunking.tokenizer import _as_tokenizer, _context_free, _DocTokens
from embedfleet.tasks.chunking.windows import (
    _UNKNOWN,
    _estimate_tokens,
    _plan_document,
    _Units,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Re-tokenisation is batched (encode_batch_fast, parallel in Rust) over every chunk of a
# partition. A window that turns out too long moves every later window of its document, so
# the plan is redone with the new counts; after this many rounds the stragglers are finished
# one encode at a time.
_PREFETCH_ROUNDS = 4
# Documents are tokenised in batches of about this many characters: encode_batch runs in
# parallel within a batch, and the offsets held for planning stay bounded (a 16 MiB partition
# would otherwise hold several hundred MB of encodings at once).
_BATCH_CHARS = 1_000_000


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
