"""Balancing scopes, expert bias, Sinkhorn and capacity: hand computations and a 2-process DP run."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from testbed.config import parse_config
from testbed.losses.expert_bias import ExpertBiasBalance, ExpertBiasConfig
from testbed.losses.load_balance import LoadBalanceConfig, LoadBalanceLoss
from testbed.metrics import specialization as S
from testbed.routing import RoutingContext, routing_from_choices
from testbed.routing.base import count_per_expert
from testbed.routing.capacity import apply_capacity, expert_capacity, mask_capacity
from testbed.routing.sinkhorn import SinkhornConfig, SinkhornRouter, sinkhorn_log
from testbed.routing.topk_softmax import TopKSoftmaxConfig, TopKSoftmaxRouter
from testbed.scope import GlobalScopeState, Scope
from tests.conftest import compose, layer_step


def top1(probs):
    chosen = probs.argmax(-1, keepdim=True)
    return routing_from_choices(probs.log(), probs, chosen, probs.gather(1, chosen))


# ---------------------------------------------------------------- global scope, gradient accumulation
def test_global_scope_uses_running_counts_over_micro_batches():
    loss = LoadBalanceLoss(LoadBalanceConfig(scope="global"))
    state = GlobalScopeState()
    state.start_step()
    mb1 = torch.tensor([[0.9, 0.1], [0.8, 0.2]])  # both tokens -> expert 0: counts [2, 0]
    mb2 = torch.tensor([[0.3, 0.7], [0.4, 0.6]])  # both tokens -> expert 1: running counts [2, 2]
    ctx = RoutingContext(1, 2, scope_state=state)
    first = loss(top1(mb1), ctx)
    # f = [1, 0], P = [0.85, 0.15] -> 2 * 0.85
    assert first.item() == pytest.approx(1.7)
    state.next_micro_batch()
    second = loss(top1(mb2), ctx)
    # running f = [0.5, 0.5] (micro-batches 1..2), P of micro-batch 2 = [0.35, 0.65] -> 2 * 0.5 * 1.0
    assert second.item() == pytest.approx(1.0)
    # a micro-batch scope would have used f = [0, 1]: 2 * 0.65
    micro = LoadBalanceLoss(LoadBalanceConfig(scope="micro_batch"))(top1(mb2), RoutingContext(1, 2))
    assert micro.item() == pytest.approx(1.3)
    state.start_step()  # a new optimizer step forgets the counts
    assert loss(top1(mb2), ctx).item() == pytest.approx(1.3)


def test_training_module_resets_scope_state_per_optimizer_step(synth_mix):
    from testbed.train.module import MoELanguageModel
    from tests.conftest import synth_overrides

    run = parse_config(compose(synth_overrides(synth_mix, "trainer.accumulate_grad_batches=3")))
    module = MoELanguageModel(run, ["alpha", "beta", "gamma"])
    seen = []
    for batch_idx in range(7):
        module.advance_scope(batch_idx)
        seen.append(module.scope_state.micro_batch)
    assert seen == [0, 1, 2, 0, 1, 2, 0]


# ---------------------------------------------------------------- two data-parallel processes (gloo)
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_probs(seed=0, tokens=24, experts=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, experts, generator=g) * 2).softmax(-1)


def two_rank_worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    probs = batch_probs()
    half = probs.shape[0] // 2
    local = probs[rank * half : (rank + 1) * half]
    # load balance at global scope
    state = GlobalScopeState()
    state.start_step()
    ctx = RoutingContext(1, half, scope_state=state)
    value = LoadBalanceLoss(LoadBalanceConfig(scope="global"))(top1(local), ctx)
    counts = state.counts[("load_balance", 0)]
    # sinkhorn at global scope
    torch.manual_seed(0)
    router = SinkhornRouter(4, 6, SinkhornConfig(top_k=2, scope="global")).train()
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(1))[rank * half : (rank + 1) * half]
    chosen = router(x, RoutingContext(1, half)).expert_index
    chosen_pairs = router.balanced_choice(router.gate(x).detach(), RoutingContext(1, half))
    # expert bias at global scope
    tracker = ExpertBiasBalance(ExpertBiasConfig(scope="global", gamma=1e-3))
    tracker.observe(0, top1(local), RoutingContext(1, half))
    bias_router = TopKSoftmaxRouter(4, 6, TopKSoftmaxConfig(top_k=1))
    tracker.after_optimizer_step([bias_router])
    torch.save(
        {
            "value": value,
            "counts": counts,
            "chosen": chosen_pairs,
            "bias": bias_router.expert_bias,
            "routed": chosen,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def test_two_process_global_scope_equals_one_process_on_concatenated_batch(tmp_path):
    mp.spawn(two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    probs = batch_probs()
    whole = top1(probs)
    single = LoadBalanceLoss(LoadBalanceConfig(scope="micro_batch"))(whole, RoutingContext(1, 24))
    expected_counts = torch.bincount(whole.expert_index, minlength=6).double()
    for r in ranks:  # every rank sees the global counts
        torch.testing.assert_close(r["counts"].double(), expected_counts)
    # DDP averages the ranks' gradients: the mean of the local losses is the single-process loss
    assert (ranks[0]["value"] + ranks[1]["value"]).item() / 2 == pytest.approx(single.item(), rel=1e-6)
    # Sinkhorn over both ranks = Sinkhorn over the concatenated micro-batch
    torch.manual_seed(0)
    router = SinkhornRouter(4, 6, SinkhornConfig(top_k=2, scope="micro_batch")).train()
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(1))
    expected = router.balanced_choice(router.gate(x).detach(), RoutingContext(1, 24))
    torch.testing.assert_close(torch.cat([r["chosen"] for r in ranks]), expected)
    # expert bias: the same update on both ranks, from the global counts
    expected_bias = 1e-3 * torch.sign(expected_counts.mean() - expected_counts).float()
    for r in ranks:
        torch.testing.assert_close(r["bias"], expected_bias)


# ---------------------------------------------------------------- expert bias
def skewed_router(top_k=2):
    torch.manual_seed(0)
    router = TopKSoftmaxRouter(16, 8, TopKSoftmaxConfig(top_k=top_k))
    with torch.no_grad():
        router.gate.weight[0] += 0.1  # experts 0 and 1 attract more tokens than the others
        router.gate.weight[1] += 0.06
    return router


def measured_max_violation(router, x):
    routing = router(x, RoutingContext(1, x.shape[0]))
    return S.max_violation(routing.tokens_per_expert.numpy())


@pytest.mark.parametrize("scope", ["global", "micro_batch", "sequence"])
def test_expert_bias_reduces_max_violation_on_a_skewed_router(scope):
    router = skewed_router()
    g = torch.Generator().manual_seed(1)
    x_eval = torch.randn(2048, 16, generator=g).abs()
    before = measured_max_violation(router, x_eval)
    gates_before = router(x_eval, RoutingContext(1, 2048)).probs
    tracker = ExpertBiasBalance(ExpertBiasConfig(scope=scope, gamma=1e-3))
    for _ in range(300):  # one optimizer step each: 4 sequences of 64 tokens
        x = torch.randn(256, 16, generator=g).abs()
        tracker.observe(0, router(x, RoutingContext(4, 64)), RoutingContext(4, 64))
        tracker.after_optimizer_step([router])
    after = measured_max_violation(router, x_eval)
    assert before > 1.0 and after < 0.3, (before, after)
    assert router.expert_bias[0] < 0 and router.expert_bias[1] < 0
    # the bias changes selection only: the router distribution is untouched
    torch.testing.assert_close(router(x_eval, RoutingContext(1, 2048)).probs, gates_before)


def test_expert_bias_update_by_hand():
    tracker = ExpertBiasBalance(ExpertBiasConfig(scope="micro_batch", gamma=0.5))
    router = TopKSoftmaxRouter(2, 3, TopKSoftmaxConfig(top_k=1))
    p = torch.tensor([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    tracker.observe(0, top1(p), RoutingContext(1, 3))  # counts [2,1,0], mean 1: signs [-1, 0, +1]
    tracker.observe(0, top1(p[:1]), RoutingContext(1, 1))  # counts [1,0,0], mean 1/3: signs [-1, +1, +1]
    tracker.after_optimizer_step([router])
    torch.testing.assert_close(router.expert_bias, 0.5 * torch.tensor([-1.0, 0.5, 1.0]))
    assert tracker.sums == {}


# ---------------------------------------------------------------- sinkhorn
def test_sinkhorn_marginals_are_uniform():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 128, 8, generator=g) + torch.linspace(3, -3, 8)
    p = sinkhorn_log(logits, iterations=50).exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 128, dtype=p.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.sum(1), torch.full((3, 8), 16.0, dtype=p.dtype), atol=1e-3, rtol=0)


@pytest.mark.parametrize("scope", ["sequence", "micro_batch", "global"])
def test_sinkhorn_router_balances_in_training_and_is_top_k_at_eval(scope):
    torch.manual_seed(0)
    router = SinkhornRouter(16, 8, SinkhornConfig(top_k=2, scope=scope))
    with torch.no_grad():
        router.gate.weight[0] += 0.5
    x = torch.randn(4 * 64, 16).abs()
    ctx = RoutingContext(4, 64, scope_state=GlobalScopeState())
    balanced = router.train()(x, ctx)
    plain = router.eval()(x, ctx)
    assert S.max_violation(balanced.tokens_per_expert.numpy()) < 0.3
    assert S.max_violation(plain.tokens_per_expert.numpy()) > 1.0
    torch.testing.assert_close(plain.probs, balanced.probs)
    expected = plain.probs.topk(2, dim=-1).indices.sort(-1).values
    got = torch.zeros(256, 8, dtype=torch.bool)
    got[plain.token_index, plain.expert_index] = True
    assert torch.equal(got.nonzero()[:, 1].view(256, 2), expected)


def test_sinkhorn_global_scope_evens_out_across_accumulation():
    torch.manual_seed(0)
    router = SinkhornRouter(16, 8, SinkhornConfig(top_k=1, scope="global")).train()
    state = GlobalScopeState()
    state.start_step()
    # as if micro-batch 1 (64 tokens, K=1) had gone to experts 0-3 only
    state.accumulate(("sinkhorn", 0), torch.tensor([16.0, 16, 16, 16, 0, 0, 0, 0], dtype=torch.float64))
    state.next_micro_batch()
    x = torch.randn(64, 16)
    second = router(x, RoutingContext(1, 64, scope_state=state))
    # cumulative targets: 128/8 = 16 per expert, so micro-batch 2 should go to experts 4-7
    assert second.tokens_per_expert[4:].sum() >= 56, second.tokens_per_expert
    total = second.tokens_per_expert + torch.tensor([16, 16, 16, 16, 0, 0, 0, 0])
    assert S.max_violation(total.numpy()) < 0.3
    alone = router(x, RoutingContext(1, 64, scope_state=GlobalScopeState()))
    assert alone.tokens_per_expert[4:].sum() <= 40  # without history it balances the micro-batch alone


# ---------------------------------------------------------------- capacity
def kept_pairs(routing):
    pairs = zip(routing.token_index.tolist(), routing.expert_index.tolist(), strict=True)
    return sorted(p for p, kept in zip(pairs, routing.kept.tolist(), strict=True) if kept)


def test_capacity_drops_exactly_the_lowest_gates_beyond_capacity():
    # 4 tokens, 2 experts, K=1, cf=1.0 -> capacity ceil(1*1*4/2) = 2
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    routing = top1(probs)  # expert 0 gets tokens 0 (.9), 1 (.6), 2 (.7); expert 1 gets token 3
    assert expert_capacity(4, 2, 1, 1.0) == 2
    capped = mask_capacity(routing, 1.0, top_k=1)
    assert capped.num_assignments == 4  # static shape: the dropped assignment stays, with gate 0
    assert kept_pairs(capped) == [
        (0, 0),
        (2, 0),
        (3, 1),
    ]  # token 1 (gate .6, the lowest on expert 0) is dropped
    dropped = ~capped.kept
    assert capped.token_index[dropped].tolist() == [1] and capped.weight[dropped].tolist() == [0.0]
    assert capped.dropped.item() == 1
    assert count_per_expert(capped.expert_index, 2, capped.kept).tolist() == [2, 1]
    assert capped.tokens_per_expert.tolist() == [3, 1]  # the experts' groups still hold every assignment
    assert S.drop_rate(1, 3) == pytest.approx(0.25)
    roomy = mask_capacity(routing, 2.0, top_k=1)
    assert roomy.dropped.item() == 0 and bool(roomy.kept.all())


def test_capacity_in_the_moe_layer_and_counters():
    from testbed.config import MoEConfig
    from testbed.metrics.stats import RoutingStats
    from testbed.model.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(
        16,
        MoEConfig(num_experts=4, expert_hidden=8, capacity_factor=0.5),
        TopKSoftmaxConfig(top_k=2),
        layer_index=0,
    ).eval()
    stats = RoutingStats(1, 1, 4)
    _, out, _ = layer_step(layer, torch.randn(1, 40, 16), RoutingContext(1, 40), stats=stats)
    capacity = math.ceil(0.5 * 2 * 40 / 4)
    kept = out.routing.kept
    assert count_per_expert(out.routing.expert_index, 4, kept).max().item() <= capacity
    assert out.routing.num_assignments == 80 and out.routing.tokens_per_expert.sum().item() == 80
    assert kept.sum().item() + out.routing.dropped.item() == 80
    assert stats.dropped[0].item() == out.routing.dropped.item() > 0
    assert stats.counts[0].sum().item() == kept.sum().item()  # the counters see the kept assignments only


@pytest.mark.parametrize("scope", ["sequence", "micro_batch", "global"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
@pytest.mark.parametrize("router", ["topk_softmax", "sigmoid"])
def test_masked_capacity_in_the_layer_equals_removing_the_dropped_assignments(
    router, capacity_factor, scope, monkeypatch
):
    """The layer's static-shape capacity (`mask_capacity`: dropped assignments kept at gate 0, `Routing.kept`)
    gives the same outputs, gradients, aux-loss values, expert-bias loads and routing metrics as removing them
    (`apply_capacity`, the reference form in testbed/routing/capacity.py)."""
    import testbed.model.moe as moe_module
    from testbed.config import MoEConfig
    from testbed.losses.expert_bias import ExpertBiasBalance, ExpertBiasConfig
    from testbed.losses.orthogonality import OrthogonalityConfig, OrthogonalityLoss
    from testbed.losses.variance import VarianceConfig, VarianceLoss
    from testbed.losses.z_loss import ZLoss, ZLossConfig
    from testbed.metrics.per_layer import per_layer, spec_metrics
    from testbed.metrics.stats import RoutingStats
    from testbed.model.moe import MoELayer
    from testbed.routing import ROUTERS

    class GatedOrthogonality(OrthogonalityLoss):
        name = "gated_orthogonality"

    _, config_cls = ROUTERS.get(router)
    losses = [
        LoadBalanceLoss(LoadBalanceConfig(scope=scope)),
        ExpertBiasBalance(ExpertBiasConfig(scope=scope, sequence_coefficient=1.0)),
        OrthogonalityLoss(OrthogonalityConfig(coefficient=1.0)),
        GatedOrthogonality(OrthogonalityConfig(coefficient=1.0, gated=True, normalize=True)),
        ZLoss(ZLossConfig()),
        VarianceLoss(VarianceConfig(coefficient=1.0)),
    ]
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=8, expert_hidden=16, capacity_factor=capacity_factor, num_shared_experts=1)
    layer = MoELayer(32, moe, config_cls(top_k=2), 0, num_domains=4).train()
    batch, seq = 2, 24
    tokens = batch * seq
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, seq, 32, generator=generator) for _ in range(2)]  # two micro-batches
    domain_ids = torch.randint(0, 4, (tokens,), generator=generator)
    correct = torch.rand(tokens, generator=generator) < 0.5
    token_mask = torch.rand(tokens, generator=generator) < 0.7

    def run(capacity):
        monkeypatch.setattr(moe_module, "mask_capacity", capacity)
        layer.zero_grad(set_to_none=True)
        state, stats = GlobalScopeState(), RoutingStats(1, 4, 8)
        bias = losses[1]
        bias.sums.clear(), bias.groups.clear()
        state.start_step()
        inputs = [x.clone().requires_grad_(True) for x in xs]
        ys, routings, loss_values, total = [], [], [], 0.0
        for i, x in enumerate(inputs):
            if i > 0:
                state.next_micro_batch()
            context = RoutingContext(batch, seq, domain_ids=domain_ids, scope_state=state)
            y, out, terms = layer_step(layer, x, context, losses, stats, observe=True)
            ys.append(y)
            routings.append(out.routing)
            loss_values.append(terms)
            total = total + (y * torch.linspace(-1, 1, 32)).square().mean() + sum(terms.values())
        total.backward()
        stats.update_accuracy(0, routings[0], correct)
        stats.update_stiffness(0, routings[0], routings[1], token_mask)
        grads = [x.grad for x in inputs] + [p.grad for p in layer.parameters()]
        loads = (bias.sums[0], bias.groups[0])
        return ys, grads, loss_values, loads, routings, per_layer(stats), spec_metrics(stats, ["layer0"])

    masked = run(mask_capacity)
    assert masked[4][0].kept is not None and masked[4][0].num_assignments == 2 * tokens
    removed = run(apply_capacity)
    assert removed[4][0].kept is None and removed[4][0].num_assignments < 2 * tokens
    for a, b in zip(masked[0] + masked[1], removed[0] + removed[1], strict=True):
        assert torch.isfinite(a).all()  # no NaN from the orthogonality loss's empty slots either
        torch.testing.assert_close(a, b)
    for a, b in zip(masked[2], removed[2], strict=True):
        assert a.keys() == b.keys() and len(a) == len(losses)
        for name in a:
            torch.testing.assert_close(a[name], b[name], msg=name)
    for a, b in zip(masked[3], removed[3], strict=True):
        torch.testing.assert_close(a, b)
    assert masked[5][0].keys() == removed[5][0].keys()
    for name, value in masked[5][0].items():
        assert value == pytest.approx(removed[5][0][name], rel=1e-9, abs=1e-12, nan_ok=True), name
    assert masked[5][0]["drop_rate"] > 0 and masked[5][0]["routing_stiffness"] > 0
    assert masked[6].keys() == removed[6].keys()
    assert masked[6] == pytest.approx(removed[6], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["balance=expert_bias"], {"balance.name": "expert_bias", "balance.scope": "global"}),
        (
            ["router=sigmoid", "balance=expert_bias"],
            {"router.name": "sigmoid", "balance.name": "expert_bias"},
        ),
        (["balance.scope=global"], {"balance.name": "load_balance", "balance.scope": "global"}),
        (["balance.scope=sequence"], {"balance.scope": "sequence", "balance.coefficient": 1e-2}),
        (
            ["router=sinkhorn", "balance=none", "router.scope=global"],
            {"router.name": "sinkhorn", "router.scope": "global", "balance.name": "none"},
        ),
        (
            ["balance=expert_bias", "balance.sequence_coefficient=1e-4", "aux_loss=[z_loss]"],
            {"balance.sequence_coefficient": 1e-4, "balance.gamma": 1e-3, "aux_loss": ["z_loss"]},
        ),
        (
            ["model.moe.capacity_factor=1.25"],
            {"model.moe.capacity_factor": 1.25, "router.name": "topk_softmax"},
        ),
        (
            ["router=expert_choice", "balance=none", "router.capacity_factor=1.5"],
            {"router.capacity_factor": 1.5, "model.moe.capacity_factor": None},
        ),
        (
            ["router=balanced_assignment", "balance=none", "router.scope=sequence"],
            {"router.scope": "sequence"},
        ),
    ],
)
def test_valid_balancing_combinations(overrides, expected):
    """Combinations that work are accepted, typed, and keep what was asked (scopes as their Scope member)."""
    run = parse_config(compose(overrides))
    for dotted, value in expected.items():
        if dotted == "aux_loss":
            assert list(run.aux_loss) == value
            continue
        node = run
        for part in dotted.split("."):
            node = getattr(node, part)
        assert node == value, dotted
        if dotted.endswith(".scope"):
            assert isinstance(node, Scope)


def test_reference_precision_by_hand():
    n = np.zeros((4, 8))
    for d in range(4):
        n[d, 2 * d : 2 * d + 2] = 10
    assert S.reference_precision(n) == 1.0
    rng = np.random.default_rng(0)
    assert S.reference_precision(n[:, rng.permutation(8)]) == 1.0  # any relabeling of experts
    assert S.reference_precision(np.full((4, 8), 5.0)) == pytest.approx(2 / 8)  # uniform: |B_d| / E
    # 2 domains, 3 experts: blocks of sizes 2 and 1. Best: domain 0 -> {0, 2}, domain 1 -> {1}
    n = np.array([[5.0, 1.0, 4.0], [0.0, 6.0, 4.0]])
    assert S.reference_precision(n) == pytest.approx((5 + 4 + 6) / 20)
