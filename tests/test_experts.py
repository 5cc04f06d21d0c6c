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


def reference_path(bank, x, routing):
    """The plain-indexing data path: x[token_index] in x's dtype, one matmul pair per expert, gates
    applied per assignment and an index_add_ over tokens."""
    x_sorted = x[routing.token_index]
    chunks = []
    for expert, x_e in enumerate(x_sorted.split(routing.tokens_per_expert.tolist())):
        chunks.append(swiglu(x_e @ bank.w_in[expert]) @ bank.w_out[expert])
    outputs = torch.cat(chunks)
    y = torch.zeros_like(x)
    return y.index_add(0, routing.token_index, outputs * routing.weight.unsqueeze(-1))


def run_backward(path, bank, x, routing, upstream):
    """y and the gradients of x, the gates, w_in and w_out through `path(bank, x, routing)`."""
    bank.zero_grad()
    xi = x.clone().requires_grad_(True)
    weight = routing.weight.clone().requires_grad_(True)
    r = type(routing)(**{**routing.__dict__, "weight": weight})
    y = path(bank, xi, r)
    (y.float() * upstream).sum().backward()
    return y, (y.detach(), xi.grad, weight.grad, bank.w_in.grad.clone(), bank.w_out.grad.clone())


@pytest.mark.parametrize("backend", ["loop", "grouped"])
@pytest.mark.parametrize("num_tokens,top_k", [(37, 2), (64, 1), (5, 3)])
def test_permutation_data_path_equals_plain_indexing(backend, num_tokens, top_k):
    """Dispatch and combine by permutations (gathers forward and backward, a batched gate product) give
    the values and gradients of plain indexing with an index_add_ combine, and the backward graph has no
    accumulating index op."""
    torch.manual_seed(1)
    bank = ExpertBank(8, 16, 24, backend=backend)
    routing = routing_with_empty_experts(num_tokens, 8, top_k, seed=3)
    x, upstream = torch.randn(num_tokens, 16), torch.randn(num_tokens, 16)
    y, new = run_backward(lambda b, xi, r: b(xi, r), bank, x, routing, upstream)
    _, ref = run_backward(reference_path, bank, x, routing, upstream)
    for a, b in zip(new, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    names, stack, seen = set(), [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [next_fn for next_fn, _ in node.next_functions]
    assert {"_DispatchRowsBackward", "_PermuteRowsBackward"} <= names
    assert not names & {"IndexBackward0", "IndexPutBackward0", "IndexAddBackward0", "ScatterAddBackward0"}


def test_permutation_data_path_is_deterministic_and_handles_capacity_drops():
    """Two backward passes agree bit for bit; assignments dropped by capacity (kept in place with gate 0)
    contribute nothing, as in the index_add_ reference."""
    from testbed.routing.capacity import mask_capacity

    torch.manual_seed(2)
    bank = ExpertBank(8, 16, 24, backend="grouped")
    routing = mask_capacity(routing_with_empty_experts(40, 8, 2, seed=4), 0.75, 2)
    assert routing.kept is not None and not bool(routing.kept.all())
    x, upstream = torch.randn(40, 16), torch.randn(40, 16)
    _, first = run_backward(lambda b, xi, r: b(xi, r), bank, x, routing, upstream)
    _, second = run_backward(lambda b, xi, r: b(xi, r), bank, x, routing, upstream)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    _, ref = run_backward(reference_path, bank, x, routing, upstream)
    for a, b in zip(first, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_data_path_matches_the_fp32_reference():
    """compute_dtype bf16 (what the grouped backend uses on CUDA), here on CPU: one cast before dispatch,
    bf16 gather, GEMMs and combine, y back in the input's dtype; within bf16 tolerance of the fp32
    reference, the expert outputs handed to losses in bf16, gradients reaching x, gates and weights."""
    torch.manual_seed(3)
    bank = ExpertBank(8, 16, 24, backend="grouped")
    routing = routing_with_empty_experts(48, 8, 2, seed=5)
    x, upstream = torch.randn(48, 16), torch.randn(48, 16)
    _, ref = run_backward(reference_path, bank, x, routing, upstream)
    bank.compute_dtype = torch.bfloat16
    y, new = run_backward(lambda b, xi, r: b(xi, r), bank, x, routing, upstream)
    assert y.dtype == torch.float32 and new[1].dtype == torch.float32
    assert bank(x, routing, return_expert_outputs=True)[1].dtype == torch.bfloat16
    for a, b in zip(new, ref, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)
