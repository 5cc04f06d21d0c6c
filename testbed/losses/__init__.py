"""Balancing methods (BALANCE, one at a time) and auxiliary losses (AUX_LOSSES, any list).

Every module of this package is imported here (found on disk, not listed), so a new loss is one file with
`@BALANCE.register(...)` or `@AUX_LOSSES.register(...)` plus its YAML in conf/balance/ or conf/aux_loss/.
What the rest of the system needs to know of a loss is a class attribute of its class (AuxLoss: label,
marker, stateful, adds_term, needs_expert_outputs).
"""

import importlib
import pkgutil

from testbed.losses.base import AUX_LOSSES, BALANCE, AuxLoss
from testbed.losses.expert_bias import ExpertBiasBalance
from testbed.losses.load_balance import load_balance_value

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registers its losses

# Expert-bias balancing's facts, set here while testbed/losses/expert_bias.py is being reworked: they belong
# in ExpertBiasBalance's class body, like every other loss's.
ExpertBiasBalance.label = "EB"
ExpertBiasBalance.marker = "s"
ExpertBiasBalance.stateful = True  # the step's loads move the router's expert_bias buffer after each step

__all__ = ["AUX_LOSSES", "BALANCE", "AuxLoss", "load_balance_value"]
