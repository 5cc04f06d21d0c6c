"""The MoE layer: router -> Routing -> experts -> combine (+ shared experts) -> per-layer aux losses."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from testbed.losses.base import AuxLoss
from testbed.model.experts import DenseSwiGLU, ExpertBank
from testbed.model.schema import MoEConfig
from testbed.routing.base import ROUTERS, Routing, RoutingContext
from testbed.routing.capacity import mask_capacity


@dataclass
class LayerOutput:
    """What one MoE layer reports besides its hidden states: unweighted aux losses and its routing."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    routing: Routing | None = None


class MoELayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        moe: MoEConfig,
        router_config,
        losses: list[AuxLoss],
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
        self.losses = losses

    def forward(self, x: Tensor, context: RoutingContext) -> tuple[Tensor, LayerOutput]:
        batch, seq, d_model = x.shape
        flat = x.reshape(batch * seq, d_model)
        # static bound on experts per token for per-token losses (None: data-dependent, e.g. expert choice)
        context = context.for_layer(self.layer_index, self.router.top_k if self.router.token_choice else None)
        routing = self.router(flat, context)
        if self.capacity_factor is not None and self.router.token_choice:
            # static shapes, no host sync: dropped assignments stay with gate 0 and `routing.kept` False;
            # losses and counters count only the kept ones
            routing = mask_capacity(routing, self.capacity_factor, self.router.top_k)
        y, expert_outputs = self.experts(flat, routing, return_expert_outputs=True)
        if self.shared is not None:
            y = y + self.shared(flat)
        losses = {}
        if self.training:
            for loss in self.losses:
                losses[loss.name] = loss(
                    routing, context, expert_outputs if loss.needs_expert_outputs else None
                )
        stats = context.routing_stats
        if stats is not None:
            stats.update(self.moe_index, routing, context.domain_ids, expert_outputs, (batch, seq))
        return y.view(batch, seq, d_model), LayerOutput(losses=losses, routing=routing)
