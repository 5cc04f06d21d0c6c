"""Routers: one class each, registered by name in ROUTERS; all return the `Routing` contract.

A router is its options, a config dataclass declared with `@ROUTERS.options(name)` in
testbed/routing/options.py and derived from RouterOptions (torch-free: it checks its own values and states
the router's facts the config checks read, so a config is composed and checked from these alone), its
class, `@ROUTERS.register(name)` in a module of this package (which copies those facts onto it), and its
YAML in conf/router/. The modules are found
on disk, not listed: the registry imports every one the first time a router class is asked for
(testbed.registry), and the tests parametrize over `ROUTERS.names()`.

Importing this package does not import torch: `Router`, `Routing`, `RoutingContext` and
`routing_from_choices` (testbed/routing/base.py) are imported from here on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from testbed.lazy import lazy_attributes
from testbed.routing.options import ROUTERS

if TYPE_CHECKING:
    from testbed.routing.base import Router, Routing, RoutingContext, routing_from_choices

# the names of testbed.routing.base, imported (with torch) on first use
__getattr__ = lazy_attributes(
    __name__, dict.fromkeys(("Router", "Routing", "RoutingContext", "routing_from_choices"), "base")
)


__all__ = ["ROUTERS", "Router", "Routing", "RoutingContext", "routing_from_choices"]
