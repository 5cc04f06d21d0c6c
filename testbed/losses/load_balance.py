"""Load-balance loss (Switch / GShard form) at a chosen balancing scope.

L = alpha * E * sum_e f_e * P_e, with f_e the fraction of assignments sent to expert e (hard counts of
the kept assignments under capacity, no gradient) and P_e the mean router probability of e over the
scope's local tokens (full softmax). Equals 1 at perfect balance (Fedus et al. 2021; scopes: Qiu et
al. 2025, Falke et al. 2026).
"""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.losses.base import BALANCE, AuxLoss
from testbed.losses.options import LoadBalanceConfig as LoadBalanceConfig
from testbed.losses.options import NoBalanceConfig as NoBalanceConfig
from testbed.routing.base import Routing, RoutingContext, count_per_expert
from testbed.scope import LOCAL_SCOPES, Scope, TokenGroups, token_groups


def load_balance_value(
    probs: Tensor,
    expert_index: Tensor,
    token_index: Tensor,
    num_experts: int,
    group_of_token: Tensor | None = None,
    num_groups: int = 1,
    kept: Tensor | None = None,
) -> Tensor:
    """E * sum_e f_e P_e computed within each group of tokens, averaged over groups.

    probs [T, E]; expert_index/token_index [A]; group_of_token [T] (None = one group, the micro-batch);
    kept [A] bool (None = all): f_e counts only the kept assignments (capacity).
    """
    num_tokens = probs.shape[0]
    if group_of_token is None:
        group_of_token = torch.zeros(num_tokens, dtype=torch.long, device=probs.device)
    flat = group_of_token[token_index] * num_experts + expert_index
    counts = torch.zeros(num_groups * num_experts, device=probs.device, dtype=probs.dtype)
    ones = torch.ones_like(flat, dtype=probs.dtype) if kept is None else kept.to(probs.dtype)
    counts = counts.scatter_add_(0, flat, ones).view(num_groups, num_experts)
    fractions = (counts / counts.sum(-1, keepdim=True).clamp_min(1)).detach()
    prob_sums = torch.zeros(num_groups, num_experts, device=probs.device, dtype=probs.dtype)
    prob_sums = prob_sums.index_add_(0, group_of_token, probs)
    tokens_per_group = torch.zeros(num_groups, device=probs.device, dtype=probs.dtype)
    tokens_per_group = tokens_per_group.index_add_(0, group_of_token, torch.ones_like(probs[:, 0]))
    mean_probs = prob_sums / tokens_per_group.clamp_min(1).unsqueeze(-1)
    return (num_experts * (fractions * mean_probs).sum(-1)).mean()


def micro_batch_load_balance(routing: Routing) -> Tensor:
    """Micro-batch scope, the value of `load_balance_value` with one group: f_e from the routing's own
    per-expert counts (`tokens_per_expert`; recounted over the kept assignments under capacity) and P_e a
    mean over tokens, so no scatter funnels every assignment into one row."""
    probs = routing.probs.float()
    counts = routing.tokens_per_expert
    if routing.kept is not None:
        counts = count_per_expert(routing.expert_index, routing.num_experts, routing.kept)
    counts = counts.to(probs.dtype)
    fractions = (counts / counts.sum().clamp_min(1)).detach()
    return routing.num_experts * (fractions * probs.mean(0)).sum()


def grouped_load_balance(routing: Routing, groups: TokenGroups) -> Tensor:
    """The value within each group of consecutive tokens (testbed.scope.token_groups), averaged over the
    groups: P_e per group is a mean over a [groups, size, E] view; f_e counts per (group, expert)."""
    probs = routing.probs.float()
    num_experts = routing.num_experts
    group = torch.div(routing.token_index, groups.size, rounding_mode="floor")
    ones = routing.kept_as(probs.dtype)
    counts = torch.zeros(groups.count * num_experts, device=probs.device, dtype=probs.dtype)
    counts = counts.scatter_add_(0, group * num_experts + routing.expert_index, ones).view(groups.count, -1)
    fractions = (counts / counts.sum(-1, keepdim=True).clamp_min(1)).detach()
    mean_probs = probs.view(groups.count, groups.size, num_experts).mean(1)
    return (num_experts * (fractions * mean_probs).sum(-1)).mean()


def sequence_load_balance(routing: Routing, context: RoutingContext) -> Tensor:
    """Sequence scope (DeepSeek's sequence-wise loss): the value within each sequence, averaged; also the
    complementary loss beside expert-bias balancing (`sequence_coefficient`)."""
    groups = token_groups(Scope.sequence, routing.num_tokens, context.batch_size, context.seq_len)
    return grouped_load_balance(routing, groups)


def global_load_balance(
    probs: Tensor, expert_index: Tensor, context: RoutingContext, kept: Tensor | None = None
) -> Tensor:
    """Global scope: f_e from the running (kept) counts of this optimizer step, summed over all ranks and
    the micro-batches so far; P_e over this micro-batch's local tokens."""
    num_experts = probs.shape[1]
    local_counts = count_per_expert(expert_index, num_experts, kept).to(probs.dtype)
    state = context.scope_state
    if state is None:  # outside training steps (e.g. a bare forward): the micro-batch is the whole scope
        counts = local_counts
    else:
        counts = state.accumulate(("load_balance", context.layer_index), local_counts)
    fractions = counts / counts.sum().clamp_min(1)
    return num_experts * (fractions * probs.mean(0)).sum()


@BALANCE.register("load_balance")
class LoadBalanceLoss(AuxLoss):
    label = "LBL"
    marker = "o"

    def __call__(
        self, routing: Routing, context: RoutingContext, expert_outputs: Tensor | None = None
    ) -> Tensor:
        scope = self.config.scope
        if scope not in LOCAL_SCOPES:  # global: counts of the optimizer step so far, over all ranks
            return global_load_balance(routing.probs.float(), routing.expert_index, context, routing.kept)
        groups = token_groups(scope, routing.num_tokens, context.batch_size, context.seq_len)
        if groups.count == 1:  # the routing's own per-expert counts, no scatter
            return micro_batch_load_balance(routing)
        return grouped_load_balance(routing, groups)


@BALANCE.register("none")
class NoBalance(AuxLoss):
    """No balancing term (e.g. for routers that balance by construction): its value is a constant 0."""

    label = "none"
    marker = "P"
    adds_term = False
    coefficient = 0.0

    def __call__(
        self, routing: Routing, context: RoutingContext, expert_outputs: Tensor | None = None
    ) -> Tensor:
        return routing.probs.new_zeros((), dtype=torch.float32)
