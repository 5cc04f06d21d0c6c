"""Routers: one file each, registered by name in ROUTERS; all return the `Routing` contract."""

from testbed.routing import (
    balanced_assignment,  # noqa: F401  (registers)
    expert_choice,  # noqa: F401  (registers)
    hash,  # noqa: F401  (registers)
    oracle,  # noqa: F401  (registers)
    sigmoid,  # noqa: F401  (registers)
    sinkhorn,  # noqa: F401  (registers)
    topk_softmax,  # noqa: F401  (registers)
)
from testbed.routing.base import ROUTERS, Router, Routing, RoutingContext, routing_from_choices

__all__ = ["ROUTERS", "Router", "Routing", "RoutingContext", "routing_from_choices"]
