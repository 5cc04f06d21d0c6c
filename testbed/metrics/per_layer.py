"""Metrics per MoE layer from the routing counters (`RoutingStats`), and the metric keys they are
logged under, `spec/<metric>/layer<i>` and `spec/<metric>/mean`; the headline metrics a run prints."""

from __future__ import annotations

import math

import numpy as np

from testbed.metrics import specialization as S
from testbed.metrics.stats import RoutingStats

# Metrics of the domain x expert table alone (usable on any saved count table).
TABLE_METRICS = {
    "utilization": S.utilization,
    "load_entropy": S.load_entropy,
    "max_violation": S.max_violation,
    "dead_experts": S.dead_experts,
    "purity": S.purity,
    "nmi": S.nmi,
    "reference_precision": S.reference_precision,
    "routing_specialization": S.routing_specialization,
    "effective_rank": S.effective_rank,
    "domain_isolation": S.domain_isolation,
}

# The headline metrics printed at the end of a run, in order.
HEADLINE = (
    "utilization",
    "max_violation",
    "dead_experts",
    "gate_entropy",
    "purity",
    "nmi",
    "reference_precision",
)


def table_metrics(domain_expert_counts) -> dict[str, float]:
    return {name: fn(domain_expert_counts) for name, fn in TABLE_METRICS.items()}


def layer_metrics(state: dict[str, np.ndarray], ngram_sizes: tuple[int, ...] = (4, 10)) -> dict[str, float]:
    """Every metric for one layer from that layer's counters (arrays without the layer axis)."""
    counts = state["counts"]
    tokens = float(state["tokens"].sum())
    out = table_metrics(counts)
    # dropped / routed: `counts` holds the kept assignments only, so routed = kept + dropped
    out["drop_rate"] = S.drop_rate(float(state["dropped"]), float(counts.sum()))
    out["gate_entropy"] = S.ratio(float(state["entropy_sums"]), tokens)
    out["gate_mass"] = S.ratio(float(state["gate_sums"]), tokens)
    out["lbl_value"] = S.lbl_value(counts, state["prob_sums"], tokens)
    out["routing_variance"] = S.ratio(float(state["variance_sums"]), tokens)
    for i, n in enumerate(ngram_sizes):
        out[f"ngram_expertise_n{n}"] = S.ratio(
            float(state["ngram_hits"][i]), float(state["ngram_windows"][i])
        )
    std, spread = S.accuracy_spread(state["correct"], state["accuracy_routed"])
    out["expert_accuracy_spread"], out["expert_accuracy_range"] = std, spread
    out["expert_overlap"] = S.ratio(float(state["overlap_sums"]), float(state["overlap_tokens"]))
    out["routing_stiffness"] = S.ratio(float(state["stiffness_kept"]), float(state["stiffness_routed"]))
    return out


def per_layer(stats: RoutingStats) -> list[dict[str, float]]:
    """One dict of metrics per MoE layer. One host transfer, at log time."""
    state = {name: value.numpy() for name, value in stats.state_dict().items()}
    return [
        layer_metrics({k: v[i] for k, v in state.items()}, stats.ngram_sizes) for i in range(stats.num_layers)
    ]


def spec_metrics(stats: RoutingStats, layer_names: list[str], prefix: str = "spec") -> dict[str, float]:
    """All layers' metrics under `spec/` keys plus the mean over layers; metrics with no data (NaN in every
    layer, e.g. stiffness when its pass did not run) are left out rather than logged as NaN."""
    layers = per_layer(stats)
    out: dict[str, float] = {}
    for metric in layers[0] if layers else []:
        values = [m[metric] for m in layers]
        finite = [v for v in values if not math.isnan(v)]
        if not finite:
            continue
        for name, value in zip(layer_names, values, strict=True):
            out[f"{prefix}/{metric}/{name}"] = value
        out[f"{prefix}/{metric}/mean"] = float(np.mean(finite))
    return out
