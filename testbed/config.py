"""Structured configs for every section of a run, and validation before any training starts.

Hydra composes YAML from conf/; `parse_config` merges each section into its dataclass (unknown keys and
wrong types fail), then `validate` checks values that cannot work together. Router and loss sections are
validated against the config dataclass of the registered component they name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from testbed.data.corpora import DEFAULT_MIX
from testbed.errors import ConfigError


@dataclass
class MoEConfig:
    num_experts: int = 16
    expert_hidden: int = 128
    num_shared_experts: int = 0  # always-on dense experts added to every token's output
    backend: str = "grouped"  # loop (reference) | grouped (grouped_mm)
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


@dataclass
class DomainSourceConfig:
    """Where one domain's documents come from: a local file/dir, or a Hugging Face hub dataset."""

    path: str | None = None  # jsonl / json(.gz) / txt / parquet file, or a directory of .txt files
    format: str | None = None  # json | text | parquet (inferred from the file name when null)
    text_field: str = "text"
    hf_dataset: str | None = None  # hub name, for users with internet
    hf_config: str | None = None
    hf_split: str = "train"


@dataclass
class DataConfig:
    name: str = "shipped"
    root: str | None = None  # directory holding <domain>.jsonl.gz; null = the shipped data/mix
    domains: list[str] = field(default_factory=lambda: list(DEFAULT_MIX))
    weights: list[float] | None = None  # mixture weights per domain; null = balanced
    sources: dict[str, DomainSourceConfig] = field(default_factory=dict)  # per-domain overrides
    tokenizer: str | None = None  # tokenizer.json; null = the shipped data/tokenizer.json
    seq_len: int = 128
    batch_size: int = 16
    batch_composition: str = "mixed"  # mixed | homogeneous
    val_fraction: float = 0.1  # documents held out per domain
    split_seed: int = 0  # which documents are held out: fixed, so every training seed validates on the same
    val_tokens_per_domain: int = 8192  # cap on validation tokens per domain (0 = all)
    max_train_tokens_per_domain: int = 0  # 0 = all
    num_workers: int = 0
    cache_dir: str | None = None  # Hugging Face datasets cache and token-id cache (null = none / HF default)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at max_steps
    router_lr_scale: float = 1.0  # router (gate) learning rate = lr * router_lr_scale
    router_weight_decay: bool = True  # false: no weight decay on the router gates


@dataclass
class TrainerConfig:
    name: str = "cpu"
    accelerator: str = "cpu"
    devices: Any = 1
    precision: str = "32-true"
    max_steps: int = 1500
    val_check_interval: int = 250  # validate every N training steps (and at the end)
    limit_val_batches: float = 1.0
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = 10
    num_threads: int = 0  # torch CPU threads; 0 = leave torch's default
    deterministic: bool = True
    enable_checkpointing: bool = True
    progress_bar: bool = True
    strategy: str = "auto"  # Lightning strategy, e.g. ddp / ddp_find_unused_parameters_true
    compile: bool = False  # torch.compile the model (the grouped expert kernel then runs in bf16)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation, for checks)
    fused_optimizer: bool = False  # fused AdamW kernel (CUDA)
    chunked_cross_entropy: bool = True  # LM head + loss in row chunks, no [N, V] logits (same values)


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv | tensorboard | wandb
    project: str = "moe-testbed"
    offline: bool = True  # wandb only


@dataclass
class MetricsConfig:
    """Specialization metrics collection (SpecializationMetrics callback)."""

    train_every_n_steps: int = 50  # routing stats of one training step every N steps (0 = off)
    stiffness_batches: int = 4  # validation batches re-run with a perturbed context (0 = off)
    stiffness_perturbation: str = "context"  # context: prefix from another same-domain sequence | noise
    stiffness_noise_std: float = 0.5  # noise: std relative to the embeddings' RMS, added to the prefix
    ngram_sizes: list[int] = field(default_factory=lambda: [4, 10])
    plots: bool = True  # heatmaps at each validation (PNG in <run_dir>/plots, images to TensorBoard/W&B)


@dataclass
class FinetuneConfig:
    """Post-training: which parameters train (with init_from and a narrowed data.domains)."""

    trainable: str = "all"  # all | routers | routers_and_experts (everything else frozen)
    experts: Any = None  # routers_and_experts: expert ids trained in every MoE layer, or {layer<i>: [ids]};
    # null = all experts. Frozen experts get no gradient and no weight decay.


@dataclass
class RunConfig:
    """The validated configuration of one run (router/balance/aux_loss are component dataclasses)."""

    model: ModelConfig
    data: DataConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    optim: OptimConfig
    metrics: MetricsConfig
    finetune: FinetuneConfig
    router: Any
    balance: Any
    aux_loss: dict[str, Any]
    seed: int = 0
    run_name: str = "run"
    init_from: str | None = None


SECTIONS = {
    "finetune": FinetuneConfig,
    "metrics": MetricsConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "optim": OptimConfig,
}
# `experiment`: the grid block of conf/experiment/<id>.yaml, read by testbed-experiment; training ignores it.
TOP_LEVEL_KEYS = {"seed", "run_name", "init_from", "experiment", "router", "balance", "aux_loss", *SECTIONS}


def _structured(section: str, schema: type, node: Any) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = f"{section}.{err.full_key}" if getattr(err, "full_key", None) else section
        allowed = f"the fields of {schema.__name__}: {[f.name for f in dataclasses.fields(schema)]}"
        raise ConfigError(
            key, getattr(err, "value", None), f"{allowed} ({err.msg if hasattr(err, 'msg') else err})"
        ) from None


def parse_config(cfg: DictConfig | dict) -> RunConfig:
    """Turn a composed Hydra config into a validated `RunConfig`; raises ConfigError on the first problem."""
    from testbed.losses import AUX_LOSSES, BALANCE
    from testbed.routing import ROUTERS

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(unknown[0], raw[unknown[0]], f"top-level keys {sorted(TOP_LEVEL_KEYS)}")
    sections = {name: _structured(name, schema, raw.get(name)) for name, schema in SECTIONS.items()}

    router_raw = dict(raw.get("router") or {})
    router_name = router_raw.pop("name", None)
    if router_name is None:
        raise ConfigError("router.name", None, f"one of {ROUTERS.names()}")
    router = ROUTERS.build_config(router_name, {"name": router_name, **router_raw}, "router")

    balance_raw = dict(raw.get("balance") or {"name": "none"})
    balance_name = balance_raw.get("name")
    balance = BALANCE.build_config(balance_name, balance_raw, "balance")

    aux_raw = raw.get("aux_loss") or {}
    if not isinstance(aux_raw, dict):
        raise ConfigError(
            "aux_loss", aux_raw, f"a list of config names from conf/aux_loss: {AUX_LOSSES.names()}"
        )
    aux = {
        name: AUX_LOSSES.build_config(name, dict(options or {}), f"aux_loss.{name}")
        for name, options in aux_raw.items()
    }

    run = RunConfig(
        router=router,
        balance=balance,
        aux_loss=aux,
        seed=int(raw.get("seed", 0)),
        run_name=str(raw.get("run_name", "run")),
        init_from=raw.get("init_from"),
        **sections,
    )
    validate(run)
    return run


def _positive(key: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "a positive integer")


def validate(run: RunConfig) -> None:
    """Checks of values that cannot work (single fields and combinations)."""
    from testbed.losses import AUX_LOSSES, BALANCE
    from testbed.routing import ROUTERS

    m = run.model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "dense_hidden", "max_seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.moe.num_experts", m.moe.num_experts)
    _positive("model.moe.expert_hidden", m.moe.expert_hidden)
    if m.d_model % m.n_heads:
        raise ConfigError("model.d_model", m.d_model, f"a multiple of model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            "model.n_heads",
            m.n_heads,
            f"a head count giving an even head size (rotary needs pairs); d_model={m.d_model}",
        )
    if not 0 <= m.dense_layers <= m.n_layers:
        raise ConfigError(
            "model.dense_layers", m.dense_layers, f"an integer from 0 to model.n_layers={m.n_layers}"
        )
    if m.moe.num_shared_experts < 0:
        raise ConfigError("model.moe.num_shared_experts", m.moe.num_shared_experts, "an integer >= 0")
    from testbed.model.experts import BACKENDS

    if m.moe.backend not in BACKENDS:
        raise ConfigError("model.moe.backend", m.moe.backend, f"one of {list(BACKENDS)}")

    d = run.data
    _positive("data.seq_len", d.seq_len)
    _positive("data.batch_size", d.batch_size)
    if d.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", d.seq_len, f"at most model.max_seq_len={m.max_seq_len}")
    if d.batch_composition not in ("mixed", "homogeneous"):
        raise ConfigError("data.batch_composition", d.batch_composition, "one of ['mixed', 'homogeneous']")
    if not d.domains:
        raise ConfigError("data.domains", d.domains, "a non-empty list of domain names")
    if len(set(d.domains)) != len(d.domains):
        raise ConfigError("data.domains", d.domains, "a list without repeated names")
    if d.weights is not None:
        if len(d.weights) != len(d.domains) or any(w < 0 for w in d.weights) or sum(d.weights) <= 0:
            raise ConfigError(
                "data.weights",
                d.weights,
                f"null (balanced) or {len(d.domains)} non-negative numbers, one per data.domains entry",
            )
    if not 0 < d.val_fraction < 1:
        raise ConfigError("data.val_fraction", d.val_fraction, "a fraction in (0, 1)")
    unknown_sources = sorted(set(d.sources) - set(d.domains))
    if unknown_sources:
        raise ConfigError(
            f"data.sources.{unknown_sources[0]}",
            unknown_sources[0],
            f"a domain listed in data.domains {d.domains}",
        )

    t = run.trainer
    if t.accelerator in ("gpu", "cuda") and m.moe.backend == "grouped":
        for key, value in (("model.d_model", m.d_model), ("model.moe.expert_hidden", m.moe.expert_hidden)):
            if value % 16:
                raise ConfigError(key, value, "a multiple of 16 on GPU (grouped GEMM alignment)")
    _positive("trainer.max_steps", t.max_steps)
    _positive("trainer.val_check_interval", t.val_check_interval)
    _positive("trainer.accumulate_grad_batches", t.accumulate_grad_batches)
    if run.logger.name not in ("csv", "tensorboard", "wandb"):
        raise ConfigError("logger.name", run.logger.name, "one of ['csv', 'tensorboard', 'wandb']")
    validate_finetune(run)
    mc = run.metrics
    if mc.train_every_n_steps < 0 or mc.stiffness_batches < 0:
        raise ConfigError(
            "metrics.train_every_n_steps/stiffness_batches",
            (mc.train_every_n_steps, mc.stiffness_batches),
            "integers >= 0 (0 = off)",
        )
    if mc.stiffness_perturbation not in ("context", "noise"):
        raise ConfigError(
            "metrics.stiffness_perturbation", mc.stiffness_perturbation, "one of ['context', 'noise']"
        )
    if not mc.ngram_sizes or any(n < 2 for n in mc.ngram_sizes):
        raise ConfigError("metrics.ngram_sizes", mc.ngram_sizes, "a non-empty list of integers >= 2")
    if run.optim.lr <= 0:
        raise ConfigError("optim.lr", run.optim.lr, "a float > 0")
    if run.optim.router_lr_scale <= 0:
        raise ConfigError("optim.router_lr_scale", run.optim.router_lr_scale, "a float > 0")

    router_cls, _ = ROUTERS.get(run.router.name, "router.name")
    router_cls.check(run.router, run, "router")
    capacity = m.moe.capacity_factor
    if capacity is not None:
        if capacity <= 0:
            raise ConfigError("model.moe.capacity_factor", capacity, "null (dropless) or a float > 0")
        if not router_cls.token_choice:
            raise ConfigError(
                "model.moe.capacity_factor",
                capacity,
                f"null with router '{run.router.name}', which sets its own capacity (router.capacity_factor)",
            )
    if run.balance.name == "expert_bias" and not router_cls.supports_expert_bias:
        supported = [name for name in ROUTERS.names() if ROUTERS.get(name)[0].supports_expert_bias]
        raise ConfigError(
            "balance",
            "expert_bias",
            f"a router with expert-bias support {supported} (router is '{run.router.name}'); "
            "use balance=load_balance or balance=none",
        )
    balance_cls, _ = BALANCE.get(run.balance.name, "balance.name")
    balance_cls.check(run.balance, "balance")
    for name, options in run.aux_loss.items():
        loss_cls, _ = AUX_LOSSES.get(name, "aux_loss")
        loss_cls.check(options, f"aux_loss.{name}")


def validate_finetune(run: RunConfig) -> None:
    f, num_experts = run.finetune, run.model.moe.num_experts
    if f.trainable not in ("all", "routers", "routers_and_experts"):
        raise ConfigError(
            "finetune.trainable", f.trainable, "one of ['all', 'routers', 'routers_and_experts']"
        )
    if f.experts is None:
        return
    if f.trainable != "routers_and_experts":
        raise ConfigError("finetune.experts", f.experts, "null unless finetune.trainable=routers_and_experts")
    moe_layers = [f"layer{i}" for i in range(run.model.dense_layers, run.model.n_layers)]
    per_layer = f.experts if isinstance(f.experts, dict) else dict.fromkeys(moe_layers, f.experts)
    for layer, ids in per_layer.items():
        if layer not in moe_layers:
            raise ConfigError(f"finetune.experts.{layer}", ids, f"keys among the MoE layers {moe_layers}")
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < num_experts for i in ids):
            raise ConfigError(f"finetune.experts.{layer}", ids, f"a list of expert ids in [0, {num_experts})")
