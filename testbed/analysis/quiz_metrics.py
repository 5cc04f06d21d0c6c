"""Routing over the counted quiz tokens and the per-layer quantities of Chernov (2025) from it: dead
experts, gate entropy, per-expert accuracy spread (definitions: testbed/analysis/quiz.py)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from testbed.metrics import specialization as S
from testbed.metrics.stats import RoutingStats
from testbed.routing.base import Routing, count_per_expert


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
