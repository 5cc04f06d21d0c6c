"""The balancing methods' and auxiliary losses' names and options, without their implementations
(torch-free): `BALANCE`, `AUX_LOSSES` and one config dataclass per loss, declared with
`@BALANCE.options(name)` or `@AUX_LOSSES.options(name)`. A config is composed and checked from these alone
(testbed.config); the loss classes (`@BALANCE.register(name)`, `@AUX_LOSSES.register(name)`, in the
modules of this package) are imported the first time one is asked for. Each dataclass is importable from
its loss's module too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from testbed.registry import Registry
from testbed.scope import Scope

BALANCE = Registry("balancing method", "balance", "testbed.losses")
"""Registry of the balancing methods (testbed.losses.base.AuxLoss subclasses; one per run), by name."""
AUX_LOSSES = Registry("auxiliary loss", "aux_loss", "testbed.losses")
"""Registry of the auxiliary losses (testbed.losses.base.AuxLoss subclasses; any list per run), by name."""


@BALANCE.options("load_balance")
@dataclass
class LoadBalanceConfig:
    name: str = "load_balance"
    coefficient: float = 1e-2
    scope: Scope = Scope.micro_batch  # sequence | micro_batch | global


@BALANCE.options("none")
@dataclass
class NoBalanceConfig:
    name: str = "none"


@BALANCE.options("expert_bias")
@dataclass
class ExpertBiasConfig:
    name: str = "expert_bias"
    gamma: float = 1e-3  # bias step size (DeepSeek-V3)
    scope: Scope = Scope("global")  # sequence | micro_batch | global
    sequence_coefficient: float = 0.0  # weight of the complementary sequence-scope load-balance loss


@AUX_LOSSES.options("orthogonality")
@dataclass
class OrthogonalityConfig:
    coefficient: Any = "auto"  # a float, or "auto": calibrated on the first batch toward `target`
    target: float = 1e-4  # Guo et al.'s calibration target for w_o * L
    normalize: bool = False
    gated: bool = False
    eps: float = 1e-6


@AUX_LOSSES.options("variance")
@dataclass
class VarianceConfig:
    coefficient: Any = "auto"  # a float, or "auto": calibrated on the first batch toward `target`
    target: float = 1e-3  # Guo et al.'s calibration target for |w_v * L|


@AUX_LOSSES.options("z_loss")
@dataclass
class ZLossConfig:
    coefficient: float = 1e-3
