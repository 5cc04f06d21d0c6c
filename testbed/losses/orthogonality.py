"""Orthogonality loss (Guo et al., NeurIPS 2025, arXiv 2505.22323), per-token form [SPEC].

L = w_o * (1 / sum_t |S_t|) * sum_t sum_{k in S_t} ||Proj_{span{o_tj : j in S_t, j != k}} o_tk||^2,
o_tk = output of expert k for token t before gating; the span is built by Gram-Schmidt with eps 1e-6.
Computed per token over that token's co-selected experts, the paper's intent (its released code groups
outputs by expert instead, a known discrepancy). `normalize: true` divides each term by ||o_tk||^2, a
cosine form that cannot be lowered by shrinking outputs. Tokens with fewer than 2 experts add nothing
(their assignments still count in the denominator).

Gradient: o_tk does not depend on this layer's router, so by this definition the loss trains the experts
(and, through the hidden states, earlier layers). `gated: true` uses g_tk * o_tk instead [defined here],
which also sends gradient to this layer's router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from testbed.losses.base import AUX_LOSSES, AuxLoss, check_coefficient
from testbed.routing.base import Routing, RoutingContext


@dataclass
class OrthogonalityConfig:
    coefficient: Any = "auto"  # a float, or "auto": calibrated on the first batch toward `target`
    target: float = 1e-4  # Guo et al.'s calibration target for w_o * L
    normalize: bool = False
    gated: bool = False
    eps: float = 1e-6


def per_token_slots(routing: Routing, max_per_token: int | None) -> tuple[Tensor, int]:
    """Slot of each assignment within its token (0..n_t-1), and the number of slots K_max.

    K_max comes from the router when it is static (token choice: top_k); otherwise it is read from the
    data, which costs one host sync (expert-choice, capacity drops make it data-dependent)."""
    num_tokens = routing.num_tokens
    per_token = torch.zeros(num_tokens, dtype=torch.long, device=routing.token_index.device)
    per_token.index_add_(0, routing.token_index, torch.ones_like(routing.token_index))
    if max_per_token is None:
        max_per_token = int(per_token.max()) if num_tokens else 0
    order = torch.argsort(routing.token_index, stable=True)
    starts = torch.cumsum(per_token, 0) - per_token
    slot_sorted = torch.arange(order.numel(), device=order.device) - starts[routing.token_index[order]]
    slot = torch.empty_like(slot_sorted)
    slot[order] = slot_sorted
    return slot, max(max_per_token, 1)


def projection_energy(outputs: Tensor, eps: float = 1e-6, normalize: bool = False) -> Tensor:
    """For padded per-token outputs [T, K, d] (zero rows = no expert), the energy ||Proj_{others} o_k||^2
    of each slot k onto the span of the token's other outputs, [T, K] (Gram-Schmidt, batched over T, K)."""
    num_slots = outputs.shape[1]
    if num_slots < 2:
        return outputs.new_zeros(outputs.shape[:2])
    others_index = torch.tensor(
        [[j for j in range(num_slots) if j != k] for k in range(num_slots)], device=outputs.device
    )
    others = outputs[:, others_index]  # [T, K, K-1, d]
    basis: list[Tensor] = []
    energy = outputs.new_zeros(outputs.shape[:2])
    for j in range(num_slots - 1):
        v = others[:, :, j]
        for q in basis:
            v = v - (q * v).sum(-1, keepdim=True) * q
        q = v / (v.norm(dim=-1, keepdim=True) + eps)
        basis.append(q)
        energy = energy + (q * outputs).sum(-1).square()
    if normalize:
        energy = energy / (outputs.square().sum(-1) + eps)
    return energy


@AUX_LOSSES.register("orthogonality", OrthogonalityConfig)
class OrthogonalityLoss(AuxLoss):
    needs_expert_outputs = True

    def __call__(
        self, routing: Routing, context: RoutingContext, expert_outputs: Tensor | None = None
    ) -> Tensor:
        if expert_outputs is None:
            raise ValueError("the orthogonality loss needs the per-assignment expert outputs")
        outputs = expert_outputs.float()
        if self.config.gated:
            outputs = outputs * routing.weight.float().unsqueeze(-1)
        slot, num_slots = per_token_slots(routing, context.extras.get("max_experts_per_token"))
        padded = outputs.new_zeros(routing.num_tokens, num_slots, outputs.shape[-1])
        padded = padded.index_put((routing.token_index, slot), outputs)
        energy = projection_energy(padded, self.config.eps, self.config.normalize)
        return energy.sum() / max(routing.num_assignments, 1)

    @classmethod
    def check(cls, config: OrthogonalityConfig, key: str) -> None:
        check_coefficient(config, key)
