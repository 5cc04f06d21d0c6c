"""Routers: one file each, registered by name in ROUTERS; all return the `Routing` contract.

Every module of this package is imported here (found on disk, not listed), so a new router is one file
with `@ROUTERS.register(...)` plus its YAML in conf/router/; the tests parametrize over `ROUTERS.names()`.
"""

import importlib
import pkgutil

from testbed.routing.base import ROUTERS, Router, Routing, RoutingContext, routing_from_choices

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registers its routers

__all__ = ["ROUTERS", "Router", "Routing", "RoutingContext", "routing_from_choices"]
