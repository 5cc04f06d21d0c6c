"""Top-k softmax router: p = softmax(z), S_t = TopK(p_t, K); gates renormalized (Mixtral) or not (OLMoE)."""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.routing.base import ROUTERS, Router, Routing, RoutingContext, routing_from_choices
from testbed.routing.hash import hash_choices, hash_constants
from testbed.routing.options import TopKSoftmaxConfig as TopKSoftmaxConfig


@ROUTERS.register("topk_softmax")
class TopKSoftmaxRouter(Router):
    label = ""  # the default router: labels name its balancing method only

    def __init__(self, d_model: int, num_experts: int, config, num_domains: int = 1):
        super().__init__(d_model, num_experts, config, num_domains)
        if config.hash_steps > 0:
            hash_a, hash_b = hash_constants(num_experts, seed=0)
            self.register_buffer("hash_a", hash_a, persistent=False)
            self.register_buffer("hash_b", hash_b, persistent=False)

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        if self.training and self.config.jitter > 0:
            noise = torch.empty_like(x).uniform_(1 - self.config.jitter, 1 + self.config.jitter)
            x = x * noise
        logits = self.router_logits(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if self.hash_stage:  # stage one: the hash assignment, learned gates
            if context.token_ids is None:
                raise ValueError("router.hash_steps needs the input token ids (context.token_ids is None)")
            chosen = hash_choices(context.token_ids, self.hash_a, self.hash_b, self.config.top_k)
        else:
            chosen = torch.topk(
                probs + self.expert_bias, self.config.top_k, dim=-1
            ).indices  # bias: selection only
        gates = probs.gather(-1, chosen)
        if self.config.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return routing_from_choices(logits, probs, chosen, gates.to(x.dtype))
