"""Analyses that other MoE studies compute, over the same routings and domain labels as the rest of the
testbed: expert co-activation, token- and vocabulary-level specialisation, cross-layer co-occurrence, router
agreement between two checkpoints, single-expert ablation and forcing, and the experts' shares of the MoE
output. Model-independent: every accumulator here consumes `Routing`s (testbed/routing/base.py), token ids,
domain labels and per-assignment expert outputs, whichever model produced them (a testbed checkpoint,
testbed/analysis/peer_runs.py, or a pretrained Hugging Face MoE, testbed/hf/peers.py).

Streaming: each accumulator keeps count tables whose size depends on the number of layers L, experts E and
domains D, never on the number of tokens; the token tables are bounded by a memory budget (`TokenTables`).
Nothing per token is kept beyond the batch being counted. Every statistic counts kept assignments only
(`Routing.kept`): an assignment dropped by capacity is not a choice.

Notation: S_t is the set of experts of token t at a layer (its kept assignments), g_{t,e} the combine weight
(gate) of expert e for t, o_{t,e} the expert's output for t (before the gate), d_t the token's domain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import fields, replace

import numpy as np
import torch
from torch import Tensor

from testbed.routing.base import Routing

PEER_ANALYSES = ("coactivation", "tokens", "cross_layer", "contribution", "agreement", "ablation", "forcing")
# computed from the counting pass (one forward pass over the token set); the others need more passes
COUNTING = ("coactivation", "tokens", "cross_layer", "contribution")
MOSTLY_ONE = 0.5  # a token type is "routed mostly to one expert" when one expert takes more than this share


def parse_peers(value: str) -> list[str]:
    """`--peers` value: comma-separated names from PEER_ANALYSES, or `all`; ValueError naming the allowed
    ones otherwise. Order follows PEER_ANALYSES."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names or names == ["all"]:
        return list(PEER_ANALYSES)
    unknown = [n for n in names if n not in PEER_ANALYSES]
    if unknown:
        raise ValueError(
            f"unknown analyses {unknown}; allowed: all, or a comma list of {list(PEER_ANALYSES)}"
        )
    return [n for n in PEER_ANALYSES if n in names]


# ------------------------------------------------------------------------------------------ per token


def routing_to(routing: Routing, device: torch.device | str) -> Routing:
    """`routing` with its tensors on `device` (layers placed on several devices report on theirs)."""
    device = torch.device(device)
    if routing.token_index.device == device:
        return routing
    moved = {f.name: getattr(routing, f.name) for f in fields(routing)}
    return replace(routing, **{k: v.to(device) for k, v in moved.items() if isinstance(v, Tensor)})


def membership(routing: Routing) -> Tensor:
    """M [T, E] float32: M[t, e] = 1 when e ∈ S_t (a kept assignment of t to e), else 0."""
    member = torch.zeros(routing.num_tokens, routing.num_experts, device=routing.token_index.device)
    member[routing.token_index, routing.expert_index] = routing.kept_as(torch.float32)
    return member


def top1_expert(routing: Routing, member: Tensor | None = None) -> Tensor:
    """[T] long: the expert of S_t with the largest gate (ties: the lower id), -1 when S_t is empty."""
    member = membership(routing) if member is None else member
    gates = torch.full_like(member, -math.inf)
    gates[routing.token_index, routing.expert_index] = routing.weight.detach().float()
    gates = gates.masked_fill(member == 0, -math.inf)
    best = gates.argmax(-1)
    return torch.where(member.sum(-1) > 0, best, torch.full_like(best, -1))


def _entropy(p: np.ndarray) -> float:
    """-sum p log p (nats) of a distribution, never below 0."""
    nz = p[p > 0]
    return max(float(-(nz * np.log(nz)).sum()), 0.0)


def _rows(counts: np.ndarray) -> np.ndarray:
    """Rows normalized to sum 1; rows without counts NaN."""
    total = counts.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts / np.where(total > 0, total, 1), np.nan)


# --------------------------------------------------------------------------------------- co-activation


class CoActivation:
    """C [L, E, E]: C[l, i, j] = #{t : i ∈ S_t and j ∈ S_t} at layer l (the diagonal: tokens choosing i),
    accumulated as C += M^T M per batch."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str = "cpu"):
        self.pairs = torch.zeros(num_layers, num_experts, num_experts, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(num_layers, dtype=torch.float64)

    def update(self, layer: int, member: Tensor) -> None:
        self.pairs[layer] += (member.T @ member).double()  # exact in fp32 below 2^24 tokens a batch
        self.tokens[layer] += member.shape[0]


def coactivation_conditional(pairs) -> np.ndarray:
    """P(j | i) = C[i, j] / C[i, i]: the share of the tokens that choose expert i that also choose j.
    The diagonal is 1; the row of an expert never chosen is NaN."""
    c = np.asarray(pairs, dtype=np.float64)
    diag = np.diag(c)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(diag > 0, c / np.where(diag > 0, diag, 1), np.nan)


def top_pairs(pairs, tokens: float, top: int = 10, min_count: float = 1.0) -> dict[str, list[dict]]:
    """The most co-activated expert pairs i < j, ranked by their count C[i, j] and by their lift
    C[i, j] T / (C[i, i] C[j, j]) (how much more often they meet than if chosen independently; pairs met
    fewer than `min_count` times are not ranked by lift). Each with P(j | i) and P(i | j)."""
    c = np.asarray(pairs, dtype=np.float64)
    diag = np.diag(c)
    i, j = np.triu_indices(c.shape[0], k=1)
    count = c[i, j]
    with np.errstate(invalid="ignore", divide="ignore"):
        lift = np.where((diag[i] > 0) & (diag[j] > 0), count * tokens / (diag[i] * diag[j]), np.nan)

    def entry(n: int) -> dict:
        a, b = int(i[n]), int(j[n])
        return {
            "experts": [a, b],
            "count": float(count[n]),
            "p_j_given_i": float(count[n] / diag[a]) if diag[a] > 0 else None,
            "p_i_given_j": float(count[n] / diag[b]) if diag[b] > 0 else None,
            "lift": None if math.isnan(lift[n]) else float(lift[n]),
        }

    by_count = [n for n in np.argsort(-count, kind="stable") if count[n] > 0][:top]
    rankable = np.where(count >= max(min_count, 1e-12), np.nan_to_num(lift, nan=-np.inf), -np.inf)
    by_lift = [n for n in np.argsort(-rankable, kind="stable") if np.isfinite(rankable[n])][:top]
    return {"by_count": [entry(n) for n in by_count], "by_lift": [entry(n) for n in by_lift]}


def coactivation_summary(pairs, tokens: float, top: int = 10, min_count: float = 1.0) -> dict:
    """One layer: the matrix P(j | i), the counts C and the top pairs."""
    c = np.asarray(pairs, dtype=np.float64)
    return {
        "p_j_given_i": coactivation_conditional(c).tolist(),
        "counts": c.tolist(),
        "tokens": float(tokens),
        "top_pairs": top_pairs(c, tokens, top, min_count),
    }


# -------------------------------------------------------------------------------------- token tables


class TokenTables:
    """Per layer and expert, counts of the input token types and of the next token types of its assignments:
    n_in[l, e, v] = #{t : e ∈ S_t, x_t = v}, n_next[l, e, v] = #{t : e ∈ S_t, x_{t+1} = v}, with the base
    counts c_in[v] = #{t : x_t = v}, c_next[v] over every token, and the assignments per expert A[l, e].

    Bounded: token types get a table slot on first sight, at most `max_slots` = min(V, budget / (2 L E)) of
    them (default budget 2^27 int32 cells, 512 MiB); the tables grow with the types seen (doubling), so a
    small mix costs little whatever the vocabulary. Occurrences of types seen after the slots ran out are
    counted in the totals but in no table, and `coverage` reports the share of occurrences that were tracked
    (`exact`: all of them). Types are seen roughly by frequency, so the frequent ones are tracked.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        vocab_size: int,
        device: torch.device | str = "cpu",
        budget: int = 2**27,
        initial_slots: int = 1024,
    ):
        self.num_layers, self.num_experts, self.vocab_size = num_layers, num_experts, vocab_size
        self.max_slots = max(1, min(vocab_size, budget // (2 * num_layers * num_experts)))
        self.device = torch.device(device)
        self.slot_of = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        self.slots = 0  # allocated
        self.token_of = torch.zeros(0, dtype=torch.long, device=device)
        self.inputs = torch.zeros(num_layers, num_experts, 0, dtype=torch.int32, device=device)
        self.nexts = torch.zeros_like(self.inputs)
        self.base_inputs = torch.zeros(0, dtype=torch.long, device=device)
        self.base_nexts = torch.zeros(0, dtype=torch.long, device=device)
        self._grow(min(self.max_slots, initial_slots))
        self.used = 0
        self.assignments = torch.zeros(num_layers, num_experts, dtype=torch.long, device=device)
        self.tokens = 0
        self.tracked_inputs = 0
        self.tracked_nexts = 0
        self.next_tokens = 0
        self._in_slot: Tensor | None = None
        self._next_slot: Tensor | None = None

    def _grow(self, slots: int) -> None:
        """Widen every table to `slots` columns, keeping the counts."""
        extra = slots - self.slots
        if extra <= 0:
            return
        pad = torch.zeros(self.num_layers, self.num_experts, extra, dtype=torch.int32, device=self.device)
        self.inputs = torch.cat([self.inputs, pad], dim=-1)
        self.nexts = torch.cat([self.nexts, torch.zeros_like(pad)], dim=-1)
        zeros = torch.zeros(extra, dtype=torch.long, device=self.device)
        self.base_inputs = torch.cat([self.base_inputs, zeros])
        self.base_nexts = torch.cat([self.base_nexts, zeros])
        self.token_of = torch.cat([self.token_of, torch.full_like(zeros, -1)])
        self.slots = slots

    def observe(self, token_ids: Tensor, next_ids: Tensor | None) -> None:
        """The batch's tokens [T] and next tokens [T] (once per batch, before the layers' `update`)."""
        ids = token_ids if next_ids is None else torch.cat([token_ids, next_ids])
        seen = ids.unique()
        new = seen[self.slot_of[seen] < 0][: self.max_slots - self.used]
        if len(new):
            if self.used + len(new) > self.slots:
                self._grow(min(self.max_slots, max(2 * self.slots, self.used + len(new))))
            slots = torch.arange(self.used, self.used + len(new), device=self.device)
            self.slot_of[new], self.token_of[slots] = slots, new
            self.used += len(new)
        self._in_slot = self.slot_of[token_ids]
        self.tokens += token_ids.numel()
        tracked = self._in_slot >= 0
        self.base_inputs.index_add_(0, self._in_slot.clamp_min(0), tracked.long())
        self.tracked_inputs += int(tracked.sum())
        self._next_slot = None
        if next_ids is not None:
            self._next_slot = self.slot_of[next_ids]
            self.next_tokens += next_ids.numel()
            tracked = self._next_slot >= 0
            self.base_nexts.index_add_(0, self._next_slot.clamp_min(0), tracked.long())
            self.tracked_nexts += int(tracked.sum())

    def update(self, layer: int, routing: Routing) -> None:
        kept = routing.kept_as(torch.int32)
        self.assignments[layer].index_add_(0, routing.expert_index, kept.long())
        for table, slot in ((self.inputs, self._in_slot), (self.nexts, self._next_slot)):
            if slot is None:
                continue
            s = slot[routing.token_index]
            flat = routing.expert_index * self.slots + s.clamp_min(0)
            table[layer].view(-1).index_add_(0, flat, kept * (s >= 0).int())

    def coverage(self) -> dict:
        return {
            "vocabulary_slots": self.max_slots,
            "types_tracked": self.used,
            "tokens": self.tokens,
            "coverage_inputs": self.tracked_inputs / self.tokens if self.tokens else None,
            "coverage_next": self.tracked_nexts / self.next_tokens if self.next_tokens else None,
            "exact": self.tracked_inputs == self.tokens and self.tracked_nexts == self.next_tokens,
        }

    def summary(
        self,
        decode: Callable[[list[int]], list[str]] | None = None,
        top: int = 10,
        min_count: int = 5,
    ) -> dict[str, dict]:
        """Per layer: each expert's top tokens (`expert_tokens`) and the vocabulary concentration
        (`vocabulary_concentration`). `decode` maps token ids to their text (None: ids only)."""
        used = self.used
        ids = self.token_of[:used].cpu().numpy()
        base_in = self.base_inputs[:used].cpu().numpy().astype(np.float64)
        base_next = self.base_nexts[:used].cpu().numpy().astype(np.float64)
        assignments = self.assignments.cpu().numpy().astype(np.float64)
        wanted: set[int] = set()
        layers = []
        for layer in range(self.num_layers):
            n_in = self.inputs[layer, :, :used].cpu().numpy().astype(np.float64)
            n_next = self.nexts[layer, :, :used].cpu().numpy().astype(np.float64)
            experts = []
            for e in range(self.num_experts):
                entry = {"expert": e, "assignments": float(assignments[layer, e])}
                for key, table, base in (("input", n_in, base_in), ("next", n_next, base_next)):
                    if key == "next" and self.next_tokens == 0:
                        continue
                    ranked = expert_tokens(table[e], base, assignments[layer, e], self.tokens, top, min_count)
                    for rows in ranked.values():
                        for row in rows:
                            row["id"] = int(ids[row.pop("slot")])
                            wanted.add(row["id"])
                    entry[f"top_{key}"], entry[f"top_{key}_by_lift"] = ranked["by_count"], ranked["by_lift"]
                experts.append(entry)
            per_token = assignments[layer].sum() / self.tokens if self.tokens else 0.0
            layers.append(
                {
                    "experts": experts,
                    "vocabulary": vocabulary_concentration(n_in, base_in, min_count, per_token),
                }
            )
        texts = dict(zip(sorted(wanted), decode(sorted(wanted)), strict=True)) if decode and wanted else {}
        for layer in layers:
            for entry in layer["experts"]:
                for key, rows in entry.items():
                    if key.startswith("top_"):
                        for row in rows:
                            row["token"] = texts.get(row["id"])
        return {"layers": layers, "tracking": self.coverage()}


def expert_tokens(
    counts, base, assignments: float, tokens: float, top: int = 10, min_count: int = 5
) -> dict[str, list[dict]]:
    """One expert's top token types by count n[v] and by lift = (n[v] / A_e) / (c[v] / N), the share of the
    expert's assignments with type v over the type's base rate (1 = no preference; ties: the more frequent
    first); types with fewer than `min_count` assignments to the expert are not ranked by lift. Rows: slot,
    count, share, lift."""
    n = np.asarray(counts, dtype=np.float64)
    c = np.asarray(base, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = n / assignments if assignments > 0 else np.zeros_like(n)
        lift = np.where(c > 0, share / (c / tokens), np.nan) if tokens > 0 else np.full_like(n, np.nan)

    def rows(order) -> list[dict]:
        return [
            {"slot": int(v), "count": float(n[v]), "share": float(share[v]), "lift": float(lift[v])}
            for v in order
        ]

    by_count = [v for v in np.argsort(-n, kind="stable")[:top] if n[v] > 0]
    rankable = np.where((n >= min_count) & np.isfinite(lift), lift, -np.inf)
    by_lift = [v for v in np.lexsort((-n, -rankable))[:top] if np.isfinite(rankable[v])]  # ties: more often
    return {"by_count": rows(by_count), "by_lift": rows(by_lift)}


def vocabulary_concentration(
    counts, base, min_count: int = 5, assignments_per_token: float = 1.0, bins: int = 20
) -> dict:
    """How much of the vocabulary one expert owns, over the token types seen at least `min_count` times.
    For a type v: c_v = max_e n[e, v] / c[v], the share of v's occurrences that its most frequent expert
    receives (1/E..1; with K experts a token, K/E when routing ignores the type). A type is *routed mostly
    to one expert* when c_v > 1/2. Keys: `share_types_mostly_one_expert` (of the types),
    `share_tokens_mostly_one_expert` (of their occurrences), `mean_concentration` (mean c_v over types),
    `uniform_concentration` (K/E, the mean experts per token over E), `types`, and the histogram of c_v."""
    n = np.asarray(counts, dtype=np.float64)
    c = np.asarray(base, dtype=np.float64)
    counted = c >= max(min_count, 1)
    num_experts = n.shape[0]
    out = {
        "min_count": min_count,
        "types": int(counted.sum()),
        "uniform_concentration": assignments_per_token / num_experts if num_experts else None,
    }
    if not counted.any():
        return out | {
            "share_types_mostly_one_expert": None,
            "share_tokens_mostly_one_expert": None,
            "mean_concentration": None,
            "histogram": {"edges": np.linspace(0, 1, bins + 1).tolist(), "types": [0] * bins},
        }
    concentration = n[:, counted].max(axis=0) / c[counted]
    mostly = concentration > MOSTLY_ONE
    hist, edges = np.histogram(np.clip(concentration, 0, 1), bins=bins, range=(0.0, 1.0))
    return out | {
        "share_types_mostly_one_expert": float(mostly.mean()),
        "share_tokens_mostly_one_expert": float(c[counted][mostly].sum() / c[counted].sum()),
        "mean_concentration": float(concentration.mean()),
        "histogram": {"edges": edges.tolist(), "types": hist.tolist()},
    }


# ---------------------------------------------------------------------------------------- cross-layer


class CrossLayer:
    """For consecutive MoE layers l, l+1 (on the same token): J[l, i, j] = #{(t, i, j) : i ∈ S_t at l,
    j ∈ S_t at l+1} (every pair of the token's assignments, K^2 a token) and J1[l, i, j] = #{t : top-1
    expert i at l and j at l+1}. Layers of a batch must arrive in model order."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str = "cpu"):
        pairs = max(num_layers - 1, 0)
        self.num_experts = num_experts
        self.joint = torch.zeros(pairs, num_experts, num_experts, dtype=torch.float64, device=device)
        self.joint_top1 = torch.zeros_like(self.joint)
        self._held: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, layer: int, member: Tensor, top1: Tensor) -> None:
        previous = self._held.pop(layer - 1, None)
        if previous is not None:
            prev_member, prev_top1 = previous
            self.joint[layer - 1] += (prev_member.T @ member).double()
            both = (prev_top1 >= 0) & (top1 >= 0)
            flat = prev_top1.clamp_min(0) * self.num_experts + top1.clamp_min(0)
            self.joint_top1[layer - 1].view(-1).index_add_(0, flat, both.double())
        if layer < self.joint.shape[0]:
            self._held[layer] = (member, top1)

    def end_batch(self) -> None:
        self._held.clear()


def transition_summary(joint, top: int = 10) -> dict:
    """One layer pair from its joint counts J[i, j]: P(j at l+1 | i at l) = J[i, j] / sum_j J[i, j] (rows of
    experts never chosen at l: NaN), the marginal entropy H(E_{l+1}), the conditional entropy
    H(E_{l+1} | E_l) = H(E_l, E_{l+1}) - H(E_l) (nats, of the pair distribution J / sum J), and
    determinism = 1 - H(E_{l+1} | E_l) / H(E_{l+1}) = I(E_l; E_{l+1}) / H(E_{l+1}): 1 when the expert at l
    fixes the expert at l+1, 0 when they are independent. The top transitions by count, with P(j | i)."""
    j = np.asarray(joint, dtype=np.float64)
    total = j.sum()
    if total <= 0:
        return {"pairs": 0.0, "p_next_given_prev": _rows(j).tolist(), "determinism": None}
    p = j / total
    h_next, h_prev, h_joint = _entropy(p.sum(0)), _entropy(p.sum(1)), _entropy(p.ravel())
    h_cond = max(h_joint - h_prev, 0.0)
    conditional = _rows(j)
    order = [n for n in np.argsort(-j.ravel(), kind="stable")[:top] if j.ravel()[n] > 0]
    size = j.shape[1]
    return {
        "pairs": float(total),
        "p_next_given_prev": conditional.tolist(),
        "marginal_entropy": h_next,
        "conditional_entropy": h_cond,
        "mutual_information": max(h_next - h_cond, 0.0),
        "determinism": 1.0 - h_cond / h_next if h_next > 1e-12 else None,
        "top_transitions": [
            {
                "from": int(n // size),
                "to": int(n % size),
                "count": float(j.ravel()[n]),
                "p_to_given_from": float(conditional[n // size, n % size]),
            }
            for n in order
        ],
    }


# ---------------------------------------------------------------------------------------- agreement


class Agreement:
    """Router agreement of checkpoints A and B on the same tokens, per layer and domain: tokens with
    S_t^A = S_t^B (`exact`), sum_t |S_t^A ∩ S_t^B| / max(|S_t^A|, |S_t^B|) (`overlap`: |A∩B| / k for top-k
    routers; 1 when both are empty) and tokens with the same top-1 expert (`top1`)."""

    def __init__(self, num_layers: int, num_domains: int, device: torch.device | str = "cpu"):
        shape = (num_layers, num_domains)
        self.exact = torch.zeros(shape, dtype=torch.float64, device=device)
        self.overlap = torch.zeros_like(self.exact)
        self.top1 = torch.zeros_like(self.exact)
        self.tokens = torch.zeros_like(self.exact)

    def update(self, layer: int, a: Routing, b: Routing, domain_ids: Tensor | None) -> None:
        if a.num_tokens != b.num_tokens or a.num_experts != b.num_experts:
            raise ValueError(
                f"agreement: the two checkpoints route {a.num_tokens} x {a.num_experts} and "
                f"{b.num_tokens} x {b.num_experts} (tokens x experts); they must be checkpoints of one model"
            )
        member_a, member_b = membership(a), membership(b)
        inter = (member_a * member_b).sum(-1)
        size = torch.maximum(member_a.sum(-1), member_b.sum(-1))
        overlap = torch.where(size > 0, inter / size.clamp_min(1), torch.ones_like(size))
        exact = (member_a == member_b).all(-1)
        same_top1 = top1_expert(a, member_a) == top1_expert(b, member_b)
        if domain_ids is None:
            domain_ids = torch.zeros(a.num_tokens, dtype=torch.long, device=member_a.device)
        for table, values in (
            (self.exact, exact),
            (self.overlap, overlap),
            (self.top1, same_top1),
            (self.tokens, torch.ones_like(overlap)),
        ):
            table[layer].index_add_(0, domain_ids, values.double())

    def summary(self, layer_names: Sequence[str], domains: Sequence[str]) -> dict:
        out = {}
        for layer, name in enumerate(layer_names):
            tokens = self.tokens[layer].cpu().double()
            total = float(tokens.sum())

            def rate(table, per=None, tokens=tokens, total=total, layer=layer):
                values = table[layer].cpu().double()
                if per is None:
                    return float(values.sum() / total) if total > 0 else None
                return float(values[per] / tokens[per]) if tokens[per] > 0 else None

            out[name] = {
                "exact": rate(self.exact),
                "overlap": rate(self.overlap),
                "top1": rate(self.top1),
                "tokens": total,
                "per_domain": {
                    d: {
                        "exact": rate(self.exact, i),
                        "overlap": rate(self.overlap, i),
                        "top1": rate(self.top1, i),
                    }
                    for i, d in enumerate(domains)
                },
            }
        return out


# ------------------------------------------------------------------------------------- contribution


def gate_rank(token_index: Tensor, weight: Tensor, num_tokens: int) -> Tensor:
    """[A] rank of each assignment among its token's assignments by descending gate (0 = the top-1;
    ties: the earlier assignment first)."""
    by_weight = torch.argsort(-weight, stable=True)
    order = by_weight[torch.argsort(token_index[by_weight], stable=True)]
    per_token = torch.zeros(num_tokens, dtype=torch.long, device=token_index.device)
    per_token.index_add_(0, token_index, torch.ones_like(token_index))
    starts = torch.cumsum(per_token, 0) - per_token
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[token_index[order]]
    return rank


class Contribution:
    """How much each chosen expert contributes to the routed MoE output y_t = sum_{e∈S_t} g_{t,e} o_{t,e}
    (shared experts excluded), per token:
    - share_{t,e} = ||g_{t,e} o_{t,e}|| / sum_{e'∈S_t} ||g_{t,e'} o_{t,e'}||;
    - with e1 the top-1 expert (largest gate), y1_t = g_{t,e1} o_{t,e1}: cos(y1_t, y_t) (0 when y1_t = 0)
      and the relative error ||y_t - y1_t|| / ||y_t||.
    Per layer: their means over the tokens with a non-zero mixture, the mean share by gate rank and by
    expert, and histograms of the top-1 share and of the cosine."""

    def __init__(self, num_layers: int, num_experts: int, max_rank: int = 16, bins: int = 20):
        self.num_layers, self.num_experts, self.max_rank, self.bins = num_layers, num_experts, max_rank, bins
        self.tokens = np.zeros(num_layers)
        self.skipped = np.zeros(num_layers)
        self.top1_share = np.zeros(num_layers)
        self.cosine = np.zeros(num_layers)
        self.relative_error = np.zeros(num_layers)
        self.expert_share = np.zeros((num_layers, num_experts))
        self.expert_assignments = np.zeros((num_layers, num_experts))
        self.rank_share = np.zeros((num_layers, max_rank))
        self.rank_assignments = np.zeros((num_layers, max_rank))
        self.share_hist = np.zeros((num_layers, bins))
        self.cosine_hist = np.zeros((num_layers, 2 * bins))

    @torch.no_grad()
    def update(
        self,
        layer: int,
        token_index: Tensor,
        expert_index: Tensor,
        weight: Tensor,
        outputs: Tensor,
        num_tokens: int,
        kept: Tensor | None = None,
    ) -> None:
        """One batch of one layer: the assignments (token, expert, gate) and their expert outputs o [A, d]
        before the gate; `kept` [A] bool leaves out dropped assignments."""
        kept = torch.ones_like(token_index, dtype=torch.bool) if kept is None else kept.bool()
        weighted = outputs.double() * (weight.double() * kept.double()).unsqueeze(-1)
        norms = weighted.norm(dim=-1)
        d = outputs.shape[-1]
        mixture = torch.zeros(num_tokens, d, dtype=torch.float64, device=outputs.device)
        mixture.index_add_(0, token_index, weighted)
        total = torch.zeros(num_tokens, dtype=torch.float64, device=outputs.device)
        total.index_add_(0, token_index, norms)
        rank = gate_rank(token_index, weight.float().masked_fill(~kept, -math.inf), num_tokens)
        is_top = (rank == 0) & kept
        top = torch.zeros_like(mixture).index_add_(0, token_index, weighted * is_top.double().unsqueeze(-1))
        top_norm = torch.zeros_like(total).index_add_(0, token_index, norms * is_top.double())
        y_norm = mixture.norm(dim=-1)
        valid = (total > 0) & (y_norm > 0)
        share = torch.where(valid[token_index], norms / total[token_index].clamp_min(1e-300), 0.0)
        cosine = (top * mixture).sum(-1) / (top.norm(dim=-1) * y_norm).clamp_min(1e-300)
        relative = (mixture - top).norm(dim=-1) / y_norm.clamp_min(1e-300)
        top_share = top_norm / total.clamp_min(1e-300)
        v = valid.cpu().numpy()
        cos_v, rel_v, share_v = cosine.cpu().numpy()[v], relative.cpu().numpy()[v], top_share.cpu().numpy()[v]
        self.tokens[layer] += v.sum()
        self.skipped[layer] += num_tokens - v.sum()
        self.top1_share[layer] += share_v.sum()
        self.cosine[layer] += cos_v.sum()
        self.relative_error[layer] += rel_v.sum()
        self.share_hist[layer] += np.histogram(np.clip(share_v, 0, 1), self.bins, (0.0, 1.0))[0]
        self.cosine_hist[layer] += np.histogram(np.clip(cos_v, -1, 1), 2 * self.bins, (-1.0, 1.0))[0]
        counted = (kept & valid[token_index]).cpu().numpy()
        experts = expert_index.cpu().numpy()[counted]
        shares = share.cpu().numpy()[counted]
        ranks = rank.cpu().numpy()[counted]
        np.add.at(self.expert_share[layer], experts, shares)
        np.add.at(self.expert_assignments[layer], experts, 1)
        inside = ranks < self.max_rank
        np.add.at(self.rank_share[layer], ranks[inside], shares[inside])
        np.add.at(self.rank_assignments[layer], ranks[inside], 1)

    def summary(self, layer_names: Sequence[str]) -> dict:
        out = {}
        for layer, name in enumerate(layer_names):
            n = self.tokens[layer]

            def mean(total, count):
                return float(total / count) if count > 0 else None

            ranks = self.rank_assignments[layer]
            last = int(np.nonzero(ranks)[0].max()) + 1 if ranks.any() else 0
            with np.errstate(invalid="ignore", divide="ignore"):
                by_expert = self.expert_share[layer] / self.expert_assignments[layer]
                by_rank = self.rank_share[layer, :last] / ranks[:last]
            out[name] = {
                "tokens": float(n),
                "tokens_skipped": float(self.skipped[layer]),
                "top1_share": mean(self.top1_share[layer], n),
                "top1_cosine": mean(self.cosine[layer], n),
                "top1_relative_error": mean(self.relative_error[layer], n),
                "share_by_rank": by_rank.tolist(),
                "share_by_expert": by_expert.tolist(),
                "assignments_by_expert": self.expert_assignments[layer].tolist(),
                "top1_share_histogram": {
                    "edges": np.linspace(0, 1, self.bins + 1).tolist(),
                    "tokens": self.share_hist[layer].tolist(),
                },
                "cosine_histogram": {
                    "edges": np.linspace(-1, 1, 2 * self.bins + 1).tolist(),
                    "tokens": self.cosine_hist[layer].tolist(),
                },
            }
        return out


# ------------------------------------------------------------------------------------ the counting pass


class PeerCollector:
    """The counting pass of the selected analyses (those in COUNTING): per batch, `begin_batch` with the
    tokens, then `layer` for every MoE layer in model order (with `contribute` where expert outputs are
    available), then `end_batch`; `compare` feeds router agreement with the second checkpoint's routing."""

    def __init__(
        self,
        analyses: Sequence[str],
        num_layers: int,
        num_experts: int,
        num_domains: int,
        vocab_size: int,
        device: torch.device | str = "cpu",
        token_budget: int = 2**27,
    ):
        self.analyses = list(analyses)
        self.device = torch.device(device)
        self.num_layers, self.num_experts = num_layers, num_experts
        self.coactivation = (
            CoActivation(num_layers, num_experts, device) if "coactivation" in analyses else None
        )
        self.tokens = (
            TokenTables(num_layers, num_experts, vocab_size, device, token_budget)
            if "tokens" in analyses
            else None
        )
        self.cross_layer = CrossLayer(num_layers, num_experts, device) if "cross_layer" in analyses else None
        self.contribution = Contribution(num_layers, num_experts) if "contribution" in analyses else None
        self.agreement = Agreement(num_layers, num_domains, device) if "agreement" in analyses else None
        self.num_tokens = 0
        self._domain_ids: Tensor | None = None

    def begin_batch(self, token_ids: Tensor, next_ids: Tensor | None, domain_ids: Tensor | None) -> None:
        """The batch's flat tokens [T], next tokens [T] (None: unknown) and domain labels [T]."""
        self._domain_ids = domain_ids
        self.num_tokens += token_ids.numel()
        if self.tokens is not None:
            self.tokens.observe(token_ids, next_ids)

    def layer(self, layer: int, routing: Routing) -> None:
        if self.coactivation is None and self.cross_layer is None and self.tokens is None:
            return
        routing = routing_to(routing, self.device)
        member = membership(routing)
        if self.coactivation is not None:
            self.coactivation.update(layer, member)
        if self.cross_layer is not None:
            self.cross_layer.update(layer, member, top1_expert(routing, member))
        if self.tokens is not None:
            self.tokens.update(layer, routing)

    def contribute(self, layer: int, routing: Routing, expert_outputs: Tensor) -> None:
        """Expert outputs [A, d] in the order of `routing`'s assignments."""
        if self.contribution is not None:
            self.contribution.update(
                layer,
                routing.token_index,
                routing.expert_index,
                routing.weight.detach(),
                expert_outputs.detach(),
                routing.num_tokens,
                None if routing.kept is None else routing.kept,
            )

    def compare(self, layer: int, a: Routing, b: Routing) -> None:
        if self.agreement is not None:
            self.agreement.update(
                layer, routing_to(a, self.device), routing_to(b, self.device), self._domain_ids
            )

    def end_batch(self) -> None:
        if self.cross_layer is not None:
            self.cross_layer.end_batch()

    def summary(
        self,
        layer_names: Sequence[str],
        domains: Sequence[str],
        decode: Callable[[list[int]], list[str]] | None = None,
        top: int = 10,
        min_count: int = 5,
    ) -> dict:
        """Every number of the counting pass, keyed by analysis and layer name."""
        out: dict = {}
        if self.coactivation is not None:
            pairs = self.coactivation.pairs.cpu().numpy()
            out["coactivation"] = {
                name: coactivation_summary(pairs[i], float(self.coactivation.tokens[i]), top, min_count)
                for i, name in enumerate(layer_names)
            }
        if self.tokens is not None:
            tables = self.tokens.summary(decode, top, min_count)
            out["tokens"] = {
                "layers": dict(zip(layer_names, tables["layers"], strict=True)),
                "tracking": tables["tracking"],
                "min_count": min_count,
            }
        if self.cross_layer is not None:
            joint, joint_top1 = (
                self.cross_layer.joint.cpu().numpy(),
                self.cross_layer.joint_top1.cpu().numpy(),
            )
            out["cross_layer"] = {
                f"{layer_names[i]}->{layer_names[i + 1]}": {
                    "assignments": transition_summary(joint[i], top),
                    "top1": transition_summary(joint_top1[i], top),
                }
                for i in range(len(joint))
            }
        if self.contribution is not None:
            out["contribution"] = self.contribution.summary(layer_names)
        if self.agreement is not None:
            out["agreement"] = {"layers": self.agreement.summary(layer_names, domains)}
        return out


# ------------------------------------------------------------------------------- ablation and forcing


def loss_table_summary(
    kind: str,
    baseline,
    losses,
    domains: Sequence[str],
    layer_names: Sequence[str],
    top: int = 10,
) -> dict:
    """Loss changes of single-expert interventions: `baseline` [D] mean loss per domain (nats/token) and
    `losses` [L', E, D] under the intervention on expert e of layer l. delta = losses - baseline per domain;
    `delta_mean` the mean over domains (each domain weighted equally, as val_loss_mean).
    ablation: `top` ranks (layer, expert) by the largest mean increase, and per domain by that domain's;
    forcing: `top` ranks by the smallest mean increase (the experts that best stand in for the whole layer),
    and per domain the expert whose forcing costs that domain least (`best_per_domain`, per layer)."""
    base = np.asarray(baseline, dtype=np.float64)
    table = np.asarray(losses, dtype=np.float64)
    delta = table - base
    mean = delta.mean(axis=-1)
    sign = -1.0 if kind == "ablation" else 1.0
    flat = np.argsort(sign * mean.ravel(), kind="stable")[:top]
    num_experts = table.shape[1]

    def entry(n: int, values: np.ndarray) -> dict:
        layer, expert = divmod(int(n), num_experts)
        return {
            "layer": layer_names[layer],
            "expert": expert,
            "delta_mean": float(values.ravel()[n]),
            "delta": {d: float(delta[layer, expert, i]) for i, d in enumerate(domains)},
        }

    out = {
        "baseline": {d: float(v) for d, v in zip(domains, base, strict=True)},
        "baseline_mean": float(base.mean()),
        "delta": {name: delta[i].tolist() for i, name in enumerate(layer_names)},  # [expert][domain]
        "delta_mean": {name: mean[i].tolist() for i, name in enumerate(layer_names)},
        "top": [entry(n, mean) for n in flat],
        "top_per_domain": {
            d: [
                entry(n, delta[..., i]) for n in np.argsort(sign * delta[..., i].ravel(), kind="stable")[:top]
            ]
            for i, d in enumerate(domains)
        },
    }
    if kind == "forcing":
        out["best_per_domain"] = {
            name: {d: int(np.argmin(delta[layer, :, i])) for i, d in enumerate(domains)}
            for layer, name in enumerate(layer_names)
        }
    return out


def json_ready(value, digits: int | None = None):
    """Nested containers with NaN and infinities as None (strict JSON), numpy scalars as Python numbers and
    floats rounded to `digits` significant digits (None: as they are)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v, digits) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{digits}g}") if digits else value
    return value
