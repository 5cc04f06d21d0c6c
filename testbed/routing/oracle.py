"""Oracle router, the reference [defined here; docs/routers.md, "Oracle domain router"]: the block layout
gives domain d a fixed block B_d of experts; S_t = the top-K of the learned logits restricted to B_{d_t}
(`learned`), or K experts of the block by token position with gates 1/K (`uniform`). Needs per-token
domain labels; K <= floor(E/D)."""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.layout import block_layout
from testbed.routing.base import ROUTERS, Router, Routing, RoutingContext, routing_from_choices
from testbed.routing.options import OracleConfig as OracleConfig
from testbed.routing.options import WithinBlock as WithinBlock


@ROUTERS.register("oracle")
class OracleRouter(Router):
    reference = "upper"  # the reports' reference, not a learned router
    marker = "*"
    needs_reference = True  # routes by each token's domain label

    def __init__(self, d_model: int, num_experts: int, config, num_domains: int = 1):
        super().__init__(d_model, num_experts, config, num_domains)
        blocks = block_layout(num_experts, num_domains)
        width = max(len(b) for b in blocks)
        mask = torch.zeros(num_domains, num_experts, dtype=torch.bool)
        members = torch.zeros(num_domains, width, dtype=torch.long)  # padded; padding is never indexed
        for d, block in enumerate(blocks):
            mask[d, block] = True
            members[d, : len(block)] = torch.tensor(block)
        # derived from (E, D): not saved in checkpoints
        self.register_buffer("block_mask", mask, persistent=False)  # [D, E]: expert e in B_d
        self.register_buffer("block_members", members, persistent=False)  # [D, max |B_d|]
        self.register_buffer("block_size", torch.tensor([len(b) for b in blocks]), persistent=False)  # [D]

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        if context.domain_ids is None:
            raise ValueError("the oracle router needs per-token domain labels (context.domain_ids is None)")
        domains = context.domain_ids
        in_block = self.block_mask[domains]  # [T, E]
        top_k = self.config.top_k
        if self.config.within_block == "uniform":
            # nothing is learned: K experts of B_d by position, block[(pos + j) mod |B_d|], gates 1/K
            num_tokens = x.shape[0]
            logits = x.new_zeros(num_tokens, self.num_experts)
            position = torch.arange(num_tokens, device=x.device) % context.seq_len  # tokens are batch-major
            size = self.block_size[domains].unsqueeze(-1)  # [T, 1]
            offset = torch.arange(top_k, device=x.device)
            local = (position.unsqueeze(-1) + offset) % size  # [T, K]
            chosen = self.block_members[domains].gather(-1, local)
            gates = x.new_full((num_tokens, top_k), 1.0 / top_k)
            probs = in_block.float() / size.float()  # uniform over the block
            return routing_from_choices(logits, probs, chosen, gates)
        logits = self.router_logits(x)
        # z restricted to B_{d_t}: -inf outside, so the softmax is exactly 0 there
        masked = logits.float().masked_fill(~in_block, float("-inf"))
        probs = torch.softmax(masked, dim=-1)
        chosen = torch.topk(masked, top_k, dim=-1).indices  # K <= |B_d| (checked): all inside the block
        gates = probs.gather(-1, chosen)
        gates = gates / gates.sum(dim=-1, keepdim=True)  # renormalized over the chosen experts
        return routing_from_choices(logits, probs, chosen, gates.to(x.dtype))
