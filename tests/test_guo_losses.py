"""Guo et al. losses (orthogonality, variance), coefficient calibration, and post-training freezing."""

import math

import pytest
import torch
from hydra.errors import ConfigCompositionException

from testbed.config import MoEConfig
from testbed.losses.orthogonality import OrthogonalityConfig, OrthogonalityLoss, projection_energy
from testbed.losses.variance import VarianceConfig, VarianceLoss
from testbed.model.moe import MoELayer
from testbed.routing import RoutingContext, routing_from_choices
from testbed.routing.expert_choice import ExpertChoiceConfig
from testbed.routing.topk_softmax import TopKSoftmaxConfig
from tests.conftest import compose, layer_step, synth_overrides


def orthogonality(routing, outputs, **options):
    loss = OrthogonalityLoss(OrthogonalityConfig(coefficient=1.0, **options))
    return loss(routing, RoutingContext(1, routing.num_tokens), outputs)


def two_expert_routing(num_tokens=1):
    probs = torch.full((num_tokens, 3), 1 / 3)
    return routing_from_choices(
        probs, probs, torch.tensor([[0, 1]] * num_tokens), torch.full((num_tokens, 2), 0.5)
    )


def test_mutually_orthogonal_outputs_give_zero():
    routing = two_expert_routing()
    assert orthogonality(routing, torch.tensor([[3.0, 0, 0], [0, 2.0, 0]])).item() == pytest.approx(
        0.0, abs=1e-12
    )
    energy = projection_energy(torch.eye(4).unsqueeze(0) * 5)  # 4 orthogonal outputs
    assert torch.allclose(energy, torch.zeros(1, 4))


def test_identical_outputs_give_full_projection_energy():
    v = torch.tensor([1.0, 2.0, 2.0])  # ||v||^2 = 9: each output lies in the other's span
    routing = two_expert_routing()
    assert orthogonality(routing, torch.stack([v, v])).item() == pytest.approx(9.0, rel=1e-5)
    assert orthogonality(routing, torch.stack([v, v]), normalize=True).item() == pytest.approx(1.0, rel=1e-5)
    # at 60 degrees: projection energy ||v||^2 cos^2 = 9/4 per assignment
    w = torch.tensor([1.0, 0.0, 0.0]) * 3
    u = torch.tensor([0.5, math.sqrt(3) / 2, 0.0]) * 3
    assert orthogonality(routing, torch.stack([w, u])).item() == pytest.approx(9 / 4, rel=1e-5)


def test_normalized_form_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    routing = two_expert_routing(5)
    outputs = torch.randn(10, 6, generator=g)
    base = orthogonality(routing, outputs, normalize=True)
    assert orthogonality(routing, outputs * 37.0, normalize=True).item() == pytest.approx(
        base.item(), rel=1e-5
    )
    assert orthogonality(routing, outputs * 2.0).item() == pytest.approx(
        4 * orthogonality(routing, outputs).item()
    )


def brute_force_orthogonality(routing, outputs, eps=1e-6):
    """Per token, per assignment: Gram-Schmidt over the other outputs of that token, in a plain loop."""
    total = 0.0
    for t in range(routing.num_tokens):
        rows = [i for i in range(routing.num_assignments) if routing.token_index[i] == t]
        for k in rows:
            basis = []
            for j in rows:
                if j == k:
                    continue
                v = outputs[j].double()
                for q in basis:
                    v = v - (q @ v) * q
                basis.append(v / (v.norm() + eps))
            total += sum(float((q @ outputs[k].double()) ** 2) for q in basis)
    return total / routing.num_assignments


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_variable_experts_per_token_match_a_per_token_loop(capacity_factor):
    torch.manual_seed(0)
    x = torch.randn(1, 24, 8)
    for router in (TopKSoftmaxConfig(top_k=3), ExpertChoiceConfig(top_k=2, capacity_factor=1.0)):
        moe = MoEConfig(
            num_experts=6,
            expert_hidden=8,
            capacity_factor=capacity_factor if router.name == "topk_softmax" else None,
        )
        layer = MoELayer(8, moe, router, layer_index=0).train()
        routing = layer.router(x.view(24, 8), RoutingContext(1, 24))
        if capacity_factor is not None and router.name == "topk_softmax":
            from testbed.routing.capacity import apply_capacity

            routing = apply_capacity(routing, capacity_factor, 3)
        outputs = layer.experts.expert_outputs(x.view(24, 8), routing)
        counts = torch.zeros(24).index_add_(0, routing.token_index, torch.ones(routing.num_assignments))
        if router.name == "topk_softmax" and capacity_factor is None:
            assert torch.all(counts == 3)
        else:  # expert choice / capacity drops: some tokens have fewer than 2 experts, some more
            assert counts.min() < 2 <= counts.max()
        loss = OrthogonalityLoss(OrthogonalityConfig(coefficient=1.0))
        max_k = 3 if router.name == "topk_softmax" else None
        value = loss(routing, RoutingContext(1, 24, max_experts_per_token=max_k), outputs)
        assert value.item() == pytest.approx(brute_force_orthogonality(routing, outputs.detach()), rel=1e-4)


def test_variance_of_one_hot_and_uniform():
    num_experts = 8
    one_hot = torch.nn.functional.one_hot(torch.arange(4) % num_experts, num_experts).float()
    uniform = torch.full((4, num_experts), 1 / num_experts)
    loss = VarianceLoss(VarianceConfig(coefficient=1.0))
    for probs, expected in ((one_hot, -1 / num_experts), (uniform, 0.0)):  # unbiased Var of one-hot = 1/E
        routing = routing_from_choices(probs, probs, probs.argmax(-1, keepdim=True), torch.ones(4, 1))
        assert loss(routing, RoutingContext(1, 4)).item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(
    "first,target,expected",
    [
        (0.0042, 1e-3, 0.1),
        (2.5, 1e-4, 1e-4),
        (-0.0123, 1e-3, 0.1),
        (0.05, 1e-4, 1e-3),
        (0.032, 1e-3, 0.01),
        (0.0316, 1e-3, 0.1),
    ],
)
def test_calibration_picks_the_power_of_ten(first, target, expected):
    # w = 10^round(log10(target / |L|)): 1e-3/0.0042 = 0.238 -> 10^-1; 1e-4/2.5 -> 10^-4.4 -> 1e-4; ...
    loss = VarianceLoss(VarianceConfig(coefficient="auto", target=target))
    assert loss.calibrate(first) == pytest.approx(expected)


def layer_pair(router_config):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=6, expert_hidden=8)
    return [MoELayer(8, moe, router_config, layer_index=i).train() for i in range(2)]


def test_orthogonality_gradients_reach_experts_and_routers():
    loss = OrthogonalityLoss(OrthogonalityConfig(coefficient=1.0))
    first, second = layer_pair(TopKSoftmaxConfig(top_k=2))
    x = torch.randn(2, 10, 8)
    hidden, _ = first(x, RoutingContext(2, 10))
    _, _, terms = layer_step(second, x + hidden, RoutingContext(2, 10), [loss])
    terms["orthogonality"].backward()
    assert second.experts.w_in.grad.abs().sum() > 0 and second.experts.w_out.grad.abs().sum() > 0
    assert first.router.gate.weight.grad.abs().sum() > 0  # through the hidden states
    assert second.router.gate.weight.grad is None  # pre-gate outputs do not depend on this router
    gated = OrthogonalityLoss(OrthogonalityConfig(coefficient=1.0, gated=True))
    layer = layer_pair(TopKSoftmaxConfig(top_k=2))[0]
    _, _, terms = layer_step(layer, x, RoutingContext(2, 10), [gated])
    terms["orthogonality"].backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0  # gated form: this router too


def test_variance_gradient_reaches_the_router():
    layer = layer_pair(TopKSoftmaxConfig(top_k=2))[0]
    loss = VarianceLoss(VarianceConfig(coefficient=1.0))
    _, _, terms = layer_step(layer, torch.randn(2, 10, 8), RoutingContext(2, 10), [loss])
    terms["variance"].backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_finetune_trainable_is_one_of_its_options_at_composition():
    with pytest.raises(ConfigCompositionException) as info:
        compose(["finetune.trainable=experts"])
    assert "full_key: finetune.trainable" in str(info.value.__cause__)
    assert "expected one of [all, routers, routers_and_experts]" in str(info.value.__cause__)


def test_losses_compose_from_the_command_line_and_calibrate(synth_mix, tmp_path):
    from testbed.train.cli import run_training

    summary = run_training(
        compose(
            synth_overrides(
                synth_mix,
                "aux_loss=[z_loss,orthogonality,variance]",
                "trainer.log_every_n_steps=1",
                "trainer.max_steps=4",
            )
        ),
        tmp_path,
        quiet=True,
    )
    coefficients = summary["coefficients"]
    assert coefficients["z_loss"] == 1e-3 and coefficients["load_balance"] == 1e-2
    for name in ("orthogonality", "variance"):  # calibrated: a power of ten
        assert math.log10(coefficients[name]) == pytest.approx(round(math.log10(coefficients[name])))
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {
        "train/aux/orthogonality",
        "train/aux/variance",
        "spec/expert_overlap/mean",
        "spec/routing_variance/mean",
    } <= set(header)


def test_finetune_trains_only_routers_and_chosen_experts(synth_mix, tmp_path):
    from testbed.train.cli import run_training

    first = tmp_path / "pretrain"
    run_training(compose(synth_overrides(synth_mix, "trainer.max_steps=3")), first, quiet=True)
    ckpt = first / "checkpoints" / "last.ckpt"
    before = torch.load(ckpt)["state_dict"]
    post = tmp_path / "post"
    summary = run_training(
        compose(
            synth_overrides(
                synth_mix,
                f"init_from={ckpt}",
                "data.domains=[alpha]",
                "trainer.max_steps=5",
                "finetune.trainable=routers_and_experts",
                "finetune.experts=[1,4]",
            )
        ),
        post,
        quiet=True,
    )
    after = torch.load(post / "checkpoints" / "last.ckpt")["state_dict"]
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        if "router.gate" in name:
            assert changed, name
        elif ".experts.w_" in name:
            moved = [e for e in range(value.shape[0]) if not torch.equal(value[e], after[name][e])]
            assert moved == [1, 4], (name, moved)
        elif "expert_bias" not in name:
            assert not changed, name
    # trainable_params: the routers plus rows 1 and 4 of every layer's stacked expert weights
    expected = sum(
        v.numel() if "router.gate" in n else 2 * v[0].numel() if ".experts.w_" in n else 0
        for n, v in before.items()
    )
    assert summary["trainable_params"] == expected
    # the starting point is validated first: init/val/loss is the pretrained model's loss on alpha
    assert summary["init/val/loss"] == pytest.approx(summary["init/val/loss/alpha"])
    assert summary["init/val/loss"] != summary["val/loss"]
