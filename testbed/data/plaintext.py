"""Plain-text documents from the formats the domain sources come in (`testbed-data`; the sources:
testbed/data/corpora.py): the cleaning and splitting every document gets, grouping of short records into
documents, and one converter per format: Markdown plays into scenes, licence-matching patterns into licence
text, OSIS Bible markup into verses, groff manual pages into terminal text.
"""

from __future__ import annotations

import html
import re
import subprocess
from collections.abc import Iterable, Iterator

MAX_DOCUMENT_BYTES = 32_000
"""Documents longer than this (UTF-8 bytes) are split at paragraph, then line boundaries."""


# ----------------------------------------------------------------------------------------------
# Cleaning and splitting (shared by every source)

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str) -> str:
    """Normalize line endings to ``\\n``, drop control characters except ``\\n``/``\\t`` and
    anything not encodable as UTF-8 (lone surrogates), strip trailing spaces and outer blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARS.sub("", text)
    text = text.encode("utf-8", "ignore").decode("utf-8")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


_SPLIT_POINTS = [re.compile(p) for p in (r"(?<=\n\n)", r"(?<=\n)", r"(?<=[.!?] )", r"(?<= )")]


def split_document(text: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> list[str]:
    """Split ``text`` into pieces of at most ``max_bytes`` UTF-8 bytes, preferring paragraph,
    then line, then sentence, then word boundaries, and character boundaries as a last resort.
    Joining the pieces gives back ``text``."""
    if _utf8_len(text) <= max_bytes:
        return [text]
    for split_point in _SPLIT_POINTS:
        parts = [part for part in split_point.split(text) if part]
        if len(parts) > 1:
            break
    else:  # no boundary at all: cut at character boundaries
        data, pieces = text.encode("utf-8"), []
        while data:
            piece = data[:max_bytes].decode("utf-8", "ignore")  # drops a cut multi-byte character
            pieces.append(piece)
            data = data[len(piece.encode("utf-8")) :]
        return pieces
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for part in parts:
        part_bytes = _utf8_len(part)
        if current and size + part_bytes <= max_bytes:
            current.append(part)
            size += part_bytes
            continue
        if current:
            pieces.append("".join(current))
        if part_bytes > max_bytes:
            pieces.extend(split_document(part, max_bytes))
            current, size = [], 0
        else:
            current, size = [part], part_bytes
    if current:
        pieces.append("".join(current))
    return pieces


def _group(pieces: Iterable[str], max_bytes: int, separator: str) -> Iterator[str]:
    """Join consecutive pieces with `separator` into documents of about ``max_bytes`` bytes."""
    current: list[str] = []
    size = 0
    for piece in pieces:
        if current and size + _utf8_len(piece) + len(separator) > max_bytes:
            yield separator.join(current)
            current, size = [], 0
        current.append(piece)
        size += _utf8_len(piece) + len(separator)
    if current:
        yield separator.join(current)


def group_lines(lines: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Join consecutive lines into documents of about ``max_bytes`` bytes."""
    return _group(lines, max_bytes, "\n")


def group_paragraphs(paragraphs: list[str], max_bytes: int) -> Iterator[str]:
    """Join consecutive paragraphs, a blank line between them, into documents of about ``max_bytes``."""
    return _group(paragraphs, max_bytes, "\n\n")


def clean_documents(documents: Iterable[str], max_bytes: int = MAX_DOCUMENT_BYTES) -> Iterator[str]:
    """The non-empty documents of ``documents`` cleaned (:func:`clean_text`), each split into pieces of at
    most ``max_bytes`` UTF-8 bytes (:func:`split_document`), without outer blank lines."""
    for document in documents:
        text = clean_text(document)
        if not text.strip():
            continue
        for piece in split_document(text, max_bytes):
            piece = piece.lstrip("\n").rstrip()
            if piece.strip():
                yield piece


# ----------------------------------------------------------------------------------------------
# Plays (Markdown), licence patterns, OSIS markup, manual pages

_MARKDOWN_NOISE = re.compile(r"[*_\\]")


def play_scenes(markdown: str) -> Iterator[str]:
    """Split one play into scenes; each scene starts with the play title, act and scene heading."""
    title, act, scene, body = "", "", "", []

    def flush() -> Iterator[str]:
        text = "\n".join(body).strip()
        if text:
            yield "\n".join(h for h in (title, act, scene) if h) + "\n\n" + text

    for line in markdown.split("\n"):
        line = _MARKDOWN_NOISE.sub("", line).rstrip()
        heading = re.match(r"^(#+)\s*(.*)$", line)
        if not heading:
            body.append(line)
            continue
        yield from flush()
        body = []
        level, name = len(heading.group(1)), heading.group(2).strip()
        if level == 1 and not title:
            title = name
        elif level <= 2:
            act, scene = name, ""
        else:
            scene = name
    yield from flush()


_LRE_TOKEN = re.compile(r"//\*\*.*?\*\*//|\\.|\(\(|\)\)(?:\?\?)?|\|\||__\d*__", re.DOTALL)


def render_license_pattern(pattern: str) -> str:
    """Render a licensecheck "LRE" matching pattern as plain licence text.

    The pattern language has ``((a || b))`` alternatives, ``((x))??`` optional text, ``__N__``
    wildcards and ``//** comments **//``. We keep optional text, drop wildcards and comments, and
    take the first alternative unless another is over 200 characters and three times longer (then
    the longest: in several patterns the first alternative is a short notice, another the full text).
    """
    stack: list[list[list[str]]] = [[[]]]  # groups -> alternatives -> text pieces
    position = 0
    for match in _LRE_TOKEN.finditer(pattern):
        stack[-1][-1].append(pattern[position : match.start()])
        position = match.end()
        token = match.group(0)
        if token.startswith("//**") or token.startswith("__"):
            continue
        if token.startswith("\\"):
            stack[-1][-1].append(token[1:])
        elif token == "((":
            stack.append([[]])
        elif token == "||":
            stack[-1].append([])
        elif len(stack) > 1:  # "))" or "))??"
            alternatives = ["".join(alt) for alt in stack.pop()]
            chosen = alternatives[0]
            longest = max(alternatives, key=len)
            if len(longest.strip()) > max(3 * len(chosen.strip()), 200):
                chosen = longest
            stack[-1][-1].append(" " + chosen + " ")
    stack[-1][-1].append(pattern[position:])
    while len(stack) > 1:  # unbalanced pattern: close what is open
        inner = "".join(stack.pop()[0])
        stack[-1][-1].append(inner)
    text = "".join(stack[0][0])
    # The patterns are whitespace-insensitive and laid out one phrase per line: reflow paragraphs.
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", text)]
    text = "\n\n".join(p for p in paragraphs if p)
    return re.sub(r" ([,.;:)])", r"\1", text).replace("( ", "(")


_OSIS_NOTE_BEFORE_WORD = re.compile(r"<note\b.*?</note>(?=<w\b)", re.DOTALL)  # the note held the space
_OSIS_NOTE_OR_TITLE = re.compile(r"<(note|title)\b.*?</\1>", re.DOTALL)
_XML_TAG = re.compile(r"<[^>]*>")


def osis_to_text(osis: str) -> str:
    """Strip OSIS markup: footnotes and headings go, word tags keep their words."""
    text = _OSIS_NOTE_OR_TITLE.sub("", _OSIS_NOTE_BEFORE_WORD.sub(" ", osis))
    text = _XML_TAG.sub("", text)
    text = html.unescape(text)
    return "\n".join(" ".join(line.split()) for line in text.split("\n") if line.strip())


GROFF = "groff"
GROFF_ARGS = ("-Kutf-8", "-t", "-Tutf8", "-man", "-rHY=0", "-P", "-cbou")
"""UTF-8 input, tables through tbl, plain UTF-8 terminal output of the man macros, no hyphenation;
``-P -cbou``: grotty writes no SGR escapes and no overstrikes (bold, underline)."""
GROFF_PRELUDE = b".ad l\n.ss 12 0\n.hla none\n"
"""Prepended to every page: adjust left (no justification, so no runs of padding spaces), no extra
space after sentences, and a hyphenation language without patterns (pages that switch hyphenation
back on with ``.hy`` still get no hyphenated words). Japanese is formatted without groff's ``-mja``,
so lines break only at spaces, never inside a word."""
_OVERSTRIKE = re.compile(r".\x08")
_BLANK_LINES = re.compile(r"\n{3,}")


def is_man_redirect(source: str) -> bool:
    """True for a page whose first request is ``.so`` (it only includes another page)."""
    for line in source.split("\n"):
        stripped = line.strip()
        if not stripped or stripped.startswith(('.\\"', "'\\\"", '\\"')) or stripped == ".":
            continue
        return stripped.startswith(".so ") or stripped == ".so"
    return False


def render_man_page(source: bytes, name: str = "<page>") -> str:
    """Format one page's groff source with ``groff -Tutf8 -man`` as plain UTF-8 text.

    The page header and footer lines (title, section, date, version) are dropped, blank-line runs
    become one blank line, trailing spaces go, and hyphens are ASCII ``-``. Body text keeps
    groff's layout: 78 columns, 7-space indentation, lists and tables as a terminal shows them.
    """
    command = [GROFF, *GROFF_ARGS]
    result = subprocess.run(
        command, input=GROFF_PRELUDE + source, capture_output=True, check=False, timeout=120
    )
    if result.returncode != 0:
        error = result.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(f"{' '.join(command)} failed on {name} (exit {result.returncode}): {error}")
    text = _OVERSTRIKE.sub("", result.stdout.decode("utf-8", "replace"))
    text = text.replace("\u2010", "-")  # groff writes the source's plain "-" as U+2010 HYPHEN
    lines = [line.rstrip() for line in text.split("\n")]
    content = [i for i, line in enumerate(lines) if line]
    if len(content) >= 3:
        first, last = content[0], content[-1]
        if not lines[first + 1]:  # the header: a title line followed by blank lines
            lines[first] = ""
        if not lines[last - 1]:  # the footer: a line after a blank line, at the very end
            lines[last] = ""
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")
