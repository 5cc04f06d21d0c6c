"""Turn routing counters into the SPEC metric keys `spec/<metric>/layer<i>` and `spec/<metric>/mean`."""

from __future__ import annotations

import numpy as np

from testbed.metrics import specialization as S
from testbed.metrics.stats import RoutingStats

# The metrics computed from the counters, in logging order.
METRICS = (
    "utilization",
    "load_entropy",
    "max_violation",
    "dead_experts",
    "drop_rate",
    "gate_entropy",
    "purity",
    "nmi",
    "reference_precision",
)


def layer_metrics(
    domain_expert_counts: np.ndarray, entropy_sum: float, num_tokens: int, dropped: float = 0.0
) -> dict[str, float]:
    """Every counter-based metric for one layer."""
    return {
        "drop_rate": S.drop_rate(dropped, float(np.sum(domain_expert_counts))),
        "reference_precision": S.reference_precision(domain_expert_counts),
        "utilization": S.utilization(domain_expert_counts),
        "load_entropy": S.load_entropy(domain_expert_counts),
        "max_violation": S.max_violation(domain_expert_counts),
        "dead_experts": S.dead_experts(domain_expert_counts),
        "gate_entropy": S.gate_entropy(entropy_sum, num_tokens),
        "purity": S.purity(domain_expert_counts),
        "nmi": S.nmi(domain_expert_counts),
    }


def spec_metrics(stats: RoutingStats, layer_names: list[str]) -> dict[str, float]:
    """All layers' metrics under SPEC keys, plus the mean over layers. One host transfer, at log time."""
    state = stats.state_dict()
    counts, entropy, tokens = state["counts"].numpy(), state["entropy_sums"].numpy(), state["tokens"].numpy()
    dropped = state["dropped"].numpy()
    per_layer = [
        layer_metrics(counts[i], float(entropy[i]), int(tokens[i].sum()), float(dropped[i]))
        for i in range(len(layer_names))
    ]
    out: dict[str, float] = {}
    for metric in METRICS:
        values = [m[metric] for m in per_layer]
        for name, value in zip(layer_names, values, strict=True):
            out[f"spec/{metric}/{name}"] = value
        out[f"spec/{metric}/mean"] = float(np.mean(values))
    return out
