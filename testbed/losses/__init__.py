"""Balancing methods (BALANCE, one at a time) and auxiliary losses (AUX_LOSSES, any list)."""

from testbed.losses import expert_bias, load_balance, orthogonality, variance, z_loss  # noqa: F401  (registers)
from testbed.losses.base import AUX_LOSSES, BALANCE, AuxLoss
from testbed.losses.load_balance import load_balance_value

__all__ = ["AUX_LOSSES", "BALANCE", "AuxLoss", "load_balance_value"]
