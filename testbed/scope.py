"""Balancing scope: the set of tokens over which load statistics are counted (docs/balancing.md, "Scopes").

- `sequence`: per sequence, then averaged over sequences;
- `micro_batch`: the tokens of one forward pass on one device;
- `global`: counts summed over all data-parallel ranks (all-reduce) and over the gradient-accumulation
  micro-batches of one optimizer step, as running counts: micro-batch m uses micro-batches 1..m
  (Qiu et al. 2025, arXiv 2501.11873).

`GlobalScopeState` holds the running counts of one optimizer step. The training module resets it at
the first micro-batch of every optimizer step and passes it to the layers in the routing context.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the scopes are config options, read without it
    import torch
    from torch import Tensor

Scope = StrEnum("Scope", ["sequence", "micro_batch", "global"], module=__name__)
"""The balancing scopes, as the typed config field (`global` is a Python keyword: `Scope("global")`). A
StrEnum: members equal their names as strings, so configs may also hold the plain string."""
SCOPES = tuple(s.value for s in Scope)
# the scopes within one forward pass: routers that need every token of the scope at once (expert choice,
# balanced assignment) cannot span accumulated micro-batches
LOCAL_SCOPES = SCOPES[:2]


@dataclass(frozen=True)
class TokenGroups:
    """The groups of one forward pass's tokens that a scope counts within: `count` groups of `size`
    consecutive tokens (tokens are laid out batch-major, so a sequence is a run of consecutive tokens)."""

    count: int
    size: int

    def index(self, device: torch.device | str | None = None) -> Tensor:
        """[count * size] long: the group of each token."""
        import torch

        return torch.arange(self.count, device=device).repeat_interleave(self.size)


def token_groups(scope: str, num_tokens: int, batch_size: int, seq_len: int) -> TokenGroups:
    """The token groups of `scope` in a forward pass of `num_tokens` tokens: one per sequence for
    `sequence` (which needs num_tokens = batch_size * seq_len), the whole pass for `micro_batch` and
    `global` (global scope adds the step's other micro-batches and ranks through GlobalScopeState)."""
    if Scope(scope) is Scope.sequence:
        if num_tokens != batch_size * seq_len:
            raise ValueError(
                f"scope 'sequence' needs T = batch_size * seq_len tokens, got T={num_tokens}, "
                f"batch_size={batch_size}, seq_len={seq_len}"
            )
        return TokenGroups(batch_size, seq_len)
    return TokenGroups(1, num_tokens)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over data-parallel ranks (identity when not distributed). Not differentiable: use on counts."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class GlobalScopeState:
    """Running per-layer expert counts over the micro-batches (and ranks) of the current optimizer step."""

    def __init__(self):
        self.counts: dict[tuple[str, int], Tensor] = {}
        self.micro_batch = 0

    def start_step(self) -> None:
        """Called at the first micro-batch of each optimizer step."""
        self.counts.clear()
        self.micro_batch = 0

    def next_micro_batch(self) -> None:
        self.micro_batch += 1

    def accumulate(self, key: tuple[str, int], local_counts: Tensor) -> Tensor:
        """Add this micro-batch's counts (summed over ranks) and return the running total.

        `key` = (what is counted, layer index), so several users (a loss, Sinkhorn) keep separate totals.
        """
        reduced = all_reduce_sum(local_counts.detach())
        total = self.counts.get(key)
        total = reduced if total is None else total + reduced
        self.counts[key] = total
        return total

    def previous(self, key: tuple[str, int]) -> Tensor | None:
        """The running total before this micro-batch (None at the first)."""
        return self.counts.get(key)
