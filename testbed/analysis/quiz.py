"""`testbed-quiz`: a multiple-choice quiz in MMLU's format built from held-out text, and its evaluation with
the routing analysis of Chernov (2025) (experiment X5: dead experts, gate entropy per layer, per-expert
accuracy spread on a quiz).

`testbed-quiz build [overrides] --out DIR` writes one `<domain>_test.csv` per domain, exactly in the format of
MMLU's `data/test/*_test.csv` files (no header; columns question,A,B,C,D,answer), plus `manifest.json` and
`provenance.jsonl`. An item is taken from a *validation* document of the data config (the holdout of
`testbed.data.datamodule.holdout`, the one training uses), so the quiz never contains training text:
- question: `--prefix-tokens` consecutive tokens of the document, decoded to text;
- true option: the next `--answer-tokens` tokens of the same document, decoded;
- three distractors: spans of `--answer-tokens` tokens from other positions or other validation documents of
  the same domain (never overlapping the item's own passage, never equal to another option's text);
- the answer letter is a seeded permutation, so it is deterministic given `--seed`.
Every option starts at a token that begins with whitespace (a word boundary of the byte-level BPE), and a span
is used only if decoding and re-encoding it gives the same token ids, so at evaluation the model sees exactly
the original tokens. Item passages of one domain do not overlap each other.

`testbed-quiz --hf <model id or directory> --quiz <dir or csv files>` does Chernov's analysis of a pretrained
Hugging Face MoE instead (testbed/hf/quiz.py: MMLU prompt, letter scoring, routing at the answer position).

`testbed-quiz eval <run dir or .ckpt> --quiz <dir or csv files> [--out DIR]` scores these files or real MMLU
files (`load_quiz`: a `*_test.csv` file, a directory of them, or the hendrycks layout with `test/` or
`data/test/`; the subject is the file stem without `_test`). Definitions [defined here, after Chernov 2025]:
- score of an option: the log-likelihood of its tokens given the question, sum over the option's tokens
  (cloze form). The option follows the question directly when either side has whitespace at the join (always
  the case for built quizzes), else with one space between them (MMLU). `accuracy` takes the option with the
  highest sum; `accuracy_norm` divides each sum by the option's length in UTF-8 bytes first (the
  lm-evaluation-harness `acc_norm` convention; a per-token normalization would rank the options of a built
  quiz exactly like the sum, since all of them have `--answer-tokens` tokens). Ties go to the earlier letter.
- evaluation packs an item into one row: the question, then the four options, each option attending only to
  the question and to itself, at the positions it would have right after the question (`pack_items`); this
  computes what four separate question + option sequences would, with the question computed once.
- counted tokens: the question tokens once and the tokens of each of the four options, i.e. every token of
  an item's row; padding is never counted. With `--positions answer`, only the answer position is counted:
  the last question token, whose output predicts the answer (as the HF quiz counts the prompt's last token).
- `dead_experts` (per layer): fraction of experts with no assignment from any counted token
  (`specialization.dead_experts` of the subject x expert count table).
- `gate_entropy` (per layer): mean over counted tokens of H(p_t) / log E, the full router distribution
  (`RoutingStats` entropy sums and `specialization.gate_entropy`).
- per-expert accuracy (per layer): each item is given to the expert that receives the most assignments from
  its question tokens (ties: the lowest expert id); an expert's accuracy is the `accuracy` over its items.
  `expert_accuracy_spread` / `expert_accuracy_range` are the std and max - min of that accuracy across the
  experts with at least one item (`specialization.accuracy_spread` with items in place of tokens).
  `experts_with_items` says how many experts that is.
Routers whose choice depends on the batch (expert_choice) route quiz tokens together with the other items
and the padding of their batch; the oracle router needs each subject to be one of the model's domains.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from torch import Tensor

from testbed import CONF_DIR
from testbed.analysis.analyze import load_run, resolve_checkpoint
from testbed.config import parse_config
from testbed.data.datamodule import holdout
from testbed.data.loading import SHIPPED_TOKENIZER, load_documents
from testbed.data.tokenizer import load_tokenizer
from testbed.errors import TestbedError
from testbed.metrics import specialization as S
from testbed.metrics.stats import RoutingStats
from testbed.routing.base import Routing, count_per_expert
from testbed.train.checkpoint import load_weights
from testbed.train.module import MoELanguageModel

LETTERS = "ABCD"
MANIFEST = "manifest.json"
PROVENANCE = "provenance.jsonl"
PAD_ID = 0  # <|endoftext|>; padded positions are never scored nor counted


class QuizError(TestbedError):
    """A quiz file or quiz setting that cannot be used; the message names the file (and row)."""


@dataclass(frozen=True)
class QuizItem:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: int  # index of the right option, 0..3 (A..D)
    source: str = ""  # file it was read from
    row: int = 0  # 1-based record number in that file

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


# ----------------------------------------------------------------------------------------------- CSV files


def write_quiz_csv(path: str | Path, items: Iterable[QuizItem]) -> None:
    """MMLU's format: no header, one record per item, question,A,B,C,D,answer with CSV quoting (fields with a
    comma, quote or line break are quoted, quotes doubled)."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        for item in items:
            writer.writerow([item.question, *item.options, item.letter])


def subject_of(path: Path) -> str:
    return path.stem.removesuffix("_test")


def read_quiz_csv(path: str | Path) -> list[QuizItem]:
    """The items of one MMLU-format file; a QuizError naming the file and row for any malformed record."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise QuizError(f"quiz file {path}: cannot be read ({err})") from err
    except UnicodeDecodeError as err:
        raise QuizError(f"quiz file {path} is not valid UTF-8 (byte {err.start}: {err.reason})") from err
    subject = subject_of(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    items = []
    record = 0
    try:
        for row in reader:
            if not row:  # a blank line
                continue
            record += 1
            where = f"quiz file {path}, row {record} (line {reader.line_num})"
            if len(row) != 6:
                raise QuizError(
                    f"{where}: {len(row)} columns; MMLU format has 6 (question,A,B,C,D,answer) and no header"
                )
            answer = row[5].strip()
            if answer not in tuple(LETTERS):  # a tuple: "" and "AB" are substrings of "ABCD", not letters
                hint = " (a header row? MMLU files have none)" if record == 1 else ""
                raise QuizError(f"{where}: answer {row[5]!r} is not one of A, B, C, D{hint}")
            items.append(QuizItem(subject, row[0], tuple(row[1:5]), LETTERS.index(answer), str(path), record))
    except csv.Error as err:
        raise QuizError(f"quiz file {path}, line {reader.line_num}: not valid CSV ({err})") from err
    if not items:
        raise QuizError(f"quiz file {path} holds no items")
    return items


def quiz_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """CSV files named by `paths`: files as given; a directory gives its `*_test.csv` files, or those of its
    `test/` or `data/test/` folder (the hendrycks MMLU layout)."""
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            for folder in (path, path / "test", path / "data" / "test"):
                found = sorted(folder.glob("*_test.csv"))
                if found:
                    files.extend(found)
                    break
            else:
                raise QuizError(
                    f"quiz directory {path} holds no *_test.csv files, nor does {path}/test or "
                    f"{path}/data/test (expected MMLU's layout or the output of `testbed-quiz build`)"
                )
        elif path.is_file():
            files.append(path)
        else:
            raise QuizError(f"quiz path {path} does not exist")
    if not files:
        raise QuizError("no quiz files given")
    return files


def load_quiz(paths: str | Path | Sequence[str | Path]) -> list[QuizItem]:
    """All items of the quiz files named by `paths` (see `quiz_files`), file by file, in file order."""
    return [item for file in quiz_files(paths) for item in read_quiz_csv(file)]


# -------------------------------------------------------------------------------------------------- build


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


def data_description(data) -> dict:
    """What decides the holdout and the text of a data config (recorded in the manifest, checked at eval)."""
    return {
        "root": data.root,
        "tokenizer": data.tokenizer,
        "domains": list(data.domains),
        "split_seed": data.split_seed,
        "val_fraction": data.val_fraction,
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
    for index, domain in enumerate(data.domains):
        documents = load_documents(domain, data.sources.get(domain), data.root, data.cache_dir)
        _, val_documents = holdout(documents, data, index)
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


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class EncodedItem:
    subject: int  # index into the list of subjects
    context: list[int]  # question token ids (never empty)
    options: list[list[int]]  # four option token ids
    option_bytes: list[int]  # UTF-8 length of each option's text as joined (for accuracy_norm)
    answer: int


def join(question: str, option: str) -> str:
    """The option text as it follows the question: as is when either side has whitespace at the join, else
    after one space."""
    if not question or not option or question[-1].isspace() or option[0].isspace():
        return option
    return " " + option


def encode_items(tokenizer, items: list[QuizItem], subjects: list[str], max_len: int) -> tuple[list, int]:
    """Token ids of every item; questions longer than `max_len` minus the longest option lose their start.
    Returns (encoded items, number of truncated questions)."""
    continuations = [join(item.question, option) for item in items for option in item.options]
    questions = tokenizer.encode_batch([item.question for item in items], add_special_tokens=False)
    options = tokenizer.encode_batch(continuations, add_special_tokens=False)
    encoded, truncated = [], 0
    for i, item in enumerate(items):
        context = questions[i].ids or [PAD_ID]  # an empty question: predict from a document start
        opts = [options[4 * i + k].ids[: max_len - 1] for k in range(4)]
        room = max_len - max(len(o) for o in opts)
        if len(context) > room:
            context, truncated = context[-room:], truncated + 1
        encoded.append(
            EncodedItem(
                subjects.index(item.subject),
                context,
                opts,
                [len(continuations[4 * i + k].encode()) for k in range(4)],
                item.answer,
            )
        )
    return encoded, truncated


def restrict(routing: Routing, keep: Tensor) -> Routing:
    """The routing of the tokens where `keep` [T] is true, renumbered 0..T'-1 (other assignments dropped)."""
    renumber = torch.cumsum(keep.long(), 0) - 1
    assigned = keep[routing.token_index]
    if routing.kept is not None:  # assignments dropped by capacity count nowhere
        assigned = assigned & routing.kept
    expert_index = routing.expert_index[assigned]
    return Routing(
        logits=routing.logits[keep],
        probs=routing.probs[keep],
        token_index=renumber[routing.token_index[assigned]],
        expert_index=expert_index,
        weight=routing.weight[assigned],
        tokens_per_expert=count_per_expert(expert_index, routing.probs.shape[1]),
    )


class QuizRouting:
    """Routing of the counted quiz tokens, per MoE layer: `RoutingStats` counters (subject x expert counts,
    entropy sums, tokens per subject) and per-item expert counts over the question tokens [L, N, E]."""

    def __init__(self, num_layers: int, num_subjects: int, num_experts: int, num_items: int, device="cpu"):
        self.stats = RoutingStats(num_layers, num_subjects, num_experts, device)
        self.item_experts = torch.zeros(num_layers, num_items, num_experts, dtype=torch.long)
        self.num_experts = num_experts

    def add(
        self,
        layer: int,
        routing: Routing,
        counted: Tensor,
        subject: Tensor,
        question_item: Tensor,
        top1_only: bool = False,
    ) -> None:
        """counted [T] bool, subject [T] long, question_item [T] long: the item of a counted question token,
        -1 for any other token. `top1_only`: an item's expert counts take only each token's first choice
        (its highest gate; token-choice routers), so one counted token gives its item to its top-1 expert."""
        self.stats.update(layer, restrict(routing, counted), subject[counted])
        item = question_item[routing.token_index]
        is_question = item >= 0
        if routing.kept is not None:
            is_question = is_question & routing.kept
        if top1_only and routing.slot_index is not None:
            is_question = is_question & (routing.slot_index == 0)
        flat = item[is_question] * self.num_experts + routing.expert_index[is_question]
        self.item_experts[layer].view(-1).index_add_(0, flat.cpu(), torch.ones_like(flat.cpu()))


@torch.no_grad()
def pack_items(batch: list[EncodedItem]) -> dict[str, Tensor]:
    """One row per item: its question, then its four options one after another. Each option attends to the
    question and to itself only, at the rotary positions it would have right after the question, so the row
    computes exactly what four separate (question + option) sequences would, with the question once.
    Returns input_ids, attention_mask [B, S, S], position_ids, segment (-1 padding, 0 question, 1..4 option)
    and, per option token, its row, the position that predicts it, the token and its option slot (4 i + k)."""
    width = max(len(item.context) + sum(len(o) for o in item.options) for item in batch)
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    segment = torch.full((len(batch), width), -1, dtype=torch.long)
    positions = torch.zeros(len(batch), width, dtype=torch.long)
    rows, predictors, targets, slots = [], [], [], []
    for i, item in enumerate(batch):
        q = len(item.context)
        ids[i, :q], segment[i, :q], positions[i, :q] = torch.tensor(item.context), 0, torch.arange(q)
        start = q
        for k, option in enumerate(item.options):
            n = len(option)
            ids[i, start : start + n] = torch.tensor(option, dtype=torch.long)
            segment[i, start : start + n] = k + 1
            positions[i, start : start + n] = torch.arange(q, q + n)
            rows += [i] * n
            predictors += [q - 1, *range(start, start + n - 1)]  # the previous token of its own sequence
            targets += option
            slots += [4 * i + k] * n
            start += n
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty attention row
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "segment": segment,
        "rows": torch.tensor(rows, dtype=torch.long),
        "predictors": torch.tensor(predictors, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "slots": torch.tensor(slots, dtype=torch.long),
    }


@torch.no_grad()
def score_items(
    forward: Callable,
    encoded: list[EncodedItem],
    routing: QuizRouting | None = None,
    batch_items: int = 32,
    domain_of_subject: list[int | None] | None = None,
    device: str | torch.device = "cpu",
    head: Callable | None = None,
    positions: str = "all",
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the log-probabilities of each option's tokens given its question, [N, 4], and the number of
    option tokens, [N, 4]. `forward(input_ids [B, S], domain_ids [B, S] | None, extras)` returns (logits,
    per-layer outputs with `.routing`); rows are packed by `pack_items` (extras: its attention_mask and
    position_ids). With `head`, `forward` returns hidden states instead and `head` turns the ones that predict
    an option token into logits (the LM head is then applied only where it is needed). `positions`: routing is
    counted over every token of an item's row ("all"), or only at its answer position ("answer": the last
    question token, whose output predicts the answer; each item then goes to that token's top-1 expert)."""
    if positions not in ("all", "answer"):
        raise QuizError(f"positions: got {positions!r}; allowed: 'all' or 'answer'")
    logprob = np.zeros((len(encoded), 4))
    lengths = np.array([[len(o) for o in item.options] for item in encoded], dtype=np.int64).reshape(-1, 4)
    # batches of similar row lengths (less padding); a stable sort keeps equal-length items in order
    order = sorted(
        range(len(encoded)), key=lambda i: len(encoded[i].context) + sum(map(len, encoded[i].options))
    )
    for first in range(0, len(order), batch_items):
        index = order[first : first + batch_items]
        batch = [encoded[i] for i in index]
        packed = {k: v.to(device) for k, v in pack_items(batch).items()}
        ids, segment = packed["input_ids"], packed["segment"]
        domain_ids = None
        if domain_of_subject is not None:
            domains = [domain_of_subject[item.subject] for item in batch]
            if all(d is not None for d in domains):
                domain_ids = torch.tensor(domains, device=device)[:, None].expand_as(ids)
        extras = {"attention_mask": packed["attention_mask"], "position_ids": packed["position_ids"]}
        logits, outputs = forward(ids, domain_ids, extras)
        logits = logits[packed["rows"], packed["predictors"]]
        logp = torch.log_softmax((logits if head is None else head(logits)).float(), dim=-1)
        picked = logp.gather(-1, packed["targets"][:, None]).squeeze(-1).double()
        sums = torch.zeros(4 * len(batch), dtype=torch.float64, device=device)
        sums.index_add_(0, packed["slots"], picked)
        logprob[index] = sums.view(len(batch), 4).cpu().numpy()
        if routing is not None and outputs:
            subject = torch.tensor([item.subject for item in batch], device=device)[:, None].expand_as(ids)
            item_index = torch.tensor(index, device=device)[:, None].expand_as(ids)
            counted = segment >= 0
            if positions == "answer":
                last = (segment == 0).sum(dim=1) - 1  # each row's last question token
                counted = torch.zeros_like(counted)
                counted[torch.arange(len(batch), device=device), last] = True
            question_item = torch.where((segment == 0) & counted, item_index, -1)
            for layer, out in enumerate(outputs):
                routing.add(
                    layer,
                    out.routing,
                    counted.reshape(-1),
                    subject.reshape(-1),
                    question_item.reshape(-1),
                    top1_only=positions == "answer",
                )
    logprob[lengths == 0] = -math.inf  # an option with no tokens is never chosen
    return logprob, lengths


def choose(scores: np.ndarray) -> np.ndarray:
    """Index of the best option per item; ties go to the earlier letter."""
    return np.argmax(scores, axis=1)


def expert_item_accuracy(item_experts, correct) -> tuple[np.ndarray, np.ndarray]:
    """(correct items, items) per expert, each item given to the expert with the most assignments from its
    question tokens (ties: the lowest id); items with no assignment are left out."""
    item_experts = np.asarray(item_experts)
    correct = np.asarray(correct, dtype=np.float64)
    routed = item_experts.sum(1) > 0
    top = item_experts.argmax(1)[routed]
    num_experts = item_experts.shape[1]
    return (
        np.bincount(top, weights=correct[routed], minlength=num_experts),
        np.bincount(top, minlength=num_experts).astype(np.float64),
    )


def layer_report(routing: QuizRouting, correct: np.ndarray) -> list[dict]:
    """Per MoE layer: Chernov's three quantities (and load balance) from the collected routing."""
    state = routing.stats.state_dict()
    layers = []
    for layer in range(routing.stats.num_layers):
        counts = state["counts"][layer].numpy()
        load = counts.sum(0)
        items_correct, items = expert_item_accuracy(routing.item_experts[layer].numpy(), correct)
        std, spread = S.accuracy_spread(items_correct, items)
        accuracy = np.where(items > 0, items_correct / np.maximum(items, 1), np.nan)
        layers.append(
            {
                "dead_experts": S.dead_experts(counts),
                "gate_entropy": S.gate_entropy(
                    float(state["entropy_sums"][layer]), int(state["tokens"][layer].sum())
                ),
                "utilization": S.utilization(counts),
                "max_violation": S.max_violation(counts),
                "expert_accuracy_spread": std,
                "expert_accuracy_range": spread,
                "experts_with_items": int((items > 0).sum()),
                "tokens": int(state["tokens"][layer].sum()),
                "assignments": int(load.sum()),
                "expert_load": load.tolist(),
                "expert_items": items.astype(int).tolist(),
                "expert_accuracy": accuracy.tolist(),
            }
        )
    return layers


# --------------------------------------------------------------------------------------------------- eval


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
            for key in ("root", "split_seed", "val_fraction"):
                if theirs[key] != ours[key]:
                    problems.append(f"{domain}: quiz data.{key}={theirs[key]!r}, model {ours[key]!r}")
            if theirs["sources"].get(domain) != ours["sources"].get(domain):
                problems.append(f"{domain}: data.sources.{domain} differs")
            if theirs["domains"].index(domain) != ours["domains"].index(domain):
                problems.append(
                    f"{domain}: position {theirs['domains'].index(domain)} in the quiz's data.domains, "
                    f"{ours['domains'].index(domain)} in the model's (the holdout depends on it)"
                )
    return {"checked": True, "matches": not problems, "problems": problems}


def evaluate_quiz(
    module, tokenizer, items: list[QuizItem], batch_items: int = 32, device="cpu", positions: str = "all"
) -> dict:
    """Score `items` with a `MoELanguageModel`, collect routing; returns the quiz.json payload (no paths)."""
    subjects = list(dict.fromkeys(item.subject for item in items))
    encoded, truncated = encode_items(tokenizer, items, subjects, module.run_config.model.max_seq_len)
    routing = QuizRouting(
        len(module.model.moe_layers),
        len(subjects),
        module.run_config.model.moe.num_experts,
        len(items),
        device,
    )
    domain_of_subject = [module.domains.index(s) if s in module.domains else None for s in subjects]
    module.eval()
    model, lm_head = module.model, module.model.lm_head

    def hidden_states(ids, domains, extras):  # the model up to its final norm: the LM head comes after
        return model(ids, domains, extras, return_hidden=True)

    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        logprob, lengths = score_items(
            hidden_states,
            encoded,
            routing,
            batch_items,
            domain_of_subject,
            device,
            head=lm_head,
            positions=positions,
        )
    except ValueError as err:
        if module.run_config.router.name == "oracle":
            raise QuizError(
                f"router 'oracle' routes by domain label and the quiz subjects {subjects} are not all model "
                f"domains {module.domains} ({err})"
            ) from err
        raise
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    answers = np.array([item.answer for item in items])
    option_bytes = np.array([e.option_bytes for e in encoded], dtype=np.float64)
    correct = choose(logprob) == answers
    correct_norm = choose(logprob / np.maximum(option_bytes, 1)) == answers
    subject_index = np.array([e.subject for e in encoded])
    per_subject = {
        s: {
            "items": int((subject_index == j).sum()),
            "accuracy": float(correct[subject_index == j].mean()),
            "accuracy_norm": float(correct_norm[subject_index == j].mean()),
        }
        for j, s in enumerate(subjects)
    }
    layers = layer_report(routing, correct)
    names = module.moe_layer_names
    return {
        "router": module.run_config.router.name,
        "top_k": getattr(module.run_config.router, "top_k", None),
        "num_experts": module.run_config.model.moe.num_experts,
        "items": len(items),
        "truncated_questions": truncated,
        "accuracy": float(correct.mean()),
        "accuracy_norm": float(correct_norm.mean()),
        "chance": 0.25,
        "per_subject": per_subject,
        "layers": names,
        "per_layer": dict(zip(names, layers, strict=True)),
        "mean": {
            key: _nanmean([layer[key] for layer in layers])
            for key in (
                "dead_experts",
                "gate_entropy",
                "utilization",
                "expert_accuracy_spread",
                "expert_accuracy_range",
            )
        },
        "option_tokens_mean": float(lengths.mean()),
        "timing": {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,  # process CPU time, summed over threads
            "items_per_s": len(items) / seconds if seconds > 0 else None,
            "threads": torch.get_num_threads(),
            "device": str(device),
        },
    }


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def json_finite(value):
    """`value` with every non-finite float replaced by None, recursively (JSON has no NaN or inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_finite(v) for v in value]
    return value


def markdown(result: dict) -> str:
    def fmt(value, digits=3):
        return (
            "n/a"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else f"{value:.{digits}f}"
        )

    timing = result["timing"]
    lines = [
        f"# Quiz (X5) of {result['checkpoint']}",
        "",
        f"Router `{result['router']}`, {result['num_experts']} experts. {result['items']} items in "
        f"{len(result['per_subject'])} subjects from {', '.join(result['quiz'])}.",
        f"Accuracy {fmt(result['accuracy'])} (length-normalized {fmt(result['accuracy_norm'])}); "
        "chance 0.250.",
        f"Scoring took {fmt(timing['seconds'], 1)} s ({fmt(timing['cpu_seconds'], 1)} s of CPU time) with "
        f"{timing['threads']} threads.",
        "",
        "Routing over the quiz tokens (each question once, every option):",
        "",
        "| layer | dead experts | gate entropy | utilization | experts with items | per-expert accuracy std "
        "| per-expert accuracy max−min |",
        "|---|---|---|---|---|---|---|",
    ]
    columns = ("dead_experts", "gate_entropy", "utilization", "experts_with_items")
    spread = ("expert_accuracy_spread", "expert_accuracy_range")
    for name in result["layers"]:
        m = result["per_layer"][name]
        cells = [fmt(m[c]) if c != "experts_with_items" else str(m[c]) for c in columns + spread]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result["layers"]:
        mean = result["mean"]
        cells = [fmt(mean[c]) if c in mean else "" for c in columns + spread]
        lines.append("| mean | " + " | ".join(cells) + " |")
    lines += ["", "| subject | items | accuracy | accuracy (length-normalized) |", "|---|---|---|---|"]
    for subject, row in result["per_subject"].items():
        lines.append(f"| {subject} | {row['items']} | {fmt(row['accuracy'])} | {fmt(row['accuracy_norm'])} |")
    lines.append(f"| all | {result['items']} | {fmt(result['accuracy'])} | {fmt(result['accuracy_norm'])} |")
    check = result["holdout"]
    if check["checked"] and not check["matches"]:
        lines += ["", "**Warning**: the quiz was built with another holdout than this model's training data:"]
        lines += [f"- {problem}" for problem in check["problems"]]
    lines += [
        "",
        "Definitions: testbed/analysis/quiz.py. Per-expert tables (load, items, accuracy): quiz.json.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- CLI


def compose_data(overrides: list[str]):
    """The data config of the default run with Hydra-style overrides (`data=shipped data.split_seed=1`)."""
    try:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except HydraException as err:
        raise QuizError(f"config overrides {overrides}: {err}") from err
    return parse_config(cfg).data


def build_main(args: argparse.Namespace) -> int:
    """`testbed-quiz build [overrides] --out DIR` with parsed options (`parse_args`)."""
    if args.from_run is not None:
        data = load_run(resolve_checkpoint(args.from_run), args.overrides).data
    else:
        data = compose_data(args.overrides)
    manifest = build_quiz(
        data, args.out, args.items_per_domain, args.prefix_tokens, args.answer_tokens, args.seed
    )
    total = sum(d["items"] for d in manifest["domains"].values())
    print(
        f"wrote {total} items in {len(manifest['domains'])} files, {MANIFEST} and {PROVENANCE} to {args.out}"
    )
    return 0


def load_tokenizer_of(run):
    """The tokenizer a run was trained with."""
    return load_tokenizer(run.data.tokenizer or SHIPPED_TOKENIZER)


def eval_main(args: argparse.Namespace) -> int:
    """`testbed-quiz eval <run dir or .ckpt> --quiz FILES` with parsed options (`parse_args`)."""
    if args.checkpoint is None:
        raise QuizError("testbed-quiz eval: give a checkpoint (or run directory), or --hf MODEL")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    checkpoint = resolve_checkpoint(args.checkpoint)
    run = load_run(checkpoint, [])
    items = load_quiz(args.quiz)
    tokenizer = load_tokenizer_of(run)
    module = MoELanguageModel(run, list(run.data.domains))
    load_weights(module, checkpoint, what="testbed-quiz")
    module.to(args.device)
    check = holdout_check(args.quiz, run.data)
    for problem in check["problems"]:
        print(
            f"warning: quiz holdout differs from the model's, items may be training text: {problem}",
            file=sys.stderr,
        )
    result = evaluate_quiz(module, tokenizer, items, args.batch_items, args.device, args.positions)
    result["positions"] = args.positions
    result = {"checkpoint": str(checkpoint), "quiz": [str(p) for p in args.quiz], "holdout": check, **result}
    out = args.out or checkpoint.parent.parent / "quiz"
    out.mkdir(parents=True, exist_ok=True)
    (out / "quiz.json").write_text(json.dumps(json_finite(result), indent=2) + "\n")
    (out / "quiz.md").write_text(markdown(result))
    print((out / "quiz.md").read_text())
    print(f"wrote {out}/quiz.json and quiz.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The options of `testbed-quiz` (its entry point, `testbed.hf.cli.quiz_main`, runs `build_main`,
    `eval_main` or, with --hf, the Hugging Face evaluation)."""
    parser = argparse.ArgumentParser(prog="testbed-quiz", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build an MMLU-format quiz from the validation documents")
    build.add_argument("overrides", nargs="*", help="Hydra-style config overrides, e.g. data=shipped")
    build.add_argument("--out", type=Path, required=True, help="output directory")
    build.add_argument("--from-run", type=Path, help="take the data config from this run dir or .ckpt")
    build.add_argument("--items-per-domain", type=int, default=100)
    build.add_argument("--prefix-tokens", type=int, default=64, help="question length in tokens")
    build.add_argument("--answer-tokens", type=int, default=16, help="option length in tokens")
    build.add_argument("--seed", type=int, default=0)
    ev = commands.add_parser("eval", help="score a checkpoint on quiz files, with the routing analysis")
    ev.add_argument(
        "checkpoint",
        type=Path,
        nargs="?",
        help="a .ckpt file, or a run directory with checkpoints/last.ckpt (not with --hf)",
    )
    ev.add_argument(
        "--quiz", type=Path, nargs="+", required=True, help="quiz directories or *_test.csv files"
    )
    ev.add_argument("--out", type=Path, help="output directory (default: <run dir>/quiz)")
    ev.add_argument("--batch-items", type=int, default=32, help="items per forward pass (one row each)")
    ev.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument(
        "--positions",
        choices=["all", "answer"],
        default="all",
        help="count routing over every token of an item (all) or at its answer position only (answer: the "
        "last question token; each item goes to that token's top-1 expert)",
    )
    hf = ev.add_argument_group("pretrained Hugging Face MoEs (pip install -e .[hf]; testbed/hf/quiz.py)")
    hf.add_argument("--hf", help="a hub model id or a local model directory, instead of a checkpoint")
    hf.add_argument("--tokenizer", help="tokenizer directory or id (default: the model's own)")
    hf.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32")
    hf.add_argument("--max-length", type=int, default=2048, help="prompt tokens kept (the end is kept)")
    hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `testbed-quiz` parsed (`build` overrides may also come after the options)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--hf"):  # `testbed-quiz --hf MODEL --quiz ...` means `eval --hf`
        argv.insert(0, "eval")
    args, extra = parser.parse_known_args(argv)  # overrides may also come after the options
    if args.command == "build" and not any(x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
