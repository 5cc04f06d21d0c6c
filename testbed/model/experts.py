"""Expert bank (SwiGLU experts stored as stacked weights) and the dispatch backends.

Both backends compute the per-assignment expert outputs `o_{t,k}` (before gating) from the
expert-sorted assignments of a `Routing`, then combine them into y[T, d]:
- `loop`: a Python loop over experts; readable, the reference the tests compare against.
- `grouped`: two grouped matmuls (torch.nn.functional.grouped_mm) with int32 offsets, no host sync.

The data path (`ExpertBank.forward`): the hidden states are cast once to the compute dtype (bf16 for the
grouped backend on CUDA, the input's dtype otherwise) before dispatch, so the [T*K, d] gather, the GEMMs
and the combine all move compute-dtype rows and only y [T, d] is cast back. For token choice (K
assignments per token, as `routing_from_choices` builds them) dispatch and combine are permutations
(`permute_rows`): dispatch gathers each token's rows in expert order, and its backward gathers them back
into token-major order and sums each token's K rows (no accumulating scatter, no atomics); combine
gathers the outputs into token-major order and takes one batched product with the gates [T, 1, K] x
[T, K, d]. Expert choice, the oracle and other variable-count routings combine with an `index_add_`.
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
        # None: bf16 for the grouped backend on CUDA (its kernels take bf16), else the input's dtype; the
        # tests set bf16 on CPU to check the bf16 data path against the fp32 reference
        self.compute_dtype: torch.dtype | None = None

    def dtype_for(self, x: Tensor) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.bfloat16 if x.is_cuda and self.backend == "grouped" else x.dtype

    def expert_outputs(self, x: Tensor, routing: Routing, plan=None) -> Tensor:
        """Per-assignment outputs o [A, d], in the expert-sorted order of `routing` (no gating), in the
        compute dtype. `plan`: `token_major_plan(routing, T)` when the caller has it already."""
        x = x.to(self.dtype_for(x))
        plan = plan if plan is not None else token_major_plan(routing, x.shape[0])
        if plan is None:
            x_sorted = x.index_select(0, routing.token_index)
        else:
            _, inverse, top_k = plan
            x_sorted = dispatch_rows(x, routing.token_index, inverse, top_k)
        if self.backend == "loop":
            return self._loop(x_sorted, routing.tokens_per_expert)
        return self._grouped(x_sorted, routing.tokens_per_expert)

    def forward(self, x: Tensor, routing: Routing, return_expert_outputs: bool = False):
        plan = token_major_plan(routing, x.shape[0])  # once per layer: dispatch and combine share it
        outputs = self.expert_outputs(x, routing, plan)
        y = combine(outputs, routing, num_tokens=x.shape[0], plan=plan).to(x.dtype)
        return (y, outputs) if return_expert_outputs else y

    def _loop(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
        chunks = []
        # Host sync by design: this is the readable reference backend. unbind, not w_in[expert]: indexing
        # per expert would make a full-size zero gradient of the bank per expert in backward.
        dtype = x_sorted.dtype
        w_in, w_out = self.w_in.to(dtype).unbind(0), self.w_out.to(dtype).unbind(0)
        for expert, x_e in enumerate(x_sorted.split(tokens_per_expert.tolist())):
            chunks.append(swiglu(x_e @ w_in[expert]) @ w_out[expert])
        return torch.cat(chunks) if chunks else x_sorted.new_zeros(0, self.d_model)

    def _grouped(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        dtype = x_sorted.dtype
        hidden = grouped_matmul(x_sorted, self.w_in.to(dtype), offsets)
        return grouped_matmul(swiglu(hidden), self.w_out.to(dtype), offsets)


class _PermuteRows(torch.autograd.Function):
    """rows[index] along dim 0 for a permutation `index`; backward: grad[inverse] (a gather, not the
    accumulating scatter of plain indexing)."""

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _DispatchRows(torch.autograd.Function):
    """x [T, d] -> x[token_index] [T*K, d], every token K times; backward: the rows gathered back into
    token-major order (`inverse`) and summed over each token's K rows, in a fixed order."""

    @staticmethod
    def forward(ctx, x: Tensor, token_index: Tensor, inverse: Tensor, top_k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        per_token = grad.index_select(0, inverse)
        return per_token.view(-1, ctx.top_k, *grad.shape[1:]).sum(1), None, None, None


def permute_rows(rows: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """rows[index] for a permutation `index` whose inverse is `inverse` (gather forward and backward)."""
    return _PermuteRows.apply(rows, index, inverse)


def dispatch_rows(x: Tensor, token_index: Tensor, inverse: Tensor, top_k: int) -> Tensor:
    """x[token_index] for a token-choice routing (each token K times; `inverse` from `token_major_plan`)."""
    return _DispatchRows.apply(x, token_index, inverse, top_k)


def token_major_plan(routing: Routing, num_tokens: int) -> tuple[Tensor, Tensor, int] | None:
    """For a token-choice routing with exactly K assignments per token (capacity drops stay in place with
    gate 0): (token_major [A], inverse [A], K), where token_major[j] = t*K + k is the token-major position
    of expert-sorted assignment j and inverse[token_major[j]] = j. None for any other routing."""
    num_assignments = routing.num_assignments
    every_token_k = routing.dropped is None or routing.kept is not None  # not `apply_capacity`'s removal
    if routing.slot_index is None or not every_token_k or num_tokens == 0 or num_assignments % num_tokens:
        return None
    top_k = num_assignments // num_tokens
    token_major = routing.token_index * top_k + routing.slot_index
    positions = torch.arange(num_assignments, device=token_major.device, dtype=token_major.dtype)
    inverse = torch.empty_like(token_major).scatter_(0, token_major, positions)  # unique targets
    return token_major, inverse, top_k


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


def combine(expert_outputs: Tensor, routing: Routing, num_tokens: int, plan=None) -> Tensor:
    """y_t = sum_k g_{t,k} o_{t,k} in the outputs' dtype; tokens with no (kept) assignment get 0 (the
    residual carries them).

    Token choice (`token_major_plan`): outputs and gates are permuted into token-major order (gathers
    forward and backward) and combined by one batched product [T, 1, K] x [T, K, d]: a fixed-order sum,
    deterministic on GPU, with no zero-filled [T*K, d] buffer. Otherwise (expert choice, oracle: counts
    per token vary) an `index_add_` over tokens."""
    plan = plan if plan is not None else token_major_plan(routing, num_tokens)
    gates = routing.weight.to(expert_outputs.dtype)
    if plan is not None:
        token_major, inverse, top_k = plan
        outputs = permute_rows(expert_outputs, inverse, token_major).view(num_tokens, top_k, -1)
        gates = permute_rows(gates, inverse, token_major).view(num_tokens, 1, top_k)
        return torch.bmm(gates, outputs).squeeze(1)
    y = expert_outputs.new_zeros(num_tokens, expert_outputs.shape[1])
    return y.index_add_(0, routing.token_index, expert_outputs * gates.unsqueeze(-1))


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
