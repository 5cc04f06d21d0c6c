"""GPU checks (skipped without CUDA): the MoE path makes no device-to-host synchronization (every router,
every loss, expert choice with orthogonality, capacity in the layer), and the token-choice combine is
deterministic. tests/test_sync_free.py checks the same on CPU with a dispatch mode."""

import pytest
import torch

from testbed.config import MoEConfig
from testbed.losses.load_balance import LoadBalanceConfig, LoadBalanceLoss
from testbed.losses.orthogonality import OrthogonalityConfig, OrthogonalityLoss
from testbed.losses.variance import VarianceConfig, VarianceLoss
from testbed.losses.z_loss import ZLoss, ZLossConfig
from testbed.metrics.stats import RoutingStats
from testbed.model.moe import MoELayer
from testbed.routing import ROUTERS, RoutingContext
from testbed.scope import GlobalScopeState
from tests.conftest import layer_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


SYNC_FREE = sorted(name for name in ROUTERS.names() if not ROUTERS.get(name)[0].host_sync)


@pytest.mark.parametrize(
    "router,capacity_factor",
    [(name, None) for name in SYNC_FREE]
    + [(name, 1.0) for name in SYNC_FREE if ROUTERS.get(name)[0].token_choice],
)
def test_moe_layer_step_makes_no_host_sync(router, capacity_factor):
    """Forward, backward, every loss and the routing counters; with capacity (token choice) too."""
    _, config_cls = ROUTERS.get(router)
    losses = [
        LoadBalanceLoss(LoadBalanceConfig(scope="global")),
        ZLoss(ZLossConfig()),
        VarianceLoss(VarianceConfig(coefficient=1.0)),
    ]
    losses.append(OrthogonalityLoss(OrthogonalityConfig(coefficient=1.0)))  # expert choice: E slots, static
    layer = MoELayer(
        256,
        MoEConfig(num_experts=16, expert_hidden=256, capacity_factor=capacity_factor),
        config_cls(),
        0,
        num_domains=8,
    )
    layer = layer.cuda().train()
    x = torch.randn(4, 256, 256, device="cuda", requires_grad=True)
    token_ids = torch.randint(0, 4096, (1024,), device="cuda")
    domain_ids = torch.randint(0, 8, (1024,), device="cuda")
    stats = RoutingStats(1, 8, 16, "cuda")
    correct = torch.rand(1024, device="cuda") < 0.5
    context = RoutingContext(
        4,
        256,
        token_ids=token_ids,
        domain_ids=domain_ids,
        scope_state=GlobalScopeState(),
    )
    layer(x, context)  # warm-up: lazy initialization may synchronize once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, out, terms = layer_step(layer, x, context, losses, stats, observe=True)
        (y.float().square().mean() + sum(terms.values())).backward()
        stats.update_accuracy(0, out.routing, correct)
        stats.update_stiffness(0, out.routing, out.routing, correct)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    if capacity_factor is not None:
        assert out.routing.kept is not None
        if router in ("topk_softmax", "sigmoid"):  # unbalanced at init: some experts overflow
            assert out.routing.dropped.item() > 0


def no_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def test_static_capacity_makes_no_host_sync_and_matches_dropping():
    from testbed.model.experts import combine
    from testbed.routing import routing_from_choices
    from testbed.routing.capacity import apply_capacity, mask_capacity

    torch.manual_seed(0)
    probs = torch.randn(4096, 32, device="cuda").softmax(-1)
    chosen = probs.topk(4, dim=-1).indices
    routing = routing_from_choices(probs.log(), probs, chosen, probs.gather(1, chosen))
    masked = no_sync(lambda: mask_capacity(routing, 1.0, 4))
    dropped = apply_capacity(routing, 1.0, 4)
    assert masked.dropped.item() == dropped.dropped.item() > 0
    outputs = torch.randn(routing.num_assignments, 64, device="cuda")
    position = {
        p: i
        for i, p in enumerate(zip(routing.token_index.tolist(), routing.expert_index.tolist(), strict=True))
    }

    def rows(capped):
        keys = zip(capped.token_index.tolist(), capped.expert_index.tolist(), strict=True)
        return outputs[torch.tensor([position[k] for k in keys], device="cuda")]

    torch.testing.assert_close(combine(rows(masked), masked, 4096), combine(rows(dropped), dropped, 4096))


def test_token_choice_combine_is_deterministic_on_cuda():
    """The permutation + [T, K, d] sum has a fixed summation order: two runs are bitwise equal."""
    from testbed.model.experts import combine
    from testbed.routing import routing_from_choices

    torch.manual_seed(0)
    probs = torch.randn(8192, 32, device="cuda").softmax(-1)
    chosen = probs.topk(4, dim=-1).indices
    routing = routing_from_choices(probs.log(), probs, chosen, probs.gather(1, chosen))
    outputs = torch.randn(routing.num_assignments, 512, device="cuda", requires_grad=True)
    first = no_sync(lambda: combine(outputs, routing, 8192))
    second = combine(outputs, routing, 8192)
    assert torch.equal(first, second)
    reference = torch.zeros_like(first).index_add_(0, routing.token_index, outputs * routing.weight[:, None])
    torch.testing.assert_close(first, reference)


def test_fsdp2_trains_checkpoints_and_resumes_on_one_gpu(synth_mix, tmp_path):
    """trainer.strategy=fsdp2 on one GPU (NCCL, bf16-mixed; the path a sharded multi-GPU run takes, with one
    shard; tests/test_ddp.py checks 2 CPU processes against DDP): training with the global balancing scope
    and the expert bias, the checkpoint, and resume=auto after a SIGTERM. Its val loss is close to the
    default strategy's (bf16 and another parameter layout: not bit-equal), and the resumed run reaches the
    uninterrupted run's numbers."""
    import json
    import signal

    from testbed.train.checkpoint import RunInterrupted
    from testbed.train.cli import run_training
    from tests.conftest import compose, synth_overrides
    from tests.test_resume import SendSignal

    base = synth_overrides(
        synth_mix,
        "trainer=gpu",
        "trainer.compile=false",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "balance=expert_bias",
        "aux_loss=[z_loss,orthogonality]",
        "metrics.plots=false",
    )
    fsdp = [*base, "trainer.strategy=fsdp2", "trainer.devices=1"]
    plain = run_training(compose(base), tmp_path / "plain", quiet=True)
    full = run_training(compose(fsdp), tmp_path / "fsdp", quiet=True)
    assert plain["status"] == full["status"] == "finished" and full["steps"] == 8
    assert abs(full["val/loss"] - plain["val/loss"]) < 0.05, (full["val/loss"], plain["val/loss"])
    run_dir = tmp_path / "resumed"
    with pytest.raises(RunInterrupted):
        run_training(compose(fsdp), run_dir, quiet=True, callbacks=(SendSignal(signal.SIGTERM, 4, True),))
    assert json.loads((run_dir / "summary.json").read_text())["checkpoint_step"] == 4
    resumed = run_training(compose([*fsdp, "resume=auto"]), run_dir, quiet=True)
    assert resumed["status"] == "finished" and resumed["steps"] == 8
    assert abs(resumed["val/loss"] - full["val/loss"]) < 1e-2, (resumed["val/loss"], full["val/loss"])
