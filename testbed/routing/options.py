"""The routers' names and options, without their implementations (torch-free): `ROUTERS` and one config
dataclass per router, declared with `@ROUTERS.options(name)`. A config is composed and checked from these
alone (testbed.config); the router classes (`@ROUTERS.register(name)`, one module each in this package)
are imported the first time one is asked for. Each dataclass is importable from its router's module too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from testbed.registry import Registry
from testbed.scope import Scope

ROUTERS = Registry("router", "router", "testbed.routing")
"""Registry of testbed.routing.base.Router subclasses, by name."""


@ROUTERS.options("topk_softmax")
@dataclass
class TopKSoftmaxConfig:
    name: str = "topk_softmax"
    top_k: int = 2
    renormalize: bool = (
        False  # True: gates of the chosen experts sum to 1 (Mixtral); False: OLMoE/DeepSeek-V2
    )
    jitter: float = (
        0.0  # multiplicative input noise U(1-jitter, 1+jitter) during training (Switch Transformer)
    )
    # two-stage start: for the first hash_steps optimizer steps each token goes to the hash router's experts
    # (router=hash, seed 0), gated by this router's probabilities, so the router learns to weight a stable
    # assignment; from then on its own top-k (StableMoE's two stages, in the other order)
    hash_steps: int = 0


@ROUTERS.options("sinkhorn")
@dataclass
class SinkhornConfig:
    name: str = "sinkhorn"
    top_k: int = 2
    iterations: int = 20  # alternating row/column normalizations
    scope: Scope = Scope.micro_batch  # sequence | micro_batch | global
    renormalize: bool = False  # gates of the chosen experts sum to 1
    eval_balanced: bool = False  # true: evaluation routes as training does (balanced), not plain top-k


@ROUTERS.options("balanced_assignment")
@dataclass
class BalancedAssignmentConfig:
    name: str = "balanced_assignment"
    top_k: int = 2
    scope: Scope = Scope.micro_batch  # sequence | micro_batch: the group assigned with equal expert capacity
    eps: float = 1.0e-4  # final auction epsilon, relative to the score range of the group
    eps_factor: float = 8.0  # epsilon scaling: divided by this per phase
    check_every: int = 8  # rounds between host-side "done?" checks
    max_rounds: int = 20000  # per phase; beyond it the assignment is reported as not found
    renormalize: bool = False  # gates of the chosen experts sum to 1
    eval_balanced: bool = False  # true: evaluation routes as training does (balanced), not plain top-k


@ROUTERS.options("expert_choice")
@dataclass
class ExpertChoiceConfig:
    name: str = "expert_choice"
    top_k: int = 2  # K: average experts per token; only sets the capacity C
    capacity_factor: float = 1.0  # C = ceil(capacity_factor * K * tokens / E), capped at the token count
    scope: Scope = Scope.micro_batch  # micro_batch | sequence (choose within each sequence; C from seq_len)


@ROUTERS.options("hash")
@dataclass
class HashConfig:
    name: str = "hash"
    top_k: int = 2  # experts per token
    seed: int = 0  # seeds the hash constants A_e, B_e: same seed, same token -> expert map


class WithinBlock(StrEnum):
    """How the oracle picks top_k experts inside the domain's block."""

    learned = "learned"  # top-k of the gate logits in the block
    uniform = "uniform"  # by token position, no gate (a gate-less router)


@ROUTERS.options("oracle")
@dataclass
class OracleConfig:
    name: str = "oracle"
    top_k: int = 2  # experts per token, all inside the token's domain block; needs top_k <= floor(E / D)
    within_block: WithinBlock = WithinBlock.learned  # learned: gate top-k in the block | uniform: by position


@ROUTERS.options("sigmoid")
@dataclass
class SigmoidConfig:
    name: str = "sigmoid"
    top_k: int = 2
    scale: float = 1.0  # routed scaling factor: the gates of a token sum to `scale`
