"""Prune experts out of a pretrained HF MoE for real: their weights and router rows removed, the config's
expert count lowered, and the result saved in the model's own format (`save_pretrained`, safetensors), so
that plain `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it.

Where each family keeps what is removed (transformers 5.x; checked at prune time, any other layout is an
error naming the tensor):

- OLMoE, Qwen2-MoE, Qwen3-MoE (config `num_experts`), Mixtral, PhiMoE (`num_local_experts`), DeepSeek-V2
  (`n_routed_experts`): the block's `experts.gate_up_proj` and `experts.down_proj`, and the router's
  `weight` (`mlp.gate`; PhiMoE: `mlp.router`).
- DeepSeek-V3, GLM-4-MoE (`n_routed_experts`): the same, and the router's `e_score_correction_bias`.
- GPT-OSS (`num_local_experts`): the same plus `experts.gate_up_proj_bias` and `experts.down_proj_bias`,
  and the router's `weight` and `bias` (`mlp.router`).
The first dimension of each of these tensors is the expert; `num_experts_per_tok` stays (it never exceeds
the new count, see below).

Shared experts (Qwen2-MoE, DeepSeek, GLM) and dense layers are untouched. `save_pretrained` writes the
family's hub layout (per-expert tensors for the families stored that way), renumbering the kept experts
0 .. E' - 1 in their original order.

Which experts [defined here]: the config holds one expert count for every MoE layer, and no family has a
config field that masks experts per layer, so every layer loses the same number n of experts. n is the
smallest number of never-used experts of any layer, capped so that top-k (2 for PhiMoE's sparsemixer)
experts remain; in a layer with more never-used experts than n, the n with the smallest summed router
probability on the counted sample go (ties: the lower id). The grouped routers (DeepSeek-V2's
`group_limited_greedy`, DeepSeek-V3 and GLM with n_group > 1) read experts in n_group equal consecutive
groups, so there every group of every layer loses the same number m (n = m x n_group): m is the smallest
number of never-used experts in any group of any layer, capped so that each group keeps two experts
(sigmoid routers score a group by its top two) and the topk_group best groups still hold top-k experts.

When is the pruned model's output the original's: the kept router rows give the same logits, so a token's
routing is unchanged when the family's selection and gates do not depend on the removed logits beyond
their not being chosen. That holds for Mixtral, GPT-OSS and the renormalizing softmax routers
(`norm_topk_prob` true) wherever no removed expert was chosen; PhiMoE additionally needs no removed expert
within the sparsemixer's 2ε window of a chosen one. For the softmax routers that do not renormalize (OLMoE,
Qwen2/3-MoE with `norm_topk_prob` false, DeepSeek-V2) each gate grows by 1 / (1 - m_t), m_t the removed
experts' softmax mass at the token; for the grouped routers a group's score changes where a removed expert
was its group's best (V2) or among its group's top two (V3, GLM). `routing_unchanged` measures the fraction
of tokens whose experts and gates are unchanged on a sample, per layer, from the original router logits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from testbed.hf.capture import RouterHooks, router_paths
from testbed.hf.families import Choice, RouterSpec, route, spec_for
from testbed.hf.load import HFModel, HFModelError

EXPERT_COUNT_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts")
SAFE_MAX_SHARD = "5GB"


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its experts: tensors of the MoE block's `experts` module and of its router
    whose first dimension is the expert, and the config attribute of the expert count."""

    expert_tensors: tuple[str, ...]
    router_tensors: tuple[str, ...]
    config_key: str


_STACKED = ("gate_up_proj", "down_proj")
LAYOUTS = {
    "olmoe": Layout(_STACKED, ("weight",), "num_experts"),
    "qwen2_moe": Layout(_STACKED, ("weight",), "num_experts"),
    "qwen3_moe": Layout(_STACKED, ("weight",), "num_experts"),
    "mixtral": Layout(_STACKED, ("weight",), "num_local_experts"),
    "deepseek_v2": Layout(_STACKED, ("weight",), "n_routed_experts"),
    "deepseek_v3": Layout(_STACKED, ("weight", "e_score_correction_bias"), "n_routed_experts"),
    "glm4_moe": Layout(_STACKED, ("weight", "e_score_correction_bias"), "n_routed_experts"),
    "phimoe": Layout(_STACKED, ("weight",), "num_local_experts"),
    "gpt_oss": Layout(
        (*_STACKED, "gate_up_proj_bias", "down_proj_bias"), ("weight", "bias"), "num_local_experts"
    ),
}


@dataclass
class PrunePlan:
    """The experts removed per layer (old ids, ascending) and the rule that chose them."""

    layer_names: list[str]
    pruned: list[list[int]]
    num_experts: int
    rule: str
    grouped: bool = False
    limited_by: str = ""

    @property
    def removed_per_layer(self) -> int:
        return len(self.pruned[0]) if self.pruned else 0

    @property
    def kept(self) -> list[list[int]]:
        return [[e for e in range(self.num_experts) if e not in set(p)] for p in self.pruned]

    def describe(self) -> dict:
        return {
            "rule": self.rule,
            "experts_before": self.num_experts,
            "experts_after": self.num_experts - self.removed_per_layer,
            "removed_per_layer": self.removed_per_layer,
            "grouped": self.grouped,
            "limited_by": self.limited_by,
            "pruned": dict(zip(self.layer_names, self.pruned, strict=True)),
        }


def grouped_routing(spec: RouterSpec) -> bool:
    """Whether the router reads the experts in groups (then groups must stay equal)."""
    if spec.num_groups <= 1:
        return False
    return spec.family.rule == "sigmoid_group" or spec.topk_method == "group_limited_greedy"


def _least_mass(candidates: list[int], mass: Tensor, n: int) -> list[int]:
    return sorted(sorted(candidates, key=lambda e: (float(mass[e]), e))[:n])


def plan_pruning(spec: RouterSpec, layer_names: list[str], load: Tensor, mass: Tensor) -> PrunePlan:
    """Which never-used experts (load 0) each layer loses: the same number per layer (and per group for the
    grouped routers), the least-probable first (module docstring)."""
    num_layers, num_experts = load.shape
    never = load == 0
    top_k = spec.top_k
    if grouped_routing(spec):
        groups, size = spec.num_groups, num_experts // spec.num_groups
        per_group = never.view(num_layers, groups, size).sum(-1)
        m = int(per_group.min()) if per_group.numel() else 0
        limited = "the layer and group with the fewest never-used experts"
        floor = 2 if spec.family.rule == "sigmoid_group" else 1
        if size - m < floor:
            m, limited = size - floor, f"every group keeps {floor} expert(s) (the group score needs them)"
        while m > 0 and spec.topk_groups * (size - m) < top_k:
            m, limited = m - 1, f"the {spec.topk_groups} best groups must still hold top-k ({top_k}) experts"
        pruned = []
        for layer in range(num_layers):
            chosen = []
            for g in range(groups):
                ids = [g * size + i for i in range(size) if never[layer, g * size + i]]
                chosen += _least_mass(ids, mass[layer], m)
            pruned.append(sorted(chosen))
        rule = (
            f"{m} never-used expert(s) per group x {groups} groups in every layer "
            "(the least router probability first)"
        )
        return PrunePlan(layer_names, pruned, num_experts, rule, True, limited)
    n = int(never.sum(1).min()) if num_layers else 0
    limited = "the layer with the fewest never-used experts"
    if num_experts - n < top_k:
        n, limited = num_experts - top_k, f"top-k ({top_k}) experts must remain"
    pruned = [
        _least_mass(torch.nonzero(never[layer]).flatten().tolist(), mass[layer], n)
        for layer in range(num_layers)
    ]
    rule = f"{n} never-used expert(s) in every layer (the least router probability first)"
    return PrunePlan(layer_names, pruned, num_experts, rule, False, limited)


@dataclass
class PruneResult:
    parameters_before: int
    parameters_after: int
    removed_numel: dict[str, int] = field(default_factory=dict)  # per tensor name (layer-independent)
    removed_tensors: list[tuple[str, int]] = field(default_factory=list)  # (module path.tensor, numel)

    @property
    def parameters_removed(self) -> int:
        return self.parameters_before - self.parameters_after


def _check_materialized(tensor: Tensor, where: str) -> None:
    if tensor.device.type == "meta":
        raise HFModelError(
            f"{where} is not in memory (offloaded by the device map); pruning needs every expert weight "
            "loaded: use --device, or a --device-map with room for the whole model"
        )


def _slice(module: nn.Module, name: str, keep: Tensor, experts: int, where: str) -> int:
    tensor = getattr(module, name, None)
    if not isinstance(tensor, Tensor) or tensor.ndim == 0 or tensor.shape[0] != experts:
        shape = None if not isinstance(tensor, Tensor) else tuple(tensor.shape)
        raise HFModelError(
            f"{where}.{name}: expected a tensor with {experts} experts first, found {shape}; this "
            "transformers version lays out the experts differently from the one pruning was written for (5.x)"
        )
    _check_materialized(tensor, f"{where}.{name}")
    kept = tensor.detach().index_select(0, keep.to(tensor.device)).contiguous()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(kept, requires_grad=tensor.requires_grad))
    else:
        module._buffers[name] = kept
    return tensor.numel() - kept.numel()


@torch.no_grad()
def prune_model(hf: HFModel, plan: PrunePlan) -> PruneResult:
    """Remove the plan's experts from the model in memory: expert tensors, router rows, module counts and
    the config's count; `hf.spec` becomes the pruned model's."""
    family = hf.spec.family.model_type
    layout = LAYOUTS[family]
    routers = router_paths(hf.model, hf.spec)
    if [name for name, _, _ in routers] != plan.layer_names:
        raise HFModelError("the prune plan's layers are not the model's MoE layers")
    before = sum(p.numel() for p in hf.model.parameters())
    experts = plan.num_experts
    new_count = experts - plan.removed_per_layer
    result = PruneResult(before, before)
    for (_, path, router), kept in zip(routers, plan.kept, strict=True):
        block_path = path.rsplit(".", 1)[0]
        block = hf.model.get_submodule(block_path)
        expert_module = getattr(block, "experts", None)
        if not isinstance(expert_module, nn.Module):
            raise HFModelError(f"{block_path}: no `experts` module beside the router")
        keep = torch.tensor(kept, dtype=torch.long)
        for module, names, where in (
            (expert_module, layout.expert_tensors, f"{block_path}.experts"),
            (router, layout.router_tensors, path),
        ):
            for name in names:
                removed = _slice(module, name, keep, experts, where)
                result.removed_numel[name] = result.removed_numel.get(name, 0) + removed
                result.removed_tensors.append((f"{where}.{name}", removed))
        for module in block.modules():
            for attr in EXPERT_COUNT_ATTRS:
                if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == experts:
                    setattr(module, attr, new_count)
    setattr(hf.model.config, layout.config_key, new_count)
    spec = spec_for(hf.model.config)
    if spec.num_experts != new_count or spec.top_k > new_count:
        raise HFModelError(
            f"after pruning the config says {spec.num_experts} experts, top-{spec.top_k}; "
            f"expected {new_count}"
        )
    hf.spec = spec
    result.parameters_after = sum(p.numel() for p in hf.model.parameters())
    return result


def _keep_fp32(model, name: str) -> bool:
    patterns = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return any(p in name for p in patterns)


def check_out_dir(out: Path, source: str | None) -> None:
    """--out must not be the source model's folder, nor another model folder."""
    if source is not None and Path(source).is_dir() and out.resolve() == Path(source).resolve():
        raise HFModelError(f"--out {out}: is the model's own folder; write the pruned model elsewhere")
    if out.is_dir() and ((out / "config.json").exists() or any(out.glob("*.safetensors"))):
        raise HFModelError(
            f"--out {out}: already holds a model (config.json or .safetensors); give an empty or new folder"
        )


@torch.no_grad()
def save_pruned(hf: HFModel, out: Path, result: PruneResult) -> dict:
    """Save the pruned model (safetensors, in the dtype its checkpoint declares; the modules the family keeps
    in fp32 stay fp32) and its tokenizer; returns what was written and the bytes removed."""
    check_out_dir(out, hf.source)
    model = hf.model
    dtype = hf.stored_dtype if hf.stored_dtype in (torch.float32, torch.bfloat16, torch.float16) else hf.dtype
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.dtype != dtype and not _keep_fp32(model, name):
            tensor.data = tensor.data.to(dtype)
    removed_bytes = 0
    for where, numel in result.removed_tensors:  # in the dtype each tensor is saved in
        module_path, name = where.rsplit(".", 1)
        kept = getattr(model.get_submodule(module_path), name)
        removed_bytes += numel * kept.element_size()
    out.mkdir(parents=True, exist_ok=True)
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True, max_shard_size=SAFE_MAX_SHARD)
    tokenizer_saved = False
    if hf.tokenizer is not None and hasattr(hf.tokenizer, "save_pretrained"):
        hf.tokenizer.save_pretrained(out)
        tokenizer_saved = True
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    weights = sum(os.path.getsize(out / f) for f in files if f.endswith(".safetensors"))
    return {
        "out": str(out),
        "format": "safetensors",
        "dtype": str(dtype).removeprefix("torch."),
        "files": files,
        "tokenizer_saved": tokenizer_saved,
        "weights_bytes": weights,
        "bytes_removed": removed_bytes,
        "parameters_before": result.parameters_before,
        "parameters_after": result.parameters_after,
        "parameters_removed": result.parameters_removed,
    }


# ------------------------------------------------------------------------------- is the routing unchanged


def routing_change(
    spec: RouterSpec, pruned_spec: RouterSpec, logits: Tensor, bias: Tensor | None, kept: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per token [T]: (a removed expert chosen by the original router, routing unchanged = same experts and
    gates within 1e-5 relative, largest relative gate change) when the removed experts' router rows go."""
    original = route(spec, logits, bias)
    kept = kept.to(logits.device)
    pruned = route(pruned_spec, logits[:, kept], None if bias is None else bias[kept])
    removed = torch.ones(spec.num_experts, dtype=torch.bool, device=logits.device)
    removed[kept] = False
    hit = removed[original.indices].any(-1)
    mapped = kept[pruned.indices]
    order_a, order_b = original.indices.argsort(-1), mapped.argsort(-1)
    same_set = (original.indices.gather(-1, order_a) == mapped.gather(-1, order_b)).all(-1)
    gates_a = original.weights.gather(-1, order_a)
    gates_b = pruned.weights.gather(-1, order_b)
    relative = ((gates_a - gates_b).abs() / gates_a.abs().clamp_min(1e-12)).amax(-1)
    relative = torch.where(same_set, relative, torch.full_like(relative, float("inf")))
    return hit, same_set & (relative <= 1e-5), relative


@torch.no_grad()
def check_routing(hf: HFModel, plan: PrunePlan, batches, max_tokens: int = 16384) -> dict:
    """On a sample (before pruning): per layer, the fraction of tokens whose routing the pruned router
    reproduces exactly, the fraction where a removed expert was chosen, and the largest relative gate change
    among the tokens whose expert set is unchanged."""
    spec = hf.spec
    new_count = plan.num_experts - plan.removed_per_layer
    pruned_spec = RouterSpec(**{**spec.__dict__, "num_experts": new_count})
    hooks = RouterHooks(hf.model, spec)
    biases = [getattr(router, "e_score_correction_bias", None) for _, router in hooks.routers]
    kept = [torch.tensor(k, dtype=torch.long) for k in plan.kept]
    num_layers = len(hooks.routers)
    tokens = torch.zeros(num_layers, dtype=torch.long)
    unchanged = torch.zeros(num_layers, dtype=torch.long)
    hits = torch.zeros(num_layers, dtype=torch.long)
    worst = torch.zeros(num_layers, dtype=torch.float64)
    current: dict = {"rows": None}

    def on_choice(layer: int, logits: Tensor, choice: Choice) -> None:
        rows = current["rows"]
        if rows is not None:
            logits = logits[rows.to(logits.device)]
        bias = biases[layer]
        hit, same, relative = routing_change(
            spec, pruned_spec, logits, None if bias is None else bias.to(logits.device), kept[layer]
        )
        tokens[layer] += len(hit)
        hits[layer] += int(hit.sum())
        unchanged[layer] += int(same.sum())
        finite = relative[torch.isfinite(relative)]
        if finite.numel():
            worst[layer] = max(float(worst[layer]), float(finite.max()))

    hooks.on_choice = on_choice
    body = getattr(hf.model, hf.model.base_model_prefix)
    seen = 0
    with hooks:
        for batch in batches:
            ids, mask = batch if isinstance(batch, tuple) else (batch, None)
            current["rows"] = None if mask is None else mask.reshape(-1).bool()
            kwargs = {} if mask is None else {"attention_mask": mask.to(hf.device)}
            body(input_ids=ids.to(hf.device), **kwargs)
            seen += int(ids.numel() if mask is None else mask.sum())
            if seen >= max_tokens:
                break
    fraction = (unchanged.double() / tokens.clamp_min(1)).tolist()
    return {
        "tokens": seen,
        "routing_unchanged": dict(zip(plan.layer_names, fraction, strict=True)),
        "removed_expert_chosen": dict(
            zip(plan.layer_names, (hits.double() / tokens.clamp_min(1)).tolist(), strict=True)
        ),
        "max_relative_gate_change": dict(zip(plan.layer_names, worst.tolist(), strict=True)),
    }
