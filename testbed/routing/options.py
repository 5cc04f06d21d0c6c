"""The routers' names and options, without their implementations (torch-free): `ROUTERS` and one config
dataclass per router, declared with `@ROUTERS.options(name)` and derived from `RouterOptions`. Each states
the router's facts the config checks read (`token_choice`, ...) and checks its own values (`check`), so a
config is composed and checked from these alone (testbed.config); the router classes
(`@ROUTERS.register(name)`, one module each in this package, which get the facts copied from here) are
imported the first time one is asked for. Each dataclass is importable from its router's module too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from testbed.errors import ConfigError
from testbed.registry import Registry
from testbed.scope import LOCAL_SCOPES, SCOPES, Scope


class RouterOptions:
    """Base of every router's config dataclass: the router's facts that the config checks read, as class
    attributes (their defaults here; a router's options set what differs), and `check`, the check of the
    options' values. `ROUTERS.register` copies the facts onto the router class (testbed.routing.base.Router
    states those that only the model and the reports read: host_sync, label, ...).

    - `token_choice`: each token picks its experts (model.moe.capacity_factor may then drop assignments);
    - `supports_expert_bias`: selection adds the router's `expert_bias` buffer (balance=expert_bias);
    - `scopes`: balancing scopes the router itself uses (e.g. Sinkhorn); empty = none;
    - `gateless`: nothing is learned, the gate gets no gradient (hash): DDP then needs
      `find_unused_parameters` (testbed.config.resolve_strategy). `is_gateless()` also reads options that
      make a router gate-less (the oracle's `within_block: uniform`).
    """

    token_choice: ClassVar[bool] = True
    supports_expert_bias: ClassVar[bool] = False
    scopes: ClassVar[tuple[str, ...]] = ()
    gateless: ClassVar[bool] = False

    def is_gateless(self) -> bool:
        """Whether the gate goes unused with these options (`gateless`, unless an option decides it)."""
        return self.gateless

    def check(self, run: Any, key: str) -> None:
        """Raise ConfigError if these options cannot work in `run` (a RunConfig); called before training.
        A router's options that check more call this first (`super().check(run, key)`)."""
        check_top_k(getattr(self, "top_k", 1), run, key)


def check_top_k(top_k: Any, run: Any, key: str) -> None:
    """top_k is an integer from 1 to the number of experts."""
    num_experts = run.model.moe.num_experts
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ConfigError(
            f"{key}.top_k",
            top_k,
            f"an integer from 1 to the number of experts (model.moe.num_experts={num_experts})",
        )


ROUTER_FACTS = ("token_choice", "supports_expert_bias", "scopes", "gateless")
ROUTERS = Registry("router", "router", "testbed.routing", base=RouterOptions, facts=ROUTER_FACTS)
"""Registry of testbed.routing.base.Router subclasses, by name."""


@ROUTERS.options("topk_softmax")
@dataclass
class TopKSoftmaxConfig(RouterOptions):
    supports_expert_bias = True

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

    def check(self, run: Any, key: str) -> None:
        super().check(run, key)
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"{key}.jitter", self.jitter, "a float in [0, 1)")
        if not isinstance(self.hash_steps, int) or self.hash_steps < 0:
            raise ConfigError(f"{key}.hash_steps", self.hash_steps, "an integer >= 0 (0 = off)")


@ROUTERS.options("sinkhorn")
@dataclass
class SinkhornConfig(RouterOptions):
    scopes = SCOPES

    name: str = "sinkhorn"
    top_k: int = 2
    iterations: int = 20  # alternating row/column normalizations
    scope: Scope = Scope.micro_batch  # sequence | micro_batch | global
    renormalize: bool = False  # gates of the chosen experts sum to 1
    eval_balanced: bool = False  # true: evaluation routes as training does (balanced), not plain top-k

    def check(self, run: Any, key: str) -> None:
        super().check(run, key)
        if self.iterations < 1:
            raise ConfigError(f"{key}.iterations", self.iterations, "an integer >= 1")


@ROUTERS.options("balanced_assignment")
@dataclass
class BalancedAssignmentConfig(RouterOptions):
    scopes = LOCAL_SCOPES  # an exact assignment needs every token of its group at once

    name: str = "balanced_assignment"
    top_k: int = 2
    scope: Scope = Scope.micro_batch  # sequence | micro_batch: the group assigned with equal expert capacity
    eps: float = 1.0e-4  # final auction epsilon, relative to the score range of the group
    eps_factor: float = 8.0  # epsilon scaling: divided by this per phase
    check_every: int = 8  # rounds between host-side "done?" checks
    max_rounds: int = 20000  # per phase; beyond it the assignment is reported as not found
    renormalize: bool = False  # gates of the chosen experts sum to 1
    eval_balanced: bool = False  # true: evaluation routes as training does (balanced), not plain top-k

    def check(self, run: Any, key: str) -> None:
        super().check(run, key)
        if self.scope not in self.scopes:
            raise ConfigError(
                f"{key}.scope",
                self.scope,
                f"one of {list(self.scopes)} (an exact assignment cannot span accumulated micro-batches)",
            )
        for name, low in (("eps", 0.0), ("eps_factor", 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > low:
                raise ConfigError(f"{key}.{name}", value, f"a number > {low:g}")
        for name in ("check_every", "max_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}.{name}", value, "an integer >= 1")


@ROUTERS.options("expert_choice")
@dataclass
class ExpertChoiceConfig(RouterOptions):
    token_choice = False  # each expert picks its tokens

    name: str = "expert_choice"
    top_k: int = 2  # K: average experts per token; only sets the capacity C
    capacity_factor: float = 1.0  # C = ceil(capacity_factor * K * tokens / E), capped at the token count
    scope: Scope = Scope.micro_batch  # micro_batch | sequence (choose within each sequence; C from seq_len)

    def check(self, run: Any, key: str) -> None:
        super().check(run, key)
        cf = self.capacity_factor
        if not isinstance(cf, (int, float)) or isinstance(cf, bool) or not cf > 0:
            raise ConfigError(f"{key}.capacity_factor", cf, "a float > 0")
        if self.scope not in LOCAL_SCOPES:
            raise ConfigError(f"{key}.scope", self.scope, f"one of {list(LOCAL_SCOPES)}")


@ROUTERS.options("hash")
@dataclass
class HashConfig(RouterOptions):
    gateless = True  # a fixed hash of the token id

    name: str = "hash"
    top_k: int = 2  # experts per token
    seed: int = 0  # seeds the hash constants A_e, B_e: same seed, same token -> expert map


class WithinBlock(StrEnum):
    """How the oracle picks top_k experts inside the domain's block."""

    learned = "learned"  # top-k of the gate logits in the block
    uniform = "uniform"  # by token position, no gate (a gate-less router)


@ROUTERS.options("oracle")
@dataclass
class OracleConfig(RouterOptions):
    name: str = "oracle"
    top_k: int = 2  # experts per token, all inside the token's domain block; needs top_k <= floor(E / D)
    within_block: WithinBlock = WithinBlock.learned  # learned: gate top-k in the block | uniform: by position

    def is_gateless(self) -> bool:
        return self.within_block == "uniform"  # experts by position: the gate is never used

    def check(self, run: Any, key: str) -> None:
        super().check(run, key)
        num_experts, num_domains = run.model.moe.num_experts, len(run.data.domains)
        largest = num_experts // num_domains
        if self.top_k > largest:
            raise ConfigError(
                f"{key}.top_k",
                self.top_k,
                f"at most floor(E / D) = {largest} with E={num_experts} experts and D={num_domains} domains "
                "(every domain block must hold top_k experts); "
                "raise model.moe.num_experts or lower router.top_k",
            )


@ROUTERS.options("sigmoid")
@dataclass
class SigmoidConfig(RouterOptions):
    supports_expert_bias = True

    name: str = "sigmoid"
    top_k: int = 2
    scale: float = 1.0  # routed scaling factor: the gates of a token sum to `scale`

    def check(self, run: Any, key: str) -> None:
        super().check(run, key)
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or self.scale <= 0:
            raise ConfigError(f"{key}.scale", self.scale, "a float > 0")
