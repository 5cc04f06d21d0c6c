"""The balancing methods' and auxiliary losses' names and options, without their implementations
(torch-free): `BALANCE`, `AUX_LOSSES` and one config dataclass per loss, declared with
`@BALANCE.options(name)` or `@AUX_LOSSES.options(name)` and derived from `LossOptions`. Each states the
loss's facts the config checks read (`stateful`) and checks its own values (`check`), so a config is
composed and checked from these alone (testbed.config); the loss classes (`@BALANCE.register(name)`,
`@AUX_LOSSES.register(name)`, in the modules of this package, which get the facts copied from here) are
imported the first time one is asked for. Each dataclass is importable from its loss's module too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from testbed.errors import ConfigError
from testbed.registry import Registry
from testbed.scope import Scope


class LossOptions:
    """Base of every balancing method's and auxiliary loss's config dataclass: the loss's facts that the
    config checks read, as class attributes (their defaults here), and `check`, the check of the options'
    values. `BALANCE.register` / `AUX_LOSSES.register` copy the facts onto the loss class
    (testbed.losses.base.AuxLoss states those that only training and the reports read: label, adds_term, ...).

    - `stateful`: the loss keeps statistics over an optimizer step (`observe`, `after_optimizer_step`;
      expert bias: the step's loads, applied to the router's expert_bias buffer after each step), so it
      needs a router with `supports_expert_bias`.
    """

    stateful: ClassVar[bool] = False

    def check(self, key: str) -> None:
        """Raise ConfigError for options that cannot work (`key`: their section, e.g. aux_loss.z_loss);
        called before training."""


def check_coefficient(config: Any, key: str) -> None:
    """A coefficient is a float >= 0 or "auto" (then `target` must be > 0)."""
    value = config.coefficient
    if value == "auto":
        if not hasattr(config, "target"):
            raise ConfigError(
                f"{key}.coefficient", value, "a float >= 0 (no calibration target for this loss)"
            )
        if not isinstance(config.target, int | float) or not config.target > 0:
            raise ConfigError(
                f"{key}.target", getattr(config, "target", None), "a float > 0 (coefficient: auto)"
            )
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(
            f"{key}.coefficient", value, 'a float >= 0, or "auto" (calibrated on the first batch)'
        )


LOSS_FACTS = ("stateful",)
BALANCE = Registry("balancing method", "balance", "testbed.losses", base=LossOptions, facts=LOSS_FACTS)
"""Registry of the balancing methods (testbed.losses.base.AuxLoss subclasses; one per run), by name."""
AUX_LOSSES = Registry("auxiliary loss", "aux_loss", "testbed.losses", base=LossOptions, facts=LOSS_FACTS)
"""Registry of the auxiliary losses (testbed.losses.base.AuxLoss subclasses; any list per run), by name."""


@BALANCE.options("load_balance")
@dataclass
class LoadBalanceConfig(LossOptions):
    name: str = "load_balance"
    coefficient: float = 1e-2
    scope: Scope = Scope.micro_batch  # sequence | micro_batch | global

    def check(self, key: str) -> None:
        check_coefficient(self, key)


@BALANCE.options("none")
@dataclass
class NoBalanceConfig(LossOptions):
    name: str = "none"


@BALANCE.options("expert_bias")
@dataclass
class ExpertBiasConfig(LossOptions):
    stateful = True  # the step's loads move the routers' expert_bias buffers after each optimizer step

    name: str = "expert_bias"
    gamma: float = 1e-3  # bias step size (DeepSeek-V3)
    scope: Scope = Scope("global")  # sequence | micro_batch | global
    sequence_coefficient: float = 0.0  # weight of the complementary sequence-scope load-balance loss

    def check(self, key: str) -> None:
        if self.gamma <= 0:
            raise ConfigError(f"{key}.gamma", self.gamma, "a float > 0")
        if self.sequence_coefficient < 0:
            raise ConfigError(f"{key}.sequence_coefficient", self.sequence_coefficient, "a float >= 0")


@AUX_LOSSES.options("orthogonality")
@dataclass
class OrthogonalityConfig(LossOptions):
    coefficient: Any = "auto"  # a float, or "auto": calibrated on the first batch toward `target`
    target: float = 1e-4  # Guo et al.'s calibration target for w_o * L
    normalize: bool = False
    gated: bool = False
    eps: float = 1e-6

    def check(self, key: str) -> None:
        check_coefficient(self, key)


@AUX_LOSSES.options("variance")
@dataclass
class VarianceConfig(LossOptions):
    coefficient: Any = "auto"  # a float, or "auto": calibrated on the first batch toward `target`
    target: float = 1e-3  # Guo et al.'s calibration target for |w_v * L|

    def check(self, key: str) -> None:
        check_coefficient(self, key)


@AUX_LOSSES.options("z_loss")
@dataclass
class ZLossConfig(LossOptions):
    coefficient: float = 1e-3

    def check(self, key: str) -> None:
        check_coefficient(self, key)
