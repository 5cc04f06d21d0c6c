"""Auxiliary-loss interface: a loss maps one layer's `Routing` (and context) to an unweighted scalar.

Layers return the raw values per loss name; the training module multiplies by each loss's
`coefficient` and averages over layers (SPEC: "per MoE layer, averaged over layers").
"""

from __future__ import annotations

from torch import Tensor

from testbed.registry import Registry
from testbed.routing.base import Routing, RoutingContext


class AuxLoss:
    """Base class: `config` is a dataclass with at least `coefficient`; subclasses implement `__call__`."""

    registry_name = "base"
    needs_expert_outputs = False  # True: the expert backend hands back per-assignment outputs o_{t,k}

    def __init__(self, config):
        self.config = config

    @property
    def name(self) -> str:
        return self.registry_name

    @property
    def coefficient(self) -> float:
        return float(self.config.coefficient)

    def __call__(
        self, routing: Routing, context: RoutingContext, expert_outputs: Tensor | None = None
    ) -> Tensor:
        raise NotImplementedError

    @classmethod
    def check(cls, config, key: str) -> None:
        """Raise ConfigError for options that cannot work; called before training."""


BALANCE: Registry[AuxLoss] = Registry("balancing method", "balance")
AUX_LOSSES: Registry[AuxLoss] = Registry("auxiliary loss", "aux_loss")
