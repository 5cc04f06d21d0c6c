"""Auxiliary-loss-free balancing by expert bias (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3).

After each optimizer step, outside autograd: b_e <- b_e + gamma * sign(mean_j c_j - c_e), with the
counts c (of kept assignments, under capacity) over the balancing scope. The bias only changes which
experts are selected, never the gates.
Scopes [defined here for scopes narrower than the optimizer step]: `global` uses one count vector
summed over the step's micro-batches and all ranks; `micro_batch` and `sequence` average the sign
vectors of each micro-batch (resp. each sequence) seen in the step. Optionally a tiny sequence-scope
load-balance loss runs beside it, as in DeepSeek-V3 (`sequence_coefficient`, e.g. 1e-4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.losses.base import BALANCE, AuxLoss
from testbed.losses.load_balance import sequence_load_balance
from testbed.losses.options import ExpertBiasConfig as ExpertBiasConfig
from testbed.routing.base import Routing, RoutingContext
from testbed.scope import all_reduce_sum, token_groups


@BALANCE.register("expert_bias")
class ExpertBiasBalance(AuxLoss):
    """The bias update's statistics and its step: `observe` adds one layer's load of one micro-batch
    (called by the training module on each layer's routing record), `after_optimizer_step` moves each
    router's `expert_bias` buffer and clears them (an optimizer step hook). As a loss term it returns
    the complementary sequence-scope load-balance value (weight `sequence_coefficient`)."""

    label = "EB"
    marker = "s"

    def __init__(self, config: ExpertBiasConfig):
        super().__init__(config)
        self.scope, self.gamma = str(config.scope), float(config.gamma)
        # the current optimizer step's statistics per MoE layer (empty between steps: a checkpoint, written
        # at a step boundary, never needs them): global: counts; micro_batch/sequence: summed sign vectors
        self.sums: dict[int, Tensor] = {}
        self.groups: dict[int, Tensor] = {}  # number of sign vectors summed

    @property
    def name(self) -> str:
        return "sequence_load_balance"

    @property
    def coefficient(self) -> float:
        return float(self.config.sequence_coefficient)

    def __call__(
        self, routing: Routing, context: RoutingContext, expert_outputs: Tensor | None = None
    ) -> Tensor:
        return sequence_load_balance(routing, context)

    @torch.no_grad()
    def observe(self, layer: int, routing: Routing, context: RoutingContext) -> None:
        num_experts = routing.num_experts
        device = routing.expert_index.device
        groups = token_groups(self.scope, routing.num_tokens, context.batch_size, context.seq_len)
        group = groups.index(device)[routing.token_index]  # each assignment's sequence (or 0)
        num_groups = groups.count
        counts = torch.zeros(num_groups * num_experts, device=device)
        counts = counts.index_add_(
            0,
            group * num_experts + routing.expert_index,
            routing.kept_as(counts.dtype),
        )
        counts = counts.view(num_groups, num_experts)
        if self.scope == "global":
            value, groups = counts[0], torch.ones((), device=device)
        else:
            value = torch.sign(counts.mean(-1, keepdim=True) - counts).sum(0)
            groups = torch.full((), float(num_groups), device=device)
        self.sums[layer] = self.sums.get(layer, 0) + value
        self.groups[layer] = self.groups.get(layer, 0) + groups

    @torch.no_grad()
    def after_optimizer_step(self, routers: list[torch.nn.Module]) -> None:
        """b += gamma * direction for the router of each observed layer (`routers[layer]`), then clear."""
        for layer, router in enumerate(routers):
            if layer not in self.sums:
                continue
            if self.scope == "global":
                counts = all_reduce_sum(self.sums[layer])
                direction = torch.sign(counts.mean() - counts)
            else:
                direction = all_reduce_sum(self.sums[layer]) / all_reduce_sum(self.groups[layer]).clamp_min(1)
            router.expert_bias += self.gamma * direction.to(router.expert_bias.dtype)
        self.sums.clear()
        self.groups.clear()
