"""GPU checks (skipped without CUDA): the MoE path makes no device-to-host synchronization."""

import pytest
import torch

from testbed.config import MoEConfig
from testbed.losses.load_balance import LoadBalanceConfig, LoadBalanceLoss
from testbed.losses.orthogonality import OrthogonalityConfig, OrthogonalityLoss
from testbed.losses.scope import GlobalScopeState
from testbed.losses.variance import VarianceConfig, VarianceLoss
from testbed.losses.z_loss import ZLoss, ZLossConfig
from testbed.metrics.stats import RoutingStats
from testbed.model.moe import MoELayer
from testbed.routing import ROUTERS, RoutingContext

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("router", ["topk_softmax", "sigmoid", "expert_choice", "oracle", "sinkhorn", "hash"])
def test_moe_layer_step_makes_no_host_sync(router):
    _, config_cls = ROUTERS.get(router)
    losses = [
        LoadBalanceLoss(LoadBalanceConfig(scope="global")),
        ZLoss(ZLossConfig()),
        VarianceLoss(VarianceConfig(coefficient=1.0)),
    ]
    if router != "expert_choice":  # per-token losses under expert choice read the per-token maximum
        losses.append(OrthogonalityLoss(OrthogonalityConfig(coefficient=1.0)))
    layer = MoELayer(
        256, MoEConfig(num_experts=16, expert_hidden=256), config_cls(), losses, 0, num_domains=8
    )
    layer = layer.cuda().train()
    x = torch.randn(4, 256, 256, device="cuda", requires_grad=True)
    token_ids = torch.randint(0, 4096, (1024,), device="cuda")
    domain_ids = torch.randint(0, 8, (1024,), device="cuda")
    extras = {"scope_state": GlobalScopeState(), "routing_stats": RoutingStats(1, 8, 16, "cuda")}
    context = RoutingContext(4, 256, token_ids=token_ids, domain_ids=domain_ids, extras=extras)
    layer(x, context)  # warm-up: lazy initialization may synchronize once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, out = layer(x, context)
        (y.float().square().mean() + sum(out.losses.values())).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
