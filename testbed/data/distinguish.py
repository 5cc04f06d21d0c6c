"""How distinguishable a mix's domains are at the sequence level: a bag-of-tokens classifier on windows.

The testbed asks whether experts specialise by domain; that question needs domains a simple model can tell
apart from one sequence. This module measures it. A multinomial naive Bayes classifier (token counts, add-one
smoothing, uniform class prior) is fitted on each domain's *training* tokens and scores every
non-overlapping window of ``window`` tokens of each domain's *held-out* text (validation and, where there is
one, test documents: never seen in fitting). A window is classified by

    argmax_d  sum_t log p(token_t | d),   p(v | d) = (count_d(v) + 1) / (N_d + V)

with ``<|endoftext|>`` ignored. Reported per domain: accuracy (recall) and the confusion matrix (rows: true
domain, columns: predicted; row-normalised in the figure); a pair of domains is *confusable* when either
one's windows go to the other at a rate of at least :data:`CONFUSABLE_RATE`.

`testbed-data distinguish [data overrides] --out DIR` (testbed.data.build) writes ``distinguish.json`` and
``confusion.png``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WINDOW = 128
CONFUSABLE_RATE = 0.02
"""A pair is named as not clearly distinguishable when at least 2 % of one domain's held-out windows are
classified as the other."""


def fit(train_counts: np.ndarray, eos_id: int = 0) -> np.ndarray:
    """Log p(token | domain), [domains, vocab], from per-domain token counts [domains, vocab]."""
    counts = train_counts.astype(np.float64)
    counts[:, eos_id] = 0
    log_p = np.log(counts + 1) - np.log(counts.sum(1, keepdims=True) + counts.shape[1])
    log_p[:, eos_id] = 0.0  # EOS says nothing about the domain
    return log_p


def classify(log_p: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """The predicted domain of each window [N, window] of token ids."""
    scores = np.zeros((len(windows), log_p.shape[0]))
    for start in range(0, len(windows), 4096):
        chunk = windows[start : start + 4096]
        scores[start : start + len(chunk)] = log_p[:, chunk].sum(-1).T
    return scores.argmax(1)


def confusion(log_p: np.ndarray, held_out: Sequence[np.ndarray]) -> np.ndarray:
    """[true, predicted] window counts over each domain's held-out windows."""
    matrix = np.zeros((len(held_out), log_p.shape[0]), dtype=np.int64)
    for domain, windows in enumerate(held_out):
        if len(windows):
            matrix[domain] = np.bincount(classify(log_p, windows), minlength=log_p.shape[0])
    return matrix


def confusable_pairs(domains: Sequence[str], matrix: np.ndarray, rate: float = CONFUSABLE_RATE) -> list[dict]:
    """Pairs (a, b) where a's windows go to b, or b's to a, at a rate >= `rate`."""
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    pairs = []
    for a in range(len(domains)):
        for b in range(a + 1, len(domains)):
            worst = max(rates[a, b], rates[b, a])
            if worst >= rate:
                pairs.append(
                    {
                        "pair": [domains[a], domains[b]],
                        f"{domains[a]}_as_{domains[b]}": round(float(rates[a, b]), 4),
                        f"{domains[b]}_as_{domains[a]}": round(float(rates[b, a]), 4),
                    }
                )
    return pairs


def stream_windows(stream, window: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows [N, window] of a token stream (a store split), at most `limit`."""
    count = len(stream) // window
    if limit is not None:
        count = min(count, limit)
    if count == 0:
        return np.zeros((0, window), dtype=np.int64)
    return stream.read(0, count * window).astype(np.int64).reshape(count, window)


def report(store, domains: Sequence[str], window: int = WINDOW, max_windows: int | None = None) -> dict:
    """The classifier's figures on a token store (testbed.data.store.TokenStore) for `domains`."""
    vocab = int(store.meta["vocab_size"])
    train_counts = np.zeros((len(domains), vocab), dtype=np.int64)
    held_out = []
    for index, domain in enumerate(domains):
        for chunk in store.stream(domain, "train").chunks(0, len(store.stream(domain, "train"))):
            train_counts[index] += np.bincount(chunk, minlength=vocab)[:vocab]
        parts = [
            stream_windows(store.stream(domain, split), window, max_windows) for split in ("val", "test")
        ]
        held_out.append(np.concatenate(parts))
    log_p = fit(train_counts, int(store.meta.get("eos_id", 0)))
    matrix = confusion(log_p, held_out)
    accuracy = np.diag(matrix) / np.maximum(matrix.sum(1), 1)
    return {
        "classifier": "multinomial naive Bayes on token counts (add-one smoothing, uniform prior)",
        "window_tokens": window,
        "domains": list(domains),
        "training_tokens": {d: int(train_counts[i].sum()) for i, d in enumerate(domains)},
        "held_out_windows": {d: int(len(w)) for d, w in zip(domains, held_out, strict=True)},
        "accuracy": {d: round(float(a), 4) for d, a in zip(domains, accuracy, strict=True)},
        "mean_accuracy": round(float(accuracy.mean()), 4),
        "confusion": matrix.tolist(),
        "confusable_rate": CONFUSABLE_RATE,
        "confusable_pairs": confusable_pairs(domains, matrix),
        "splits": split_table(store, domains),
    }


def split_table(store, domains: Sequence[str]) -> dict:
    """Per domain, from the store's meta.json: documents, tokens and bytes of each split (tokens count one
    <|endoftext|> per document), training bytes per token, and the paragraphs deduplication removed."""
    out = {}
    for domain in domains:
        entry = store.meta["domains"][domain]
        splits = {
            name: {k: info[k] for k in ("documents", "tokens", "bytes")}
            for name, info in entry["splits"].items()
        }
        train = splits["train"]
        text_tokens = train["tokens"] - train["documents"]
        out[domain] = {
            "splits": splits,
            "bytes_per_token": round(train["bytes"] / text_tokens, 3) if text_tokens > 0 else None,
            "dedup": entry.get("dedup"),
        }
    return out


def markdown(result: dict) -> str:
    """The per-domain table and the confusable pairs, for data/SOURCES.md."""
    lines = ["| domain | held-out windows | accuracy | most confused with |", "|---|---:|---:|---|"]
    matrix = np.asarray(result["confusion"])
    domains = result["domains"]
    for i, domain in enumerate(domains):
        off = matrix[i].copy()
        off[i] = -1
        j = int(off.argmax())
        rate = matrix[i, j] / max(matrix[i].sum(), 1)
        other = f"{domains[j]} ({rate:.1%})" if matrix[i, j] > 0 else "-"
        lines.append(f"| `{domain}` | {matrix[i].sum():,} | {result['accuracy'][domain]:.1%} | {other} |")
    pairs = result["confusable_pairs"]
    named = ", ".join(" / ".join(p["pair"]) for p in pairs) or "none"
    lines.append("")
    lines.append(
        f"Mean accuracy {result['mean_accuracy']:.1%}; pairs confused at >= {CONFUSABLE_RATE:.0%}: {named}."
    )
    return "\n".join(lines)
