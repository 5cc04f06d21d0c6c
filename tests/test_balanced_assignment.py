"""Balanced assignment router (BA, BASE layers): perfect balance in training, the optimum of the linear
assignment (against a brute-force enumeration and the LP optimum), plain top-k at eval, a gradient to
the gate, and its config errors."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from testbed.routing import RoutingContext
from testbed.routing.balanced_assignment import (
    BalancedAssignmentConfig,
    BalancedAssignmentRouter,
    balanced_assignment,
    expert_capacities,
)
from tests.conftest import compose


def brute_force(scores, top_k):
    """Best total score over every assignment of K distinct experts per token with equal capacities."""
    num_tokens, num_experts = scores.shape
    caps = expert_capacities(num_tokens, top_k, num_experts).tolist()
    choices = list(itertools.combinations(range(num_experts), top_k))
    best = -np.inf
    for pick in itertools.product(choices, repeat=num_tokens):
        load = [0] * num_experts
        for experts in pick:
            for e in experts:
                load[e] += 1
        if load == caps:
            best = max(best, sum(scores[t, list(experts)].sum() for t, experts in enumerate(pick)))
    return best


def lp_optimum(scores, top_k):
    """The b-matching LP (totally unimodular, so its optimum is an assignment's)."""
    num_tokens, num_experts = scores.shape
    caps = expert_capacities(num_tokens, top_k, num_experts).numpy()
    rows = np.kron(np.eye(num_tokens), np.ones(num_experts))
    cols = np.kron(np.ones(num_tokens), np.eye(num_experts))
    result = linprog(
        -scores.reshape(-1),
        A_eq=np.vstack([rows, cols]),
        b_eq=np.concatenate([np.full(num_tokens, top_k), caps]),
        bounds=(0, 1),
        method="highs",
    )
    return -result.fun


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), [(6, 3, 1), (5, 3, 1), (6, 4, 2), (5, 4, 2)])
def test_auction_finds_the_brute_force_optimum(num_tokens, num_experts, top_k):
    gen = torch.Generator().manual_seed(num_tokens * 10 + top_k)
    for _ in range(20):
        scores = torch.randn(1, num_tokens, num_experts, dtype=torch.float64, generator=gen)
        held, _ = balanced_assignment(scores, top_k, eps=1e-7)
        assert torch.equal(held[0].sum(1), torch.full((num_tokens,), top_k))
        assert torch.equal(held[0].sum(0), expert_capacities(num_tokens, top_k, num_experts))
        got = (scores[0] * held[0]).sum().item()
        assert got == pytest.approx(brute_force(scores[0].numpy(), top_k), abs=1e-9)


def test_auction_matches_the_lp_optimum_on_larger_groups():
    gen = torch.Generator().manual_seed(0)
    for num_tokens, num_experts, top_k in [(40, 8, 2), (33, 5, 1), (24, 6, 3)]:
        scores = torch.randn(3, num_tokens, num_experts, dtype=torch.float64, generator=gen) * 2
        held, _ = balanced_assignment(scores, top_k, eps=1e-7)
        for g in range(3):
            got = (scores[g] * held[g]).sum().item()
            # eps-optimal: within T*K*eps of the optimum, in units of the score range
            span = (scores[g].max() - scores[g].min()).item()
            assert got == pytest.approx(
                lp_optimum(scores[g].numpy(), top_k), abs=num_tokens * top_k * 1e-7 * span
            )


def test_auction_that_cannot_finish_says_so():
    scores = torch.randn(1, 64, 8)
    with pytest.raises(RuntimeError, match="did not finish in 2 rounds"):
        balanced_assignment(scores, 2, max_rounds=2, check_every=1)


@pytest.mark.parametrize("scope", ["sequence", "micro_batch"])
def test_router_balances_exactly_in_training_and_is_top_k_at_eval(scope):
    torch.manual_seed(0)
    router = BalancedAssignmentRouter(16, 8, BalancedAssignmentConfig(top_k=2, scope=scope))
    with torch.no_grad():
        router.gate.weight[0] += 1.0  # expert 0 is everyone's favourite
    x = torch.randn(4 * 32, 16).abs()
    context = RoutingContext(4, 32)
    balanced = router.train()(x, context)
    plain = router.eval()(x, context)
    assert balanced.tokens_per_expert.tolist() == [32] * 8  # 128 tokens x 2 / 8 experts
    if scope == "sequence":  # each sequence on its own: 32 x 2 / 8 = 8 per expert
        seq = balanced.token_index // 32
        per_sequence = torch.zeros(4, 8, dtype=torch.long).index_put_(
            (seq, balanced.expert_index), torch.ones_like(seq), accumulate=True
        )
        assert torch.equal(per_sequence, torch.full((4, 8), 8))
    assert plain.tokens_per_expert[0] == 128  # eval: plain top-k, expert 0 for everyone
    torch.testing.assert_close(plain.probs, balanced.probs)
    # gates are the softmax probabilities of the assigned experts; the gate weight gets a gradient
    gates = balanced.weight
    torch.testing.assert_close(gates, balanced.probs[balanced.token_index, balanced.expert_index])
    gates.sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_router_keeps_the_best_assignment_of_each_token_first():
    """With capacity to spare for everyone's favourites, BA picks what plain top-k picks."""
    router = BalancedAssignmentRouter(4, 4, BalancedAssignmentConfig(top_k=1)).train()
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    x = torch.eye(4).repeat(2, 1)  # 8 tokens, two for each expert: capacity 8 x 1 / 4 = 2
    routing = router(x, RoutingContext(1, 8))
    assert torch.equal(routing.expert_index[routing.token_index.argsort()], torch.arange(8) % 4)


@pytest.mark.parametrize("name", ["sinkhorn", "balanced_assignment"])
def test_eval_balanced_routes_at_evaluation_as_in_training(name):
    """`router.eval_balanced=true` scores a balancing router on its training-time routing."""
    from testbed.routing import ROUTERS

    router_cls, config_cls = ROUTERS.get(name)
    torch.manual_seed(0)
    router = router_cls(16, 8, config_cls(top_k=2, eval_balanced=True), 1)
    with torch.no_grad():
        router.gate.weight[0] += 1.0
    x = torch.randn(128, 16).abs()
    trained = router.train()(x, RoutingContext(4, 32))
    evaluated = router.eval()(x, RoutingContext(4, 32))
    assert torch.equal(evaluated.tokens_per_expert, trained.tokens_per_expert)
    assert evaluated.tokens_per_expert.max() <= 40  # balanced (plain top-k sends all 128 to expert 0)


def test_an_unfinished_auction_fails_the_run_with_a_summary(synth_mix, tmp_path):
    """router.max_rounds too small: the run stops with AuctionUnfinished (a TestbedError: exit 2 on the
    command line) naming the setting, and summary.json says failed, with the message."""
    import json

    from testbed.routing.balanced_assignment import AuctionUnfinished
    from testbed.train.cli import run_training
    from tests.conftest import synth_overrides

    overrides = synth_overrides(synth_mix, "router=balanced_assignment", "router.max_rounds=1")
    with pytest.raises(AuctionUnfinished, match="raise router.max_rounds"):
        run_training(compose(overrides), tmp_path, quiet=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "router.max_rounds" in summary["error"]
