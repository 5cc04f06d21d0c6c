"""Routers: one file each, registered by name in ROUTERS; all return the `Routing` contract."""

from testbed.routing import topk_softmax  # noqa: F401  (registers)
from testbed.routing.base import ROUTERS, Router, Routing, RoutingContext, routing_from_choices

__all__ = ["ROUTERS", "Router", "Routing", "RoutingContext", "routing_from_choices"]
