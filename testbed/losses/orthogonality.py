"""Orthogonality loss (Guo et al., NeurIPS 2025, arXiv 2505.22323), per-token form.

L = w_o * (1 / sum_t |S_t|) * sum_t sum_{k in S_t} ||Proj_{span{o_tj : j in S_t, j != k}} o_tk||^2,
o_tk = output of expert k for token t before gating; the span is built by Gram-Schmidt with eps 1e-6.
Computed per token over that token's co-selected experts, the paper's intent (its released code groups
outputs by expert instead, a known discrepancy). `normalize: true` divides each term by ||o_tk||^2, a
cosine form that cannot be lowered by shrinking outputs. Tokens with fewer than 2 experts add nothing
(their assignments still count in the denominator). Assignments dropped by capacity (`Routing.kept`
False) are not among S_t: their outputs become empty (zero) slots and they leave the denominator.

Gradient: o_tk does not depend on this layer's router, so by this definition the loss trains the experts
(and, through the hidden states, earlier layers). `gated: true` uses g_tk * o_tk instead [defined here],
which also sends gradient to this layer's router.
"""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.losses.base import AUX_LOSSES, AuxLoss
from testbed.losses.options import OrthogonalityConfig as OrthogonalityConfig
from testbed.routing.base import Routing, RoutingContext


def per_token_slots(routing: Routing, max_per_token: int | None) -> tuple[Tensor, int]:
    """Slot of each assignment within its token (0..n_t-1), and the number of slots K_max.

    K_max comes from the router when it is static (token choice: top_k). Otherwise (expert choice) it is
    bounded by the number of experts, a static shape: reading the per-token maximum from the data would
    cost one device-to-host sync per layer. Empty slots are zero rows, which add exactly nothing."""
    num_tokens = routing.num_tokens
    if routing.slot_index is not None and max_per_token is not None:  # token choice: known, no sort needed
        return routing.slot_index, max(max_per_token, 1)
    per_token = torch.zeros(num_tokens, dtype=torch.long, device=routing.token_index.device)
    per_token.index_add_(0, routing.token_index, torch.ones_like(routing.token_index))
    if max_per_token is None:
        max_per_token = min(routing.num_experts, routing.num_assignments)
    order = torch.argsort(routing.token_index, stable=True)
    starts = torch.cumsum(per_token, 0) - per_token
    slot_sorted = torch.arange(order.numel(), device=order.device) - starts[routing.token_index[order]]
    slot = torch.empty_like(slot_sorted)
    slot[order] = slot_sorted
    return slot, max(max_per_token, 1)


def quadratic(a: Tensor, gram: Tensor, b: Tensor) -> Tensor:
    """a_t^T G_t b_t per token, element-wise (K is small: batched matmuls of KxK blocks are slower)."""
    return (a.unsqueeze(-1) * gram * b.unsqueeze(-2)).sum((-1, -2))


def projection_energy(outputs: Tensor, eps: float = 1e-6, normalize: bool = False) -> Tensor:
    """For padded per-token outputs [T, K, d] (zero rows = no expert), the energy ||Proj_{others} o_k||^2
    of each slot k onto the span of the token's other outputs, [T, K].

    Gram-Schmidt with q = v / (||v|| + eps), run in coefficient space: each basis vector is kept as its
    coefficients c over the token's outputs (q = sum_l c_l o_l), so every inner product comes from the
    per-token Gram matrix G = O O^T. The same arithmetic as Gram-Schmidt on the vectors, with the d-sized
    work done once (the Gram matrix) instead of per basis vector."""
    num_tokens, num_slots, _ = outputs.shape
    if num_slots <= 2:  # measured on CPU: element-wise beats a batch of 2x2 matmuls; bmm wins from K = 4
        gram = (outputs.unsqueeze(2) * outputs.unsqueeze(1)).sum(-1)  # [T, K, K]
    else:
        gram = outputs @ outputs.transpose(1, 2)
    energy = outputs.new_zeros(num_tokens, num_slots)
    if num_slots < 2:
        return energy
    eye = torch.eye(num_slots, dtype=outputs.dtype, device=outputs.device)
    columns = []
    for k in range(num_slots):
        basis: list[Tensor] = []  # coefficients [T, K] of the orthonormalized other outputs
        total = outputs.new_zeros(num_tokens)
        for j in range(num_slots):
            if j == k:
                continue
            c = eye[j].expand(num_tokens, num_slots)
            for q in basis:  # v <- v - (q . v) q
                c = c - quadratic(q, gram, c).unsqueeze(-1) * q
            squared = quadratic(c, gram, c).clamp_min(0)
            # sqrt's slope is infinite at 0: for an empty slot (zero row: capacity drop, expert choice) its
            # zero upstream gradient would become NaN and spread over the token's Gram matrix. Slope 0 there.
            nonzero = squared > 0
            norm = torch.where(nonzero, torch.where(nonzero, squared, 1.0).sqrt(), 0.0)
            q = c / (norm + eps).unsqueeze(-1)
            basis.append(q)
            total = total + (q * gram[:, :, k]).sum(-1).square()  # (q . o_k)^2
        columns.append(total)
    energy = torch.stack(columns, dim=1)
    if normalize:
        energy = energy / (torch.diagonal(gram, dim1=1, dim2=2) + eps)
    return energy


GRAM_SCHMIDT_MAX_SLOTS = 4
"""Up to this many slots per token the energies come from Gram-Schmidt (its Python loops grow as K^3);
above it, from the inverse of the per-token Gram matrix (a few batched kernels, any K)."""


def projection_energy_by_inverse(outputs: Tensor, eps: float = 1e-6, normalize: bool = False) -> Tensor:
    """The energies of `projection_energy` for any K, from the per-token Gram matrix in float64.

    Leave-one-out projection by the Schur complement: with H = G + eps^2 I and h_k the k-th column of G
    without row k, ||Proj_{others} o_k||^2 ~= h_k^T (H_{-k})^{-1} h_k = H_kk - 1 / (H^{-1})_kk.
    The ridge eps^2 plays the role of Gram-Schmidt's eps (zero rows, i.e. empty slots, and outputs that lie
    in the span of the others stay finite); the two agree to ~eps^2 / ||o||^2. Cholesky without error
    checks: no host sync."""
    num_tokens, num_slots, _ = outputs.shape
    if num_slots < 2:
        return outputs.new_zeros(num_tokens, num_slots)
    wide = outputs.double()
    gram = wide @ wide.transpose(1, 2)
    ridge = eps * eps
    eye = torch.eye(num_slots, dtype=gram.dtype, device=gram.device)
    factor, _ = torch.linalg.cholesky_ex(gram + ridge * eye)
    inverse_factor = torch.linalg.solve_triangular(factor, eye.expand_as(gram), upper=False)
    inverse_diagonal = inverse_factor.square().sum(-2)  # (H^{-1})_kk = sum_i (L^{-1})_ik^2
    diagonal = torch.diagonal(gram, dim1=1, dim2=2)
    energy = (diagonal + ridge - 1.0 / inverse_diagonal).clamp_min(0)
    if normalize:
        energy = energy / (diagonal + eps)
    return energy.to(outputs.dtype)


@AUX_LOSSES.register("orthogonality")
class OrthogonalityLoss(AuxLoss):
    needs_expert_outputs = True

    def __call__(
        self, routing: Routing, context: RoutingContext, expert_outputs: Tensor | None = None
    ) -> Tensor:
        if expert_outputs is None:
            raise ValueError("the orthogonality loss needs the per-assignment expert outputs")
        outputs = expert_outputs.float()
        if self.config.gated:
            outputs = outputs * routing.weight.float().unsqueeze(-1)
        if routing.kept is not None:  # dropped by capacity: an empty slot, as if never routed
            outputs = torch.where(routing.kept.unsqueeze(-1), outputs, torch.zeros_like(outputs))
        slot, num_slots = per_token_slots(routing, context.max_experts_per_token)
        padded = outputs.new_zeros(routing.num_tokens, num_slots, outputs.shape[-1])
        padded = padded.index_put((routing.token_index, slot), outputs)
        energy_of = projection_energy if num_slots <= GRAM_SCHMIDT_MAX_SLOTS else projection_energy_by_inverse
        energy = energy_of(padded, self.config.eps, self.config.normalize)
        if routing.kept is None:
            return energy.sum() / max(routing.num_assignments, 1)
        return energy.sum() / routing.kept.sum().clamp_min(1)  # on device: no host sync
