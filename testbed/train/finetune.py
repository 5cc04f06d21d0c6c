"""Post-training: freeze everything except the routers and (optionally) chosen experts.

Experts are stacked in one tensor per layer, so "chosen experts" train through a gradient mask on the
stacked weights; those tensors go to an optimizer group without weight decay, so that frozen experts
stay bit-identical (AdamW's decoupled decay would otherwise shrink them).
"""

from __future__ import annotations

import torch

from testbed.config import FinetuneConfig


def chosen_experts(config: FinetuneConfig, layer_index: int) -> list[int] | None:
    """Expert ids trained in MoE layer `layer_index` (finetune.experts, per layer or shared); None = all."""
    if isinstance(config.experts, dict):
        return config.experts.get(f"layer{layer_index}", [])
    return config.experts


def apply_finetune(model, config: FinetuneConfig) -> list[torch.nn.Parameter]:
    """Set requires_grad per config.trainable and install expert gradient masks; returns the parameters
    that must not get weight decay (masked expert banks)."""
    if config.trainable == "all":
        return []
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    no_decay = []
    for layer in model.moe_layers:
        layer.router.gate.weight.requires_grad_(True)
        if config.trainable != "routers_and_experts":
            continue
        chosen = chosen_experts(config, layer.layer_index)
        for weight in (layer.experts.w_in, layer.experts.w_out):
            weight.requires_grad_(True)
            if chosen is not None:
                mask = torch.zeros(weight.shape[0], *([1] * (weight.dim() - 1)), device=weight.device)
                mask[list(chosen)] = 1.0
                weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
                no_decay.append(weight)
    return no_decay


def trainable_parameter_count(model, config: FinetuneConfig) -> int:
    """Parameters that post-training updates: requires_grad ones, counting only the chosen experts' rows of
    the masked (stacked) expert banks."""
    total = 0
    for layer in model.moe_layers:
        chosen = (
            chosen_experts(config, layer.layer_index) if config.trainable == "routers_and_experts" else None
        )
        for weight in (layer.experts.w_in, layer.experts.w_out):
            if weight.requires_grad and chosen is not None:
                total -= weight.numel() - len(set(chosen)) * weight[0].numel()
    return total + sum(p.numel() for p in model.parameters() if p.requires_grad)
