"""Auxiliary-loss interface: a loss maps one layer's `Routing` (and context) to an unweighted scalar.

The model stays pure: each MoE layer returns a record of its routing, and the training module computes
every loss on every layer's record (`layer_loss_terms`), averages over layers and multiplies by each
loss's `coefficient`.
"""

from __future__ import annotations

import math

from torch import Tensor

from testbed.losses.options import AUX_LOSSES as AUX_LOSSES  # registries of the AuxLoss subclasses
from testbed.losses.options import BALANCE as BALANCE
from testbed.routing.base import Routing, RoutingContext


class AuxLoss:
    """Base class: `config` is a dataclass with at least `coefficient`; subclasses implement `__call__`."""

    registry_name = "base"
    needs_expert_outputs = False  # True: reads each layer record's per-assignment outputs o_{t,k}
    # As a balancing method (BALANCE): its name in reports' words and legends ("LBL"; None: its registry
    # name) and its plot marker on the specialization-vs-balance frontier.
    label: str | None = None
    marker: str | None = None
    # `stateful`: it keeps statistics over an optimizer step (`observe`, `after_optimizer_step`). Stated on
    # the loss's options (testbed.losses.options.LossOptions), where the config checks read it, and copied
    # onto the class by its registry's `register`.
    stateful: bool
    adds_term = True  # False: it adds no term to the loss (balance=none); the model leaves it out

    def __init__(self, config):
        self.config = config

    @property
    def name(self) -> str:
        return self.registry_name

    @property
    def coefficient(self) -> float | str:
        """The weight of this loss, or "auto" until `calibrate` has run on the first batch."""
        value = self.config.coefficient
        return value if value == "auto" else float(value)

    def calibrate(self, initial_value: float) -> float:
        """Guo et al.'s rule: w = 10^round(log10(target / |L_initial|)), from the first batch's value."""
        magnitude = abs(initial_value)
        if magnitude == 0 or magnitude != magnitude:
            raise ValueError(f"cannot calibrate '{self.name}': its first value is {initial_value}")
        return 10.0 ** round(math.log10(self.config.target / magnitude))

    def __call__(
        self, routing: Routing, context: RoutingContext, expert_outputs: Tensor | None = None
    ) -> Tensor:
        raise NotImplementedError

    def observe(self, layer: int, routing: Routing, context: RoutingContext) -> None:
        """Stateful losses: add one MoE layer's routing of one micro-batch to the step's statistics."""

    def after_optimizer_step(self, routers: list) -> None:
        """Stateful losses: act on the step's statistics (e.g. move each MoE layer's router buffers) after
        the optimizer step, then clear them."""


def layer_loss_terms(
    losses: list[AuxLoss], routing: Routing, context: RoutingContext, expert_outputs: Tensor | None
) -> dict[str, Tensor]:
    """Unweighted value of each loss on one MoE layer's routing (`context`: the layer's own)."""
    return {
        loss.name: loss(routing, context, expert_outputs if loss.needs_expert_outputs else None)
        for loss in losses
    }
