"""Every registered loss as test cases: both registries (BALANCE, AUX_LOSSES), each entry at its config
dataclass's defaults and, for a config with a balancing `scope`, at every scope. A loss registered anywhere
in the package is in these cases from the moment it is registered (tests/test_new_loss.py checks that)."""

from __future__ import annotations

import dataclasses
import typing
from enum import Enum

from testbed.losses import AUX_LOSSES, BALANCE


def loss_configs() -> list[tuple[str, type, object, str]]:
    """(registry key, loss class, config, test id) for every registered loss and option set."""
    cases = []
    for registry in (BALANCE, AUX_LOSSES):
        for name, (loss_cls, config_cls) in registry.items():
            hints = typing.get_type_hints(config_cls)
            scope = hints.get("scope")
            if isinstance(scope, type) and issubclass(scope, Enum):
                for member in scope:
                    config = dataclasses.replace(config_cls(), scope=member)
                    cases.append((registry.config_key, loss_cls, config, f"{name}-{member.value}"))
            else:
                cases.append((registry.config_key, loss_cls, config_cls(), name))
    return cases


def every_loss() -> list:
    """One instance of every registered loss and option set (what a layer can be handed)."""
    return [loss_cls(config) for _, loss_cls, config, _ in loss_configs()]
