"""Specialization and balance metrics as pure functions of count tables (docs/metrics.md, "Formulas").

Inputs are numpy arrays (or anything np.asarray accepts) for ONE layer:
`domain_expert_counts` n[D, E] = #{t : d_t = d, e in S_t}; expert loads C_e = sum_d n[d, e].
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

from testbed.layout import block_sizes

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


def lbl_value(domain_expert_counts, prob_sums, num_tokens: float) -> float:
    """The load-balance loss value E * sum_e f_e P_e over one fixed token set (the validation set)
    [defined here]: f_e the fraction of assignments to e, P_e the mean router probability of e.
    1 at perfect balance; runs trained at different balancing scopes compare on the same tokens (X8)."""
    f = load_fractions(domain_expert_counts)
    if num_tokens <= 0 or f.sum() == 0:
        return math.nan
    mean_probs = np.asarray(prob_sums, dtype=np.float64) / num_tokens
    return float(len(f) * np.dot(f, mean_probs))


def gate_entropy(entropy_sum: float, num_tokens: int) -> float:
    """mean_t H(p_t) / log E from the streamed sum of normalized entropies; 1 = uniform routing."""
    return float(entropy_sum / num_tokens) if num_tokens > 0 else float("nan")


def purity(domain_expert_counts) -> float:
    """sum_e max_d n[d, e] / sum n: 1 when every expert serves a single domain [defined here]."""
    n = np.asarray(domain_expert_counts, dtype=np.float64)
    total = n.sum()
    return float(n.max(axis=0).sum() / total) if total > 0 else float("nan")


def _entropy(p: np.ndarray) -> float:
    """-sum p log p, never below 0: a one-domain table's marginal can sum to 1 + 2e-16, whose entropy would
    otherwise come out as -2e-16 (and nmi's square root of a negative product fail)."""
    nz = p[p > 0]
    return max(float(-(nz * np.log(nz)).sum()), 0.0)


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
    """I(D;E) / sqrt(H(D) H(E)) [defined here]; 0 when either marginal is deterministic."""
    mi, h_domain, h_expert = mutual_information(domain_expert_counts)
    denom = math.sqrt(h_domain * h_expert)
    return float(mi / denom) if denom > EPS else 0.0


def drop_rate(dropped: float, kept: float) -> float:
    """Dropped assignments / routed assignments (kept + dropped); 0 when dropless."""
    routed = dropped + kept
    return float(dropped / routed) if routed > 0 else 0.0


def reference_assignment(domain_expert_counts) -> np.ndarray:
    """The best relabeling behind `reference_precision`: domain_of_expert[e] = the domain whose oracle block
    expert e fills (the blocks have the layout's sizes). Exact, by linear assignment: domain d is replicated
    once per expert of its block (rows), experts are columns, captured counts are maximized."""
    n = np.asarray(domain_expert_counts, dtype=np.float64)
    num_domains, num_experts = n.shape
    slots = np.repeat(np.arange(num_domains), block_sizes(num_experts, num_domains))
    rows, cols = linear_sum_assignment(n[slots], maximize=True)
    domain_of_expert = np.empty(num_experts, dtype=np.int64)
    domain_of_expert[cols] = slots[rows]
    return domain_of_expert


def reference_precision(domain_expert_counts) -> float:
    """Agreement with the oracle's block layout up to relabeling of experts [defined here]:
    max over ways of giving each domain a block of the layout's sizes of sum_t |S_t ∩ B(d_t)| / sum_t |S_t|.
    NaN when D > E (no layout) or nothing was routed."""
    n = np.asarray(domain_expert_counts, dtype=np.float64)
    num_domains, num_experts = n.shape
    total = n.sum()
    if total <= 0 or num_domains > num_experts:
        return float("nan")
    domain_of_expert = reference_assignment(n)
    return float(n[domain_of_expert, np.arange(num_experts)].sum() / total)


def ratio(numerator: float, denominator: float) -> float:
    """A streamed mean: sum / count, NaN when nothing was counted."""
    return float(numerator / denominator) if denominator > 0 else float("nan")


def routing_specialization(domain_expert_counts) -> float:
    """DBES Routing Specialization: I(D;E) / H(D) [defined here]; 1 when the expert set determines
    the domain, 0 when routing is independent of the domain."""
    mi, h_domain, _ = mutual_information(domain_expert_counts)
    return float(mi / h_domain) if h_domain > EPS else 0.0


def effective_rank(domain_expert_counts) -> float:
    """DBES Normalized Effective Rank: exp(H(sigma / sum sigma)) / min(D, E), sigma the singular values of
    the row-normalized table p(e|d) [defined here]; 1 when domains use linearly independent expert
    mixes, 1/min(D, E) when all domains share one mix."""
    n = np.asarray(domain_expert_counts, dtype=np.float64)
    rows = n[n.sum(axis=1) > 0]
    if rows.size == 0:
        return float("nan")
    p = rows / rows.sum(axis=1, keepdims=True)
    sigma = np.linalg.svd(p, compute_uv=False)
    sigma = sigma[sigma > EPS * sigma.max()]
    weights = sigma / sigma.sum()
    return float(math.exp(-(weights * np.log(weights)).sum()) / min(n.shape))


def covering_set(expert_counts_of_domain, coverage: float = 0.8) -> set[int]:
    """Smallest set of experts holding at least `coverage` of a domain's assignments (largest first)."""
    counts = np.asarray(expert_counts_of_domain, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return set()
    order = np.argsort(-counts, kind="stable")
    needed = int(np.searchsorted(np.cumsum(counts[order]), coverage * total - 1e-9 * total) + 1)
    return set(order[:needed].tolist())


def domain_isolation(domain_expert_counts, coverage: float = 0.8) -> float:
    """DBES Domain Isolation: 1 - mean over domain pairs of Jaccard(T_d, T_d'), T_d the smallest expert set
    covering 80% of domain d's assignments [defined here]; 1 = disjoint expert sets."""
    n = np.asarray(domain_expert_counts, dtype=np.float64)
    sets = [covering_set(row, coverage) for row in n if row.sum() > 0]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
    if not pairs:
        return float("nan")
    return float(1.0 - np.mean([len(a & b) / len(a | b) for a, b in pairs]))


def accuracy_spread(correct, routed) -> tuple[float, float]:
    """Per-expert next-token accuracy (over tokens routed to the expert): (std, max - min) across the
    experts that received tokens [paper: Chernov 2025, LM form]."""
    correct, routed = np.asarray(correct, dtype=np.float64), np.asarray(routed, dtype=np.float64)
    used = routed > 0
    if not used.any():
        return float("nan"), float("nan")
    accuracy = correct[used] / routed[used]
    return float(accuracy.std()), float(accuracy.max() - accuracy.min())
