"""Expert capacity for token-choice routers: each expert keeps at most ceil(cf * K * T / E) assignments,
the ones with the highest gates; dropped assignments contribute nothing (the residual carries the token).

The kept set has a data-dependent size, so on CUDA the boolean selection costs one device-to-host sync;
the default is dropless (`capacity_factor: null`), which has none.
"""

from __future__ import annotations

import math

import torch

from testbed.routing.base import Routing, count_per_expert


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * K * T / E), at least 1 and at most T (capacity and expert-choice)."""
    exact = capacity_factor * top_k * num_tokens / num_experts
    capacity = math.ceil(round(exact, 9))  # round first: 1.1 * 10 / 11 must give 1, not 2
    return max(1, min(num_tokens, capacity))


def apply_capacity(routing: Routing, capacity_factor: float, top_k: int) -> Routing:
    """Drop, per expert, the lowest-gate assignments beyond capacity; `dropped` counts them."""
    num_experts = routing.num_experts
    capacity = expert_capacity(routing.num_tokens, num_experts, top_k, capacity_factor)
    # order by expert, and within an expert by descending gate (ties: token order)
    by_gate = torch.argsort(routing.weight.detach(), descending=True, stable=True)
    order = by_gate[torch.argsort(routing.expert_index[by_gate], stable=True)]
    expert_index = routing.expert_index[order]
    starts = torch.cumsum(routing.tokens_per_expert, 0) - routing.tokens_per_expert
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[expert_index]
    keep = rank_in_expert < capacity
    kept = order[keep]
    kept_experts = expert_index[keep]
    return Routing(
        logits=routing.logits,
        probs=routing.probs,
        token_index=routing.token_index[kept],
        expert_index=kept_experts,
        weight=routing.weight[kept],
        tokens_per_expert=count_per_expert(kept_experts, num_experts),
        dropped=(~keep).sum(),
        slot_index=None if routing.slot_index is None else routing.slot_index[kept],
    )
