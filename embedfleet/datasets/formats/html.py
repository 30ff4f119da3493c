"""HTML pages reduced to their visible text, keeping where their headings are.

:func:`html_to_text` gives a page's text (a newline per block, a blank line per paragraph, as a
browser lays it out), its title, and its ``h1``-``h6`` headings as ``[start, end, level]``
offsets into that text. The files reader records the headings in the document's metadata under
:data:`HEADINGS_KEY`, where the chunker (``chunk.structure: auto``) finds them; chunks do not
carry the key.
"""

from __future__ import annotations

import re

__all__ = ["HEADINGS_KEY", "declared_html_decode", "html_to_text"]

#: Document metadata key of an HTML page's headings: ``[[start, end, level], ...]``.
HEADINGS_KEY = "_headings"

_BLOCK_BREAK = {
    "p", "pre", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "dl", "section",
    "article", "header", "footer", "nav", "aside", "main", "figure", "form", "fieldset", "details", "hr",
}
_LINE_BREAK = {"div", "li", "tr", "dt", "dd", "caption", "figcaption", "summary", "address", "option", "legend", "body"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_DROP = ["script", "style", "head", "noscript", "template"]
_SPACES = re.compile(r"\s+")


def declared_html_decode(data: bytes) -> str | None:
    """``data`` decoded with the encoding the page declares, if it declares one other than UTF-8."""
    from bs4.dammit import EncodingDetector

    declared = EncodingDetector.find_declared_encoding(data, is_html=True)
    if not declared or declared.lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig"):
        return None
    try:
        return data.decode(declared)
    except (LookupError, UnicodeDecodeError):
        return None


def html_to_text(markup: str) -> tuple[str, str | None, list[list[int]]]:
    """Visible text of an HTML page, with a newline per block and a blank line per paragraph.

    Whitespace inside ordinary elements is collapsed as a browser would; ``<pre>`` keeps its own.
    Returns the text, the page title and the headings (``[start, end, level]`` into the text;
    a heading inside another counts as part of the outer one, an empty one not at all).
    """
    from bs4 import (
        BeautifulSoup,
        Comment,
        Declaration,
        Doctype,
        NavigableString,
        ProcessingInstruction,
        Tag,
    )

    soup = BeautifulSoup(markup, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    for tag in soup.find_all(_DROP):
        tag.decompose()

    parts: list[str] = []
    # Pending newlines; whether output ends in whitespace; characters written; the level of an
    # open heading whose text has not started yet.
    state = {"break": 0, "space": True, "length": 0, "heading": 0}
    headings: list[list[int]] = []

    def trim_last() -> None:
        trimmed = parts[-1].rstrip(" ")
        state["length"] -= len(parts[-1]) - len(trimmed)
        parts[-1] = trimmed

    def append(text: str) -> None:
        parts.append(text)
        state["length"] += len(text)

    def block(newlines: int) -> None:
        state["break"] = max(state["break"], newlines)

    def write(text: str, pre: bool) -> None:
        if not pre:
            text = _SPACES.sub(" ", text)
            if state["break"] or state["space"]:
                text = text.lstrip(" ")
        if not text:
            return
        if state["break"]:
            if parts:
                trim_last()
                append("\n" * state["break"])
            state["break"] = 0
        if state["heading"] and text.strip():
            headings.append([state["length"] + len(text) - len(text.lstrip()), -1, state["heading"]])
            state["heading"] = 0
        append(text)
        state["space"] = text[-1].isspace()

    def walk(node: Tag, pre: bool) -> None:
        for child in node.children:
            if isinstance(child, (Comment, Declaration, Doctype, ProcessingInstruction)):
                continue
            if isinstance(child, NavigableString):
                write(str(child), pre)
            elif isinstance(child, Tag):
                name = child.name.lower()
                if name == "br":
                    if parts:
                        trim_last()
                    append("\n")
                    state["space"] = True
                    continue
                newlines = 2 if name in _BLOCK_BREAK else 1 if name in _LINE_BREAK else 0
                if name in ("td", "th") and parts and not state["space"]:
                    write(" ", False)
                block(newlines)
                level = _HEADINGS.get(name, 0)
                outer = level and not state["heading"] and not (headings and headings[-1][1] < 0)
                if outer:
                    state["heading"] = level
                walk(child, pre or name in ("pre", "textarea"))
                if outer:
                    state["heading"] = 0
                    if headings and headings[-1][1] < 0:
                        headings[-1][1] = state["length"]
                block(newlines)

    walk(soup, False)
    joined = "".join(parts)
    text = joined.strip()
    lead = len(joined) - len(joined.lstrip())
    spans = []
    for start, end, level in headings:
        start, end = start - lead, min(end - lead, len(text))
        if 0 <= start < end:
            spans.append([start, end, level])
    return text, title or None, spans
