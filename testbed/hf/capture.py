"""Forward hooks on a Hugging Face MoE's router modules: reconstruct each layer's routing from its logits,
check it against the model's own choice, hand it to a counter, and optionally replace the model's choice
(pruning, reweighting) with the reconstruction under the intervention.

transformers 5 routers return (router_logits, top_k_weights, top_k_index); the logits are what
`output_router_logits` exposes, and the hooks see them whether or not the model returns them. A router that
returns only logits (a plain Linear gate, as in transformers 4) can be counted but not intervened on.

Everything a hook hands on (the `Routing` of `on_routing`, the logits and choice of `on_choice`) is moved to
the device of the model's input embeddings first, so that counters on one device also work for a model
spread over several (`device_map`); the choice returned to the model stays on the router's own device.
Nothing is kept beyond the batch: what a caller accumulates is up to its callback.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

from testbed.hf.families import Choice, RouterSpec, route
from testbed.routing.base import Routing, routing_from_choices

ROUTER_SUFFIXES = (".mlp.gate", ".mlp.router", ".block_sparse_moe.gate", ".block_sparse_moe.router")
LAYER_NUMBER = re.compile(r"layers\.(\d+)\.")


def find_routers(model: nn.Module, spec: RouterSpec) -> list[tuple[str, nn.Module]]:
    """(layer name, router module) of every MoE layer in model order; the name is `layer<i>` with i the
    decoder layer index (dense layers, e.g. DeepSeek's first_k_dense_replace, have none)."""
    return [(layer, module) for layer, _, module in router_paths(model, spec)]


def router_paths(model: nn.Module, spec: RouterSpec) -> list[tuple[str, str, nn.Module]]:
    """(layer name, module path, router module) of every MoE layer in model order (`find_routers`)."""
    found = []
    for name, module in model.named_modules():
        if not name.endswith(ROUTER_SUFFIXES):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[0] != spec.num_experts:
            continue  # e.g. Qwen2-MoE's shared_expert_gate (1 output) or a dense MLP's gate_proj
        match = LAYER_NUMBER.search(name)
        found.append((f"layer{match.group(1) if match else len(found)}", name, module))
    return found


def choice_to_routing(logits: Tensor, choice: Choice) -> Routing:
    """The testbed's expert-sorted `Routing` of a token-choice decision (what RoutingStats consumes)."""
    return routing_from_choices(logits.float(), choice.probs, choice.indices.long(), choice.weights)


class RouterHooks:
    """Context manager: hooks on every router while active.

    on_routing(layer, routing): called with each layer's (reconstructed, intervened) routing of the batch.
    on_choice(layer, logits, choice): the same decision as raw logits [T, E] and `Choice` (cheaper: no
    expert-sorted `Routing` is built); counters that only need loads and probabilities use this.
    excluded [L, E] bool, gate_scale [L, E]: interventions (see `families.route`); the model then computes
    with the reconstructed choice. where: None (the intervention holds at every position) or a callable
    returning the [T] bool mask of the current batch's flattened positions where it holds (elsewhere the
    model's own choice stands). `agreement()` reports how often the reconstruction without intervention
    chose exactly the model's own experts (as sets), per layer.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: RouterSpec,
        on_routing: Callable[[int, Routing], None] | None = None,
        excluded: Tensor | None = None,
        gate_scale: Tensor | None = None,
        on_choice: Callable[[int, Tensor, Choice], None] | None = None,
        where: Callable[[], Tensor] | None = None,
    ):
        self.spec, self.on_routing, self.on_choice, self.where = spec, on_routing, on_choice, where
        self.routers = find_routers(model, spec)
        self.layer_names = [name for name, _ in self.routers]
        self.excluded, self.gate_scale = excluded, gate_scale
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        self.collect_device = weight.device if isinstance(weight, Tensor) else None
        num_layers = len(self.routers)
        self.matched = torch.zeros(num_layers, dtype=torch.long)
        self.checked = torch.zeros(num_layers, dtype=torch.long)
        self.handles: list = []

    @property
    def intervening(self) -> bool:
        return self.excluded is not None or self.gate_scale is not None

    def __enter__(self) -> RouterHooks:
        for layer, (_, module) in enumerate(self.routers):
            self.handles.append(module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _collected(self, logits: Tensor, choice: Choice) -> tuple[Tensor, Choice]:
        device = self.collect_device
        if device is None or logits.device == device:
            return logits, choice
        moved = Choice(choice.probs.to(device), choice.indices.to(device), choice.weights.to(device))
        return logits.to(device), moved

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            own = isinstance(output, tuple | list)
            logits = output[0] if own else output
            if not torch.is_floating_point(logits) or logits.shape[-1] != self.spec.num_experts:
                raise RuntimeError(
                    f"{self.layer_names[layer]}: the router returns {tuple(logits.shape)} "
                    f"{logits.dtype} first, not logits over {self.spec.num_experts} experts; this "
                    "transformers version's router is not supported (use transformers>=5)"
                )
            logits = logits.reshape(-1, self.spec.num_experts)
            bias = getattr(module, "e_score_correction_bias", None)
            choice = route(self.spec, logits, bias)
            if own:  # the model's own selection, compared as sets (some routers use sorted=False)
                same = (
                    choice.indices.sort(-1).values == output[2].reshape(choice.indices.shape).sort(-1).values
                )
                self.matched[layer] += int(same.all(-1).sum())
                self.checked[layer] += same.shape[0]
            if self.intervening:
                if not own:
                    raise RuntimeError(
                        f"{self.layer_names[layer]}: the router returns logits only, so its choice cannot "
                        "be replaced; interventions need transformers>=5"
                    )
                changed = route(
                    self.spec,
                    logits,
                    bias,
                    None if self.excluded is None else self.excluded[layer],
                    None if self.gate_scale is None else self.gate_scale[layer],
                )
                if self.where is not None:  # the intervention at some positions only
                    at = self.where().to(logits.device).reshape(-1, 1)
                    own_choice = Choice(
                        choice.probs,
                        output[2].reshape(choice.indices.shape).to(choice.indices.dtype),
                        output[1].reshape(choice.weights.shape).to(choice.weights.dtype),
                    )
                    changed = Choice(
                        choice.probs,
                        torch.where(at, changed.indices, own_choice.indices),
                        torch.where(at, changed.weights, own_choice.weights),
                    )
                choice = changed
            if self.on_routing is not None or self.on_choice is not None:
                collected_logits, collected = self._collected(logits, choice)
                if self.on_choice is not None:
                    self.on_choice(layer, collected_logits, collected)
                if self.on_routing is not None:
                    self.on_routing(layer, choice_to_routing(collected_logits, collected))
            if self.intervening:
                weights, indices = output[1], output[2]
                new = (
                    choice.weights.to(weights.dtype).reshape(weights.shape),
                    choice.indices.to(indices.dtype).reshape(indices.shape),
                )
                return (output[0], *new, *output[3:])
            return None

        return hook

    def agreement(self) -> dict[str, float | None]:
        """Per layer: fraction of tokens whose reconstructed expert set equals the model's own (None when
        the router does not return its choice)."""
        return {
            name: (float(self.matched[i]) / float(self.checked[i]) if self.checked[i] > 0 else None)
            for i, name in enumerate(self.layer_names)
        }
