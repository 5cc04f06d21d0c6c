"""The routing contract and the top-k softmax router."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.routing import ROUTERS, RoutingContext, routing_from_choices
from testbed.routing.topk_softmax import TopKSoftmaxConfig, TopKSoftmaxRouter


def make_router(d=16, num_experts=8, **options):
    torch.manual_seed(0)
    return TopKSoftmaxRouter(d, num_experts, TopKSoftmaxConfig(**options))


def check_contract(routing, num_tokens, num_experts):
    assert routing.logits.shape == routing.probs.shape == (num_tokens, num_experts)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(num_tokens))
    assert torch.all(routing.expert_index[1:] >= routing.expert_index[:-1]), "assignments sorted by expert"
    counts = torch.zeros(num_experts, dtype=torch.long).scatter_add_(
        0, routing.expert_index, torch.ones_like(routing.expert_index)
    )
    assert torch.equal(routing.tokens_per_expert, counts)
    assert torch.all(routing.weight >= 0)


@settings(max_examples=30, deadline=None)
@given(num_tokens=st.integers(1, 40), num_experts=st.integers(1, 12), data=st.data())
def test_topk_gives_k_distinct_experts_per_token(num_tokens, num_experts, data):
    top_k = data.draw(st.integers(1, num_experts))
    renormalize = data.draw(st.booleans())
    router = make_router(8, num_experts, top_k=top_k, renormalize=renormalize)
    x = torch.randn(num_tokens, 8, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    routing = router(x, RoutingContext(batch_size=1, seq_len=num_tokens))
    check_contract(routing, num_tokens, num_experts)
    assert routing.num_assignments == num_tokens * top_k
    pairs = routing.token_index * num_experts + routing.expert_index
    assert pairs.unique().numel() == pairs.numel(), "a token never gets the same expert twice"
    per_token = torch.zeros(num_tokens, dtype=torch.long).index_add_(
        0, routing.token_index, torch.ones_like(routing.token_index)
    )
    assert torch.all(per_token == top_k)
    # the chosen experts are the top-k of the probabilities, and gates are those probabilities
    gates = torch.zeros(num_tokens, num_experts).index_put_(
        (routing.token_index, routing.expert_index), routing.weight
    )
    topk_values = routing.probs.topk(top_k, dim=-1).values
    chosen_probs = routing.probs[routing.token_index, routing.expert_index]
    assert torch.all(chosen_probs >= topk_values[routing.token_index, -1] - 1e-7)
    if renormalize:
        torch.testing.assert_close(gates.sum(-1), torch.ones(num_tokens))
    else:
        torch.testing.assert_close(routing.weight, chosen_probs)


def test_routing_from_choices_by_hand():
    logits = torch.zeros(3, 4)
    probs = torch.full((3, 4), 0.25)
    chosen = torch.tensor([[2, 0], [1, 2], [0, 3]])
    gates = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    r = routing_from_choices(logits, probs, chosen, gates)
    assert r.expert_index.tolist() == [0, 0, 1, 2, 2, 3]
    assert r.token_index.tolist() == [0, 2, 1, 0, 1, 2]
    torch.testing.assert_close(r.weight, torch.tensor([0.4, 0.9, 0.7, 0.6, 0.3, 0.1]))
    assert r.tokens_per_expert.tolist() == [2, 1, 2, 1]
    assert r.kept is None and r.kept_as(torch.long).tolist() == [1] * 6  # dropless: every assignment counts


def test_kept_mask_counts_only_the_kept_assignments():
    from testbed.routing.base import count_per_expert

    r = routing_from_choices(
        torch.zeros(3, 4),
        torch.full((3, 4), 0.25),
        torch.tensor([[2, 0], [1, 2], [0, 3]]),
        torch.full((3, 2), 0.5),
    )
    r.kept = torch.tensor([True, False, True, True, False, True])  # e.g. dropped by capacity
    assert r.num_assignments == 6 and r.kept_as(torch.float32).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert count_per_expert(r.expert_index, 4).tolist() == [2, 1, 2, 1]
    assert count_per_expert(r.expert_index, 4, r.kept).tolist() == [1, 1, 1, 1]


def test_jitter_only_in_training():
    router = make_router(jitter=0.5)
    x = torch.randn(10, 16)
    router.eval()
    a, b = router(x, RoutingContext(1, 10)), router(x, RoutingContext(1, 10))
    assert torch.equal(a.logits, b.logits)
    router.train()
    assert not torch.equal(router(x, RoutingContext(1, 10)).logits, a.logits)


def test_registry_lists_router():
    assert "topk_softmax" in ROUTERS.names()
    with pytest.raises(ValueError, match="one of"):
        ROUTERS.get("no_such_router")
