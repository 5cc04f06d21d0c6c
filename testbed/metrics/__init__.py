"""Streaming routing counters (stats.py) and pure metric functions over them (specialization.py)."""

from testbed.metrics import specialization
from testbed.metrics.stats import RoutingStats

__all__ = ["RoutingStats", "specialization"]
