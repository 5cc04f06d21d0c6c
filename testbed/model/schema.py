"""The model's own config dataclasses (sizes, experts, backend). The model takes these; `testbed.config`
places them in a run's `RunConfig` (as `model` and `model.moe`) and validates them, so config sits above
the model and the model never imports config."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Backend(StrEnum):
    """How the experts run: `loop` (the readable reference) or `grouped` (one grouped GEMM)."""

    loop = "loop"
    grouped = "grouped"


@dataclass
class MoEConfig:
    num_experts: int = 16
    expert_hidden: int = 128
    num_shared_experts: int = 0  # always-on dense experts added to every token's output
    backend: Backend = Backend.grouped  # loop (reference) | grouped (grouped_mm)
    capacity_factor: float | None = (
        None  # token-choice routers: None = dropless, else ceil(cf*K*T/E) per expert
    )


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 1024
    dense_layers: int = 0  # the first k blocks use a dense SwiGLU instead of MoE
    dense_hidden: int = 512
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    moe: MoEConfig = field(default_factory=MoEConfig)
