"""Sinkhorn router (SH): balanced assignment over the balancing scope, plain top-k at eval.

exp(z) over the scope's T x E block is scaled alternately so that rows sum to 1 and columns to T/E
(Sinkhorn-Knopp; Clark et al. 2022 "Unified scaling laws for routed LMs", Falke et al. 2026); each token
takes the top-K experts of the balanced matrix, with gates from the unbalanced softmax.
Scopes: `sequence` balances each sequence separately, `micro_batch` the whole forward pass, `global`
all data-parallel ranks together (column sums all-reduced every iteration) and, across gradient
accumulation, aims each micro-batch's column targets at the cumulative balance of the optimizer step
so far [defined here]: target_e = max((M + T)/E - R_e, eps), renormalized to T, with R_e the assignments
of expert e so far divided by K and M the tokens so far.
"""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.routing.base import (
    ROUTERS,
    BalancingRouter,
    RoutingContext,
    count_per_expert,
)
from testbed.routing.options import SinkhornConfig as SinkhornConfig
from testbed.scope import LOCAL_SCOPES, all_reduce_sum, token_groups


def sinkhorn_log(
    log_scores: Tensor, iterations: int, column_targets: Tensor | None = None, distributed: bool = False
) -> Tensor:
    """Balanced log-assignment for log_scores [G, T, E] (G independent groups).

    Rows end summing to 1; columns to `column_targets` [G, E] (default T/E each). With `distributed`,
    column sums include every data-parallel rank. The final step is a column scaling: the per-row
    ranking of experts only depends on the column factors.
    """
    log_p = log_scores.double()
    groups, num_tokens, num_experts = log_p.shape
    if column_targets is None:
        column_targets = torch.full(
            (groups, num_experts), num_tokens / num_experts, dtype=log_p.dtype, device=log_p.device
        )
    log_targets = column_targets.double().clamp_min(1e-12).log()
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=2, keepdim=True)  # rows -> 1
        if distributed:  # after the row step every entry is <= 1, so exp cannot overflow
            log_columns = all_reduce_sum(torch.exp(log_p).sum(dim=1, keepdim=True)).log()
        else:
            log_columns = torch.logsumexp(log_p, dim=1, keepdim=True)
        log_p = log_p - log_columns + log_targets.unsqueeze(1)  # columns -> targets
    return log_p


@ROUTERS.register("sinkhorn")
class SinkhornRouter(BalancingRouter):
    balances = True
    label = "SH"
    marker = "^"

    def balanced_choice(self, logits: Tensor, context: RoutingContext) -> Tensor:
        num_tokens, num_experts = logits.shape
        scope, top_k = self.config.scope, self.config.top_k
        if scope in LOCAL_SCOPES:  # each group of the forward pass balanced on its own
            groups = token_groups(scope, num_tokens, context.batch_size, context.seq_len)
            log_p = sinkhorn_log(logits.view(groups.count, groups.size, num_experts), self.config.iterations)
            return torch.topk(log_p.reshape(num_tokens, num_experts), top_k, dim=-1).indices
        # global: across ranks, and toward the cumulative balance of this optimizer step
        state = context.scope_state
        key = ("sinkhorn", context.layer_index)
        tokens_here = all_reduce_sum(
            torch.full((), float(num_tokens), device=logits.device, dtype=torch.float64)
        )
        previous = state.previous(key) if state is not None else None
        if previous is None:
            targets = torch.full((num_experts,), 1.0, device=logits.device, dtype=torch.float64)
        else:
            tokens_before = previous.sum() / top_k
            wanted = (tokens_before + tokens_here) / num_experts - previous.double() / top_k
            targets = wanted.clamp_min(1e-3 * tokens_here / num_experts)
        # column targets are in global token mass; this rank scales its share by its token fraction
        targets = targets / targets.sum() * tokens_here
        log_p = sinkhorn_log(
            logits.unsqueeze(0), self.config.iterations, targets.unsqueeze(0), distributed=True
        )
        chosen = torch.topk(log_p[0], top_k, dim=-1).indices
        if state is not None:
            state.accumulate(key, count_per_expert(chosen.reshape(-1), num_experts).double())
        return chosen
