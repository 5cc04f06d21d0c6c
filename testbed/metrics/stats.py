"""On-device streaming routing counters, filled inside the forward pass.

Only scatter/index adds: no .item(), .tolist(), bincount or nonzero, so the step never waits on the
host. Metrics are derived from these tables only when they are logged (see specialization.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class RoutingStats:
    """Per-layer counters over the tokens seen since the last reset.

    counts [L, D, E]        n_{d,e}: assignments of domain-d tokens to expert e
    prob_sums [L, E]        sum_t p_{t,e}
    entropy_sums [L]        sum_t H(p_t) / log E
    tokens [L, D]           tokens seen per domain
    dropped [L]             assignments removed by capacity
    """

    def __init__(
        self, num_layers: int, num_domains: int, num_experts: int, device: torch.device | str = "cpu"
    ):
        self.num_layers, self.num_domains, self.num_experts = num_layers, num_domains, num_experts
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        L, D, E, dev = self.num_layers, self.num_domains, self.num_experts, self.device
        self.counts = torch.zeros(L, D, E, dtype=torch.long, device=dev)
        self.prob_sums = torch.zeros(L, E, dtype=torch.float64, device=dev)
        self.entropy_sums = torch.zeros(L, dtype=torch.float64, device=dev)
        self.tokens = torch.zeros(L, D, dtype=torch.long, device=dev)
        self.dropped = torch.zeros(L, dtype=torch.long, device=dev)

    def to(self, device: torch.device | str) -> RoutingStats:
        self.device = torch.device(device)
        for name in ("counts", "prob_sums", "entropy_sums", "tokens", "dropped"):
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    @torch.no_grad()
    def update(self, layer: int, routing, domain_ids: Tensor | None) -> None:
        """Add one layer's routing of one batch. `layer` indexes MoE layers in model order."""
        probs = routing.probs.detach().double()
        num_tokens, num_experts = probs.shape
        if domain_ids is None:
            domain_ids = torch.zeros(num_tokens, dtype=torch.long, device=probs.device)
        assigned_domain = domain_ids[routing.token_index]
        flat = assigned_domain * num_experts + routing.expert_index
        self.counts[layer].view(-1).index_add_(0, flat, torch.ones_like(flat))
        self.prob_sums[layer] += probs.sum(0)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / math.log(num_experts)
        self.entropy_sums[layer] += entropy.sum()
        self.tokens[layer].index_add_(0, domain_ids, torch.ones_like(domain_ids))
        if routing.dropped is not None:
            self.dropped[layer] += routing.dropped

    def merge(self, other: RoutingStats) -> None:
        for name in ("counts", "prob_sums", "entropy_sums", "tokens", "dropped"):
            getattr(self, name).add_(getattr(other, name).to(self.device))

    def state_dict(self) -> dict[str, Tensor]:
        return {
            name: getattr(self, name).cpu()
            for name in ("counts", "prob_sums", "entropy_sums", "tokens", "dropped")
        }
