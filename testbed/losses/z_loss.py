"""Router z-loss c_z * mean_t (logsumexp_e z_{t,e})^2: keeps router logits small (ST-MoE, Zoph 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.losses.base import AUX_LOSSES, AuxLoss
from testbed.losses.options import ZLossConfig as ZLossConfig
from testbed.routing.base import Routing, RoutingContext


@AUX_LOSSES.register("z_loss")
class ZLoss(AuxLoss):
    def __call__(
        self, routing: Routing, context: RoutingContext, expert_outputs: Tensor | None = None
    ) -> Tensor:
        return torch.logsumexp(routing.logits.float(), dim=-1).square().mean()
