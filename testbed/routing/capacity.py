"""Expert capacity for token-choice routers: each expert keeps at most ceil(cf * K * T / E) assignments,
the ones with the highest gates; dropped assignments contribute nothing (the residual carries the token).

Which assignments are kept is computed with fixed shapes and no host sync (`capacity_keep_mask`: sort by
(expert, -gate), rank within the expert from the expert offsets). Two forms use it:
- `mask_capacity` (what the MoE layer uses): sync-free, static shapes. All T*K assignments stay, dropped
  ones with gate 0 (so they add nothing to the output and get no gradient), `Routing.kept` says which and
  `Routing.dropped` counts the others. Every consumer that counts assignments (routing counters,
  load balance, expert bias, orthogonality) counts only the kept ones, so every number, output and
  gradient equals the removal form's (tested); the experts still compute the dropped rows.
- `apply_capacity`: the removal form, kept as the reference (e.g. for tests that walk the assignments
  one by one): removes the dropped assignments. The kept set has a data-dependent size, so on CUDA this
  costs one device-to-host sync (a single `nonzero`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from testbed.routing.base import Routing, count_per_expert


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * K * T / E), at least 1 and at most T (capacity and expert-choice)."""
    exact = capacity_factor * top_k * num_tokens / num_experts
    capacity = math.ceil(round(exact, 9))  # round first: 1.1 * 10 / 11 must give 1, not 2
    return max(1, min(num_tokens, capacity))


def capacity_keep_mask(routing: Routing, capacity_factor: float, top_k: int) -> tuple[Tensor, Tensor]:
    """(order, keep): `order` [A] sorts the assignments by expert, and within an expert by descending gate
    (ties: token order); `keep` [A] (in that order) is True for the first C of each expert. No host sync."""
    capacity = expert_capacity(routing.num_tokens, routing.num_experts, top_k, capacity_factor)
    by_gate = torch.argsort(routing.weight.detach(), descending=True, stable=True)
    order = by_gate[torch.argsort(routing.expert_index[by_gate], stable=True)]
    expert_index = routing.expert_index[order]
    starts = torch.cumsum(routing.tokens_per_expert, 0) - routing.tokens_per_expert
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[expert_index]
    return order, rank_in_expert < capacity


def mask_capacity(routing: Routing, capacity_factor: float, top_k: int) -> Routing:
    """The static-shape form, no host sync: every assignment stays, in the order of `capacity_keep_mask`,
    dropped ones at gate 0 and `kept` False; `dropped` (on device) counts them.

    Same output and gradients as `apply_capacity` through the experts and `combine`; `tokens_per_expert`
    still counts every assignment (the experts compute the dropped ones too)."""
    order, keep = capacity_keep_mask(routing, capacity_factor, top_k)
    weight = routing.weight[order]
    return Routing(
        logits=routing.logits,
        probs=routing.probs,
        token_index=routing.token_index[order],
        expert_index=routing.expert_index[order],
        weight=torch.where(keep, weight, torch.zeros_like(weight)),
        tokens_per_expert=routing.tokens_per_expert,
        dropped=keep.numel() - keep.sum(),
        slot_index=None if routing.slot_index is None else routing.slot_index[order],
        kept=keep,
    )


def apply_capacity(routing: Routing, capacity_factor: float, top_k: int) -> Routing:
    """The removal form: drop, per expert, the lowest-gate assignments beyond capacity; `dropped` counts
    them. The kept ones come in the order of `mask_capacity`'s kept assignments. One host sync."""
    order, keep = capacity_keep_mask(routing, capacity_factor, top_k)
    kept = order[torch.nonzero(keep).squeeze(1)]  # the one host sync: the kept set's size
    kept_experts = routing.expert_index[kept]
    return Routing(
        logits=routing.logits,
        probs=routing.probs,
        token_index=routing.token_index[kept],
        expert_index=kept_experts,
        weight=routing.weight[kept],
        tokens_per_expert=count_per_expert(kept_experts, routing.num_experts),
        dropped=keep.numel() - keep.sum(),
        slot_index=None if routing.slot_index is None else routing.slot_index[kept],
    )
