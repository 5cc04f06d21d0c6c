"""Routing rules of pretrained Hugging Face MoE families, reconstructed from their router logits.

Each family's router (read from the `transformers` source, 5.x) maps logits z [T, E] to the experts a token
is sent to and their combine weights. `route` recomputes exactly that from z (plus the router's own buffers,
e.g. DeepSeek-V3's `e_score_correction_bias`), so that routing can be counted from `output_router_logits`
alone and changed by an intervention (pruning, reweighting) in one place. Pure torch: no transformers import.

Rules (selection; gate of a chosen expert; families):
- `softmax_topk`: TopK(softmax(z)); softmax(z), renormalized over the K when `norm_topk_prob`, times
  `routed_scaling_factor`. OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral (always renormalized), DeepSeek-V2 (greedy
  or group-limited greedy: only the `topk_group` groups with the highest max score compete).
- `sigmoid_group`: TopK(σ(z) + b) inside the `topk_group` best groups (group score: sum of its top-2 of
  σ(z) + b), b = `e_score_correction_bias`; σ(z), renormalized if `norm_topk_prob`, times
  `routed_scaling_factor`. DeepSeek-V3, GLM-4-MoE.
- `sparsemixer` (eval mode, K = 2): top-1 = argmax z, top-2 = argmax of the rest; gate = softmax of z over
  the experts within 2·ε (relative) of the chosen one's logit, ε = `router_jitter_noise`. PhiMoE.
- `topk_softmax`: TopK(z) (the router has a bias); softmax over the K chosen logits. GPT-OSS.

Shared experts (Qwen2-MoE's gated shared expert, DeepSeek's `n_shared_experts`) see every token and are not
routed: they are not among the E experts counted here.

The full distribution used by the metrics (`probs`, p_t) is softmax(z) for every rule except
`sigmoid_group`, where it is σ(z) normalized over the experts.

Interventions, defined here: `excluded` [E] bool removes experts from the *selection* only (the chosen set is
the best K among the others; gate values are computed as the model computes them, with the excluded experts
still in any softmax over all experts), so excluding an expert that is never chosen changes nothing.
`gate_scale` [E] multiplies the final combine weight of each chosen expert (1 = unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RULES = ("softmax_topk", "sigmoid_group", "sparsemixer", "topk_softmax")


@dataclass(frozen=True)
class Family:
    """How one `model_type` routes: the rule and where its settings live in the config."""

    model_type: str
    label: str
    rule: str
    experts_key: tuple[str, ...]  # config attributes holding E, first present wins
    renormalize: str | bool  # config attribute name of norm_topk_prob, or a constant
    shared: str  # how shared experts look, for docs/hf.md and analysis.json
    router: str  # the router module (as named in the decoder layer)


FAMILIES = {
    f.model_type: f
    for f in (
        Family("olmoe", "OLMoE", "softmax_topk", ("num_experts",), "norm_topk_prob", "none", "mlp.gate"),
        Family(
            "qwen2_moe",
            "Qwen2-MoE",
            "softmax_topk",
            ("num_experts",),
            "norm_topk_prob",
            "one shared expert on every token, scaled by sigmoid(shared_expert_gate(x))",
            "mlp.gate",
        ),
        Family(
            "qwen3_moe", "Qwen3-MoE", "softmax_topk", ("num_experts",), "norm_topk_prob", "none", "mlp.gate"
        ),
        Family("mixtral", "Mixtral", "softmax_topk", ("num_local_experts",), True, "none", "mlp.gate"),
        Family(
            "deepseek_v2",
            "DeepSeek-V2",
            "softmax_topk",
            ("num_experts", "n_routed_experts"),
            False,
            "n_shared_experts always-on experts (one MLP of n_shared_experts x moe_intermediate_size)",
            "mlp.gate",
        ),
        Family(
            "deepseek_v3",
            "DeepSeek-V3",
            "sigmoid_group",
            ("num_local_experts", "n_routed_experts"),
            "norm_topk_prob",
            "n_shared_experts always-on experts (one MLP of n_shared_experts x moe_intermediate_size)",
            "mlp.gate",
        ),
        Family(
            "glm4_moe",
            "GLM-4-MoE",
            "sigmoid_group",
            ("num_local_experts", "n_routed_experts"),
            "norm_topk_prob",
            "n_shared_experts always-on experts",
            "mlp.gate",
        ),
        Family("phimoe", "PhiMoE", "sparsemixer", ("num_local_experts",), False, "none", "mlp.router"),
        Family("gpt_oss", "GPT-OSS", "topk_softmax", ("num_local_experts",), True, "none", "mlp.router"),
    )
}


@dataclass(frozen=True)
class RouterSpec:
    """One model's routing settings, read from its config."""

    family: Family
    num_experts: int
    top_k: int
    renormalize: bool
    scaling: float = 1.0  # routed_scaling_factor (DeepSeek, GLM)
    topk_method: str = "greedy"  # DeepSeek-V2: greedy | group_limited_greedy
    num_groups: int = 1
    topk_groups: int = 1
    jitter_eps: float = 0.0  # PhiMoE: router_jitter_noise, the sparsemixer threshold

    def describe(self) -> dict:
        return {
            "family": self.family.label,
            "model_type": self.family.model_type,
            "rule": self.family.rule,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "renormalize": self.renormalize,
            "routed_scaling_factor": self.scaling,
            "topk_method": self.topk_method,
            "n_group": self.num_groups,
            "topk_group": self.topk_groups,
            "shared_experts": self.family.shared,
            "router_module": self.family.router,
        }


def spec_for(config) -> RouterSpec:
    """The routing settings of a transformers config; KeyError for a model_type without a known router."""
    family = FAMILIES[config.model_type]
    num_experts = next(getattr(config, k) for k in family.experts_key if getattr(config, k, None))
    renormalize = family.renormalize
    if isinstance(renormalize, str):
        renormalize = bool(getattr(config, renormalize, False))
    top_k = config.num_experts_per_tok
    if family.rule == "sparsemixer":
        top_k = 2  # sparsemixer always picks two experts, whatever num_experts_per_tok says
    groups = getattr(config, "n_group", None) or 1
    return RouterSpec(
        family=family,
        num_experts=int(num_experts),
        top_k=int(top_k),
        renormalize=renormalize,
        scaling=float(getattr(config, "routed_scaling_factor", None) or 1.0),
        topk_method=getattr(config, "topk_method", None) or "greedy",
        num_groups=int(groups),
        topk_groups=int(getattr(config, "topk_group", None) or 1),
        jitter_eps=float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
    )


@dataclass
class Choice:
    """A token-choice routing decision: full distribution [T, E], chosen experts [T, K], gates [T, K]."""

    probs: Tensor
    indices: Tensor
    weights: Tensor


def route(
    spec: RouterSpec,
    logits: Tensor,
    correction_bias: Tensor | None = None,
    excluded: Tensor | None = None,
    gate_scale: Tensor | None = None,
) -> Choice:
    """The model's routing of logits [T, E] (computed in fp32, as every family's router does)."""
    z = logits.float()
    rule = spec.family.rule
    if rule == "softmax_topk":
        choice = _softmax_topk(spec, z, excluded)
    elif rule == "sigmoid_group":
        choice = _sigmoid_group(spec, z, correction_bias, excluded)
    elif rule == "sparsemixer":
        choice = _sparsemixer(spec, z, excluded)
    elif rule == "topk_softmax":
        choice = _topk_softmax(spec, z, excluded)
    else:  # pragma: no cover - FAMILIES only uses RULES
        raise ValueError(f"unknown routing rule {rule!r}; known: {RULES}")
    if gate_scale is not None:
        choice.weights = choice.weights * gate_scale.to(choice.weights)[choice.indices]
    return choice


def _exclude(scores: Tensor, excluded: Tensor | None, fill: float = float("-inf")) -> Tensor:
    return scores if excluded is None else scores.masked_fill(excluded.to(scores.device), fill)


def _group_mask(spec: RouterSpec, scores: Tensor, group_score: str) -> Tensor:
    """[T, E] True for the experts in each token's `topk_group` best groups (DeepSeek's device-limited
    routing): group score = max of the group (V2) or sum of its top-2 (V3)."""
    grouped = scores.view(-1, spec.num_groups, spec.num_experts // spec.num_groups)
    if group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_index = torch.topk(group_scores, k=spec.topk_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_index, 1).bool()
    return group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, spec.num_experts)


def _softmax_topk(spec: RouterSpec, z: Tensor, excluded: Tensor | None) -> Choice:
    probs = torch.softmax(z, dim=-1)
    scores = probs
    if spec.topk_method == "group_limited_greedy":  # DeepSeek-V2: other groups' scores become 0
        scores = scores.masked_fill(~_group_mask(spec, scores, "max"), 0.0)
    # excluded experts go below any softmax value (>= 0), also below the masked groups' zeros
    chosen = torch.topk(_exclude(scores, excluded, -1.0), spec.top_k, dim=-1).indices
    gates = scores.gather(-1, chosen)
    if spec.renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return Choice(probs, chosen, gates * spec.scaling)


def _sigmoid_group(spec: RouterSpec, z: Tensor, bias: Tensor | None, excluded: Tensor | None) -> Choice:
    scores = z.sigmoid()
    for_choice = scores if bias is None else scores + bias.float()
    for_choice = for_choice.masked_fill(~_group_mask(spec, for_choice, "top2_sum"), float("-inf"))
    chosen = torch.topk(_exclude(for_choice, excluded), spec.top_k, dim=-1, sorted=False)[1]
    gates = scores.gather(1, chosen)
    if spec.renormalize:
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
    probs = scores / scores.sum(dim=-1, keepdim=True)
    return Choice(probs, chosen, gates * spec.scaling)


def _sparsemixer_gate(z: Tensor, candidates: Tensor, selected: Tensor, eps: float) -> Tensor:
    """PhiMoE's eval-mode gate: softmax over the `candidates` logits within 2·eps (relative) of the selected
    expert's logit, taken at the selected expert. Without exclusion the selected logit is the candidates' max,
    as in `transformers`' sparsemixer."""
    top = candidates.gather(-1, selected)
    factor = z.abs().clamp(min=top)
    masked = candidates.masked_fill(((top - z) / factor) > (2 * eps), float("-inf"))
    return torch.softmax(masked, dim=-1).gather(-1, selected)


def _sparsemixer(spec: RouterSpec, z: Tensor, excluded: Tensor | None) -> Choice:
    first = _exclude(z, excluded).argmax(dim=-1, keepdim=True)
    gate_first = _sparsemixer_gate(z, z, first, spec.jitter_eps)
    rest = z.scatter(-1, first, float("-inf"))
    second = _exclude(rest, excluded).argmax(dim=-1, keepdim=True)
    gate_second = _sparsemixer_gate(z, rest, second, spec.jitter_eps)
    chosen = torch.cat([first, second], dim=-1)
    return Choice(torch.softmax(z, dim=-1), chosen, torch.cat([gate_first, gate_second], dim=-1))


def _topk_softmax(spec: RouterSpec, z: Tensor, excluded: Tensor | None) -> Choice:
    top_logits, chosen = torch.topk(_exclude(z, excluded), spec.top_k, dim=-1)
    return Choice(torch.softmax(z, dim=-1), chosen, torch.softmax(top_logits, dim=-1))
