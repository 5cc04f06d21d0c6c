"""On-device streaming routing counters, filled inside the forward pass.

Only scatter/index adds and reductions: no .item(), .tolist(), bincount or nonzero, so the step never
waits on the host. Metrics are derived from these tables only when they are logged (per_layer.py).
Assignments dropped by capacity (`Routing.kept` False) count nowhere except in `dropped`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class RoutingStats:
    """Per-layer counters over the tokens seen since the last reset (L MoE layers, D domains, E experts).

    counts [L, D, E]          n_{d,e}: (kept) assignments of domain-d tokens to expert e
    prob_sums [L, E]          sum_t p_{t,e}
    entropy_sums [L]          sum_t H(p_t) / log E
    gate_sums [L]             sum_t sum_{e in S_t} g_{t,e}: the kept assignments' gates (combine weights)
    variance_sums [L]         sum_t Var_e(p_{t,e}) (unbiased)
    tokens [L, D]             tokens seen per domain
    dropped [L]               assignments dropped by capacity
    ngram_hits [L, N]         windows of length n (per `ngram_sizes`) whose tokens share the top-1 expert
    ngram_windows [L, N]      windows counted
    correct [L, E]            kept assignments to e whose token's next-token prediction was right
    accuracy_routed [L, E]    kept assignments to e counted for accuracy
    overlap_sums [L]          sum over tokens of the mean pairwise cosine of their experts' outputs
    overlap_tokens [L]        tokens with at least two (kept) experts
    stiffness_kept [L]        sum_t |S_t ∩ S'_t| (routing kept when the context prefix is replaced)
    stiffness_routed [L]      sum_t |S_t| (S_t: the token's kept experts)
    """

    NAMES = (
        "counts",
        "prob_sums",
        "entropy_sums",
        "gate_sums",
        "variance_sums",
        "tokens",
        "dropped",
        "ngram_hits",
        "ngram_windows",
        "correct",
        "accuracy_routed",
        "overlap_sums",
        "overlap_tokens",
        "stiffness_kept",
        "stiffness_routed",
    )

    def __init__(
        self,
        num_layers: int,
        num_domains: int,
        num_experts: int,
        device: torch.device | str = "cpu",
        ngram_sizes: tuple[int, ...] = (4, 10),
    ):
        self.num_layers, self.num_domains, self.num_experts = num_layers, num_domains, num_experts
        self.ngram_sizes = tuple(ngram_sizes)
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        L, D, E, N = self.num_layers, self.num_domains, self.num_experts, len(self.ngram_sizes)
        shapes = {
            "counts": (L, D, E),
            "prob_sums": (L, E),
            "tokens": (L, D),
            "ngram_hits": (L, N),
            "ngram_windows": (L, N),
            "correct": (L, E),
            "accuracy_routed": (L, E),
        }
        integer = {"counts", "tokens", "dropped", "ngram_hits", "ngram_windows", "correct", "accuracy_routed"}
        for name in self.NAMES:
            dtype = torch.long if name in integer else torch.float64
            setattr(self, name, torch.zeros(shapes.get(name, (L,)), dtype=dtype, device=self.device))

    @torch.no_grad()
    def update(
        self,
        layer: int,
        routing,
        domain_ids: Tensor | None,
        expert_outputs: Tensor | None = None,
        batch_shape: tuple[int, int] | None = None,
    ) -> None:
        """Add one layer's routing of one batch. `layer` indexes MoE layers in model order."""
        probs = routing.probs.detach().double()
        num_tokens, num_experts = probs.shape
        if domain_ids is None:
            domain_ids = torch.zeros(num_tokens, dtype=torch.long, device=probs.device)
        flat = domain_ids[routing.token_index] * num_experts + routing.expert_index
        self.counts[layer].view(-1).index_add_(0, flat, routing.kept_as(torch.long))
        self.prob_sums[layer] += probs.sum(0)
        self.gate_sums[layer] += (routing.weight.detach().double() * routing.kept_as(torch.float64)).sum()
        if num_experts > 1:  # normalized entropy and unbiased variance of the full router distribution
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / math.log(num_experts)
            self.entropy_sums[layer] += entropy.sum()
            self.variance_sums[layer] += probs.var(dim=-1, unbiased=True).sum()
        self.tokens[layer].index_add_(0, domain_ids, torch.ones_like(domain_ids))
        if routing.dropped is not None:
            self.dropped[layer] += routing.dropped
        if batch_shape is not None:
            self._ngrams(layer, probs.argmax(-1).view(batch_shape))
        if expert_outputs is not None:
            self._overlap(layer, routing, expert_outputs.detach(), num_tokens)

    @torch.no_grad()
    def add_batch(
        self,
        routings: list,
        domain_ids: Tensor | None,
        batch_shape: tuple[int, int],
        expert_outputs: list[Tensor | None] | None = None,
        correct: Tensor | None = None,
    ) -> None:
        """One batch's routing of every MoE layer, in model order (`routings[i]`: MoE layer i); with
        `correct` [T] (next-token prediction right), the per-expert accuracy too. The one entry point of the
        training callback, testbed-analyze and the Hugging Face analysis."""
        outputs = expert_outputs if expert_outputs is not None else [None] * len(routings)
        for layer, (routing, output) in enumerate(zip(routings, outputs, strict=True)):
            self.update(layer, routing, domain_ids, output, batch_shape)
            if correct is not None:
                self.update_accuracy(layer, routing, correct)

    def _ngrams(self, layer: int, top1: Tensor) -> None:
        """DBES N-gram Expertise counters: windows inside a sequence whose tokens share the top-1 expert."""
        for i, n in enumerate(self.ngram_sizes):
            if top1.shape[1] < n:
                continue
            windows = top1.unfold(1, n, 1)  # [B, S - n + 1, n]
            same = (windows == windows[..., :1]).all(-1)
            self.ngram_hits[layer, i] += same.sum()
            self.ngram_windows[layer, i] += same.numel()

    def _overlap(self, layer: int, routing, expert_outputs: Tensor, num_tokens: int) -> None:
        """Mean pairwise cosine of each token's co-selected (kept) expert outputs, via sum-of-unit-vectors:
        sum_{j<k} cos = (||sum_k u_k||^2 - n) / 2 over n(n-1)/2 pairs. Dropped assignments: zero vectors."""
        kept = routing.kept_as(torch.float64)
        unit = torch.nn.functional.normalize(expert_outputs.double(), dim=-1) * kept.unsqueeze(-1)
        summed = torch.zeros(num_tokens, unit.shape[-1], dtype=unit.dtype, device=unit.device)
        summed.index_add_(0, routing.token_index, unit)
        per_token = torch.zeros(num_tokens, dtype=unit.dtype, device=unit.device)
        per_token.index_add_(0, routing.token_index, kept)
        pairs = per_token * (per_token - 1)
        has_pairs = pairs > 0
        mean_cos = (summed.square().sum(-1) - per_token) / pairs.clamp_min(1)
        self.overlap_sums[layer] += torch.where(has_pairs, mean_cos, torch.zeros_like(mean_cos)).sum()
        self.overlap_tokens[layer] += has_pairs.sum()

    @torch.no_grad()
    def update_accuracy(self, layer: int, routing, correct: Tensor) -> None:
        """Per-expert next-token accuracy counters over the kept assignments; `correct` [T] says whether each
        token was predicted."""
        kept = routing.kept_as(torch.long)
        self.correct[layer].index_add_(0, routing.expert_index, correct[routing.token_index].long() * kept)
        self.accuracy_routed[layer].index_add_(0, routing.expert_index, kept)

    @torch.no_grad()
    def update_stiffness(self, layer: int, original, perturbed, token_mask: Tensor) -> None:
        """Routing Stiffness counters: |S_t ∩ S'_t| and |S_t| over the tokens in `token_mask` [T], with S_t
        the token's kept experts. (token, expert) pairs are unique in a routing: each cell is written once."""
        num_tokens, num_experts = original.probs.shape
        member = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=token_mask.device)
        member_perturbed = torch.zeros_like(member)
        member[original.token_index, original.expert_index] = original.kept_as(torch.bool)
        member_perturbed[perturbed.token_index, perturbed.expert_index] = perturbed.kept_as(torch.bool)
        mask = token_mask.unsqueeze(-1)
        self.stiffness_kept[layer] += (member & member_perturbed & mask).sum()
        self.stiffness_routed[layer] += (member & mask).sum()

    def state_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).cpu() for name in self.NAMES}
