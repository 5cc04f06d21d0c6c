"""Expert-choice router (Zhou et al. 2022): P = softmax(Z) over experts; each expert takes its top-C tokens by
P[:, e], C = ceil(capacity_factor * K * T / E); gates g = P at the chosen pairs; a token gets 0..E experts.

Causality warning: choosing over the batch leaks future tokens in a causal LM. Whether a token is taken by an
expert depends on the scores of the other tokens, including later ones, so a token's routing (and output)
depends on tokens that come after it. `scope: sequence` makes the choice within each sequence separately:
it limits the leak to the token's own sequence but does not remove it (later tokens of that sequence still
count).
"""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.routing.base import ROUTERS, Router, Routing, RoutingContext, count_per_expert
from testbed.routing.capacity import expert_capacity
from testbed.routing.options import ExpertChoiceConfig as ExpertChoiceConfig
from testbed.scope import token_groups


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
    balances = True  # every expert takes C tokens
    label = "EC"
    marker = "v"

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        logits = self.router_logits(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # P = softmax(Z), [T, E]
        num_tokens, num_experts = probs.shape
        token_group = token_groups(self.config.scope, num_tokens, context.batch_size, context.seq_len)
        groups, group_len = token_group.count, token_group.size
        capacity = expert_capacity(group_len, num_experts, self.config.top_k, self.config.capacity_factor)
        # each expert takes its top-C tokens by P[:, e] within each group: [G, E, C] positions in the group
        scores = probs.view(groups, group_len, num_experts).transpose(1, 2)
        positions = torch.topk(scores, capacity, dim=-1).indices
        offsets = torch.arange(groups, device=x.device).view(groups, 1, 1) * group_len
        # expert-major order [E, G, C]: flat assignments are sorted by expert by construction
        token_index = (positions + offsets).permute(1, 0, 2).reshape(-1)
        expert_index = torch.arange(num_experts, device=x.device).repeat_interleave(groups * capacity)
        weight = probs[token_index, expert_index]  # g = P at the chosen (token, expert) pairs
        return Routing(
            logits=logits,
            probs=probs,
            token_index=token_index,
            expert_index=expert_index,
            weight=weight.to(x.dtype),
            tokens_per_expert=count_per_expert(expert_index, num_experts),
        )
