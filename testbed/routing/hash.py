"""Hash router, a non-semantic floor [defined here; docs/routers.md, "Hash"]: S_t = the K experts with the
largest keys ((id_t + 1) * A_e + B_e) mod p, a fixed hash of the token id (A, B random from `seed`); gates
1/K.

Nothing is learned: the choice ignores the hidden state, the context and training; `logits` are zeros and
`probs` is 1/K on the chosen experts. Needs the input token ids."""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.routing.base import ROUTERS, Router, Routing, RoutingContext, routing_from_choices
from testbed.routing.options import HashConfig as HashConfig

PRIME = 2**31 - 1  # Mersenne prime; (id + 1) * A + B stays far below 2**63 for any realistic vocabulary


def hash_constants(num_experts: int, seed: int) -> tuple[Tensor, Tensor]:
    """(A, B) of the hash, [E] each, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    hash_a = torch.randint(1, PRIME, (num_experts,), generator=generator)
    hash_b = torch.randint(0, PRIME, (num_experts,), generator=generator)
    return hash_a, hash_b


def hash_choices(token_ids: Tensor, hash_a: Tensor, hash_b: Tensor, top_k: int) -> Tensor:
    """[T, K] the experts with the K largest keys ((id + 1) * A_e + B_e) mod p: K distinct experts."""
    ids = token_ids.long().unsqueeze(-1) + 1  # [T, 1]
    keys = (ids * hash_a + hash_b) % PRIME  # [T, E]
    return torch.topk(keys, top_k, dim=-1).indices


@ROUTERS.register("hash")
class HashRouter(Router):
    reference = "floor"  # the reports' reference, not a learned router
    marker = "X"

    def __init__(self, d_model: int, num_experts: int, config, num_domains: int = 1):
        super().__init__(d_model, num_experts, config, num_domains)
        hash_a, hash_b = hash_constants(num_experts, config.seed)
        # derived from the seed: not saved in checkpoints
        self.register_buffer("hash_a", hash_a, persistent=False)
        self.register_buffer("hash_b", hash_b, persistent=False)

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        if context.token_ids is None:
            raise ValueError("the hash router needs the input token ids (context.token_ids is None)")
        chosen = hash_choices(context.token_ids, self.hash_a, self.hash_b, self.config.top_k)
        num_tokens, top_k = chosen.shape
        logits = x.new_zeros(num_tokens, self.num_experts)  # nothing is learned
        gates = x.new_full((num_tokens, top_k), 1.0 / top_k)
        probs = torch.zeros(num_tokens, self.num_experts, device=x.device).scatter_(-1, chosen, 1.0 / top_k)
        return routing_from_choices(logits, probs, chosen, gates)
