"""The large mix: its committed files match their manifest, near-duplicate removal and the Spanish filter by
hand, a large domain built from stub components (xz bytes reproducible, groups kept together by the split),
and (slow) the whole mix's token counts."""

import json
import lzma

import pytest

from testbed.config import DataConfig, parse_config
from testbed.data import build, large
from testbed.data.loading import resolve_data_path
from testbed.data.prepare import check_manifest, mix_splits
from testbed.data.store import file_sha256
from testbed.errors import DataError
from tests.conftest import compose

LARGE = resolve_data_path("data/large")


def test_committed_large_mix_matches_its_manifest():
    manifest = json.loads((LARGE / "manifest.json").read_text())
    assert set(manifest["domains"]) == set(large.LARGE_MIX)
    for domain, entry in manifest["domains"].items():
        path = LARGE / entry["file"]
        assert path.name == f"{domain}.jsonl.xz"
        digest = file_sha256(path)
        assert digest == entry["sha256"]
        check_manifest(path, digest)  # raises on a mismatch
        assert entry["bytes"] >= 9_000_000  # every domain at least 9 MB of text
    assert file_sha256(LARGE / "tokenizer.json") == manifest["tokenizer"]["sha256"]
    run = parse_config(compose())
    assert run.data.name == "large" and run.data.root == "data/large" and run.data.dedup_paragraphs


def test_near_duplicates_by_hand():
    base = " ".join(f"w{i}" for i in range(20))  # 13 shingles of 8 words
    half = " ".join(f"w{i}" for i in range(10)) + " " + " ".join(f"x{i}" for i in range(10))
    # half shares shingles w0..w7 .. w2..w9: 3 of its 13 shingles; a near copy shares 12 of 13
    near = base.replace("w19", "z19")
    assert large.near_duplicates([base, half, near, base.upper()]) == [False, False, True, True]


def test_spanish_filter():
    assert large.is_spanish("Para abrir el archivo, pulse el botón de la barra de herramientas.")
    assert not large.is_spanish("Click the button on the toolbar to open the file.")
    assert not large.is_spanish("for i in range(10): print(i, file=out)")
    # a known leak (data/SOURCES.md): in LilyPond code the note name e is the Spanish word for "and"
    assert large.is_spanish("\\relative c' { c4 d e f e }")
    assert not large.is_spanish("Sí, claro.")  # fewer than 4 words: not judged


def _stub(monkeypatch, pairs):
    component = large.Component("stub", "d", "CC0-1.0", "here", "nothing", lambda: iter(pairs), lambda: "1")
    monkeypatch.setitem(large.LARGE_MIX, "stubbed", [component])


def test_large_domain_file_is_reproducible_and_groups_share_a_split(tmp_path, monkeypatch):
    pairs = [
        (f"Chapter {c} in edition {e}. " + "word " * 60, f"chapter:{c}") for e in "AB" for c in range(20)
    ]
    _stub(monkeypatch, pairs)
    first = build.build_large_domain("stubbed", tmp_path / "a", 10**9)
    second = build.build_large_domain("stubbed", tmp_path / "b", 10**9)
    assert first["sha256"] == second["sha256"] and first["documents"] == 40 and first["groups"] == 20
    records = [json.loads(line) for line in lzma.open(tmp_path / "a" / "stubbed.jsonl.xz", "rt")]
    assert records[0] == {
        "text": pairs[0][0].rstrip(),
        "domain": "stubbed",
        "source": "stub",
        "group": "chapter:0",
    }
    config = DataConfig(
        domains=["stubbed"],
        root=str(tmp_path / "a"),
        val_fraction=0.1,
        test_fraction=0.1,
        group_field="group",
    )
    parts = mix_splits(config)["stubbed"]
    assert len(parts.val) == len(parts.test) == 4 and len(parts.train) == 32
    chapters = {s: {t.split(" in ")[0] for t in parts.of(s)} for s in ("train", "val", "test")}
    assert not chapters["train"] & chapters["val"] and not chapters["train"] & chapters["test"]
    halved = build.build_large_domain("stubbed", tmp_path / "c", first["bytes"] // 2)
    assert 18 <= halved["documents"] <= 22  # spread over the whole source, about half the bytes
    # rebuilding into a folder that holds a different file refuses, keeps the old one, names both
    before = (tmp_path / "c" / "stubbed.jsonl.xz").read_bytes()
    with pytest.raises(DataError, match=r"stubbed\.jsonl\.xz exists and differs .*--force"):
        build.build_large_domain("stubbed", tmp_path / "c", 10**9)
    assert (tmp_path / "c" / "stubbed.jsonl.xz").read_bytes() == before
    assert build.build_large_domain("stubbed", tmp_path / "c", 10**9, force=True)["sha256"] == first["sha256"]


def test_large_mix_token_counts_as_reported():
    """The split figures data/SOURCES.md quotes (testbed-data distinguish on all 10 domains): every default
    domain trains on at least 2.5 M tokens, the mix on more than 30 M; a test split and deduplication."""
    report = json.loads(resolve_data_path("data/distinguish/large/distinguish.json").read_text())
    assert report["domains"] == list(large.LARGE_MIX)
    train = {d: e["splits"]["train"]["tokens"] for d, e in report["splits"].items()}
    default = parse_config(compose()).data.domains
    assert min(train[d] for d in default) >= 2_500_000 and sum(train.values()) >= 30_000_000
    assert sum(t for t in train.values() if t >= 2_500_000) >= 30_000_000  # without scripture (2.42 M)
    assert all(
        e["splits"]["test"]["documents"] > 0 and e["dedup"] is not None for e in report["splits"].values()
    )
