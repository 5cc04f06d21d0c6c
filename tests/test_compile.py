"""torch.compile: the MoE layer traces into one graph with no graph breaks (dynamo.explain, CPU).

The grouped expert kernel (torch._grouped_mm) is a bf16 kernel: its fake-tensor implementation rejects
fp32, so tracing runs the layer in bf16, as training on GPU does.
"""

import math

import pytest
import torch
import torch._dynamo as dynamo

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


def explain(router: str, losses, router_options=None, with_stats=False):
    _, config_cls = ROUTERS.get(router)
    torch.manual_seed(0)
    layer = (
        MoELayer(
            32,
            MoEConfig(num_experts=8, expert_hidden=16),
            config_cls(**(router_options or {})),
            layer_index=0,
            num_domains=4,
        )
        .train()
        .to(torch.bfloat16)
    )
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16)
    token_ids, domain_ids = torch.randint(0, 100, (32,)), torch.randint(0, 4, (32,))
    state = GlobalScopeState()
    stats = RoutingStats(1, 4, 8) if with_stats else None

    def step(x, token_ids, domain_ids):  # the layer, its losses and counters, as a training step runs them
        context = RoutingContext(2, 16, token_ids=token_ids, domain_ids=domain_ids, scope_state=state)
        y, _, terms = layer_step(layer, x, context, losses, stats)
        return y, terms

    dynamo.reset()
    return dynamo.explain(step)(x, token_ids, domain_ids)


# every registered router but the one whose routing runs a host-checked loop (BA: torch.compiler.disable)
COMPILABLE = sorted(name for name in ROUTERS.names() if not ROUTERS.get(name)[0].host_sync)


@pytest.mark.parametrize("router", COMPILABLE)
def test_moe_layer_has_no_graph_breaks(router):
    result = explain(router, [LoadBalanceLoss(LoadBalanceConfig()), ZLoss(ZLossConfig())])
    assert (result.graph_count, result.graph_break_count) == (1, 0), result.break_reasons


@pytest.mark.parametrize(
    "router,options,scope",
    [
        ("topk_softmax", {}, "global"),
        ("sigmoid", {}, "sequence"),
        ("sinkhorn", {"scope": "global"}, "micro_batch"),
    ],
)
def test_guo_losses_scopes_and_counters_add_no_graph_breaks(router, options, scope):
    losses = [
        LoadBalanceLoss(LoadBalanceConfig(scope=scope)),
        OrthogonalityLoss(OrthogonalityConfig(coefficient=1.0)),
        VarianceLoss(VarianceConfig(coefficient=1.0)),
    ]
    result = explain(router, losses, options, with_stats=True)
    assert (result.graph_count, result.graph_break_count) == (1, 0), result.break_reasons


@pytest.mark.slow
def test_compiled_training_runs_and_keeps_checkpoint_names(synth_mix, tmp_path):
    """trainer.compile=true trains (aot_eager backend: the same graph capture, no code generation) and
    writes checkpoints with the same parameter names as eager runs."""
    from testbed.train.cli import run_training
    from tests.conftest import compose, synth_overrides

    summary = run_training(
        compose(
            synth_overrides(
                synth_mix,
                "trainer.compile=true",
                "trainer.compile_backend=aot_eager",
                "trainer.max_steps=4",
                "trainer.val_check_interval=4",
            )
        ),
        tmp_path,
        quiet=True,
    )
    assert summary["steps"] == 4 and math.isfinite(summary["val/loss"])
    names = torch.load(tmp_path / "checkpoints" / "last.ckpt")["state_dict"].keys()
    assert "model.blocks.0.ffn.router.gate.weight" in names and not any("_orig_mod" in n for n in names)


def test_the_balanced_assignment_auction_runs_eagerly_inside_a_compiled_router():
    """The auction (a data-dependent loop with host checks) is wrapped in torch.compiler.disable when the
    router is built, not at import: a compiled router breaks the graph there, runs the auction eagerly and
    routes exactly as the eager router."""
    router_cls, config_cls = ROUTERS.get("balanced_assignment")
    torch.manual_seed(0)
    router = router_cls(32, 8, config_cls(top_k=2)).train()
    x, context = torch.randn(64, 32), RoutingContext(4, 16)
    eager = router(x, context)
    dynamo.reset()
    compiled = torch.compile(router, backend="aot_eager")(x, context)
    assert torch.equal(compiled.expert_index, eager.expert_index)
    assert torch.equal(compiled.token_index, eager.token_index)
    torch.testing.assert_close(compiled.weight, eager.weight)
    dynamo.reset()
    result = dynamo.explain(router)(x, context)
    reasons = [str(b.reason) for b in result.break_reasons]
    assert result.graph_break_count == 1 and "torch.compiler.disable" in reasons[0], reasons
