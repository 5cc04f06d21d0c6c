"""Which documents train, validate and test, and exact-duplicate paragraphs across those splits.

Two ways to assign a document to a split, both at document level (a document is never cut across splits):
- **permutation** (sources with a known number of documents: local files, hub datasets loaded whole): a
  permutation seeded by ``data.split_seed`` and the domain's position holds out ``val_fraction`` of the
  documents for validation and the next ``test_fraction`` for test;
- **hash** (streamed sources, whose length is unknown): a keyed hash of the document's text, so the same
  document always lands in the same split and exact-duplicate documents never straddle two splits.

Then, with ``data.dedup_paragraphs``, a paragraph (text between blank lines) of at least
:data:`MIN_PARAGRAPH_BYTES` UTF-8 bytes that an earlier split already holds is removed from the later one
(documents are visited train first, then validation, then test; in streams, in arrival order), so no
exact-duplicate paragraph is shared across splits. Licences and scripture repeat whole clauses and verses;
the counts removed are recorded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "val", "test")
MIN_PARAGRAPH_BYTES = 32
"""Shorter paragraphs (a closing brace, "Amen.", a heading) repeat everywhere by nature and are not
treated as shared text."""

_PARAGRAPH_BREAK = re.compile(r"(\n[ \t]*\n)")


def split_sizes(count: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(validation, test) document counts out of `count`: each at least 1 when its fraction is positive,
    and at least one document left for training."""
    num_val = min(max(1, round(val_fraction * count)), count - 1)
    num_test = 0
    if test_fraction > 0:
        num_test = min(max(1, round(test_fraction * count)), count - 1 - num_val)
    return num_val, max(num_test, 0)


def permutation_labels(
    count: int, val_fraction: float, test_fraction: float, seed: int, groups: Sequence[str] | None = None
) -> list[str]:
    """The split of each of `count` documents: a seeded permutation's first documents validate, the next
    ones test, the rest train (with test_fraction 0 the same documents validate as without a test split).

    With `groups` (one key per document), the permutation is over groups, in order of first appearance, and
    a whole group goes to one split: groups are taken for validation until they hold the validation share
    of documents, then for test likewise; without groups every document is its own group."""
    if groups is None:
        groups = range(count)
    members: dict = {}
    for index, key in enumerate(groups):
        members.setdefault(key, []).append(index)
    order = [list(members.values())[i] for i in np.random.default_rng(seed).permutation(len(members))]
    num_val, num_test = split_sizes(count, val_fraction, test_fraction)
    labels = ["train"] * count
    position = 0
    for split, wanted in (("val", num_val), ("test", num_test)):
        taken = 0
        # stop short of the last group: training always keeps at least one
        while taken < wanted and position < len(order) - 1:
            for index in order[position]:
                labels[index] = split
            taken += len(order[position])
            position += 1
    return labels


def hash_label(text: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """The split of a streamed document: a keyed 64-bit hash of its text, read as a uniform number in
    [0, 1), below val_fraction validates, below val_fraction + test_fraction tests."""
    key = seed.to_bytes(8, "little")
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    u = int.from_bytes(digest, "little") / 2**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def paragraphs(text: str) -> list[str]:
    """The paragraphs of `text` (pieces between blank lines)."""
    return _PARAGRAPH_BREAK.split(text)[::2]


def _counter() -> dict[str, int]:
    return dict.fromkeys(SPLITS, 0)


@dataclass
class DedupCounts:
    """One domain's deduplication, per split: paragraphs, bytes and whole documents removed because an
    earlier split holds them; paragraphs that repeat inside the split itself (counted and kept: repetition
    within training is the source's own)."""

    removed_paragraphs: dict[str, int] = field(default_factory=_counter)
    removed_bytes: dict[str, int] = field(default_factory=_counter)
    removed_documents: dict[str, int] = field(default_factory=_counter)
    repeated_within: dict[str, int] = field(default_factory=_counter)

    def as_dict(self) -> dict:
        return {
            "min_paragraph_bytes": MIN_PARAGRAPH_BYTES,
            "removed_paragraphs": dict(self.removed_paragraphs),
            "removed_bytes": dict(self.removed_bytes),
            "removed_documents": dict(self.removed_documents),
            "repeated_within_split": dict(self.repeated_within),
        }


class ParagraphDedup:
    """Removes from a document the paragraphs that another split already holds, in any domain of the mix
    (exact bytes after trimming white space at both ends; paragraphs shorter than MIN_PARAGRAPH_BYTES are
    left alone). Holds one 8-byte digest per distinct paragraph seen."""

    def __init__(self) -> None:
        self.owner: dict[bytes, str] = {}
        self.counts: dict[str, DedupCounts] = {}

    def filter(self, text: str, split: str, domain: str) -> str:
        """`text` without its paragraphs held by another split ('' when nothing is left)."""
        counts = self.counts.setdefault(domain, DedupCounts())
        pieces = _PARAGRAPH_BREAK.split(text)  # paragraph, break, paragraph, ...
        kept: list[str] = []
        removed = False
        for position in range(0, len(pieces), 2):
            paragraph = pieces[position]
            stripped = paragraph.strip().encode("utf-8")
            if len(stripped) >= MIN_PARAGRAPH_BYTES:
                digest = hashlib.blake2b(stripped, digest_size=8).digest()
                owner = self.owner.get(digest)
                if owner is None:
                    self.owner[digest] = split
                elif owner == split:
                    counts.repeated_within[split] += 1
                else:
                    counts.removed_paragraphs[split] += 1
                    counts.removed_bytes[split] += len(paragraph.encode("utf-8"))
                    removed = True
                    continue
            if kept:
                kept.append(pieces[position - 1])  # the break before this paragraph
            kept.append(paragraph)
        if not removed:
            return text
        out = "".join(kept)
        if not out.strip():
            counts.removed_documents[split] += 1
            return ""
        return out


@dataclass
class SplitDocuments:
    """One domain's documents by split (each in source order) and what deduplication removed (None: off)."""

    train: list[str]
    val: list[str]
    test: list[str]
    dedup: dict | None = None

    def of(self, split: str) -> list[str]:
        return {"train": self.train, "val": self.val, "test": self.test}[split]


def split_mix(
    documents: dict[str, Sequence[str]],
    val_fraction: float,
    test_fraction: float,
    seeds: dict[str, int],
    dedup: bool,
) -> dict[str, SplitDocuments]:
    """Each domain's documents assigned to splits by :func:`permutation_labels` (seed `seeds[domain]`; by
    group where the documents carry `.groups`, testbed.data.loading.Documents);
    with `dedup`, paragraphs shared across splits are removed: every domain's training text first, then
    validation (loses what any training document holds), then test (loses what training or validation
    holds)."""
    by_split: dict[str, dict[str, list[str]]] = {}
    for domain, texts in documents.items():
        groups = getattr(texts, "groups", None)
        labels = permutation_labels(len(texts), val_fraction, test_fraction, seeds[domain], groups)
        by_split[domain] = {
            name: [t for t, label in zip(texts, labels, strict=True) if label == name] for name in SPLITS
        }
    if not dedup:
        return {domain: SplitDocuments(**parts) for domain, parts in by_split.items()}
    remover = ParagraphDedup()
    cleaned: dict[str, dict[str, list[str]]] = {domain: {} for domain in documents}
    for name in SPLITS:
        for domain in documents:
            filtered = (remover.filter(text, name, domain) for text in by_split[domain][name])
            cleaned[domain][name] = [text for text in filtered if text]
    return {
        domain: SplitDocuments(**parts, dedup=remover.counts.get(domain, DedupCounts()).as_dict())
        for domain, parts in cleaned.items()
    }
