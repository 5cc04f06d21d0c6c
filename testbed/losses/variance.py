"""Variance loss (Guo et al., NeurIPS 2025): -w_v * mean_t Var_e(p_te), the unbiased variance over the E
experts of the full router distribution, subtracted (i.e. maximized): sharper, more discriminative routing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from testbed.losses.base import AUX_LOSSES, AuxLoss, check_coefficient
from testbed.routing.base import Routing, RoutingContext


@dataclass
class VarianceConfig:
    coefficient: Any = "auto"  # a float, or "auto": calibrated on the first batch toward `target`
    target: float = 1e-3  # Guo et al.'s calibration target for |w_v * L|


@AUX_LOSSES.register("variance", VarianceConfig)
class VarianceLoss(AuxLoss):
    def __call__(
        self, routing: Routing, context: RoutingContext, expert_outputs: Tensor | None = None
    ) -> Tensor:
        return -routing.probs.float().var(dim=-1, unbiased=True).mean()

    @classmethod
    def check(cls, config: VarianceConfig, key: str) -> None:
        check_coefficient(config, key)
