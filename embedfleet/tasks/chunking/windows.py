"""Windows of one document: its units and the planner that cuts them into chunks (steps 2-5 of
the algorithm in :mod:`embedfleet.tasks.chunking`)."""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from embedfleet.errors import ChunkingError

if TYPE_CHECKING:
    from embedfleet.tasks.chunking.tokenizer import _DocTokens

logger = logging.getLogger("embedfleet.tasks.chunking")

_WORD = re.compile(r"\S+")
# A count not known yet (a prefetch round only collects what to count): treated as fitting.
_UNKNOWN = -1


class _Units:
    """Unit boundaries of one document, and the document-tokenisation estimate of a window."""

    __slots__ = ("bounds", "continues", "length", "n", "text", "tok_ends", "tok_starts", "unit")

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
