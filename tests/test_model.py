"""The decoder LM: dense first blocks, shared experts, causality, loop == grouped end to end."""

import torch

from testbed.config import ModelConfig, MoEConfig
from testbed.losses.load_balance import LoadBalanceConfig, LoadBalanceLoss
from testbed.losses.z_loss import ZLoss, ZLossConfig
from testbed.model import MoELayer, MoETransformer
from testbed.routing import RoutingContext
from testbed.routing.topk_softmax import TopKSoftmaxConfig
from testbed.train.module import model_loss_terms


def small_model(backend="grouped", **overrides):
    torch.manual_seed(0)
    moe = MoEConfig(
        num_experts=6,
        expert_hidden=16,
        backend=backend,
        num_shared_experts=overrides.pop("num_shared_experts", 0),
    )
    config = ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=2, moe=moe, **overrides)
    return MoETransformer(config, TopKSoftmaxConfig(top_k=2))


LOSSES = [LoadBalanceLoss(LoadBalanceConfig())]


def test_dense_first_blocks():
    model = small_model(dense_layers=1)
    assert [layer.layer_index for layer in model.moe_layers] == [1, 2]
    assert [layer.moe_index for layer in model.moe_layers] == [0, 1]
    ids = torch.randint(0, 50, (2, 7))
    logits, records = model(ids)
    assert logits.shape == (2, 7, 50) and len(records) == 2
    assert set(model_loss_terms(model, LOSSES, records, ids)) == {"load_balance"}


def test_shared_experts_add_a_dense_path():
    torch.manual_seed(0)
    layer = MoELayer(
        16,
        MoEConfig(num_experts=4, expert_hidden=8, num_shared_experts=2),
        TopKSoftmaxConfig(top_k=1),
        layer_index=0,
    )
    assert layer.shared.w_out.in_features == 2 * 8
    x = torch.randn(1, 5, 16)
    y, out = layer(x, RoutingContext(1, 5))
    routed = layer.experts(x.view(5, 16), out.routing)
    torch.testing.assert_close(y.view(5, 16), routed + layer.shared(x.view(5, 16)))


def test_causal_future_tokens_do_not_change_the_past():
    model = small_model().eval()
    ids = torch.randint(0, 50, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 50
    a, _ = model(ids)
    b, _ = model(changed)
    torch.testing.assert_close(a[0, :6], b[0, :6])
    assert not torch.allclose(a[0, 6:], b[0, 6:])


def test_loop_and_grouped_models_agree_with_gradients():
    loop, grouped = small_model("loop"), small_model("grouped")
    grouped.load_state_dict(loop.state_dict())
    ids = torch.randint(0, 50, (2, 9))
    grads = []
    for model in (loop, grouped):
        logits, records = model(ids)
        loss = logits.logsumexp(-1).mean() + model_loss_terms(model, LOSSES, records, ids)["load_balance"]
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        torch.testing.assert_close(logits, loop(ids)[0], rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_unknown_model_arguments_are_refused_and_the_context_is_not_mutated():
    import pytest

    model = small_model()
    ids = torch.randint(0, 50, (2, 8))
    with pytest.raises(TypeError, match="'scope_stat'"):
        model(ids, scope_stat=None)  # a typo is an error, not silently ignored
    context = RoutingContext(2, 8)
    layer = model.moe_layers[-1]
    layer(torch.randn(2, 8, 32), context)
    assert layer.layer_index > 0
    assert context.layer_index == 0 and context.max_experts_per_token is None  # frozen, per-layer copies


def test_the_model_is_pure_and_training_computes_each_loss_from_the_records():
    """The forward pass returns one record per MoE layer and computes no loss; the training module's
    `model_loss_terms` is each loss on each layer's record (with that layer's context), averaged over
    layers; a second forward of the same batch gives the same records (no state kept inside)."""
    model = small_model(dense_layers=1).train()
    ids = torch.randint(0, 50, (2, 7))
    _, records = model(ids)
    _, again = model(ids)
    for a, b in zip(records, again, strict=True):
        torch.testing.assert_close(a.routing.probs, b.routing.probs)
        assert torch.equal(a.routing.expert_index, b.routing.expert_index)
    losses = [LoadBalanceLoss(LoadBalanceConfig()), ZLoss(ZLossConfig())]
    terms = model_loss_terms(model, losses, records, ids)
    context = model.routing_context(ids)
    for loss in losses:
        layers = zip(model.moe_layers, records, strict=True)
        by_hand = [loss(r.routing, layer.layer_context(context)) for layer, r in layers]
        torch.testing.assert_close(terms[loss.name], torch.stack(by_hand).mean())
    assert [record.expert_outputs.shape[0] for record in records] == [2 * 7 * 2] * 2  # top-2
