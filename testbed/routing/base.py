"""The routing contract: every router returns one `Routing`, which experts, losses and metrics consume.

Assignments are flat and sorted by expert, so token-choice (K per token), expert-choice (C per expert)
and oracle routing all fit, including tokens with zero or many experts. Under expert capacity the
assignments beyond capacity stay in place (static shapes, no host sync) with gate 0 and `kept` False:
every consumer that counts assignments counts only the kept ones (`kept_as`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from testbed.routing.options import ROUTERS as ROUTERS  # the registry of the Router subclasses below
from testbed.scope import GlobalScopeState


@dataclass
class Routing:
    """One router decision over T tokens and E experts."""

    logits: Tensor  # [T, E] raw router scores
    probs: Tensor  # [T, E] full distribution used by losses and metrics (rows sum to 1)
    token_index: Tensor  # [A] long: token of each assignment, sorted by expert
    expert_index: Tensor  # [A] long: expert of each assignment, non-decreasing
    weight: Tensor  # [A] combine weight (gate) of each assignment
    tokens_per_expert: Tensor  # [E] long: assignments per expert, dropped ones included (the experts' groups)
    dropped: Tensor | None = None  # scalar long: assignments dropped by capacity (None when dropless)
    slot_index: Tensor | None = None  # [A] optional: rank of each assignment among its token's choices
    kept: Tensor | None = None  # [A] bool: False for an assignment dropped by capacity (None = all kept)

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    @property
    def num_assignments(self) -> int:
        """Assignments held, dropped ones included (a static shape)."""
        return self.token_index.shape[0]

    def kept_as(self, dtype: torch.dtype) -> Tensor:
        """[A] 1 for a kept assignment, 0 for a dropped one, in `dtype`: what consumers count instead of
        1 per assignment, so that their numbers are those of the kept assignments alone."""
        if self.kept is None:
            return torch.ones_like(self.expert_index, dtype=dtype)
        return self.kept.to(dtype)


@dataclass(frozen=True)
class RoutingContext:
    """What some routers, losses and counters need beyond the hidden states; all tensors are flat [T].
    Frozen: each MoE layer derives its own (`for_layer`), nothing is mutated along the way."""

    batch_size: int
    seq_len: int
    token_ids: Tensor | None = None  # [T] input token ids (hash router)
    domain_ids: Tensor | None = None  # [T] domain label of each token (oracle router, metrics)
    layer_index: int = 0
    # static bound on experts per token, for per-token losses (None: data-dependent, e.g. expert choice)
    max_experts_per_token: int | None = None
    # the optimizer step's running counts (global scope: load balance, Sinkhorn); None outside training steps
    scope_state: GlobalScopeState | None = None

    def for_layer(self, layer_index: int, max_experts_per_token: int | None) -> RoutingContext:
        return replace(self, layer_index=layer_index, max_experts_per_token=max_experts_per_token)

    @property
    def sequence_ids(self) -> Tensor:
        """[T] index of the sequence each token belongs to (tokens are laid out batch-major)."""
        device = self.token_ids.device if self.token_ids is not None else None
        return torch.arange(self.batch_size, device=device).repeat_interleave(self.seq_len)


def count_per_expert(expert_index: Tensor, num_experts: int, kept: Tensor | None = None) -> Tensor:
    """Assignments per expert with a scatter-add (no host sync, unlike bincount on CUDA); with `kept` [A]
    bool, only the kept ones."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_index.device)
    ones = torch.ones_like(expert_index) if kept is None else kept.long()
    return counts.scatter_add_(0, expert_index, ones)


def routing_from_choices(logits: Tensor, probs: Tensor, chosen_experts: Tensor, gates: Tensor) -> Routing:
    """Build the expert-sorted `Routing` from a token-choice selection.

    chosen_experts, gates: [T, K]. The sort is stable, so within an expert tokens keep their order.
    """
    num_tokens, top_k = chosen_experts.shape
    flat_expert = chosen_experts.reshape(-1)
    order = torch.argsort(flat_expert.to(torch.int32), stable=True)  # int32 keys: half the sort traffic
    expert_index = flat_expert[order]
    token_index = torch.div(order, top_k, rounding_mode="floor")
    weight = gates.reshape(-1)[order]
    slot_index = order - token_index * top_k  # k of the (token, k) choice: lets per-token losses skip a sort
    return Routing(
        logits=logits,
        probs=probs,
        token_index=token_index,
        expert_index=expert_index,
        weight=weight,
        tokens_per_expert=count_per_expert(expert_index, logits.shape[1]),
        slot_index=slot_index,
    )


class Router(nn.Module):
    """Base router: a linear gate producing logits; subclasses turn logits into a `Routing`.

    Class flags tell the rest of the system what a router can do. Those the config checks read
    (`token_choice`, `supports_expert_bias`, `scopes`, `gateless`) are stated on the router's options
    (testbed.routing.options.RouterOptions) and copied onto its class by `ROUTERS.register`, which refuses a
    router class that states one itself; the others are stated here:
    - `host_sync`: its training-time routing reads device values on the host (the balanced-assignment
      auction's stopping test); every other router is sync-free (tests/test_sync_free.py);
    - `reference`: "upper" (specialization by construction: the oracle) or "floor" (no semantic routing:
      hash); reports draw references apart from the learned routers. None for a learned router;
    - `balances`: it balances the load itself (Sinkhorn, balanced assignment, expert choice): reports name
      such a run by its router rather than by its balancing loss;
    - `label`: its name in reports' words and legends ("SH"); None: its registry name; "": left out (the
      default router, top-k softmax, goes unnamed);
    - `marker`: its plot marker where reports draw it as a method of its own (balancing routers, references);
    - `needs_reference`: it routes by the tokens' domain labels (`RoutingContext.domain_ids`: the oracle).
    """

    registry_name = "base"
    # copied from the router's options by ROUTERS.register (testbed.routing.options.RouterOptions)
    token_choice: bool
    supports_expert_bias: bool
    scopes: tuple[str, ...]
    gateless: bool
    host_sync = False
    reference: str | None = None
    balances = False
    label: str | None = None
    marker: str | None = None
    needs_reference = False

    def __init__(self, d_model: int, num_experts: int, config, num_domains: int = 1):
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.num_domains = num_domains
        self.step = 0  # the optimizer step, set by the training module (for routers that change with it)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model**-0.5)
        # b_e of expert-bias balancing: changes which experts are selected, never the gates.
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        """The optimizer step, a host integer. The forward reads only `hash_stage` (router.hash_steps'
        first stage), a bool that changes once per run: a compiled router recompiles once, not every step."""
        self._step = value
        self.hash_stage = value < getattr(self.config, "hash_steps", 0)

    def router_logits(self, x: Tensor) -> Tensor:
        """z = W_r x, always in fp32: under bf16 autocast (GPU) the logits would otherwise be bf16, whose
        8-bit mantissa ties and flips close top-k choices (routers in OLMoE and DeepSeek-V3 run in fp32)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.gate.weight.float())

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


class BalancingRouter(Router):
    """A router that balances by construction in training (Sinkhorn, balanced assignment): the top-K of its
    `balanced_choice` in training (and at eval with `eval_balanced`), else plain top-K of the softmax; gates
    are the softmax probabilities of the chosen experts (renormalized on request)."""

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        logits = self.router_logits(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if self.training or self.config.eval_balanced:
            chosen = self.balanced_choice(logits.detach().float(), context)
        else:
            chosen = torch.topk(probs, self.config.top_k, dim=-1).indices
        gates = probs.gather(-1, chosen)
        if self.config.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return routing_from_choices(logits, probs, chosen, gates.to(x.dtype))

    def balanced_choice(self, logits: Tensor, context: RoutingContext) -> Tensor:  # pragma: no cover
        """[T, K] expert ids of each token under the router's balanced assignment."""
        raise NotImplementedError
