"""DBES metrics, routing variance, n-gram expertise, expert accuracy, overlap and stiffness: known answers."""

import math

import numpy as np
import pytest
import torch

from testbed.metrics import specialization as S
from testbed.metrics.per_layer import per_layer
from testbed.metrics.stats import RoutingStats
from testbed.routing import Routing, routing_from_choices
from testbed.train.callbacks import perturbed_prefix

D, E = 4, 8


def oracle_table():
    n = np.zeros((D, E))
    for d in range(D):
        n[d, 2 * d : 2 * d + 2] = 10
    return n


def test_dbes_on_the_oracle_layout():
    n = oracle_table()
    assert S.routing_specialization(n) == pytest.approx(1.0)
    assert S.effective_rank(n) == pytest.approx(1.0)
    assert S.domain_isolation(n) == 1.0


@pytest.mark.parametrize(
    "table",
    [
        np.full((D, E), 5.0),
        np.outer([1, 2, 3, 4], [1, 1, 5, 1, 1, 2, 1, 8]) * 10.0,
        np.eye(1, E).repeat(D, 0) * 7,
    ],
    ids=["uniform", "independent_hash_like", "collapsed"],
)
def test_dbes_when_routing_ignores_the_domain(table):
    assert S.routing_specialization(table) == pytest.approx(0.0, abs=1e-12)
    assert S.nmi(table) == pytest.approx(0.0, abs=1e-12)
    assert S.effective_rank(table) == pytest.approx(1 / min(D, E))  # every domain uses the same mix
    assert S.domain_isolation(table) == 0.0


def test_effective_rank_by_hand():
    # rows p(e|d): [1,0], [0,1], [0,1]: singular values sqrt(2) and 1
    n = np.array([[3.0, 0.0], [0.0, 5.0], [0.0, 2.0]])
    w = np.array([math.sqrt(2), 1.0]) / (1 + math.sqrt(2))
    assert S.effective_rank(n) == pytest.approx(math.exp(-(w * np.log(w)).sum()) / 2)


def test_domain_isolation_by_hand():
    # T_0 = {0, 1} (9 of 10 >= 80%); T_1 = {2, 0}: Jaccard 1/3
    n = np.array([[5.0, 4.0, 1.0, 0.0], [4.0, 0.0, 5.0, 1.0]])
    assert S.covering_set(n[0]) == {0, 1} and S.covering_set(n[1]) == {2, 0}
    assert S.domain_isolation(n) == pytest.approx(2 / 3)


def test_accuracy_spread_by_hand():
    std, spread = S.accuracy_spread([1, 3, 0, 5], [2, 4, 0, 10])  # accuracies .5, .75, -, .5
    assert spread == pytest.approx(0.25)
    assert std == pytest.approx(np.std([0.5, 0.75, 0.5]))


def one_hot_routing(top1, num_experts=3):
    probs = torch.nn.functional.one_hot(torch.tensor(top1), num_experts).double() * 0.9 + 0.1 / num_experts
    return routing_from_choices(probs.log(), probs, probs.argmax(-1, keepdim=True), torch.ones(len(top1), 1))


def test_ngram_expertise_counts_windows_inside_sequences():
    stats = RoutingStats(1, 1, 3, ngram_sizes=(4,))
    # two sequences of 6: [0,0,0,0,1,1] has 1 of 3 windows uniform; [2,2,2,2,2,2] has 3 of 3
    stats.update(0, one_hot_routing([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2]), None, batch_shape=(2, 6))
    assert per_layer(stats)[0]["ngram_expertise_n4"] == pytest.approx(4 / 6)


def test_routing_variance_of_one_hot_and_uniform():
    stats = RoutingStats(2, 1, 4)
    one_hot = torch.eye(4)
    uniform = torch.full((4, 4), 0.25)
    for layer, probs in enumerate((one_hot, uniform)):
        stats.update(
            layer, routing_from_choices(probs, probs, probs.argmax(-1, keepdim=True), torch.ones(4, 1)), None
        )
    variance = [m["routing_variance"] for m in per_layer(stats)]
    assert variance == pytest.approx([(1 - 0.25) ** 2 * 1 / 3 + 0.25**2 * 3 / 3, 0.0])  # unbiased: /(E-1)


def test_expert_overlap_of_identical_and_orthogonal_outputs():
    probs = torch.full((3, 3), 1 / 3)
    routing = routing_from_choices(probs, probs, torch.tensor([[0, 1], [0, 2], [1, 2]]), torch.ones(3, 2))
    # outputs in assignment order (sorted by expert): find each (token, expert) pair's vector
    vectors = {
        (0, 0): [1.0, 0],
        (0, 1): [2.0, 0],  # token 0: parallel -> cos 1
        (1, 0): [1.0, 0],
        (1, 2): [0, 3.0],  # token 1: orthogonal -> cos 0
        (2, 1): [1.0, 1],
        (2, 2): [-1.0, -1],
    }  # token 2: opposite -> cos -1
    outputs = torch.tensor(
        [
            vectors[(t, e)]
            for t, e in zip(routing.token_index.tolist(), routing.expert_index.tolist(), strict=True)
        ]
    )
    stats = RoutingStats(1, 1, 3)
    stats.update(0, routing, None, expert_outputs=outputs)
    assert per_layer(stats)[0]["expert_overlap"] == pytest.approx((1 + 0 - 1) / 3)
    single = routing_from_choices(probs, probs, torch.tensor([[0], [1], [2]]), torch.ones(3, 1))
    lonely = RoutingStats(1, 1, 3)
    lonely.update(0, single, None, expert_outputs=torch.randn(3, 2))
    assert math.isnan(per_layer(lonely)[0]["expert_overlap"])  # no token has two experts


def test_expert_accuracy_counters():
    probs = torch.full((4, 2), 0.5)
    routing = routing_from_choices(probs, probs, torch.tensor([[0], [0], [1], [1]]), torch.ones(4, 1))
    stats = RoutingStats(1, 1, 2)
    stats.update(0, routing, None)
    stats.update_accuracy(0, routing, torch.tensor([True, False, True, True]))
    layer = per_layer(stats)[0]
    assert layer["expert_accuracy_range"] == pytest.approx(0.5)  # expert 0: 1/2, expert 1: 2/2


def test_stiffness_counters_and_partner_choice():
    probs = torch.full((4, 3), 1 / 3)
    a = routing_from_choices(probs, probs, torch.tensor([[0, 1], [0, 1], [1, 2], [0, 2]]), torch.ones(4, 2))
    b = routing_from_choices(probs, probs, torch.tensor([[0, 1], [1, 2], [0, 1], [0, 2]]), torch.ones(4, 2))
    stats = RoutingStats(1, 1, 3)
    stats.update_stiffness(0, a, b, torch.tensor([True, True, True, False]))
    # kept: token0 2/2, token1 1/2, token2 1/2 (token 3 masked out) -> 4 / 6
    assert per_layer(stats)[0]["routing_stiffness"] == pytest.approx(4 / 6)
    ids = torch.arange(16).view(4, 4)
    domains = torch.tensor([0, 1, 0, 2]).unsqueeze(1).expand(4, 4)
    perturbed, mask = perturbed_prefix(ids, domains)
    assert perturbed[0, :2].tolist() == [8, 9] and perturbed[2, :2].tolist() == [0, 1]  # rows 0 <-> 2
    assert perturbed[:, 2:].tolist() == ids[:, 2:].tolist()
    assert mask.tolist() == [[False, False, True, True], [False] * 4, [False, False, True, True], [False] * 4]


def test_streaming_equals_one_shot_for_every_counter():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * 3 * 12, E, generator=g)
    probs = logits.softmax(-1)
    gates, chosen = probs.topk(2, dim=-1)
    outputs = torch.randn(2 * 3 * 12 * 2, 5, generator=g)
    domains = torch.arange(6).repeat_interleave(12) % D

    def routing_of(rows):
        return routing_from_choices(logits[rows], probs[rows], chosen[rows], gates[rows])

    def outputs_of(routing, rows):  # outputs indexed by (token, k) in the original order
        table = outputs.view(-1, 2, 5)[rows]
        k = (routing.expert_index.unsqueeze(1) == chosen[rows][routing.token_index]).float().argmax(1)
        return table[routing.token_index, k]

    whole, streamed = RoutingStats(1, D, E, ngram_sizes=(4,)), RoutingStats(1, D, E, ngram_sizes=(4,))
    all_rows = torch.arange(72)
    r = routing_of(all_rows)
    whole.update(0, r, domains, outputs_of(r, all_rows), batch_shape=(6, 12))
    for half in (torch.arange(36), torch.arange(36, 72)):
        r = routing_of(half)
        streamed.update(0, r, domains[half], outputs_of(r, half), batch_shape=(3, 12))
    for name in RoutingStats.NAMES:
        torch.testing.assert_close(getattr(streamed, name), getattr(whole, name), msg=name)


def test_capacity_drops_flow_into_drop_rate():
    probs = torch.full((4, 2), 0.5)
    routing = Routing(
        probs,
        probs,
        torch.tensor([0, 1, 2]),
        torch.tensor([0, 0, 1]),
        torch.ones(3),
        torch.tensor([2, 1]),
        dropped=torch.tensor(1),
    )
    stats = RoutingStats(1, 1, 2)
    stats.update(0, routing, None)
    assert per_layer(stats)[0]["drop_rate"] == pytest.approx(0.25)
