"""Windows of one document: its units and the planner that cuts them into chunks (steps 2-5 of
the algorithm in :mod:`embedfleet.tasks.chunking`)."""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from embedfleet.errors import ChunkingError

if TYPE_CHECKING:
    from embedfleet.tasks.chunking.tokenizer import _DocTokens

logger = logging.getLogger("embedfleet.tasks.chunking")

_WORD = re.compile(r"\S+")
# Whitespace before a word: where a window may end.
_GAP = re.compile(r"\s+(?=\S)")
# By rank: the gaps before a word that end a paragraph, a line, a sentence (a stop, maybe closed
# by a quote or bracket). Each also matches the gaps of the ranks above it.
_ENDS = {
    3: re.compile(r"\n[^\S\n]*\n\s*(?=\S)"),
    2: re.compile(r"\n\s*(?=\S)"),
    1: re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"')\]\u201d\u2019\u00bb]?\s+(?=\S)"),
}
# The least share of a full window (percent, by rank: none, sentence, line, paragraph) an end
# of that rank must leave; plain whitespace may end anywhere past the previous window's end.
# Measured on python-docs (hard-wrapped, so a line break is often mid-sentence): lower shares
# give nicer ends but shorter chunks (70-85%: mean 0.86 of the budget; these: 0.89).
_MIN_SHARE = (0, 90, 92, 80)
# str.isspace() by code point, as an array (the last whitespace character is U+3000).
_SPACE_TABLE = np.array([chr(c).isspace() for c in range(0x3002)])
# A count not known yet (a prefetch round only collects what to count): treated as fitting.
_UNKNOWN = -1


def _word_aligned(text: str, tokens: _DocTokens) -> list[int]:
    """Token starts, each moved back over characters the tokenizer dropped (control and
    zero-width characters) to where its word starts, so a window can end there."""
    starts = tokens.starts
    if len(starts) < 2:
        return starts
    s, e = tokens.arrays
    # Tokens after a gap that does not end in whitespace: found in arrays, not a loop over tokens.
    after_gap = np.nonzero(e[:-1] < s[1:])[0] + 1
    if not len(after_gap):
        return starts
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    odd = after_gap[~_SPACE_TABLE[np.minimum(codes[s[after_gap] - 1], len(_SPACE_TABLE) - 1)]]
    moved = None
    for u in odd.tolist():
        a, floor = starts[u] - 1, int(e[u - 1])
        while a > floor and not text[a - 1].isspace():
            a -= 1
        if text[a - 1].isspace():
            moved = moved or list(starts)
            moved[u] = a
    return moved or starts


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
        if unit == "chars":
            self.n = len(text)
            self.bounds = None
            return
        if unit == "tokens":
            starts = _word_aligned(text, tokens) if tokens is not None else []
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

    def word_start(self, u: int) -> bool:
        """Does unit ``u`` start where a word starts (a window may begin or end there)?"""
        p = self.bound(u)
        return p <= 0 or p >= self.length or (self.text[p - 1].isspace() and not self.text[p].isspace())

    def next_word_start(self, u: int, limit: int) -> int:
        """The first unit in ``[u, limit]`` that starts a word, else ``limit``."""
        while u < limit and not self.word_start(u):
            u += 1
        return u

    def boundary_end(self, i: int, lo: int, hi: int) -> int | None:
        """The best end in ``[lo, hi]`` for a window starting at unit ``i``, or None if every
        end in it is inside a word.

        Ends are word starts (the whitespace before a word closes the chunk), ranked by the gap
        before them: paragraph break, line break, sentence end, plain whitespace. A higher rank
        counts if it leaves the window at least ``_MIN_SHARE[rank]`` of its full length ``hi - i``
        (else it counts as the next lower rank); the highest rank wins, then the later end.
        """
        if hi >= self.n:
            return self.n  # the end of the text
        span, b = hi - i, self.bound(hi)
        for rank in (3, 2, 1):
            floor = max(lo, i + -(-span * _MIN_SHARE[rank] // 100))
            end = self._last_end(_ENDS[rank], self.bound(floor), b, floor, hi)
            if end is not None:
                return end
        # Plain whitespace: the last word start, looked for near the end first.
        near = max(self.bound(lo), b - 128)
        end = self._last_end(_GAP, near, b, lo, hi)
        if end is None and near > self.bound(lo):
            end = self._last_end(_GAP, self.bound(lo), near, lo, hi)
        return end

    def _last_end(self, pattern: re.Pattern, a: int, b: int, lo: int, hi: int) -> int | None:
        """The last unit in ``[lo, hi]`` that starts where a match of ``pattern`` in ``text[a:b]``
        (widened to the whole gap that ends at ``a``) ends."""
        text = self.text
        a -= 2  # a sentence's stop and closing quote, before its gap
        while a > 0 and text[a - 1].isspace():
            a -= 1
        best = None
        for m in pattern.finditer(text, max(a, 0), b + 1):
            p = m.end()
            u = p if self.bounds is None else bisect.bisect_left(self.bounds, p)
            if lo <= u <= hi and self.bound(u) == p:
                best = u
        return best

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
        # The best boundary that fits; a window whose text fails the count looks again below.
        end, hi = None, j
        while hi >= lo:
            end = units.boundary_end(i, lo, hi)
            if end is None:
                break
            c = count(s, units.bound(end))
            if fits(c):
                break
            end, hi = None, end - 1
        if end is None and j < (cap := min(i + size, n)):
            # The token estimate may stop short of a word end that does fit: try that end.
            nxt = units.next_word_start(j + 1, cap)
            if units.word_start(nxt) or nxt == n:
                c = count(s, units.bound(nxt))
                if fits(c):
                    end = nxt
        if end is None and i < prev_j:
            # No boundary fits beside the overlap: the overlap gives way (to the next word
            # start), before a word is cut.
            i = units.next_word_start(i + 1, prev_j)
            continue
        if end is not None:
            j = end
            emit(s, units.bound(j), c)
        else:
            # One word alone is over the budget: cut inside it, as close to the budget as fits.
            e = units.bound(j)
            c = count(s, e)
            while not fits(c) and j > lo:
                j -= 1
                e = units.bound(j)
                c = count(s, e)
            if fits(c):
                emit(s, e, c)
            else:  # the smallest window with new text is over the limit
                for piece in _split_unit(s, e, units=units, count=count, max_tokens=max_tokens):
                    emit(*piece)
        prev_i, prev_j = i, j
        if j >= n:
            break
        # The overlap starts at a word: the first word start at or after `overlap` units back.
        i = units.next_word_start(max(j - overlap, i + 1), j)
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
