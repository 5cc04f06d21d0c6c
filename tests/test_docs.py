"""The documentation (mkdocs.yml, docs/, README.md): the site builds strictly, every page of the nav is built,
links into the repository point at files that exist, README.md stays a short front page, and no page
refers to a specification or to a tracker's issue numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

# [text](target) and ![alt](target): the target up to a space or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
ISSUE_NUMBER = re.compile(r"\bissues?\s*(?:#|no\.?\s*)?\d+|(?<![\w&/#])#\d+\b", re.IGNORECASE)


def nav_pages(nav) -> list[str]:
    """Every .md file named in mkdocs.yml's nav, in order."""
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages.extend(nav_pages(value))
        elif isinstance(value, str) and value.endswith(".md"):
            pages.append(value)
    return pages


def built_path(site: Path, page: str) -> Path:
    """Where mkdocs (use_directory_urls, the default) writes a page: index.md -> index.html, a.md ->
    a/index.html."""
    stem = page[: -len(".md")]
    if stem == "index" or stem.endswith("/index"):
        return site / f"{stem}.html"
    return site / stem / "index.html"


def doc_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [README]


def config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_mkdocs_builds_strictly_and_every_nav_page_is_built(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra: pip install -e '.[dev]'")
    pytest.importorskip("material", reason="mkdocs-material is in the dev extra: pip install -e '.[dev]'")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
        + ["--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    pages = nav_pages(config()["nav"])
    assert pages, "mkdocs.yml has no nav"
    for page in pages:
        assert built_path(site, page).is_file(), f"{page} was not built"
    # every page in docs/ has its place in the nav (mkdocs would only mention a page left out)
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk == set(pages), f"pages not in the nav: {sorted(on_disk - set(pages))}"


def test_readme_is_a_short_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines"
    for page in nav_pages(config()["nav"]):
        assert f"(docs/{page})" in README.read_text(), f"README.md does not link docs/{page}"


def test_links_into_the_repository_point_at_files_that_exist():
    """Root-relative links in docs/ (/experiments/x1_scope/README.md: GitHub resolves them against the
    repository; mkdocs leaves them unchecked) and README.md's relative links name files that exist."""
    broken = []
    for path in doc_files():
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL, or an anchor on the same page (mkdocs checks those)
            file_part = target.split("#", 1)[0]
            if file_part.startswith("/"):
                resolved = ROOT / file_part.lstrip("/")
            elif path == README:
                resolved = ROOT / file_part
            else:
                continue  # a link between pages: mkdocs --strict checks it
            if not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_spec_or_issue_numbers(path):
    text = path.read_text()
    assert not re.search(r"\bSPEC\b", text), f"{path.name} mentions SPEC"
    found = ISSUE_NUMBER.findall(text)
    assert not found, f"{path.name} mentions issue numbers: {found}"
