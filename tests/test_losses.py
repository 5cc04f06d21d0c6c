"""Balancing and auxiliary losses: the contract every registered loss keeps (both registries, iterated),
where each shipped loss is zero or minimal, hand-computed values and scopes, gradients reaching the router."""

import dataclasses
import math

import pytest
import torch

from testbed.checks import plain
from testbed.config import MoEConfig, parse_config
from testbed.losses import AUX_LOSSES, BALANCE, load_balance_value
from testbed.losses.load_balance import LoadBalanceConfig, LoadBalanceLoss
from testbed.losses.z_loss import ZLoss, ZLossConfig
from testbed.model.moe import MoELayer
from testbed.routing import RoutingContext, routing_from_choices
from testbed.routing.topk_softmax import TopKSoftmaxConfig
from testbed.scope import GlobalScopeState
from tests.conftest import compose, layer_step
from tests.loss_cases import loss_configs

CASES = [pytest.param(key, loss_cls, config, id=case_id) for key, loss_cls, config, case_id in loss_configs()]
BATCH, SEQ, EXPERTS, TOP_K, WIDTH = 2, 6, 4, 2, 5

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


# ---- every registered loss ----------------------------------------------------------------------------


def routing_case(logits, probs=None, chosen=None, outputs=None, seed=0):
    """A token-choice routing of BATCH x SEQ tokens over EXPERTS experts (top-TOP_K of `probs` unless
    `chosen` [T, K] is given; probs default to softmax(logits)), its context (a fresh global-scope state)
    and per-assignment expert outputs [A, WIDTH] (random unless given)."""
    probs = logits.softmax(-1) if probs is None else probs
    chosen = probs.topk(TOP_K, dim=-1).indices if chosen is None else chosen
    routing = routing_from_choices(logits, probs, chosen, probs.gather(1, chosen))
    if outputs is None:
        generator = torch.Generator().manual_seed(seed)
        outputs = torch.randn(routing.num_assignments, WIDTH, generator=generator, requires_grad=True)
    context = RoutingContext(BATCH, SEQ, scope_state=GlobalScopeState(), max_experts_per_token=TOP_K)
    return routing, context, outputs


def random_case(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(BATCH * SEQ, EXPERTS, generator=generator)).requires_grad_(True)
    return routing_case(logits, seed=seed)


def value_of(loss, case):
    routing, context, outputs = case
    return loss(routing, context, outputs if loss.needs_expert_outputs else None)


@pytest.mark.parametrize(("key", "loss_cls", "config"), CASES)
def test_every_loss_keeps_the_contract(key, loss_cls, config):
    """A finite scalar; a loss that adds a term sends a finite gradient to the router logits (through the
    probabilities or gates) or, for one that reads the experts' outputs, to those; a method that adds no
    term (balance=none) is a constant 0."""
    loss = loss_cls(config)
    routing, context, outputs = case = random_case(0)
    value = value_of(loss, case)
    assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value)
    if not loss_cls.adds_term:
        assert value.item() == 0.0 and not value.requires_grad
        return
    inputs = [routing.logits] + ([outputs] if loss.needs_expert_outputs else [])
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads), (
        "no gradient reaches the router or experts"
    )
    if not loss.needs_expert_outputs:
        assert grads[0] is not None and grads[0].abs().sum() > 0  # the router's logits


@pytest.mark.parametrize(("key", "loss_cls", "config"), CASES)
def test_every_loss_config_validates(key, loss_cls, config):
    """The defaults pass the loss's own check, and its YAML (conf/<group>/<name>.yaml) composes into a valid
    run whose section is the loss's config dataclass, every option present (at the case's scope)."""
    name = loss_cls.registry_name
    section = key if key == "balance" else f"aux_loss.{name}"
    config.check(section)
    choice = f"balance={name}" if key == "balance" else f"aux_loss=[{name}]"
    scope = [f"{section}.scope={config.scope.value}"] if hasattr(config, "scope") else []
    run = parse_config(compose([choice, *scope]))
    parsed = run.balance if key == "balance" else run.aux_loss[name]
    assert type(parsed) is type(config) and plain(parsed).keys() == plain(config).keys()
    assert getattr(parsed, "scope", None) == getattr(config, "scope", None)


def uniform_balanced(outputs=None):
    """The balanced ideal: logits -log E (uniform probabilities, logsumexp 0) and K distinct experts per
    token with every expert chosen equally often within each sequence (so at every scope)."""
    logits = torch.full((BATCH * SEQ, EXPERTS), -math.log(EXPERTS), requires_grad=True)
    token = torch.arange(BATCH * SEQ)
    chosen = torch.stack([(TOP_K * token + k) % EXPERTS for k in range(TOP_K)], dim=1)
    return routing_case(logits, chosen=chosen, outputs=outputs)


def one_hot():
    """Each token's whole probability on one expert (the sharpest routing)."""
    probs = torch.nn.functional.one_hot(torch.arange(BATCH * SEQ) % EXPERTS, EXPERTS).float()
    return routing_case(probs.log().clamp_min(-30).requires_grad_(True), probs=probs)


def orthogonal_outputs():
    """Balanced routing whose co-selected experts' outputs are orthogonal: slot k of every token gives the
    k-th unit vector."""
    routing, _, _ = uniform_balanced()
    outputs = torch.nn.functional.one_hot(routing.slot_index, WIDTH).float().requires_grad_(True)
    return uniform_balanced(outputs)


IDEAL = {
    # name: (the case where the formula puts the loss at its ideal, its value there, whether no routing
    # goes below it). Load balance is 1 at perfect balance but not a lower bound: tokens sent to experts
    # of low mean probability score below 1.
    "load_balance": (uniform_balanced, 1.0, False),  # Switch form E * sum_e f_e P_e: 1 at f = P = 1/E
    "expert_bias": (uniform_balanced, 1.0, False),  # its complementary sequence-scope load balance
    "none": (uniform_balanced, 0.0, True),
    "z_loss": (uniform_balanced, 0.0, True),  # mean (logsumexp z)^2: 0 where logsumexp z = 0
    "variance": (one_hot, -1 / EXPERTS, True),  # -mean_t Var_e(p): unbiased variance of one-hot rows 1/E
    "orthogonality": (orthogonal_outputs, 0.0, True),  # no output projects onto its co-selected ones
}


def test_the_ideal_cases_name_registered_losses():
    assert set(IDEAL) <= set(BALANCE.names()) | set(AUX_LOSSES.names())  # no stale entry


@pytest.mark.parametrize(
    ("key", "loss_cls", "config"), [c for c in CASES if c.values[1].registry_name in IDEAL]
)
def test_each_shipped_loss_is_ideal_where_the_formula_says(key, loss_cls, config):
    """At its ideal case each loss takes the value its formula gives there; where that value is the
    formula's minimum, no random routing goes below it."""
    make, ideal, is_minimum = IDEAL[loss_cls.registry_name]
    loss = loss_cls(config)
    assert value_of(loss, make()).item() == pytest.approx(ideal, abs=1e-6)
    if is_minimum:
        for seed in range(5):
            assert value_of(loss, random_case(seed)).item() >= ideal - 1e-6


def test_variance_is_zero_for_uniform_routing_and_load_balance_grows_with_imbalance():
    from testbed.losses.variance import VarianceConfig, VarianceLoss

    assert value_of(VarianceLoss(VarianceConfig()), uniform_balanced()).item() == pytest.approx(0.0, abs=1e-7)
    logits = torch.full((BATCH * SEQ, EXPERTS), -math.log(EXPERTS), requires_grad=True)
    skewed = routing_case(logits, chosen=torch.tensor([[0, 1]]).expand(BATCH * SEQ, TOP_K))
    assert value_of(LoadBalanceLoss(LoadBalanceConfig()), skewed).item() == pytest.approx(1.0)  # P uniform
    probs = torch.tensor([[0.7, 0.2, 0.05, 0.05]]).expand(BATCH * SEQ, EXPERTS)
    skewed = routing_case(probs.log().requires_grad_(True), probs=probs)  # all tokens to experts 0 and 1
    assert value_of(LoadBalanceLoss(LoadBalanceConfig()), skewed).item() == pytest.approx(4 * 0.5 * 0.9)


@pytest.mark.parametrize(("key", "loss_cls", "config"), CASES)
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_every_loss_in_the_moe_layer_sends_gradient_to_the_router(key, loss_cls, config, backend):
    """Through a real MoE layer (both expert backends): the loss computed on the layer's record, as training
    computes it, comes back by its name, and a loss that adds a term trains the router's gate, or, reading
    the experts' outputs, the experts."""
    loss = loss_cls(config)
    torch.manual_seed(0)
    layer = MoELayer(
        16, MoEConfig(num_experts=8, expert_hidden=16, backend=backend), TopKSoftmaxConfig(top_k=2), 0
    ).train()
    context = RoutingContext(batch_size=2, seq_len=12, scope_state=GlobalScopeState())
    _, _, terms = layer_step(layer, torch.randn(2, 12, 16), context, [loss], observe=True)
    assert set(terms) == {loss.name}
    value = terms[loss.name]
    assert torch.isfinite(value)
    if not loss_cls.adds_term:
        return
    value.backward()
    trained = layer.experts.parameters() if loss.needs_expert_outputs else [layer.router.gate.weight]
    grads = [p.grad for p in trained if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_gated_orthogonality_trains_the_router_too():
    from testbed.losses.orthogonality import OrthogonalityConfig, OrthogonalityLoss

    loss = OrthogonalityLoss(dataclasses.replace(OrthogonalityConfig(), gated=True))
    routing, context, outputs = random_case(1)
    (grad,) = torch.autograd.grad(value_of(loss, (routing, context, outputs)), routing.logits)
    assert grad.abs().sum() > 0
