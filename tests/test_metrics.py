"""Metric functions on hand-built count tables, and streaming counters vs one-shot computation."""

import math

import numpy as np
import pytest
import torch

from testbed.metrics import specialization as S
from testbed.metrics.per_layer import spec_metrics, table_metrics
from testbed.metrics.stats import RoutingStats
from testbed.routing import routing_from_choices

D, E, K = 4, 8, 2


def oracle_counts(tokens_per_domain=100):
    """Each domain d uses only its block of E/D = 2 experts, evenly (K=2: both experts of the block)."""
    n = np.zeros((D, E))
    for d in range(D):
        n[d, 2 * d : 2 * d + 2] = tokens_per_domain
    return n


def test_oracle_block_routing():
    n = oracle_counts()
    assert S.purity(n) == 1.0
    # I(D;E) = H(D) = log 4 and H(E) = log 8 (two experts per domain): nmi = log 4 / sqrt(log 4 log 8)
    assert S.nmi(n) == pytest.approx(math.log(4) / math.sqrt(math.log(4) * math.log(8)))
    assert S.utilization(n) == pytest.approx(1.0)
    assert S.load_entropy(n) == pytest.approx(1.0)
    assert S.max_violation(n) == 0.0
    assert S.dead_experts(n) == 0.0


def test_collapse_onto_k_experts():
    n = np.zeros((D, E))
    n[:, [3, 5]] = 50  # every domain, every token -> experts 3 and 5
    assert S.utilization(n) == pytest.approx(K / E)
    assert S.dead_experts(n) == pytest.approx(6 / 8)
    assert S.max_violation(n) == pytest.approx((100 * 4 / 2 - 400 / 8) / (400 / 8))  # (200 - 50) / 50 = 3
    assert S.nmi(n) == 0.0  # domain tells nothing about the expert
    assert S.purity(n) == pytest.approx(2 * 50 / 400)
    assert S.load_entropy(n) == pytest.approx(math.log(2) / math.log(8))


def test_uniform_independent_routing():
    n = np.full((D, E), 25.0)
    assert S.utilization(n) == pytest.approx(1.0)
    assert S.nmi(n) == pytest.approx(0.0, abs=1e-12)
    assert S.purity(n) == pytest.approx(1 / D)


def test_one_domain_table_whose_marginal_rounds_above_one():
    """A homogeneous training micro-batch (one domain): the domain marginal sums to 1 + 2.2e-16 here, and
    its entropy used to come out as -2.2e-16, so nmi took the square root of a negative number (X2 runs
    with capacity and homogeneous batches crashed on it). Entropies are never below 0; nmi is 0."""
    n = np.array([[46, 39, 41, 22, 49, 25, 0, 3, 34, 15, 22, 32, 43, 36, 2, 10]], dtype=float)
    assert (n / n.sum()).sum(1)[0] > 1.0  # the rounding this test is about
    mi, h_domain, h_expert = S.mutual_information(n)
    assert h_domain == 0.0 and h_expert > 0 and mi == 0.0
    assert S.nmi(n) == 0.0


def test_nmi_hand_computed_2x2():
    # joint [[.4, .1], [.1, .4]]: H(D)=H(E)=log 2, H(D,E) = -(2*.4 log .4 + 2*.1 log .1)
    n = np.array([[40.0, 10.0], [10.0, 40.0]])
    h_joint = -(2 * 0.4 * math.log(0.4) + 2 * 0.1 * math.log(0.1))
    expected = (2 * math.log(2) - h_joint) / math.log(2)
    assert S.nmi(n) == pytest.approx(expected)
    assert S.purity(n) == pytest.approx(0.8)


def test_utilization_partial_by_hand():
    counts = np.array([4, 2, 1, 1])  # f = [.5, .25, .125, .125], 1/E = .25 -> .25+.25+.125+.125
    assert S.utilization(counts) == pytest.approx(0.75)


def test_metrics_invariant_to_permutations():
    rng = np.random.default_rng(0)
    n = rng.integers(0, 50, size=(D, E)).astype(float)
    base = table_metrics(n)
    permuted = table_metrics(n[rng.permutation(D)][:, rng.permutation(E)])
    for key, value in base.items():
        assert permuted[key] == pytest.approx(value), key


def random_routing(num_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, E, generator=g)
    probs = logits.softmax(-1)
    gates, chosen = probs.topk(K, dim=-1)
    return routing_from_choices(logits, probs, chosen, gates)


def test_streaming_equals_one_shot():
    batches = [
        (random_routing(30, s), torch.randint(0, D, (30,), generator=torch.Generator().manual_seed(s)))
        for s in range(5)
    ]
    streamed = RoutingStats(1, D, E)
    for routing, domains in batches:
        streamed.update(0, routing, domains)
    # one shot: concatenate tokens of all batches
    probs = torch.cat([r.probs for r, _ in batches])
    domains = torch.cat([d for _, d in batches])
    gates, chosen = probs.topk(K, dim=-1)
    whole = routing_from_choices(probs.log(), probs, chosen, gates)
    one_shot = RoutingStats(1, D, E)
    one_shot.update(0, whole, domains)
    assert torch.equal(streamed.counts, one_shot.counts)
    torch.testing.assert_close(streamed.entropy_sums, one_shot.entropy_sums)
    assert spec_metrics(streamed, ["layer0"]) == pytest.approx(spec_metrics(one_shot, ["layer0"]))
    # hand check of the counters against a per-token loop
    expected = np.zeros((D, E))
    for t in range(len(domains)):
        for e in chosen[t].tolist():
            expected[domains[t], e] += 1
    np.testing.assert_array_equal(streamed.counts[0].numpy(), expected)
    entropy = -(probs * probs.log()).sum(-1).mean() / math.log(E)
    assert spec_metrics(streamed, ["layer0"])["spec/gate_entropy/layer0"] == pytest.approx(entropy.item())


def test_gate_entropy_uniform_and_one_hot():
    stats = RoutingStats(2, 1, E)
    uniform = torch.full((10, E), 1 / E)
    one_hot = torch.nn.functional.one_hot(torch.arange(10) % E, E).float()
    for layer, probs in enumerate((uniform, one_hot)):
        stats.update(
            layer, routing_from_choices(probs, probs, probs.topk(1).indices, torch.ones(10, 1)), None
        )
    metrics = spec_metrics(stats, ["layer0", "layer1"])
    assert metrics["spec/gate_entropy/layer0"] == pytest.approx(1.0)
    assert metrics["spec/gate_entropy/layer1"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["spec/gate_entropy/mean"] == pytest.approx(0.5)


def test_lbl_value_by_hand():
    # 2 domains x 2 experts: expert loads 3 and 1 -> f = (0.75, 0.25); mean probs (0.6, 0.4) over 4 tokens
    counts = np.array([[2, 1], [1, 0]])
    assert S.lbl_value(counts, np.array([2.4, 1.6]), 4) == pytest.approx(2 * (0.75 * 0.6 + 0.25 * 0.4))
    # perfect balance with uniform probabilities gives 1; collapse onto one confident expert gives E
    assert S.lbl_value(np.array([[5, 5, 5, 5]]), np.full(4, 2.5), 10) == pytest.approx(1.0)
    assert S.lbl_value(np.array([[10, 0, 0, 0]]), np.array([10.0, 0, 0, 0]), 10) == pytest.approx(4.0)
    assert math.isnan(S.lbl_value(np.zeros((1, 4)), np.zeros(4), 0))


def test_gate_mass_by_hand():
    """gate_mass: the mean over tokens of the summed gates of the token's kept experts. Three tokens, top-2
    gates (0.5, 0.2), (0.3, 0.3), (0.6, 0.4) with the last token's second assignment dropped by capacity:
    (0.7 + 0.6 + 0.6) / 3. Renormalised gates and hash's 1/K gates give 1."""
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.3, 0.3, 0.4], [0.6, 0.0, 0.4]])
    chosen = torch.tensor([[0, 1], [0, 1], [0, 2]])
    gates = torch.tensor([[0.5, 0.2], [0.3, 0.3], [0.6, 0.4]])
    routing = routing_from_choices(probs.log(), probs, chosen, gates)
    kept = torch.ones(routing.num_assignments, dtype=torch.bool)
    kept[(routing.token_index == 2) & (routing.expert_index == 2)] = False
    routing.kept = kept
    stats = RoutingStats(2, 1, 3)
    stats.update(0, routing, None)
    full = routing_from_choices(probs.log(), probs, chosen, gates / gates.sum(-1, keepdim=True))
    stats.update(1, full, None)
    metrics = spec_metrics(stats, ["layer0", "layer1"])
    assert metrics["spec/gate_mass/layer0"] == pytest.approx((0.7 + 0.6 + 0.6) / 3)
    assert metrics["spec/gate_mass/layer1"] == pytest.approx(1.0)
