"""The MoE layer: router -> Routing -> experts -> combine (+ shared experts). Pure: it returns its output and
a record of its routing; losses, counters and balancing state live outside the model (the training module
and the metrics callback consume the records)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from testbed.model.experts import DenseSwiGLU, ExpertBank
from testbed.model.schema import MoEConfig
from testbed.routing.base import ROUTERS, Routing, RoutingContext
from testbed.routing.capacity import mask_capacity


@dataclass
class LayerRecord:
    """What one MoE layer reports besides its hidden states, for the losses and the routing counters."""

    routing: Routing  # the layer's decision (after capacity: dropped assignments have `kept` False)
    expert_outputs: Tensor  # [A, d] each assignment's expert output o_{t,k}, before the gate


class MoELayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        moe: MoEConfig,
        router_config,
        layer_index: int,
        out_init_scale: float = 1.0,
        num_domains: int = 1,
    ):
        super().__init__()
        router_cls, _ = ROUTERS.get(router_config.name)
        self.layer_index = layer_index  # block index in the model (metric keys use it)
        self.moe_index = 0  # ordinal among MoE layers (row of the routing counters); set by the model
        self.router = router_cls(d_model, moe.num_experts, router_config, num_domains)
        self.experts = ExpertBank(moe.num_experts, d_model, moe.expert_hidden, moe.backend, out_init_scale)
        self.shared = (
            DenseSwiGLU(d_model, moe.num_shared_experts * moe.expert_hidden, out_init_scale)
            if moe.num_shared_experts > 0
            else None
        )
        self.capacity_factor = moe.capacity_factor

    def layer_context(self, context: RoutingContext) -> RoutingContext:
        """The model's routing context as this layer sees it: its index and, for per-token losses, the static
        bound on experts per token (None: data-dependent, e.g. expert choice)."""
        return context.for_layer(self.layer_index, self.router.top_k if self.router.token_choice else None)

    def forward(self, x: Tensor, context: RoutingContext) -> tuple[Tensor, LayerRecord]:
        batch, seq, d_model = x.shape
        flat = x.reshape(batch * seq, d_model)
        routing = self.router(flat, self.layer_context(context))
        if self.capacity_factor is not None and self.router.token_choice:
            # static shapes, no host sync: dropped assignments stay with gate 0 and `routing.kept` False;
            # losses and counters count only the kept ones
            routing = mask_capacity(routing, self.capacity_factor, self.router.top_k)
        y, expert_outputs = self.experts(flat, routing, return_expert_outputs=True)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(batch, seq, d_model), LayerRecord(routing=routing, expert_outputs=expert_outputs)
