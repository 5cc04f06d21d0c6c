"""The languages mix: manual pages in 8 languages, formatted with groff, built with testbed-data.

The pages are synthetic (tests/languages_fixture.py), written like Debian's; no manpages package is
needed. Tests that format pages need the groff program (Debian groff-base) and are skipped without it.
"""

from __future__ import annotations

import gzip
import json
import math
import re

import pytest

from testbed.config import parse_config
from testbed.data import corpora, loading
from testbed.data.corpora import LANGUAGES_MIX, SOURCES
from testbed.data.datamodule import DomainMixDataModule
from testbed.data.tokenizer import load_tokenizer
from testbed.errors import DataError
from tests.conftest import SMALL_MODEL, compose
from tests.languages_fixture import (
    LANGUAGE_TEXT,
    build_tiny_languages_mix,
    hello_page,
    man_pages_at,
    requires_groff,
    write_man_tree,
)

HELLO_DE = """\
BEZEICHNUNG
       hello - gibt einen freundlichen Gruß aus

ÜBERSICHT
       hello [-q] [-n NAME]

BESCHREIBUNG
       Das Programm hello schreibt einen Gruß auf die Standardausgabe. Ohne
       Argumente begrüßt es die ganze Welt. Wird ein Name angegeben, so wird
       stattdessen diese Person begrüßt.

       Die Sprache der Ausgabe richtet sich nach der Umgebungsvariable LANG.
       Fehler werden auf die Standardfehlerausgabe geschrieben. Der
       Rückgabewert ist null, wenn der Gruß erfolgreich ausgegeben wurde.

OPTIONEN
       -n, --name=NAME
              Begrüßt die angegebene Person.

       -q, --quiet
              Unterdrückt alle Meldungen außer dem Gruß.

       -v, --version
              Zeigt die Versionsnummer an und beendet das Programm.

BEISPIELE
              $ hello -n "Ada Lovelace"
              $ hello | tr '[:lower:]' '[:upper:]'

SIEHE AUCH
       greetings(7), echo(1)"""

# What groff source looks like: escapes, requests at the start of a line, overstrikes, SGR.
ROFF_LEFTOVERS = re.compile(r"\\[fe(*\-\[\"&]|^[.'][A-Za-z\\]|\x08|\x1b", re.MULTILINE)


@pytest.fixture
def man_tree(tmp_path):
    man_root, dpkg_dir = write_man_tree(tmp_path / "sources")
    with man_pages_at(man_root, dpkg_dir):
        yield man_root


def test_sources_registered_not_shipped():
    assert LANGUAGES_MIX == ("de", "fr", "es", "it", "nl", "pl", "ru", "ja")
    for language in LANGUAGES_MIX:
        source = SOURCES[language]
        assert not source.shipped and language not in corpora.SHIPPED_DOMAINS
        assert source.document_unit == "manual page"
        assert "not shipped, local builds only" in source.licence
        assert f"manpages-{language} " in source.install and f"manpages-{language}-dev" in source.install
    assert SOURCES["de"].licence.startswith("GPL-3.0-or-later translations (manpages-l10n)")
    assert "JM Project" in SOURCES["ja"].licence


def test_redirect_detection():
    assert corpora.is_man_redirect('.\\" comment\n\n.so man1/hello.1\n')
    assert corpora.is_man_redirect("'\\\" t\n.so man3/printf.3")
    assert not corpora.is_man_redirect(hello_page("de"))


def test_page_files_follow_dpkg_lists_in_name_order(man_tree):
    names = [path.relative_to(man_tree).as_posix() for path in corpora.man_page_files("fr")]
    # the symbolic link hallo.1 and other.1 (in no package's list) are left out; sorted by page name
    assert names == ["fr/man7/greetings.7.gz", "fr/man1/hello.1.gz", "fr/man1/hi.1.gz"]


@requires_groff
def test_render_exact_page(man_tree):
    documents = list(corpora.iter_domain_documents("de"))
    assert len(documents) == 2  # greetings(7), hello(1); the .so redirect hi(1) is skipped
    assert documents[1] == HELLO_DE
    assert corpora.render_man_page(hello_page("de").encode("utf-8")) == HELLO_DE
    page = ".TH X 1\n.SH NAME\nx \\- open files read-only\n"
    assert corpora.render_man_page(page.encode("utf-8")) == "NAME\n       x - open files read-only"


@requires_groff
@pytest.mark.parametrize("language", LANGUAGES_MIX)
def test_extracted_text_is_clean(man_tree, language):
    documents = list(corpora.iter_domain_documents(language))
    assert len(documents) == 2
    text = LANGUAGE_TEXT[language]
    for document in documents:
        assert not ROFF_LEFTOVERS.search(document), document
        assert "HELLO(1)" not in document and "GREETINGS(7)" not in document  # header, footer gone
        assert "2024-01-01" not in document and "\n\n\n" not in document
        assert "\u2010" not in document  # no hyphenated words, although greetings(7) asks for them
        assert not re.search(r"\S  +\S", document.split(text["sections"][3])[0])  # prose: single spaces
        assert document.startswith(text["sections"][0] + "\n")
    greetings = documents[0]
    assert "-n   " + text["options"][0] in greetings  # the tbl table
    assert "•  " + text["sentences"][0] in greetings  # .IP \(bu
    hello = documents[1]
    words = re.sub(r"\s+", " ", hello)
    for sentence in text["sentences"]:
        assert sentence in words
    assert '$ hello -n "Ada Lovelace"' in hello


def test_missing_packages_name_them(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "DPKG_INFO_DIR", tmp_path / "nothing")
    assert not SOURCES["pl"].available()
    with pytest.raises(corpora.SourceMissingError, match="manpages-pl manpages-pl-dev groff-base"):
        corpora.iter_domain_documents("pl")


def test_missing_groff_names_package(monkeypatch, man_tree):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    with pytest.raises(corpora.SourceMissingError, match="groff-base"):
        corpora.iter_domain_documents("ru")


@requires_groff
def test_build_mix_and_tokenizer(tmp_path):
    root, tokenizer_path = build_tiny_languages_mix(tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    assert sorted(manifest["domains"]) == sorted(LANGUAGES_MIX)
    assert manifest["tokenizer"]["trained_on"] == list(LANGUAGES_MIX)
    for language in LANGUAGES_MIX:
        entry = manifest["domains"][language]
        assert entry["documents"] == 2 and entry["document_unit"] == "manual page"
        assert entry["source_id"] == f"manpages-{language}"
        with gzip.open(root / f"{language}.jsonl.gz", "rt", encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle]
        assert {r["domain"] for r in records} == {language}
    tokenizer = load_tokenizer(tokenizer_path)
    assert tokenizer.get_vocab_size() <= 512
    sample = LANGUAGE_TEXT["ja"]["sentences"][0] + " " + LANGUAGE_TEXT["ru"]["sentences"][0]
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample
    # the same sources give the same bytes
    again, _ = build_tiny_languages_mix(tmp_path / "again")
    for language in LANGUAGES_MIX:
        name = f"{language}.jsonl.gz"
        assert (root / name).read_bytes() == (again / name).read_bytes()


@requires_groff
def test_languages_config_loads_tiny_mix(tmp_path):
    root, tokenizer = build_tiny_languages_mix(tmp_path)
    overrides = ["data=languages", f"data.root={root}", f"data.tokenizer={tokenizer}", "data.seq_len=32"]
    run = parse_config(compose([*overrides, *SMALL_MODEL]))
    assert run.data.domains == list(LANGUAGES_MIX)
    datamodule = DomainMixDataModule(run.data)
    datamodule.setup()
    assert [d["domain"] for d in datamodule.describe()] == list(LANGUAGES_MIX)
    assert all(d["train_tokens"] > 0 and d["val_tokens"] > 0 for d in datamodule.describe())


def test_languages_config_paths():
    run = parse_config(compose(["data=languages"]))
    assert run.data.root == "data/languages" and run.data.tokenizer == "data/languages/tokenizer.json"
    assert run.data.domains == list(LANGUAGES_MIX) and run.data.sources == {}
    assert loading.build_command(run.data.root) == "make data-languages"


def test_missing_languages_mix_says_how_to_build(monkeypatch, tmp_path):
    """From any working directory, data/languages resolves to the checkout's; when it is absent,
    setup fails before training and names `make data-languages`."""
    checkout = tmp_path / "checkout"
    monkeypatch.setattr(loading, "PROJECT_ROOT", checkout)
    monkeypatch.setattr(loading, "BUILD_COMMANDS", {checkout / "data" / "languages": "make data-languages"})
    monkeypatch.chdir(tmp_path)
    run = parse_config(compose(["data=languages"]))
    with pytest.raises(DataError, match="make data-languages") as info:
        DomainMixDataModule(run.data).setup()
    assert str(checkout / "data" / "languages") in str(info.value)
    with pytest.raises(DataError, match=r"data\.root: folder .* does not exist; run `make data-languages`"):
        loading.load_documents("de", None, "data/languages")


def test_relative_tokenizer_path_resolves_from_checkout(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer("data/tokenizer.json").get_vocab_size() == 4096


def test_wikipedia_config_parses():
    run = parse_config(compose(["data=wikipedia_languages"]))
    assert run.data.domains == list(LANGUAGES_MIX)
    assert sorted(run.data.sources) == sorted(LANGUAGES_MIX)
    for language, source in run.data.sources.items():
        assert source.hf_dataset == "wikimedia/wikipedia"
        assert source.hf_config == f"20231101.{language}"
        assert source.hf_split.startswith("train[:") and source.text_field == "text"
    assert run.data.max_train_tokens_per_domain > 0


@requires_groff
@pytest.mark.slow
def test_training_runs_on_tiny_languages_mix(tmp_path):
    from testbed.train.cli import run_training

    root, tokenizer = build_tiny_languages_mix(tmp_path)
    overrides = [
        "data=languages",
        f"data.root={root}",
        f"data.tokenizer={tokenizer}",
        "data.seq_len=32",
        "data.batch_size=8",
        "data.val_tokens_per_domain=256",
        *SMALL_MODEL,
        "trainer.progress_bar=false",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "metrics.plots=false",
    ]
    summary = run_training(compose(overrides), tmp_path / "run", quiet=True)
    assert summary["steps"] == 4
    losses = [summary[f"val/loss/{language}"] for language in LANGUAGES_MIX]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert summary["val/loss"] == pytest.approx(sum(losses) / len(losses))  # domains weighted equally
