"""Decoder-only MoE language model: RMSNorm, rotary positions, causal SDPA attention, MoE (or dense) FFN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from testbed.model.experts import DenseSwiGLU
from testbed.model.moe import LayerRecord, MoELayer
from testbed.model.schema import ModelConfig
from testbed.routing.base import RoutingContext
from testbed.scope import GlobalScopeState


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    """cos/sin tables [seq, head_dim/2] for rotary position embeddings (Su et al. 2021)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x1, x2) of the last dim of x [B, H, S, Dh] by the position angle. cos/sin are the tables
    [max_seq_len, Dh/2] (token s at position s) or already gathered per token [B, 1, S, Dh/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    if cos.ndim == 2:
        cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, out_init_scale: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=d_model**-0.5)
        nn.init.normal_(self.out.weight, std=out_init_scale * d_model**-0.5)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # [B, 1, S, S] bool, True where a query may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, seq, d_model))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, ffn: nn.Module, out_init_scale: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model)
        self.attn = Attention(config.d_model, config.n_heads, out_init_scale)
        self.ffn_norm = nn.RMSNorm(config.d_model)
        self.ffn = ffn

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, context: RoutingContext, mask: Tensor | None = None
    ):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        if isinstance(self.ffn, MoELayer):
            y, record = self.ffn(self.ffn_norm(x), context)
            return x + y, record
        return x + self.ffn(self.ffn_norm(x)), None


class MoETransformer(nn.Module):
    """Token ids [B, S] -> logits [B, S, V] plus one `LayerRecord` per MoE layer. Pure: no losses, counters
    or training state inside; the routing context carries only what routers read."""

    def __init__(self, config: ModelConfig, router_config, num_domains: int = 1):
        super().__init__()
        self.config = config
        out_init_scale = 1.0 / math.sqrt(2 * config.n_layers)  # GPT-2 style residual scaling
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=config.d_model**-0.5)  # unit-variance logits when tied
        blocks = []
        for i in range(config.n_layers):
            if i < config.dense_layers:
                ffn = DenseSwiGLU(config.d_model, config.dense_hidden, out_init_scale)
            else:
                ffn = MoELayer(config.d_model, config.moe, router_config, i, out_init_scale, num_domains)
            blocks.append(Block(config, ffn, out_init_scale))
        self.blocks = nn.ModuleList(blocks)
        for moe_index, layer in enumerate(self.moe_layers):
            layer.moe_index = moe_index
        self.norm = nn.RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=config.d_model**-0.5)
        cos, sin = rotary_tables(config.max_seq_len, config.d_model // config.n_heads, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    @staticmethod
    def routing_context(
        input_ids: Tensor, domain_ids: Tensor | None = None, scope_state: GlobalScopeState | None = None
    ) -> RoutingContext:
        """The context the routers see for a batch [B, S]; the training module builds the same one to
        compute each layer's losses from the records."""
        batch, seq = input_ids.shape
        return RoutingContext(
            batch_size=batch,
            seq_len=seq,
            token_ids=input_ids.reshape(-1),
            domain_ids=None if domain_ids is None else domain_ids.reshape(-1),
            scope_state=scope_state,
        )

    def forward(
        self,
        input_ids: Tensor,
        domain_ids: Tensor | None = None,
        *,
        scope_state: GlobalScopeState | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        embedding_offset: Tensor | None = None,
        return_hidden: bool = False,
    ) -> tuple[Tensor, list[LayerRecord]]:
        """Logits [B, S, V], or with `return_hidden` the final normed hidden states [B, S, d] (the LM head's
        input, for a chunked LM loss that never builds the logits), and one `LayerRecord` per MoE layer.

        input_ids: [B, S] token ids. domain_ids: [B, S] domain label of each token (oracle router).
        Keyword-only, all optional (a misspelled one is Python's TypeError, never silently ignored):
        scope_state: the optimizer step's running expert counts, read by routers that balance over the
        global scope (Sinkhorn); set by training steps only.
        attention_mask: [B, S, S] bool, True where a query may attend; replaces the causal mask.
        position_ids: [B, S] rotary position of each token (default 0..S-1).
        (These two score several continuations of one shared prefix in one row: testbed-quiz's packing.)
        embedding_offset: [B, S, d] added to the token embeddings (the routing-stiffness perturbation).
        """
        context = self.routing_context(input_ids, domain_ids, scope_state)
        x = self.embed(input_ids)
        if embedding_offset is not None:
            x = x + embedding_offset
        cos, sin = self.rope_cos, self.rope_sin
        if position_ids is not None:
            cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
        mask = None if attention_mask is None else attention_mask.unsqueeze(1)
        records = []
        for block in self.blocks:
            x, record = block(x, cos, sin, context, mask)
            if record is not None:
                records.append(record)
        hidden = self.norm(x)
        return (hidden if return_hidden else self.lm_head(hidden)), records
