"""Balanced assignment router (BA; Lewis et al. 2021, BASE layers): at training time, an exact linear
assignment of the scope's tokens to experts with equal capacity; plain top-k at evaluation.

Over a group of T tokens (one sequence, or the whole micro-batch), each token gets K distinct experts and
each expert exactly C_e = T*K/E tokens (the remainder of T*K mod E goes one each to the first experts),
maximizing the summed router logits of the chosen pairs. This is a bipartite b-matching (a transportation
problem with unit edge capacities), solved by the auction algorithm (Bertsekas 1988; BASE layers used an
auction too), in its parallel (Jacobi) form and batched over groups:

- every token that holds fewer than K experts bids on its best expert e* by value s_ie - p_e among the
  experts it does not hold, offering p_e* + (v1 - v2) + eps (v2: its second-best value);
- each expert keeps its C_e highest offers (holders and new bidders together); the others are outbid;
- an expert's price p_e is its price at the start of the phase (0 in the first) while it has free
  capacity, then its lowest held offer: prices never fall within a phase, which the optimality bound
  needs.

Each round is a few [G, T, E] tensor operations; rounds run in a Python loop over the whole group (no loop
per token), with epsilon scaling (eps divided by `eps_factor` per phase, prices kept, holdings reset).
At the end every token holds K experts and every expert C_e tokens, and the summed score is within
T*K*eps_final of the optimum (eps-complementary slackness). Whether the auction is done is read on the
host every `check_every` rounds: the one router that synchronizes with the device during training (as
BASE layers' own auction did). A group still unfinished after `max_rounds` rounds raises.

Gates are the softmax probabilities of the assigned experts (as for Sinkhorn), so the router gets its
gradient through them. Global scope is not offered: an exact assignment across accumulated micro-batches
would need the later micro-batches' tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.errors import TestbedError
from testbed.routing.base import ROUTERS, BalancingRouter, RoutingContext
from testbed.routing.options import BalancedAssignmentConfig as BalancedAssignmentConfig
from testbed.scope import token_groups


class AuctionUnfinished(TestbedError, RuntimeError):
    """The balanced-assignment auction hit router.max_rounds: the run fails with this message (exit 2)."""


def expert_capacities(num_tokens: int, top_k: int, num_experts: int, device=None) -> Tensor:
    """[E] long: equal capacities summing to T*K (the remainder goes one each to the first experts)."""
    base, remainder = divmod(num_tokens * top_k, num_experts)
    caps = torch.full((num_experts,), base, dtype=torch.long, device=device)
    caps[:remainder] += 1
    return caps


def balanced_assignment(
    scores: Tensor,
    top_k: int,
    eps: float = 1e-4,
    eps_factor: float = 8.0,
    check_every: int = 8,
    max_rounds: int = 20000,
    initial_price: Tensor | None = None,
    initial_eps: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(held [G, T, E] bool, prices [G, E]): for each group, K distinct experts per token and C_e tokens
    per expert, maximizing sum(scores * held) to within T*K*eps*range (eps relative to each group's score
    range). `initial_price` [G or 1, E] (in score units, e.g. the prices of the previous call on similar
    scores) with a small `initial_eps` warm-starts the auction: few rounds when the prices are close."""
    scores = scores.double()
    groups, num_tokens, num_experts = scores.shape
    device = scores.device
    caps = expert_capacities(num_tokens, top_k, num_experts, device)
    cap_max = int(caps.max())
    rank = torch.arange(cap_max, device=device).view(1, cap_max, 1)
    within_cap = rank < caps.view(1, 1, num_experts)  # [1, C, E]
    span = (scores.amax(dim=(1, 2)) - scores.amin(dim=(1, 2))).clamp_min(1e-12).view(groups, 1, 1)
    s = scores / span  # each group's scores in a unit range: eps is relative
    price = torch.zeros(groups, 1, num_experts, dtype=s.dtype, device=device)
    if initial_price is not None:
        price = price + initial_price.double().view(-1, 1, num_experts) / span
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=device)
    epsilon = initial_eps * eps_factor
    while True:
        epsilon = max(epsilon / eps_factor, eps)
        held = torch.zeros(groups, num_tokens, num_experts, dtype=torch.bool, device=device)
        offer = torch.full_like(s, float("-inf"))  # what each holder paid
        floor = price  # free capacity keeps the price of the last phase: prices never fall within a phase
        for round_ in range(max_rounds):  # noqa: B007 (read in the error below)
            need = held.sum(dim=2, keepdim=True) < top_k  # [G, T, 1]
            if round_ % check_every == 0 and not bool(need.any()):
                break
            value = torch.where(held, neg_inf, s - price)
            best = torch.topk(value, min(2, num_experts), dim=2)
            v1 = best.values[..., :1]
            v2 = best.values[..., 1:2] if num_experts > 1 else v1 - 1.0
            increment = (v1 - v2).nan_to_num(nan=1.0, posinf=1.0).clamp(max=1.0) + epsilon
            bid = price.expand(groups, num_tokens, num_experts).gather(2, best.indices[..., :1]) + increment
            new = torch.zeros_like(held).scatter_(2, best.indices[..., :1], need)
            candidates = torch.where(new, bid.expand_as(s), offer)
            top = torch.topk(candidates, cap_max, dim=1)  # [G, C, E]: each expert's best offers
            keep = within_cap & torch.isfinite(top.values)
            held = torch.zeros_like(held).scatter_(1, top.indices, keep)
            offer = torch.where(held, candidates, neg_inf)
            full = keep.sum(dim=1, keepdim=True) == caps.view(1, 1, num_experts)
            lowest = torch.where(keep, top.values, torch.inf).amin(dim=1, keepdim=True)
            price = torch.where(full, lowest, floor)
        else:
            raise AuctionUnfinished(
                f"balanced assignment: the auction did not finish in {max_rounds} rounds at eps={epsilon:g}; "
                "raise router.max_rounds (default 20000) or router.eps"
            )
        if epsilon <= eps:
            return held, (price * span).squeeze(1)


@ROUTERS.register("balanced_assignment")
class BalancedAssignmentRouter(BalancingRouter):
    host_sync = True  # the auction's "done?" test every check_every rounds
    balances = True
    label = "BA"
    marker = "D"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the auction is a data-dependent loop: it runs eagerly inside a compiled model. Wrapped here, not by
        # a decorator at import, so that importing the router classes (a router check) loads no torch._dynamo
        self._eager_choice = torch.compiler.disable(self._choice)

    def balanced_choice(self, logits: Tensor, context: RoutingContext) -> Tensor:
        return self._eager_choice(logits, context)

    def _choice(self, logits: Tensor, context: RoutingContext) -> Tensor:
        num_tokens, num_experts = logits.shape
        c = self.config
        groups = token_groups(c.scope, num_tokens, context.batch_size, context.seq_len)
        held, _ = balanced_assignment(
            logits.view(groups.count, groups.size, num_experts),
            c.top_k,
            c.eps,
            c.eps_factor,
            c.check_every,
            c.max_rounds,
        )
        held = held.reshape(num_tokens, num_experts)
        # the K held experts of each token, best logit first
        ranked = torch.where(held, logits, torch.finfo(logits.dtype).min)
        return torch.topk(ranked, c.top_k, dim=-1).indices
