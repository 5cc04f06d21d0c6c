"""Sigmoid router (DeepSeek-V3, DeepSeek-AI 2024): s = sigmoid(z), S_t = TopK(s_t + b, K) with the balancing
bias b (selection only), gates g = s_{S_t} / sum(s_{S_t}) * scale."""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.routing.base import ROUTERS, Router, Routing, RoutingContext, routing_from_choices
from testbed.routing.options import SigmoidConfig as SigmoidConfig


@ROUTERS.register("sigmoid")
class SigmoidRouter(Router):
    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        logits = self.router_logits(x)
        scores = torch.sigmoid(logits.float())  # s_{t,e} = sigma(z_{t,e})
        # S_t = TopK(s_t + b, K): the expert bias b changes which experts are selected, never the gates
        chosen = torch.topk(scores + self.expert_bias, self.config.top_k, dim=-1).indices
        gates = scores.gather(-1, chosen)
        gates = gates / gates.sum(dim=-1, keepdim=True) * self.config.scale  # g = s_S / sum(s_S) * scale
        probs = scores / scores.sum(dim=-1, keepdim=True)  # a full distribution for losses and metrics
        return routing_from_choices(logits, probs, chosen, gates.to(x.dtype))
