"""Top-k softmax router: p = softmax(z), S_t = TopK(p_t, K); gates renormalized (Mixtral) or not (OLMoE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from testbed.errors import ConfigError
from testbed.routing.base import ROUTERS, Router, Routing, RoutingContext, routing_from_choices


@dataclass
class TopKSoftmaxConfig:
    name: str = "topk_softmax"
    top_k: int = 2
    renormalize: bool = (
        False  # True: gates of the chosen experts sum to 1 (Mixtral); False: OLMoE/DeepSeek-V2
    )
    jitter: float = (
        0.0  # multiplicative input noise U(1-jitter, 1+jitter) during training (Switch Transformer)
    )


@ROUTERS.register("topk_softmax", TopKSoftmaxConfig)
class TopKSoftmaxRouter(Router):
    supports_expert_bias = True

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        if self.training and self.config.jitter > 0:
            noise = torch.empty_like(x).uniform_(1 - self.config.jitter, 1 + self.config.jitter)
            x = x * noise
        logits = self.router_logits(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        chosen = torch.topk(
            probs + self.expert_bias, self.config.top_k, dim=-1
        ).indices  # bias: selection only
        gates = probs.gather(-1, chosen)
        if self.config.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return routing_from_choices(logits, probs, chosen, gates.to(x.dtype))

    @classmethod
    def check(cls, config: TopKSoftmaxConfig, run, key: str) -> None:
        super().check(config, run, key)
        if not 0 <= config.jitter < 1:
            raise ConfigError(f"{key}.jitter", config.jitter, "a float in [0, 1)")
