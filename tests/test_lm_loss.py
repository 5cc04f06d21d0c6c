"""Speed paths that must not change results: chunked LM head + cross-entropy, fp32 grouped GEMM under
torch.compile, the loop backend's unbind; and the routing-change metric and router optimizer group."""

import pytest
import torch
import torch.nn.functional as F

from testbed.config import parse_config
from testbed.model.experts import ExpertBank, grouped_matmul, grouped_mm_fp32
from testbed.model.lm_loss import IGNORE_INDEX, linear_cross_entropy
from testbed.train.callbacks import routing_change_metrics
from testbed.train.module import MoELanguageModel
from tests.conftest import compose


@pytest.mark.parametrize("chunk_size", [7, 64, 1000])
def test_chunked_cross_entropy_equals_plain_in_value_and_gradients(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (50,))
    targets[[3, 17]] = IGNORE_INDEX
    plain = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    grads = torch.autograd.grad(plain * 3.0, (hidden, weight))
    chunked = linear_cross_entropy(hidden, weight, targets, chunk_size)
    chunked_grads = torch.autograd.grad(chunked * 3.0, (hidden, weight))  # upstream gradient scales
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for got, want in zip(chunked_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_chunked_cross_entropy_is_exact_for_confident_wrong_predictions():
    """The log-sum-exp comes from the softmax's largest entry, which never underflows: a target 200 nats
    below the maximum still gives loss 200, not inf."""
    hidden = torch.ones(1, 1)
    weight = torch.tensor([[0.0], [200.0]])
    loss = linear_cross_entropy(hidden, weight, torch.tensor([0]))
    assert loss.item() == pytest.approx(200.0)


def test_fp32_grouped_op_matches_grouped_mm_and_compiles_without_graph_breaks():
    torch.manual_seed(0)
    a = torch.randn(40, 8, requires_grad=True)
    b = torch.randn(4, 8, 16, requires_grad=True)
    offsets = torch.tensor([10, 10, 25, 40], dtype=torch.int32)  # an empty group too
    want = F.grouped_mm(a, b, offs=offsets)
    want_grads = torch.autograd.grad(want.square().sum(), (a, b))
    got = grouped_mm_fp32(a, b, offsets)
    got_grads = torch.autograd.grad(got.square().sum(), (a, b))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
    compiled = torch.compile(lambda a, b, o: grouped_matmul(a, b, o).square().sum(), backend="aot_eager")
    explanation = torch._dynamo.explain(compiled)(a, b, offsets)
    assert explanation.graph_break_count == 0
    torch.testing.assert_close(compiled(a, b, offsets), want.square().sum())


def test_loop_backend_gives_every_expert_its_own_gradient():
    torch.manual_seed(0)
    bank = ExpertBank(4, 8, 16, backend="loop")
    x_sorted = torch.randn(12, 8)
    out = bank._loop(x_sorted, torch.tensor([3, 0, 5, 4]))
    out.sum().backward()
    assert bank.w_in.grad[1].abs().sum() == 0  # expert 1 got no tokens
    assert all(bank.w_in.grad[e].abs().sum() > 0 for e in (0, 2, 3))


def test_routing_change_by_hand():
    before = torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1]])
    after = torch.tensor([[0, 1, 3, 3], [0, 0, 1, 1]])
    out = routing_change_metrics(before, after, ["layer0", "layer1"])
    assert out == {
        "spec/routing_change/layer0": 0.25,
        "spec/routing_change/layer1": 0.5,
        "spec/routing_change/mean": 0.375,
    }


def test_router_parameters_get_their_own_learning_rate_and_decay():
    run = parse_config(
        compose(["model=micro", "optim.router_lr_scale=0.1", "optim.router_weight_decay=false"])
    )
    module = MoELanguageModel(run, ["a", "b"])
    optimizer = module.configure_optimizers()["optimizer"]
    router_group = optimizer.param_groups[-1]
    gates = {id(layer.router.gate.weight) for layer in module.model.moe_layers}
    assert {id(p) for p in router_group["params"]} == gates
    assert router_group["initial_lr"] == pytest.approx(run.optim.lr * 0.1)  # before the warmup factor
    assert router_group["weight_decay"] == 0.0
    others = [id(p) for group in optimizer.param_groups[:-1] for p in group["params"]]
    assert not gates & set(others)


def test_router_logits_stay_fp32_under_bf16_autocast():
    from testbed.routing import ROUTERS

    router_cls, config_cls = ROUTERS.get("topk_softmax")
    router = router_cls(16, 4, config_cls())
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router.router_logits(x)
        plain = router.gate(x)
    assert logits.dtype == torch.float32 and plain.dtype == torch.bfloat16
    torch.testing.assert_close(logits, x @ router.gate.weight.t())
