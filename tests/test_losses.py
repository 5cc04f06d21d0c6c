"""Balancing and auxiliary losses: hand-computed values, scopes, and gradients reaching the router."""

import math

import pytest
import torch

from testbed.config import MoEConfig
from testbed.losses import load_balance_value
from testbed.losses.expert_bias import ExpertBiasBalance, ExpertBiasConfig
from testbed.losses.load_balance import LoadBalanceConfig, LoadBalanceLoss
from testbed.losses.z_loss import ZLoss, ZLossConfig
from testbed.model.moe import MoELayer
from testbed.routing import RoutingContext, routing_from_choices
from testbed.routing.topk_softmax import TopKSoftmaxConfig
from testbed.scope import GlobalScopeState

PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])


def top1_routing(probs):
    chosen = probs.argmax(-1, keepdim=True)
    return routing_from_choices(probs.log(), probs, chosen, probs.gather(1, chosen))


def test_load_balance_is_one_at_perfect_balance():
    num_experts, top_k = 8, 2
    probs = torch.full((16, num_experts), 1 / num_experts)
    chosen = torch.stack([torch.arange(16) % 8, (torch.arange(16) + 4) % 8], dim=1)
    r = routing_from_choices(probs.log(), probs, chosen, torch.full((16, top_k), 0.5))
    loss = LoadBalanceLoss(LoadBalanceConfig())(r, RoutingContext(2, 8))
    assert loss.item() == pytest.approx(1.0)


def test_load_balance_micro_batch_by_hand():
    # f = [3/4, 1/4], P = [0.65, 0.35]: 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    r = top1_routing(PROBS)
    loss = LoadBalanceLoss(LoadBalanceConfig(scope="micro_batch"))(r, RoutingContext(2, 2))
    assert loss.item() == pytest.approx(1.15)


def test_load_balance_sequence_scope_by_hand():
    # sequence 0 (tokens 0,1): f=[1,0], P=[.85,.15] -> 1.7; sequence 1: f=[.5,.5], P=[.45,.55] -> 1.0
    r = top1_routing(PROBS)
    loss = LoadBalanceLoss(LoadBalanceConfig(scope="sequence"))(r, RoutingContext(2, 2))
    assert loss.item() == pytest.approx((1.7 + 1.0) / 2)


def test_load_balance_fractions_carry_no_gradient():
    probs = PROBS.clone().requires_grad_(True)
    r = top1_routing(probs.detach())
    load_balance_value(probs, r.expert_index, r.token_index, 2).backward()
    # d/dP_e of E * sum f_e P_e, P_e = mean_t p_te  ->  E * f_e / T
    torch.testing.assert_close(probs.grad, torch.tensor([[0.75, 0.25]] * 4) * 2 / 4)


@pytest.mark.parametrize("capacity", [None, 0.75])
@pytest.mark.parametrize("scope", ["micro_batch", "sequence"])
def test_load_balance_scopes_equal_the_grouped_form(scope, capacity):
    """The micro-batch form (the routing's own counts, a mean) and the sequence form (a [B, S, E] mean)
    equal `load_balance_value` with explicit groups, values and gradients, capacity drops included."""
    from testbed.routing.capacity import mask_capacity

    g = torch.Generator().manual_seed(0)
    batch, seq, num_experts = 3, 10, 6
    logits = torch.randn(batch * seq, num_experts, generator=g, requires_grad=True)
    probs = logits.softmax(-1)
    chosen = torch.randn(batch * seq, num_experts, generator=g).topk(2, dim=-1).indices
    r = routing_from_choices(logits, probs, chosen, probs.gather(1, chosen))
    if capacity is not None:
        r = mask_capacity(r, capacity, 2)
        assert not bool(r.kept.all())
    context = RoutingContext(batch, seq)
    groups = (context.sequence_ids, batch) if scope == "sequence" else (None, 1)
    loss = LoadBalanceLoss(LoadBalanceConfig(scope=scope))(r, context)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    expected = load_balance_value(r.probs, r.expert_index, r.token_index, num_experts, *groups, kept=r.kept)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-8)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    r = routing_from_choices(logits, logits.softmax(-1), torch.tensor([[0], [0]]), torch.ones(2, 1))
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert ZLoss(ZLossConfig())(r, RoutingContext(1, 2)).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "loss",
    [
        LoadBalanceLoss(LoadBalanceConfig()),
        LoadBalanceLoss(LoadBalanceConfig(scope="sequence")),
        LoadBalanceLoss(LoadBalanceConfig(scope="global")),
        ExpertBiasBalance(ExpertBiasConfig(sequence_coefficient=1e-4)),
        ZLoss(ZLossConfig()),
    ],
    ids=["lb_micro_batch", "lb_sequence", "lb_global", "expert_bias_sequence_lb", "z_loss"],
)
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_each_aux_loss_sends_gradient_to_router(loss, backend):
    torch.manual_seed(0)
    layer = MoELayer(
        16,
        MoEConfig(num_experts=8, expert_hidden=16, backend=backend),
        TopKSoftmaxConfig(top_k=2),
        [loss],
        layer_index=0,
    )
    layer.train()
    context = RoutingContext(batch_size=2, seq_len=12, scope_state=GlobalScopeState())
    _, out = layer(torch.randn(2, 12, 16), context)
    assert set(out.losses) == {loss.name}
    out.losses[loss.name].backward()
    grad = layer.router.gate.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
