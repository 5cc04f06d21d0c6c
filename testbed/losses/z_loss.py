"""Router z-loss c_z * mean_t (logsumexp_e z_{t,e})^2: keeps router logits small (ST-MoE, Zoph 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from testbed.losses.base import AUX_LOSSES, AuxLoss, check_coefficient
from testbed.routing.base import Routing, RoutingContext


@dataclass
class ZLossConfig:
    coefficient: float = 1e-3


@AUX_LOSSES.register("z_loss", ZLossConfig)
class ZLoss(AuxLoss):
    def __call__(
        self, routing: Routing, context: RoutingContext, expert_outputs: Tensor | None = None
    ) -> Tensor:
        return torch.logsumexp(routing.logits.float(), dim=-1).square().mean()

    @classmethod
    def check(cls, config: ZLossConfig, key: str) -> None:
        check_coefficient(config, key)
