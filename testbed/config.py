"""Structured configs for every section of a run, and validation before any training starts.

`RunConfig` is registered in Hydra's ConfigStore as `run_schema`, the first entry of conf/config.yaml's
defaults: Hydra composes the YAML of conf/ onto it, so an unknown key, a value of the wrong type or a value
outside a fixed option set (the Enum fields) fails at composition, naming the key. `parse_config` then
turns the composed config into dataclasses (the same checks, for configs that do not come through Hydra:
checkpoints, tests) and `validate` checks the values that cannot work together: the cross-field checks,
all here. Router and loss sections are validated against the config dataclass of the registered component
they name. The model's own sections
(`ModelConfig`, `MoEConfig`) are defined in testbed/model/schema.py, so that the model does not import this
module; they are importable from here as well.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from testbed.errors import ConfigError
from testbed.losses import AUX_LOSSES, BALANCE
from testbed.model.schema import ModelConfig
from testbed.model.schema import MoEConfig as MoEConfig  # re-exported: a run's `model.moe`
from testbed.registry import Registry
from testbed.routing import ROUTERS

DEFAULT_MIX: tuple[str, ...] = (
    "code",
    "fiction",
    "drama",
    "formal_math",
    "biomedical",
    "legal",
    "speeches",
    "spanish",
)
"""The domains the default training mix uses (their sources: testbed/data/corpora.py)."""


class BatchComposition(StrEnum):
    mixed = "mixed"  # every micro-batch draws from all domains
    homogeneous = "homogeneous"  # every micro-batch holds sequences of one domain


class Accelerator(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    gpu = "gpu"
    mps = "mps"


class LoggerName(StrEnum):
    csv = "csv"
    tensorboard = "tensorboard"
    wandb = "wandb"


class Perturbation(StrEnum):
    context = "context"  # prefix from another same-domain sequence
    noise = "noise"  # Gaussian noise on the prefix embeddings


class Trainable(StrEnum):
    all = "all"
    routers = "routers"
    routers_and_experts = "routers_and_experts"


@dataclass
class DomainSourceConfig:
    """Where one domain's documents come from: a local file/dir, or a Hugging Face hub dataset."""

    path: str | None = None  # jsonl / json(.gz) / txt / parquet file, or a directory of .txt files
    format: str | None = None  # json | text | parquet (inferred from the file name when null)
    text_field: str = "text"
    hf_dataset: str | None = None  # hub name, for users with internet
    hf_config: str | None = None
    hf_split: str = "train"
    hf_revision: str | None = None  # a commit or tag of the hub dataset (null: its main branch)


@dataclass
class HubCorpusConfig:
    """One dataset whose rows carry a domain label (a Pile-style corpus keyed by its subset name), streamed
    into the token store: each row's label picks its domain, a hash of its text its split."""

    dataset: str = ""  # hub name (monology/pile-uncopyrighted), or a builder (parquet, json) with data_files
    config: str | None = None
    split: str = "train"
    revision: str | None = None  # a commit or tag (null: the main branch)
    data_files: list[str] | None = None  # local or remote shards for a builder name
    text_field: str = "text"
    label_field: str = "meta.pile_set_name"  # dotted path into each row
    labels: dict[str, Any] = field(default_factory=dict)  # domain -> label value (or a list of values)
    streaming: bool = True  # false: download and prepare the whole split first (datasets' cache)
    max_rows: int = 0  # stop after reading this many rows (0: read until every domain is full or the end)


@dataclass
class DataConfig:
    name: str = "shipped"
    root: str | None = None  # directory holding <domain>.jsonl.gz; null = the shipped data/mix
    domains: list[str] = field(default_factory=lambda: list(DEFAULT_MIX))
    weights: list[float] | None = None  # mixture weights per domain; null = balanced
    # per-domain overrides: {domain: DomainSourceConfig fields}, typed in parse_config (open in the schema, so
    # that `+data.sources.<domain>.path=...` can create an entry on the command line)
    sources: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # tokenizer.json; null = the shipped data/tokenizer.json
    seq_len: int = 128
    batch_size: int = 16
    batch_composition: BatchComposition = BatchComposition.mixed  # mixed | homogeneous
    val_fraction: float = 0.1  # documents held out per domain
    test_fraction: float = 0.0  # documents held out per domain for testing (never trained or validated on)
    split_seed: int = 0  # which documents are held out: fixed, so every training seed validates on the same
    dedup_paragraphs: bool = False  # remove paragraphs shared across splits (testbed/data/splits.py)
    group_field: str | None = None  # documents with one value of this field stay in one split (null: none)
    val_tokens_per_domain: int = 8192  # cap on validation tokens per domain (0 = all)
    max_train_tokens_per_domain: int = 0  # 0 = all
    num_workers: int = 0
    cache_dir: str | None = None  # Hugging Face datasets cache and token stores (<cache_dir>/stores); null =
    # datasets' own cache and $TESTBED_CACHE/stores or ~/.cache/moe-testbed/stores
    # a domain-labelled corpus streamed into the token store: HubCorpusConfig fields (null: per-domain files)
    hub: dict[str, Any] | None = None


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
    router_init_scale: float = 1.0  # router gates start at std = router_init_scale / sqrt(d_model)
    router_freeze_step: int | None = None  # from this optimizer step on the router gates stop training


@dataclass
class TrainerConfig:
    name: str = "cpu"
    accelerator: Accelerator = Accelerator.cpu
    devices: Any = 1  # a count >= 1, -1 (all), "auto", or a list of device ids
    num_nodes: int = 1  # machines; each runs `devices` processes (multi-node DDP, e.g. SLURM)
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
    strategy: str = "auto"  # Lightning strategy (ddp, ddp_find_unused_parameters_true, ...) or fsdp2 (ours)
    compile: bool = False  # torch.compile the model (the grouped expert kernel then runs in bf16)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation, for checks)
    fused_optimizer: bool = False  # fused AdamW kernel (CUDA)
    chunked_cross_entropy: bool = True  # LM head + loss in row chunks, no [N, V] logits (same values)


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.csv  # csv | tensorboard | wandb
    project: str = "moe-testbed"
    offline: bool = True  # wandb only


@dataclass
class MetricsConfig:
    """Specialization metrics collection (SpecializationMetrics callback)."""

    train_every_n_steps: int = 50  # routing stats of one training step every N steps (0 = off)
    stiffness_batches: int = 4  # validation batches re-run with a perturbed context (0 = off)
    # context: prefix from another same-domain sequence | noise
    stiffness_perturbation: Perturbation = Perturbation.context
    stiffness_noise_std: float = 0.5  # noise: std relative to the embeddings' RMS, added to the prefix
    ngram_sizes: list[int] = field(default_factory=lambda: [4, 10])
    plots: bool = True  # heatmaps at each validation (PNG in <run_dir>/plots, images to TensorBoard/W&B)
    # the routing counts of the last N measured training steps, saved beside each validation's table
    # (routing/train_counts_step<N>.pt): choices made on training data, scored on validation (X6's path)
    train_counts_window: int = 10


@dataclass
class FinetuneConfig:
    """Post-training: which parameters train (with init_from and a narrowed data.domains)."""

    trainable: Trainable = Trainable.all  # all | routers | routers_and_experts (everything else frozen)
    experts: Any = None  # routers_and_experts: expert ids trained in every MoE layer, or {layer<i>: [ids]};
    # null = all experts. Frozen experts get no gradient and no weight decay.


@dataclass
class RunConfig:
    """The configuration of one run: the schema Hydra composes onto (`run_schema`), and after
    `parse_config` the validated run, with router/balance/aux_loss as their components' dataclasses (in the
    schema they are open: each is typed by the component it names, in `parse_config`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    router: Any = None
    balance: Any = None
    aux_loss: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    run_name: str = "run"
    init_from: str | None = None
    resume: str | None = None  # auto | <path to a .ckpt>: continue a run in its own folder
    # true: clear a used run folder's files before training. Open in the schema and checked in parse_config
    # as exactly true or false: OmegaConf would read "yes" or "on" as true, and this flag deletes files.
    overwrite: Any = False
    experiment: Any = None  # the grid of conf/experiment/<id>.yaml (testbed-experiment); training ignores it


SECTIONS = {
    f.name: f.default_factory
    for f in dataclasses.fields(RunConfig)
    if dataclasses.is_dataclass(f.default_factory)
}
"""The sections typed by their own dataclass (model, data, trainer, ...), by name."""
TOP_LEVEL_KEYS = {f.name for f in dataclasses.fields(RunConfig)}

ConfigStore.instance().store(name="run_schema", node=RunConfig)


def plain(config: Any) -> Any:
    """A config dataclass as plain dicts, lists and scalars (Enum members as their string value): for
    summary.json, checkpoint hyperparameters and YAML, which must not depend on testbed's classes."""

    def factory(items: list[tuple[str, Any]]) -> dict:
        return {key: value.value if isinstance(value, Enum) else value for key, value in items}

    return dataclasses.asdict(config, dict_factory=factory)


def _lookup(node: Any, dotted: str) -> Any:
    """The raw value at `dotted` in a nested dict (None when absent)."""
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return f"one of {[member.value for member in annotation]}"
    names = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _field_type(schema: type, dotted: str) -> Any:
    """The annotated type of a (nested) dataclass field, or None."""
    for part in dotted.split("."):
        hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
        if part not in hints:
            return None
        schema = hints[part]
    return schema


def allowed_for(key: str) -> str | None:
    """What the schema allows at a dotted key of the composed config ("one of [...]", "an integer", ...), or
    None for a key the schema leaves open (router, balance, aux_loss) or does not have."""
    expected = _field_type(RunConfig, key)
    return None if expected is None or expected is Any else _type_name(expected)


def _structured(section: str, schema: type, node: Any, fields_of: str | None = None) -> Any:
    """Merge `node` into the dataclass `schema`: unknown keys, values of the wrong type (a string for a
    bool, int or float field) and values outside an Enum field's options fail with the key, the value and
    what is allowed (`fields_of` names the schema in the unknown-key message)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        full_key = getattr(err, "full_key", None) or ""
        key = f"{section}.{full_key}" if full_key else section
        value = getattr(err, "value", None)
        if value is None and full_key:
            value = _lookup(node, full_key)
        expected = _field_type(schema, full_key) if full_key else None
        if expected is None:
            parent = _field_type(schema, full_key.rpartition(".")[0]) if "." in full_key else schema
            is_schema = dataclasses.is_dataclass(parent)
            fields = sorted(f.name for f in dataclasses.fields(parent)) if is_schema else []
            owner = fields_of if parent is schema and fields_of else f"the fields of {parent.__name__}"
            allowed = f"{owner}: {fields}"
        else:
            allowed = _type_name(expected)
        raise ConfigError(key, value, allowed) from None


def _component(registry: Registry, name: str, options: dict, key: str) -> Any:
    """A router/balance/aux-loss config, typed through the dataclass of the component it names (so an
    unknown option, `renormalize=nope` or `jitter=abc` fail instead of passing)."""
    _, config_cls = registry.get(name, key)
    return _structured(key, config_cls, options, fields_of=f"options of {registry.kind} '{name}'")


def _strict_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


MAX_STEPS = 100_000_000
"""The largest trainer.max_steps accepted (the step counters, schedules and token counts stay exact far
beyond; what is refused is a run nobody means to start)."""


def refuse_non_finite(node: Any, key: str = "") -> None:
    """No option takes NaN or infinity: the first one found anywhere in the config is refused by name
    (a NaN slips through every `<` and `>` check, and an infinite rate or weight diverges later)."""
    if isinstance(node, dict):
        for name, value in node.items():
            refuse_non_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            refuse_non_finite(value, f"{key}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(key, node, "a finite number (no option takes NaN or infinity)")


def parse_config(cfg: DictConfig | dict) -> RunConfig:
    """Turn a composed Hydra config into a validated `RunConfig`; raises ConfigError on the first problem."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    refuse_non_finite(raw)
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(unknown[0], raw[unknown[0]], f"top-level keys {sorted(TOP_LEVEL_KEYS)}")
    sections = {name: _structured(name, schema, raw.get(name)) for name, schema in SECTIONS.items()}
    sources = sections["data"].sources
    if not isinstance(sources, dict):
        raise ConfigError("data.sources", sources, "a mapping {domain: {path: ..., format: ...}}")
    for domain, source in sources.items():
        sources[domain] = _structured(f"data.sources.{domain}", DomainSourceConfig, source)
    if sections["data"].hub is not None:
        sections["data"].hub = _structured("data.hub", HubCorpusConfig, sections["data"].hub)

    router_raw = dict(raw.get("router") or {})
    router_name = router_raw.pop("name", None)
    if router_name is None:
        raise ConfigError("router.name", None, f"one of {ROUTERS.names()}")
    router = _component(ROUTERS, router_name, {"name": router_name, **router_raw}, "router")

    balance_raw = dict(raw.get("balance") or {"name": "none"})
    balance_name = balance_raw.get("name")
    balance = _component(BALANCE, balance_name, balance_raw, "balance")

    aux_raw = raw.get("aux_loss") or {}
    if not isinstance(aux_raw, dict):
        raise ConfigError(
            "aux_loss", aux_raw, f"a list of config names from conf/aux_loss: {AUX_LOSSES.names()}"
        )
    aux = {
        name: _component(AUX_LOSSES, name, dict(options or {}), f"aux_loss.{name}")
        for name, options in aux_raw.items()
    }

    run = RunConfig(
        router=router,
        balance=balance,
        aux_loss=aux,
        seed=_integer("seed", raw.get("seed", 0), 0, 2**32 - 1),
        run_name=str(raw.get("run_name", "run")),
        init_from=raw.get("init_from"),
        resume=None if raw.get("resume") is None else str(raw.get("resume")),
        overwrite=_strict_bool("overwrite", raw.get("overwrite", False)),
        **sections,
    )
    validate(run)
    run.trainer.strategy = resolve_strategy(run)
    return run


def _positive(key: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "a positive integer")


def _integer(key: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an integer in [low, high] (booleans and strings are not integers)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise ConfigError(key, value, allowed)
    return value


def _in_range(
    key: str, value: float, low: float, high: float | None, low_open: bool = False, high_open: bool = False
) -> None:
    bad = value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        allowed = (
            f"a number in {lo}{low}, {high}{hi}"
            if high is not None
            else (f"a number {'>' if low_open else '>='} {low}")
        )
        raise ConfigError(key, value, allowed)


PRECISIONS = ["16-mixed", "16-true", "32", "32-true", "64-true", "bf16-mixed", "bf16-true"]


def _devices_ok(devices: Any) -> bool:
    if devices == "auto" or devices == -1:
        return True
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices >= 1
    if isinstance(devices, str):
        return (
            devices.strip().isdigit()
            and int(devices) >= 1
            or ("," in devices and all(p.strip().isdigit() for p in devices.split(",") if p.strip()))
        )
    if isinstance(devices, list):
        return bool(devices) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices
        )
    return False


FSDP2 = "fsdp2"
"""Our sharded strategy's name (testbed/train/sharding.py), accepted besides Lightning's registry."""


def strategy_names() -> list[str]:
    """Lightning's registered strategy names (ddp, ddp_spawn, fsdp, ...) plus "auto" and "fsdp2" (ours:
    FSDP2 through Lightning's ModelParallelStrategy, testbed/train/sharding.py)."""
    # imported here: lightning adds ~5 s to every import of testbed.config (measured 6.8 s vs torch 1.7 s)
    from lightning.pytorch.strategies import StrategyRegistry

    return sorted({"auto", FSDP2, *StrategyRegistry.available_strategies()})


def validate_trainer(run: RunConfig) -> None:
    """Lightning Trainer arguments, checked here so that a bad one fails before data loading."""
    t = run.trainer
    if str(t.precision) not in PRECISIONS:
        raise ConfigError("trainer.precision", t.precision, f"one of {PRECISIONS}")
    if not _devices_ok(t.devices):
        raise ConfigError(
            "trainer.devices", t.devices, "a count >= 1, -1 (all devices), 'auto' or a list of device ids"
        )
    _positive("trainer.num_nodes", t.num_nodes)
    if t.fused_optimizer and str(t.precision) == "16-mixed" and t.gradient_clip_val:
        raise ConfigError(
            "trainer.fused_optimizer",
            t.fused_optimizer,
            "false with trainer.precision=16-mixed and gradient clipping (the fused step unscales fp16 "
            "gradients itself, after clipping would have run); bf16-mixed, or trainer.gradient_clip_val=0",
        )
    strategies = strategy_names()
    if t.strategy not in strategies:
        raise ConfigError("trainer.strategy", t.strategy, f"one of {strategies}")
    if t.strategy.startswith("fsdp") and t.strategy != FSDP2:
        raise ConfigError(
            "trainer.strategy",
            t.strategy,
            f"{FSDP2} for sharded training (FSDP2 with one unit per block, tested against DDP); Lightning's "
            f"'{t.strategy}' wraps the model in the first FSDP API, which is not tested with this model",
        )
    if t.strategy == FSDP2:
        precisions = ("32-true", "32", "bf16-mixed", "bf16-true", "16-true")  # ModelParallelStrategy's
        if str(t.precision) not in precisions:
            raise ConfigError(
                "trainer.precision", t.precision, f"with trainer.strategy={FSDP2} one of {list(precisions)}"
            )
        if t.compile:
            raise ConfigError(
                "trainer.compile",
                t.compile,
                f"false with trainer.strategy={FSDP2} (compiling the sharded blocks is not tested here)",
            )
    limit = t.limit_val_batches
    if isinstance(limit, float) and not limit.is_integer():
        _in_range("trainer.limit_val_batches", limit, 0.0, 1.0, low_open=True)
    elif limit > 1:
        t.limit_val_batches = int(limit)  # a batch count (Lightning reads a float as a fraction)
    elif limit < 1:
        raise ConfigError(
            "trainer.limit_val_batches",
            limit,
            "a fraction in (0, 1] or a batch count >= 1 (validation is "
            "where the losses and metrics come from)",
        )
    _in_range("trainer.gradient_clip_val", t.gradient_clip_val, 0.0, None)
    _positive("trainer.log_every_n_steps", t.log_every_n_steps)
    _integer("trainer.num_threads", t.num_threads, 0)


def check_hardware(run: RunConfig) -> None:
    """The accelerator exists on this machine (a training run, not `testbed-analyze`, asks for it)."""
    if run.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.accelerator",
            run.trainer.accelerator,
            "'cpu' on this machine: it has no CUDA GPU (torch.cuda.is_available() is false); use trainer=cpu",
        )


def _gateless_router(run: RunConfig) -> bool:
    """Routers whose gate gets no gradient (hash; oracle with uniform within-block choice)."""
    return run.router.name == "hash" or (
        run.router.name == "oracle" and getattr(run.router, "within_block", None) == "uniform"
    )


def resolve_strategy(run: RunConfig) -> str:
    """The Lightning strategy to use: DDP with a gate-less router needs `find_unused_parameters`, which
    is chosen here (the gate never gets a gradient, and plain DDP fails at the first backward)."""
    t = run.trainer
    distributed = t.strategy in ("ddp", "ddp_spawn") or (
        t.strategy == "auto" and (t.num_nodes > 1 or t.devices not in (1, "1", "auto"))
    )
    if distributed and _gateless_router(run):
        base = "ddp" if t.strategy == "auto" else t.strategy
        return f"{base}_find_unused_parameters_true"
    return t.strategy


def validate(run: RunConfig) -> None:
    """Checks of values that cannot work (single fields and combinations)."""
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

    d = run.data
    _positive("data.seq_len", d.seq_len)
    _positive("data.batch_size", d.batch_size)
    if d.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", d.seq_len, f"at most model.max_seq_len={m.max_seq_len}")
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
    _integer("data.val_tokens_per_domain", d.val_tokens_per_domain, 0)
    _integer("data.max_train_tokens_per_domain", d.max_train_tokens_per_domain, 0)
    _integer("data.split_seed", d.split_seed, 0, 2**32 - 1)
    _integer("data.num_workers", d.num_workers, 0)
    if not 0 < d.val_fraction < 1:
        raise ConfigError("data.val_fraction", d.val_fraction, "a fraction in (0, 1)")
    if not 0 <= d.test_fraction < 1 - d.val_fraction:
        raise ConfigError(
            "data.test_fraction",
            d.test_fraction,
            f"a fraction in [0, 1 - data.val_fraction = {1 - d.val_fraction:g})",
        )
    _strict_bool("data.dedup_paragraphs", d.dedup_paragraphs)
    if d.group_field is not None and (not isinstance(d.group_field, str) or not d.group_field):
        raise ConfigError("data.group_field", d.group_field, "null or the name of a field of the documents")
    if d.hub is not None:
        validate_hub(d)
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
    if t.max_steps > MAX_STEPS:
        raise ConfigError(
            "trainer.max_steps",
            t.max_steps,
            f"at most {MAX_STEPS:,} optimizer steps (about {MAX_STEPS / 1e6:.0f}M steps: years on one GPU at "
            "this testbed's sizes; a value like 1e12 is almost surely a typo)",
        )
    _positive("trainer.val_check_interval", t.val_check_interval)
    _positive("trainer.accumulate_grad_batches", t.accumulate_grad_batches)
    validate_trainer(run)
    validate_finetune(run)
    mc = run.metrics
    if mc.train_every_n_steps < 0 or mc.stiffness_batches < 0 or mc.train_counts_window < 0:
        raise ConfigError(
            "metrics.train_every_n_steps/stiffness_batches/train_counts_window",
            (mc.train_every_n_steps, mc.stiffness_batches, mc.train_counts_window),
            "integers >= 0 (0 = off)",
        )
    if not mc.ngram_sizes or any(n < 2 for n in mc.ngram_sizes):
        raise ConfigError("metrics.ngram_sizes", mc.ngram_sizes, "a non-empty list of integers >= 2")
    if run.optim.lr <= 0:
        raise ConfigError("optim.lr", run.optim.lr, "a float > 0")
    if run.optim.router_lr_scale <= 0:
        raise ConfigError("optim.router_lr_scale", run.optim.router_lr_scale, "a float > 0")
    if run.optim.router_init_scale < 0:
        raise ConfigError("optim.router_init_scale", run.optim.router_init_scale, "a float >= 0")
    freeze = run.optim.router_freeze_step
    if freeze is not None and not 0 <= freeze <= run.trainer.max_steps:
        raise ConfigError(
            "optim.router_freeze_step",
            freeze,
            f"null, or a step in [0, trainer.max_steps = {run.trainer.max_steps}]",
        )
    o = run.optim
    _in_range("optim.weight_decay", o.weight_decay, 0.0, None)
    _in_range("optim.beta1", o.beta1, 0.0, 1.0, high_open=True)
    _in_range("optim.beta2", o.beta2, 0.0, 1.0, high_open=True)
    _integer("optim.warmup_steps", o.warmup_steps, 0)
    _in_range("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)
    if run.init_from is not None and Path(str(run.init_from)).is_dir():
        raise ConfigError(
            "init_from",
            run.init_from,
            "a checkpoint file (.ckpt), not a directory; for a run folder pass "
            f"{Path(str(run.init_from)) / 'checkpoints' / 'last.ckpt'}",
        )

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


def validate_hub(d: DataConfig) -> None:
    """A hub corpus supplies every domain: each one has a label, no label names another domain, and
    per-domain sources are not mixed in."""
    hub = d.hub
    if not hub.dataset:
        raise ConfigError(
            "data.hub.dataset", hub.dataset, "a hub dataset name, or parquet / json with data.hub.data_files"
        )
    if not hub.text_field or not hub.label_field:
        key = "data.hub.text_field" if not hub.text_field else "data.hub.label_field"
        raise ConfigError(key, "", "a field name (dotted for nested fields: meta.pile_set_name)")
    if not isinstance(hub.labels, dict) or not hub.labels:
        raise ConfigError("data.hub.labels", hub.labels, "a mapping {domain: label value or [values]}")
    missing = [domain for domain in d.domains if domain not in hub.labels]
    if missing:
        raise ConfigError(
            f"data.hub.labels.{missing[0]}",
            None,
            f"the label value(s) of every domain in data.domains {d.domains}",
        )
    extra = sorted(set(hub.labels) - set(d.domains))
    if extra:
        raise ConfigError(
            f"data.hub.labels.{extra[0]}",
            hub.labels[extra[0]],
            f"a domain listed in data.domains {d.domains}",
        )
    values = [v for label in hub.labels.values() for v in (label if isinstance(label, list) else [label])]
    if len(set(map(str, values))) != len(values):
        raise ConfigError("data.hub.labels", hub.labels, "each label value mapped to one domain only")
    if d.sources:
        raise ConfigError("data.sources", d.sources, "{} when data.hub supplies the domains")
    _integer("data.hub.max_rows", hub.max_rows, 0)


def validate_finetune(run: RunConfig) -> None:
    f, num_experts = run.finetune, run.model.moe.num_experts
    if f.experts is None:
        return
    if f.trainable != "routers_and_experts":
        raise ConfigError("finetune.experts", f.experts, "null unless finetune.trainable=routers_and_experts")
    if run.trainer.strategy == FSDP2:
        raise ConfigError(
            "finetune.experts",
            f.experts,
            f"null with trainer.strategy={FSDP2} (the chosen experts train through gradient masks on the "
            "stacked expert weights, which sharding replaces); train the expert path with ddp or one process",
        )
    moe_layers = [f"layer{i}" for i in range(run.model.dense_layers, run.model.n_layers)]
    per_layer = f.experts if isinstance(f.experts, dict) else dict.fromkeys(moe_layers, f.experts)
    for layer, ids in per_layer.items():
        if layer not in moe_layers:
            raise ConfigError(f"finetune.experts.{layer}", ids, f"keys among the MoE layers {moe_layers}")
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < num_experts for i in ids):
            raise ConfigError(f"finetune.experts.{layer}", ids, f"a list of expert ids in [0, {num_experts})")
