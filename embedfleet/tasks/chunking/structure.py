"""Document structure for chunking (``chunk.structure: auto``): where headings begin, and the
section path of the text under each.

A document's markup is known from its id's suffix (a file source's id is its relative path):
``.md``/``.markdown`` are Markdown (ATX ``#`` headings and setext underlines, outside fenced
code), ``.rst``/``.rest`` reStructuredText (a title underlined, maybe also overlined, with one
punctuation character; levels in the order the styles first appear, as docutils does), and
``.html``/``.htm`` pages carry the ``h1``-``h6`` headings the HTML reader found, as offsets into
their visible text (document metadata ``_headings``: ``[[start, end, level], ...]``). Any other
document has no structure: one section, no path.

A section runs from the start of its heading's first line (an RST overline included) to the
next heading; text before the first heading is a section with an empty path. Each title is
whitespace-collapsed and at most ``_TITLE_CHARS`` characters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from embedfleet.datasets.formats.html import HEADINGS_KEY

__all__ = [
    "SEPARATOR",
    "Section",
    "document_sections",
    "embedded_text",
    "embedding_texts",
    "markup_of",
    "section_of",
    "sections",
    "with_section",
]
#: Between the titles of a section path, in chunk metadata (``section``) and in search output.
SEPARATOR = " > "
_TITLE_CHARS = 120

_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".rst": "rst", ".rest": "rst", ".html": "html", ".htm": "html"}

_LINE = re.compile(r"[^\n]*(?:\n|$)")
_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))??(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*$")
_RST_ADORNMENT = re.compile(r"([!-/:-@\[-`{-~])\1{2,}[ \t]*$")  # one punctuation character, 3+ times
_LIST_OR_QUOTE = re.compile(r" {0,3}(?:[-+*>]|\d+[.)])(?:\s|$)")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Section:
    start: int
    end: int
    path: tuple[str, ...]

    @property
    def label(self) -> str:
        return SEPARATOR.join(self.path)


def markup_of(doc_id: str) -> str | None:
    """``markdown``, ``rst``, ``html`` or None, from the document id's suffix."""
    dot = doc_id.rfind(".")
    if dot < 0 or "/" in doc_id[dot:]:
        return None
    return _SUFFIXES.get(doc_id[dot:].lower())


def sections(text: str, markup: str | None, headings: list | None = None) -> list[Section]:
    """The sections of ``text``: consecutive, covering it whole, each with its heading path.

    ``headings`` are the HTML reader's ``[start, end, level]`` (for ``markup == "html"``).
    """
    if markup == "markdown":
        found = _markdown(text)
    elif markup == "rst":
        found = _rst(text)
    elif markup == "html":
        found = _html(text, headings or [])
    else:
        found = []
    out: list[Section] = []
    stack: list[tuple[int, str]] = []
    previous, path = 0, ()
    for start, level, title in found:
        if start < previous or (start == previous and stack):
            continue  # out of order, or two at one place (only from malformed reader metadata)
        if start > previous:
            out.append(Section(previous, start, path))
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        previous, path = start, tuple(t for _, t in stack)
    if previous < len(text) or not out:
        out.append(Section(previous, len(text), path))
    return out


def _title(raw: str) -> str:
    title = _SPACES.sub(" ", raw).strip()
    return title if len(title) <= _TITLE_CHARS else title[: _TITLE_CHARS - 1].rstrip() + "\u2026"


def _lines(text: str) -> list[tuple[int, str]]:
    """(offset, line without its newline) of every line."""
    out, at = [], 0
    for line in text.split("\n"):
        out.append((at, line.rstrip("\r")))
        at += len(line) + 1
    return out


def _markdown(text: str) -> list[tuple[int, int, str]]:
    found: list[tuple[int, int, str]] = []
    lines = _lines(text)
    fence: str | None = None
    previous_blank = True
    for k, (at, line) in enumerate(lines):
        opened = _FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence) and not line[opened.end():].strip():
                fence = None
            previous_blank = False
            continue
        if opened:
            fence = opened.group(1)
            previous_blank = False
            continue
        atx = _ATX.match(line)
        if atx and atx.group(2) and atx.group(2).strip():
            found.append((at, len(atx.group(1)), _title(atx.group(2))))
        elif (
            previous_blank
            and line.strip()
            and not line.startswith(("    ", "\t"))
            and not _LIST_OR_QUOTE.match(line)
            and k + 1 < len(lines)
            and (under := _SETEXT.match(lines[k + 1][1]))
            and (under.group(1)[0] == "=" or len(under.group(1)) >= 2)
        ):
            found.append((at, 1 if under.group(1)[0] == "=" else 2, _title(line)))
        previous_blank = not line.strip()
    return found


def _rst(text: str) -> list[tuple[int, int, str]]:
    found: list[tuple[int, int, str]] = []
    styles: dict[tuple[str, bool], int] = {}
    lines = _lines(text)
    k = 0
    while k + 1 < len(lines):
        at, line = lines[k]
        title_line, start, over = None, at, False
        adorned = _RST_ADORNMENT.match(line)
        if adorned and k + 2 < len(lines) and lines[k + 1][1].strip() and not _RST_ADORNMENT.match(lines[k + 1][1]):
            under = _RST_ADORNMENT.match(lines[k + 2][1])
            if under and under.group(1) == adorned.group(1) and len(lines[k + 2][1].rstrip()) >= len(lines[k + 1][1].strip()):
                title_line, over = lines[k + 1][1], True
        if title_line is None and line.strip() and not line[0].isspace() and not adorned:
            under = _RST_ADORNMENT.match(lines[k + 1][1])
            if under and len(lines[k + 1][1].rstrip()) >= len(line.rstrip()) and (k == 0 or not lines[k - 1][1].strip()):
                title_line = line
        if title_line is None:
            k += 1
            continue
        char = _RST_ADORNMENT.match(lines[k + (2 if over else 1)][1]).group(1)
        level = styles.setdefault((char, over), len(styles) + 1)
        found.append((start, level, _title(title_line)))
        k += 3 if over else 2
    return found


def _html(text: str, headings: list) -> list[tuple[int, int, str]]:
    found = []
    for item in headings:
        try:
            start, end, level = (int(v) for v in item)
        except (TypeError, ValueError):
            continue
        if 0 <= start < end <= len(text) and 1 <= level <= 6 and (title := _title(text[start:end])):
            found.append((start, level, title))
    return sorted(found)


# --------------------------------------------------------------------------- chunk metadata


def embedded_text(text: str, section: str) -> str:
    """What the model embeds of a chunk with ``chunk.heading-context``: its section path and a
    blank line before its text (the stored text and offsets stay the chunk's own)."""
    return f"{section}\n\n{text}" if section else text


def section_of(metadata: str | None) -> str:
    """A chunk's ``section`` (its metadata JSON's string key), or ``""``."""
    if not metadata or '"section"' not in metadata:
        return ""
    try:
        value = json.loads(metadata).get("section")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def embedding_texts(texts: list[str], metadatas: list[str | None]) -> list[str]:
    """The texts the model embeds for chunks chunked with ``chunk.heading-context: true``."""
    return [embedded_text(text, section_of(meta)) for text, meta in zip(texts, metadatas)]


def document_sections(doc_id: str, text: str, metadata: str | None, structure: str) -> list[tuple[Section, str | None]]:
    """The sections of one document, each with the metadata its chunks carry: the document's,
    without the reader's headings, plus ``section`` where the path is not empty."""
    parsed = None
    if metadata and f'"{HEADINGS_KEY}"' in metadata:
        try:
            parsed = json.loads(metadata)
        except ValueError:
            parsed = None
    headings = None
    if isinstance(parsed, dict) and HEADINGS_KEY in parsed:
        headings = parsed.pop(HEADINGS_KEY)
        metadata = _dumps(parsed)
    markup = markup_of(doc_id) if structure == "auto" else None
    found = sections(text, markup, headings if isinstance(headings, list) else None)
    # Leading blank text belongs to the section after it, so coverage holds and no section is blank.
    merged: list[Section] = []
    for section in found:
        if merged and not text[merged[-1].start:merged[-1].end].strip():
            section = Section(merged.pop().start, section.end, section.path)
        merged.append(section)
    if len(merged) > 1 and not text[merged[-1].start:merged[-1].end].strip():
        last = merged.pop()
        merged[-1] = Section(merged[-1].start, last.end, merged[-1].path)
    out = []
    for section in merged:
        meta = metadata
        if section.path:
            base = parsed if parsed is not None else _loads_object(metadata)
            meta = _dumps({**base, "section": section.label})
        out.append((section, meta))
    return out


def with_section(metadata: str | None, section: str) -> str:
    """``metadata`` with its ``section`` replaced."""
    return _dumps({**_loads_object(metadata), "section": section})


def _loads_object(metadata: str | None) -> dict:
    try:
        value = json.loads(metadata) if metadata else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _dumps(meta: dict) -> str:
    from embedfleet.datasets.formats.common import dumps

    return dumps(meta)
