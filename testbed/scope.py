"""Balancing scope: the set of tokens over which load statistics are counted (README, "Balancing").

- `sequence`: per sequence, then averaged over sequences;
- `micro_batch`: the tokens of one forward pass on one device;
- `global`: counts summed over all data-parallel ranks (all-reduce) and over the gradient-accumulation
  micro-batches of one optimizer step, as running counts: micro-batch m uses micro-batches 1..m
  (Qiu et al. 2025, arXiv 2501.11873).

`GlobalScopeState` holds the running counts of one optimizer step. The training module resets it at
the first micro-batch of every optimizer step and passes it to the layers in the routing context.
"""

from __future__ import annotations

from enum import StrEnum

import torch.distributed as dist
from torch import Tensor

Scope = StrEnum("Scope", ["sequence", "micro_batch", "global"], module=__name__)
"""The balancing scopes, as the typed config field (`global` is a Python keyword: `Scope("global")`). A
StrEnum: members equal their names as strings, so configs may also hold the plain string."""
SCOPES = tuple(s.value for s in Scope)
# the scopes within one forward pass: routers that need every token of the scope at once (expert choice,
# balanced assignment) cannot span accumulated micro-batches
LOCAL_SCOPES = SCOPES[:2]


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over data-parallel ranks (identity when not distributed). Not differentiable: use on counts."""
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
