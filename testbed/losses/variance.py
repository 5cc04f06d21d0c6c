"""Variance loss (Guo et al., NeurIPS 2025): -w_v * mean_t Var_e(p_te), the unbiased variance over the E
experts of the full router distribution, subtracted (i.e. maximized): sharper, more discriminative routing."""

from __future__ import annotations

from torch import Tensor

from testbed.losses.base import AUX_LOSSES, AuxLoss
from testbed.losses.options import VarianceConfig as VarianceConfig
from testbed.routing.base import Routing, RoutingContext


@AUX_LOSSES.register("variance")
class VarianceLoss(AuxLoss):
    def __call__(
        self, routing: Routing, context: RoutingContext, expert_outputs: Tensor | None = None
    ) -> Tensor:
        return -routing.probs.float().var(dim=-1, unbiased=True).mean()
