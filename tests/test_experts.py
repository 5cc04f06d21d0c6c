"""Expert backends: grouped == loop (forward and backward), and both equal a per-token brute force."""

import pytest
import torch

from testbed.model.experts import ExpertBank, swiglu
from testbed.routing import routing_from_choices


def routing_with_empty_experts(num_tokens, num_experts, top_k, seed=0):
    """A routing that never uses the last two experts (empty groups in the grouped GEMM)."""
    g = torch.Generator().manual_seed(seed)
    usable = num_experts - 2
    scores = torch.rand(num_tokens, usable, generator=g)
    chosen = scores.topk(top_k, dim=-1).indices
    gates = torch.rand(num_tokens, top_k, generator=g)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    return routing_from_choices(logits, logits.softmax(-1), chosen, gates)


def brute_force(bank, x, routing):
    y = torch.zeros_like(x)
    for t, e, w in zip(
        routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight, strict=True
    ):
        y[t] += w * (swiglu(x[t] @ bank.w_in[e]) @ bank.w_out[e])
    return y


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(37, 8, 2), (64, 6, 1), (5, 10, 3)])
def test_grouped_equals_loop_forward_and_backward(num_tokens, num_experts, top_k):
    torch.manual_seed(0)
    loop = ExpertBank(num_experts, 16, 24, backend="loop")
    grouped = ExpertBank(num_experts, 16, 24, backend="grouped")
    grouped.load_state_dict(loop.state_dict())
    routing = routing_with_empty_experts(num_tokens, num_experts, top_k)
    assert routing.tokens_per_expert[-2:].tolist() == [0, 0]
    x = torch.randn(num_tokens, 16)
    upstream = torch.randn(num_tokens, 16)
    grads = []
    for bank in (loop, grouped):
        xi = x.clone().requires_grad_(True)
        weight = routing.weight.clone().requires_grad_(True)
        r = type(routing)(**{**routing.__dict__, "weight": weight})
        y = bank(xi, r)
        (y * upstream).sum().backward()
        grads.append((y.detach(), xi.grad, weight.grad, bank.w_in.grad, bank.w_out.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # experts with no tokens get exactly zero gradient
    assert grads[1][3][-2:].abs().max() == 0 and grads[1][4][-2:].abs().max() == 0
    torch.testing.assert_close(grads[0][0], brute_force(loop, x, routing).detach(), rtol=1e-5, atol=1e-5)


def test_tokens_without_experts_get_zero_output():
    bank = ExpertBank(4, 8, 8, backend="grouped")
    logits = torch.zeros(3, 4)
    r = routing_from_choices(logits, logits.softmax(-1), torch.tensor([[1], [1], [2]]), torch.ones(3, 1))
    # drop token 2's only assignment by hand: it must come out as zeros
    keep = r.token_index != 2
    r.token_index, r.expert_index, r.weight = r.token_index[keep], r.expert_index[keep], r.weight[keep]
    r.tokens_per_expert = torch.tensor([0, 2, 0, 0])
    y = bank(torch.randn(3, 8), r)
    assert torch.all(y[2] == 0) and torch.all(y[0] != 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_equals_loop_on_cuda_bf16():
    torch.manual_seed(0)
    loop = ExpertBank(8, 64, 64, backend="loop").cuda()
    grouped = ExpertBank(8, 64, 64, backend="grouped").cuda()
    grouped.load_state_dict(loop.state_dict())
    routing = routing_with_empty_experts(256, 8, 2)
    routing = type(routing)(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in routing.__dict__.items()})
    x = torch.randn(256, 64, device="cuda")
    torch.testing.assert_close(grouped(x, routing), loop(x, routing), rtol=3e-2, atol=3e-2)
