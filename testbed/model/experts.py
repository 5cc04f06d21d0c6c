"""Expert bank (SwiGLU experts stored as stacked weights) and the dispatch backends.

Both backends compute the per-assignment expert outputs `o_{t,k}` (before gating) from the
expert-sorted assignments of a `Routing`, then combine them into y[T, d]:
- `loop`: a Python loop over experts; readable, the reference the tests compare against.
- `grouped`: two grouped matmuls (torch.nn.functional.grouped_mm) with int32 offsets, no host sync.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from testbed.model.schema import Backend
from testbed.routing.base import Routing

BACKENDS = tuple(b.value for b in Backend)


def swiglu(gate_and_up: Tensor) -> Tensor:
    gate, up = gate_and_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class ExpertBank(nn.Module):
    """E SwiGLU experts: w_in [E, d, 2h] (gate and up projections fused), w_out [E, h, d]."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        hidden: int,
        backend: str = "grouped",
        out_init_scale: float = 1.0,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"expert backend {backend!r} not in {BACKENDS}")
        self.num_experts, self.d_model, self.hidden, self.backend = num_experts, d_model, hidden, backend
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        nn.init.normal_(self.w_in, std=d_model**-0.5)
        nn.init.normal_(self.w_out, std=out_init_scale * hidden**-0.5)

    def expert_outputs(self, x: Tensor, routing: Routing) -> Tensor:
        """Per-assignment outputs o [A, d], in the expert-sorted order of `routing` (no gating)."""
        x_sorted = x[routing.token_index]
        if self.backend == "loop":
            return self._loop(x_sorted, routing.tokens_per_expert)
        return self._grouped(x_sorted, routing.tokens_per_expert)

    def forward(self, x: Tensor, routing: Routing, return_expert_outputs: bool = False):
        outputs = self.expert_outputs(x, routing)
        y = combine(outputs, routing, num_tokens=x.shape[0])
        return (y, outputs) if return_expert_outputs else y

    def _loop(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
        chunks = []
        # Host sync by design: this is the readable reference backend. unbind, not w_in[expert]: indexing
        # per expert would make a full-size zero gradient of the bank per expert in backward.
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        for expert, x_e in enumerate(x_sorted.split(tokens_per_expert.tolist())):
            chunks.append(swiglu(x_e @ w_in[expert]) @ w_out[expert])
        return torch.cat(chunks) if chunks else x_sorted.new_zeros(0, self.d_model)

    def _grouped(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
        offsets = torch.cumsum(tokens_per_expert, dim=0).to(torch.int32)
        w_in, w_out = self.w_in, self.w_out
        compute_dtype = x_sorted.dtype
        if x_sorted.is_cuda and compute_dtype != torch.bfloat16:
            compute_dtype = torch.bfloat16  # the CUDA grouped GEMM kernels take bf16; CPU stays in fp32
        hidden = grouped_matmul(x_sorted.to(compute_dtype), w_in.to(compute_dtype), offsets)
        out = grouped_matmul(swiglu(hidden), w_out.to(compute_dtype), offsets)
        return out.to(x_sorted.dtype)


# torch.compile traces grouped_mm through its fake kernel, which accepts bf16 only; on CPU (fp32) the
# compiled path goes through these two opaque ops instead, whose eager kernels are the same grouped GEMMs.
@torch.library.custom_op("testbed::grouped_mm_fp32", mutates_args=())
def grouped_mm_fp32(mat_a: Tensor, mat_b: Tensor, offsets: Tensor) -> Tensor:
    """[A, k] x [E, k, n] -> [A, n]: rows offsets[e-1]:offsets[e] of mat_a times mat_b[e]."""
    return F.grouped_mm(mat_a, mat_b, offs=offsets)


@grouped_mm_fp32.register_fake
def _(mat_a: Tensor, mat_b: Tensor, offsets: Tensor) -> Tensor:
    return mat_a.new_empty(mat_a.shape[0], mat_b.shape[-1])


@torch.library.custom_op("testbed::grouped_mm_fp32_weight_grad", mutates_args=())
def grouped_mm_fp32_weight_grad(mat_a: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    """[A, k]^T x [A, n] per group -> [E, k, n] (the gradient of mat_b)."""
    return F.grouped_mm(mat_a.t(), grad, offs=offsets)


@grouped_mm_fp32_weight_grad.register_fake
def _(mat_a: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    return mat_a.new_empty(offsets.shape[0], mat_a.shape[1], grad.shape[1])


def _grouped_mm_fp32_setup(ctx, inputs, output) -> None:
    mat_a, mat_b, offsets = inputs
    ctx.save_for_backward(mat_a, mat_b, offsets)


def _grouped_mm_fp32_backward(ctx, grad: Tensor):
    mat_a, mat_b, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grouped_mm_fp32(grad, mat_b.transpose(-2, -1).contiguous(), offsets)
    grad_b = grouped_mm_fp32_weight_grad(mat_a, grad, offsets)
    return grad_a, grad_b, None


grouped_mm_fp32.register_autograd(_grouped_mm_fp32_backward, setup_context=_grouped_mm_fp32_setup)


def grouped_matmul(mat_a: Tensor, mat_b: Tensor, offsets: Tensor) -> Tensor:
    """F.grouped_mm, or under torch.compile with fp32 inputs the custom op above."""
    if torch.compiler.is_compiling() and mat_a.dtype == torch.float32:
        return grouped_mm_fp32(mat_a, mat_b, offsets)
    return F.grouped_mm(mat_a, mat_b, offs=offsets)


def combine(expert_outputs: Tensor, routing: Routing, num_tokens: int) -> Tensor:
    """y_t = sum_k g_{t,k} o_{t,k}; tokens with no (kept) assignment get 0 (the residual carries them).

    Token choice (every token has exactly K assignments, `slot_index` set, no capacity drops): the
    assignments are put back in (token, slot) order by one permutation (each row written once, so no
    atomics) and summed over a [T, K, d] view, a fixed-order sum that is deterministic on GPU. Otherwise
    (expert choice, oracle, capacity drops: counts per token vary) an `index_add_` over tokens."""
    weighted = expert_outputs * routing.weight.unsqueeze(-1).to(expert_outputs.dtype)
    num_assignments, d_model = weighted.shape
    if (
        routing.slot_index is not None
        and routing.dropped is None
        and num_tokens > 0
        and num_assignments % num_tokens == 0
    ):
        top_k = num_assignments // num_tokens
        # position of each (expert-sorted) assignment in token-major order: token * K + slot
        token_major = routing.token_index * top_k + routing.slot_index
        unsorted = weighted.new_zeros(num_assignments, d_model).index_copy(0, token_major, weighted)
        return unsorted.view(num_tokens, top_k, d_model).sum(1)
    y = expert_outputs.new_zeros(num_tokens, d_model)
    return y.index_add_(0, routing.token_index, weighted)


class DenseSwiGLU(nn.Module):
    """A dense SwiGLU feed-forward block (dense layers, shared experts)."""

    def __init__(self, d_model: int, hidden: int, out_init_scale: float = 1.0):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=d_model**-0.5)
        nn.init.normal_(self.w_out.weight, std=out_init_scale / math.sqrt(hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(swiglu(self.w_in(x)))
