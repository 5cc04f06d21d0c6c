"""Scoring quiz items with a language model (`testbed-quiz eval`; definitions: testbed/analysis/quiz.py):
token ids of each question and its options, one packed row per item, the sum of the log-probabilities of
each option's tokens, and the routing of the counted tokens collected on the way (`QuizRouting`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from testbed.analysis.quiz_items import QuizError, QuizItem
from testbed.analysis.quiz_metrics import QuizRouting

PAD_ID = 0  # <|endoftext|>; padded positions are never scored nor counted


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
    option tokens, [N, 4]. Rows are packed by `pack_items`, and `forward(input_ids [B, S], domain_ids [B, S] |
    None, *, attention_mask [B, S, S], position_ids [B, S])` (the packing's mask and positions, as keywords of
    `MoETransformer.forward`) returns (logits, per-layer outputs with `.routing`). With `head`, `forward`
    returns hidden states instead and `head` turns the ones that predict an option token into logits (the LM
    head is then applied only where it is needed). `positions`: routing is counted over every token of an
    item's row ("all"), or only at its answer position ("answer": the last question token, whose output
    predicts the answer; each item then goes to that token's top-1 expert)."""
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
        logits, outputs = forward(
            ids, domain_ids, attention_mask=packed["attention_mask"], position_ids=packed["position_ids"]
        )
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
