"""`testbed-quiz build`: MMLU-format items from the validation documents of a data config (the holdout of
`testbed.data.prepare.mix_splits`, the one training uses), the manifest that records that holdout, and the
check at evaluation of a quiz's holdout against a model's data config. Definitions: testbed/analysis/quiz.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from testbed.analysis.quiz_items import LETTERS, QuizError, QuizItem, write_quiz_csv
from testbed.data.loading import SHIPPED_TOKENIZER
from testbed.data.prepare import mix_splits
from testbed.data.tokenizer import load_tokenizer

MANIFEST = "manifest.json"
PROVENANCE = "provenance.jsonl"


def _whitespace_starts(tokenizer) -> np.ndarray:
    """[V] bool: token v decodes to text that begins with whitespace (a word boundary in byte-level BPE).
    A tokenizer with no such token (no byte-level decoder) allows every position."""
    table = np.array(
        [
            tokenizer.decode([v], skip_special_tokens=True)[:1].isspace()
            for v in range(tokenizer.get_vocab_size())
        ]
    )
    return table if table.any() else np.ones_like(table)


class _Span:
    """Decoding token spans of one domain's validation documents, each checked to re-encode to itself."""

    def __init__(self, tokenizer, documents: list[list[int]]):
        self.tokenizer, self.documents = tokenizer, documents
        self.cache: dict[tuple[int, int, int], str | None] = {}

    def text(self, doc: int, start: int, stop: int) -> str | None:
        key = (doc, start, stop)
        if key not in self.cache:
            ids = self.documents[doc][start:stop]
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            same = self.tokenizer.encode(text, add_special_tokens=False).ids == ids
            self.cache[key] = text if same and text.strip() else None
        return self.cache[key]


def build_domain(
    tokenizer,
    val_documents: list[str],
    domain: str,
    num_items: int,
    prefix_tokens: int,
    answer_tokens: int,
    seed: int,
    whitespace: np.ndarray | None = None,
) -> tuple[list[QuizItem], list[dict]]:
    """Items of one domain from its validation documents, and their provenance (document ordinal within the
    validation documents, token offset of the answer, and those of the distractors)."""
    if whitespace is None:
        whitespace = _whitespace_starts(tokenizer)
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    docs = [e.ids for e in tokenizer.encode_batch(val_documents, add_special_tokens=False)]
    spans = _Span(tokenizer, docs)
    starts = [  # option starts: a word-boundary token with a whole span after it
        (d, p)
        for d, ids in enumerate(docs)
        for p in np.flatnonzero(
            whitespace[np.asarray(ids[: max(0, len(ids) - answer_tokens + 1)], dtype=np.int64)]
        ).tolist()
    ]
    starts = np.asarray(starts, dtype=np.int64).reshape(-1, 2)
    answers = starts[starts[:, 1] >= prefix_tokens]
    occupied = [np.zeros(len(ids), dtype=bool) for ids in docs]
    items, provenance = [], []
    for doc, pos in answers[rng.permutation(len(answers))].tolist():
        if len(items) == num_items:
            break
        lo, hi = pos - prefix_tokens, pos + answer_tokens
        if occupied[doc][lo:hi].any():
            continue
        question, truth = spans.text(doc, lo, pos), spans.text(doc, pos, hi)
        if question is None or truth is None:
            continue
        distractors, chosen = [], []
        for _ in range(200):  # random same-domain spans outside this passage, each text used once
            d, p = starts[rng.integers(len(starts))].tolist()
            if d == doc and p < hi and p + answer_tokens > lo:
                continue
            text = spans.text(d, p, p + answer_tokens)
            if text is None or text in (truth, *distractors):
                continue
            distractors.append(text)
            chosen.append([d, p])
            if len(distractors) == 3:
                break
        if len(distractors) < 3:
            continue
        order = rng.permutation(4)  # order[i] = which of (truth, d1, d2, d3) goes to letter i
        options = [(truth, *distractors)[k] for k in order]
        answer = int(np.flatnonzero(order == 0)[0])
        occupied[doc][lo:hi] = True
        items.append(QuizItem(domain, question, tuple(options), answer))
        provenance.append(
            {
                "subject": domain,
                "row": len(items),
                "answer": LETTERS[answer],
                "document": doc,
                "answer_start": pos,
                "distractors": chosen,
            }
        )
    return items, provenance


DATA_DEFAULTS = {"dedup_paragraphs": False, "group_field": None}  # for manifests written before these


def data_description(data) -> dict:
    """What decides the holdout and the text of a data config (recorded in the manifest, checked at eval)."""
    return {
        "root": data.root,
        "tokenizer": data.tokenizer,
        "domains": list(data.domains),
        "split_seed": data.split_seed,
        "val_fraction": data.val_fraction,
        "test_fraction": data.test_fraction,
        "dedup_paragraphs": data.dedup_paragraphs,
        "group_field": data.group_field,
        "sources": {k: dataclasses.asdict(v) for k, v in data.sources.items()},
    }


def build_quiz(
    data,
    out: str | Path,
    items_per_domain: int = 100,
    prefix_tokens: int = 64,
    answer_tokens: int = 16,
    seed: int = 0,
) -> dict:
    """Write `<domain>_test.csv` for every domain of the data config (a `DataConfig`), `manifest.json` and
    `provenance.jsonl` to `out`; returns the manifest."""
    for name, value, low in (
        ("--items-per-domain", items_per_domain, 1),
        ("--prefix-tokens", prefix_tokens, 1),
        ("--answer-tokens", answer_tokens, 1),
    ):
        if value < low:
            raise QuizError(f"{name}: got {value}; allowed: an integer >= {low}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(data.tokenizer or SHIPPED_TOKENIZER)
    whitespace = _whitespace_starts(tokenizer)
    manifest = {
        "format": "MMLU: no header; question,A,B,C,D,answer",
        "made_by": "testbed-quiz build",
        "data": data_description(data),
        "items_per_domain": items_per_domain,
        "prefix_tokens": prefix_tokens,
        "answer_tokens": answer_tokens,
        "seed": seed,
        "domains": {},
    }
    lines = []
    splits = mix_splits(data)
    for domain in data.domains:
        val_documents = splits[domain].val
        items, provenance = build_domain(
            tokenizer, val_documents, domain, items_per_domain, prefix_tokens, answer_tokens, seed, whitespace
        )
        if not items:
            raise QuizError(
                f"domain '{domain}': its {len(val_documents)} validation documents hold no passage of "
                f"{prefix_tokens} + {answer_tokens} tokens; lower --prefix-tokens or --answer-tokens"
            )
        if len(items) < items_per_domain:
            print(
                f"warning: domain '{domain}': {len(items)} items (asked for {items_per_domain}); its "
                f"validation documents hold no more non-overlapping passages",
                file=sys.stderr,
            )
        write_quiz_csv(out / f"{domain}_test.csv", items)
        manifest["domains"][domain] = {
            "file": f"{domain}_test.csv",
            "items": len(items),
            "val_documents": len(val_documents),
            "answers": {letter: sum(item.letter == letter for item in items) for letter in LETTERS},
        }
        lines += [json.dumps(p) for p in provenance]
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / PROVENANCE).write_text("\n".join(lines) + "\n")
    return manifest


def holdout_check(quiz_paths: Sequence[str | Path], data) -> dict:
    """Compare the holdout a built quiz was made with (its manifest) with the model's data config: if a quiz
    domain was held out differently, its items may be in that model's training text."""
    manifests = []
    for path in map(Path, quiz_paths):
        folder = path if path.is_dir() else path.parent
        if (folder / MANIFEST).is_file():
            manifests.append(json.loads((folder / MANIFEST).read_text()))
    if not manifests:
        return {"checked": False, "matches": None, "problems": []}
    ours = data_description(data)
    problems = []
    for manifest in manifests:
        theirs = manifest["data"]
        for domain in manifest["domains"]:
            if domain not in ours["domains"]:
                continue  # the model never trained on this domain
            for key in ("root", "split_seed", "val_fraction", "dedup_paragraphs", "group_field"):
                if theirs.get(key, DATA_DEFAULTS.get(key)) != ours[key]:
                    problems.append(f"{domain}: quiz data.{key}={theirs[key]!r}, model {ours[key]!r}")
            if theirs["sources"].get(domain) != ours["sources"].get(domain):
                problems.append(f"{domain}: data.sources.{domain} differs")
            if theirs["domains"].index(domain) != ours["domains"].index(domain):
                problems.append(
                    f"{domain}: position {theirs['domains'].index(domain)} in the quiz's data.domains, "
                    f"{ours['domains'].index(domain)} in the model's (the holdout depends on it)"
                )
    return {"checked": True, "matches": not problems, "problems": problems}
