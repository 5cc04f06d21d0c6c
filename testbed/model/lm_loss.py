"""LM head + cross-entropy in chunks, with the gradients computed in the forward pass.

The plain path materializes fp32 logits [N, V], their log-softmax and its gradient (three N x V arrays;
on the CPU config about a third of a training step). Here each chunk of rows computes its logits, the
log-sum-exp, the loss and at once the gradient `softmax - onehot` of those rows, which goes straight into
the two gradient matmuls; no N x V array outlives its chunk and backward only scales the stored gradients.
The matmuls are the same three as the plain path (forward, grad of hidden, grad of weight).
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
HOST_READ_ON_CPU = True
"""On CPU the loss reads once whether any target is ignored (free there) and skips the mask when none is;
False takes the GPU's sync-free path on CPU too (the whole-step sync test, tests/test_compile_step.py)."""


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        compute_dtype = _autocast_dtype(hidden.device.type) or hidden.dtype
        # matmuls run in the compute dtype (bf16 under autocast); softmax and gradient sums in fp32
        w = weight.to(compute_dtype)
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp_min(1).to(torch.float32)
        needs_grad = hidden.requires_grad or weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # one host read on CPU only (free there); on GPU the mask is always applied, sync-free
        ignored_any = hidden.is_cuda or not HOST_READ_ON_CPU or not bool(valid.all())
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(compute_dtype)
            t = targets[start : start + chunk_size]
            ok = valid[start : start + chunk_size]
            safe_t = torch.where(ok, t, 0).unsqueeze(1)
            logits = (h @ w.t()).float()
            probs = torch.softmax(logits, dim=-1)  # one fused pass; also the gradient's main term
            # log-sum-exp from the softmax: lse = max_v z - log p_max, where p_max >= 1/V never underflows
            row_max, argmax = logits.max(dim=-1, keepdim=True)
            lse = row_max.squeeze(1) - probs.gather(1, argmax).squeeze(1).log()
            target_logit = logits.gather(1, safe_t).squeeze(1)
            loss_sum = loss_sum + ((lse - target_logit) * ok).sum()
            if not needs_grad:
                continue
            # d loss_row / d logits = softmax - onehot(target); rows with ignored targets get 0
            grad_logits = probs.scatter_add_(1, safe_t, -ok.to(probs.dtype).unsqueeze(1))
            if ignored_any:
                grad_logits.mul_(ok.unsqueeze(1))
            g = grad_logits.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = (g @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.add_((g.t() @ h).float())
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
            count,
        )
        ctx.has_grads = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count
        out_hidden = (grad_hidden * scale.to(grad_hidden.dtype)) if ctx.has_grads[0] else None
        out_weight = (grad_weight * scale).to(ctx.weight_dtype) if ctx.has_grads[1] else None
        return out_hidden, out_weight, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 512) -> Tensor:
    """Mean cross-entropy of `hidden [N, d] @ weight [V, d].T` against `targets [N]` (IGNORE_INDEX skipped),
    equal to `F.cross_entropy(hidden @ weight.T, targets)` in value and gradient, without the N x V arrays.

    Only first-order gradients (the gradient is precomputed in forward).
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden [N, d] and targets [N] expected, got {tuple(hidden.shape)}, {tuple(targets.shape)}"
        )
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
