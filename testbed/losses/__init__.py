"""Balancing methods (BALANCE, one at a time) and auxiliary losses (AUX_LOSSES, any list).

A loss is its options, a config dataclass declared with `@BALANCE.options(name)` or
`@AUX_LOSSES.options(name)` in testbed/losses/options.py and derived from LossOptions (torch-free: it checks
its own values and states `stateful`, the fact the config checks read, so a config is composed and checked
from these alone), its class, `@BALANCE.register(name)` or `@AUX_LOSSES.register(name)` in a module of this
package, and its YAML in conf/balance/ or conf/aux_loss/. The modules are found on disk, not listed: the
registry imports every one the first time a loss class is asked for (testbed.registry).
What the rest of the system needs to know of a loss is a class attribute of its class (AuxLoss: label,
marker, stateful (copied from its options by the registry), adds_term, needs_expert_outputs).

Importing this package does not import torch: `AuxLoss`, `layer_loss_terms` (testbed/losses/base.py) and
`load_balance_value` (testbed/losses/load_balance.py) are imported from here on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from testbed.lazy import lazy_attributes
from testbed.losses.options import AUX_LOSSES, BALANCE

if TYPE_CHECKING:
    from testbed.losses.base import AuxLoss, layer_loss_terms
    from testbed.losses.load_balance import load_balance_value

# the names of the implementation modules, imported (with torch) on first use
__getattr__ = lazy_attributes(
    __name__, {"AuxLoss": "base", "layer_loss_terms": "base", "load_balance_value": "load_balance"}
)


__all__ = ["AUX_LOSSES", "BALANCE", "AuxLoss", "layer_loss_terms", "load_balance_value"]
