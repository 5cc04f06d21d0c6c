"""Balancing methods (BALANCE, one at a time) and auxiliary losses (AUX_LOSSES, any list).

Every module of this package is imported here (found on disk, not listed), so a new loss is one file with
`@BALANCE.register(...)` or `@AUX_LOSSES.register(...)` plus its YAML in conf/balance/ or conf/aux_loss/.
What the rest of the system needs to know of a loss is a class attribute of its class (AuxLoss: label,
marker, stateful, adds_term, needs_expert_outputs).
"""

import importlib
import pkgutil

from testbed.losses.base import AUX_LOSSES, BALANCE, AuxLoss, layer_loss_terms
from testbed.losses.load_balance import load_balance_value

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registers its losses

__all__ = ["AUX_LOSSES", "BALANCE", "AuxLoss", "layer_loss_terms", "load_balance_value"]
