"""Specialization and balance metrics as pure functions of count tables (SPEC.md "Metrics").

Inputs are numpy arrays (or anything np.asarray accepts) for ONE layer:
`domain_expert_counts` n[D, E] = #{t : d_t = d, e in S_t}; expert loads C_e = sum_d n[d, e].
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

from testbed.metrics.layout import block_sizes

EPS = 1e-12


def _loads(domain_expert_counts) -> np.ndarray:
    n = np.asarray(domain_expert_counts, dtype=np.float64)
    return n.sum(axis=0) if n.ndim == 2 else n


def load_fractions(expert_counts) -> np.ndarray:
    """f_e = C_e / sum_j C_j (zeros when nothing was routed)."""
    counts = _loads(expert_counts)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


def utilization(expert_counts) -> float:
    """sum_e min(f_e, 1/E): 1 at perfect balance, K/E when collapsed onto K experts [paper: Falke et al.]."""
    f = load_fractions(expert_counts)
    return float(np.minimum(f, 1.0 / f.size).sum())


def load_entropy(expert_counts) -> float:
    """-sum_e f_e log f_e / log E; 1 at perfect balance."""
    f = load_fractions(expert_counts)
    nz = f[f > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(f.size)) if f.size > 1 else 1.0


def max_violation(expert_counts) -> float:
    """MaxVio = (max_e C_e - mean_e C_e) / mean_e C_e [paper: Wang et al. 2024]."""
    counts = _loads(expert_counts)
    mean = counts.mean()
    return float((counts.max() - mean) / mean) if mean > 0 else 0.0


def dead_experts(expert_counts) -> float:
    """Fraction of experts that received no assignment [paper: Chernov 2025]."""
    counts = _loads(expert_counts)
    return float((counts == 0).mean())


def gate_entropy(entropy_sum: float, num_tokens: int) -> float:
    """mean_t H(p_t) / log E from the streamed sum of normalized entropies; 1 = uniform routing."""
    return float(entropy_sum / num_tokens) if num_tokens > 0 else float("nan")


def purity(domain_expert_counts) -> float:
    """sum_e max_d n[d, e] / sum n: 1 when every expert serves a single domain [defined here, SPEC]."""
    n = np.asarray(domain_expert_counts, dtype=np.float64)
    total = n.sum()
    return float(n.max(axis=0).sum() / total) if total > 0 else float("nan")


def _entropy(p: np.ndarray) -> float:
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def mutual_information(domain_expert_counts) -> tuple[float, float, float]:
    """(I(D;E), H(D), H(E)) in nats from the joint n[d, e] / sum n."""
    n = np.asarray(domain_expert_counts, dtype=np.float64)
    total = n.sum()
    if total <= 0:
        return 0.0, 0.0, 0.0
    joint = n / total
    h_domain, h_expert = _entropy(joint.sum(1)), _entropy(joint.sum(0))
    return max(h_domain + h_expert - _entropy(joint.ravel()), 0.0), h_domain, h_expert


def nmi(domain_expert_counts) -> float:
    """I(D;E) / sqrt(H(D) H(E)) [defined here, SPEC]; 0 when either marginal is deterministic."""
    mi, h_domain, h_expert = mutual_information(domain_expert_counts)
    denom = math.sqrt(h_domain * h_expert)
    return float(mi / denom) if denom > EPS else 0.0


def drop_rate(dropped: float, kept: float) -> float:
    """Dropped assignments / routed assignments (kept + dropped); 0 when dropless."""
    routed = dropped + kept
    return float(dropped / routed) if routed > 0 else 0.0


def reference_precision(domain_expert_counts) -> float:
    """Agreement with the oracle's block layout up to relabeling of experts [defined here, SPEC]:
    max over ways of giving each domain a block of the layout's sizes of sum_t |S_t ∩ B(d_t)| / sum_t |S_t|.

    Exact, as a linear assignment: domain d is replicated once per expert of its block (rows), experts
    are columns, and scipy's linear_sum_assignment maximizes the captured counts. NaN when D > E.
    """
    n = np.asarray(domain_expert_counts, dtype=np.float64)
    num_domains, num_experts = n.shape
    total = n.sum()
    if total <= 0 or num_domains > num_experts:
        return float("nan")
    slots = np.repeat(np.arange(num_domains), block_sizes(num_experts, num_domains))
    rows, cols = linear_sum_assignment(n[slots], maximize=True)
    return float(n[slots][rows, cols].sum() / total)
