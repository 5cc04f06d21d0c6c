"""Structured configs for every section of a run, and validation before any training starts.

`RunConfig` is registered in Hydra's ConfigStore as `run_schema`, the first entry of conf/config.yaml's
defaults: Hydra composes the YAML of conf/ onto it, so an unknown key, a value of the wrong type or a value
outside a fixed option set (the Enum fields) fails at composition, naming the key. Every option's default
is stated once, in its dataclass: the YAML of conf/ only selects and overrides. Router, balance and
auxiliary-loss options take their defaults from the config dataclass of the registered component they name,
stored here as registry/<group>/<name> for the defaults list of conf/<group>/<name>.yaml.

`parse_config` then turns the composed config into dataclasses (the same checks, for configs that do not
come through Hydra: checkpoints, tests) and `validate` checks the values that cannot work: each section
checks itself beside its component (DataConfig.validate, TrainerConfig.validate, the router's options'
`check`, ...), then the checks across sections run here. The model's own sections (`ModelConfig`,
`MoEConfig`) are defined in testbed/model/schema.py and the data section in testbed/data/schema.py, so that
neither the model nor the data code imports this module; they are importable from here as well.

This module does not import torch: the components' options come from the registries' torch-free options
modules (testbed/routing/options.py, testbed/losses/options.py), and with them the components' own checks
(`check`) and the facts the checks across components read (`token_choice`, `stateful`, ...). So composing
a config, typing every section, the sections' and the components' checks answer a config error in about a
second, without the components' classes; only `check_hardware` imports torch, for a GPU trainer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from testbed.checks import (
    field_type,
    in_range,
    integer,
    positive,
    refuse_non_finite,
    strict_bool,
    structured,
    type_name,
)
from testbed.checks import plain as plain  # re-exported: summary.json and checkpoints use it from here
from testbed.data.schema import DEFAULT_MIX as DEFAULT_MIX  # re-exported, as the data section's names below
from testbed.data.schema import BatchComposition as BatchComposition
from testbed.data.schema import DataConfig, parse_data
from testbed.data.schema import DomainSourceConfig as DomainSourceConfig
from testbed.data.schema import HubCorpusConfig as HubCorpusConfig
from testbed.data.schema import validate_hub as validate_hub
from testbed.errors import ConfigError
from testbed.losses.options import AUX_LOSSES, BALANCE
from testbed.model.schema import ModelConfig
from testbed.model.schema import MoEConfig as MoEConfig  # re-exported: a run's `model.moe`
from testbed.registry import Registry
from testbed.routing.options import ROUTERS


class Accelerator(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    gpu = "gpu"
    mps = "mps"


class Perturbation(StrEnum):
    context = "context"  # prefix from another same-domain sequence
    noise = "noise"  # Gaussian noise on the prefix embeddings


class Trainable(StrEnum):
    all = "all"
    routers = "routers"
    routers_and_experts = "routers_and_experts"


class Direction(StrEnum):
    minimize = "minimize"
    maximize = "maximize"


MAX_STEPS = 100_000_000
"""The largest trainer.max_steps accepted (the step counters, schedules and token counts stay exact far
beyond; what is refused is a run nobody means to start)."""

PRECISIONS = ["16-mixed", "16-true", "32", "32-true", "64-true", "bf16-mixed", "bf16-true"]

FSDP2 = "fsdp2"
"""Our sharded strategy's name (testbed/train/sharding.py), accepted besides Lightning's registry."""


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

    def validate(self, max_steps: int) -> None:
        """`max_steps`: the run's trainer.max_steps, the last step the router can be frozen at."""
        if self.lr <= 0:
            raise ConfigError("optim.lr", self.lr, "a float > 0")
        if self.router_lr_scale <= 0:
            raise ConfigError("optim.router_lr_scale", self.router_lr_scale, "a float > 0")
        if self.router_init_scale < 0:
            raise ConfigError("optim.router_init_scale", self.router_init_scale, "a float >= 0")
        freeze = self.router_freeze_step
        if freeze is not None and not 0 <= freeze <= max_steps:
            raise ConfigError(
                "optim.router_freeze_step", freeze, f"null, or a step in [0, trainer.max_steps = {max_steps}]"
            )
        in_range("optim.weight_decay", self.weight_decay, 0.0, None)
        in_range("optim.beta1", self.beta1, 0.0, 1.0, high_open=True)
        in_range("optim.beta2", self.beta2, 0.0, 1.0, high_open=True)
        integer("optim.warmup_steps", self.warmup_steps, 0)
        in_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)


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
    # torch CPU threads; 0 = chosen at the start of a CPU run from the machine's load (testbed.train.threads)
    num_threads: int = 0
    deterministic: bool = True
    enable_checkpointing: bool = True
    progress_bar: bool = True  # the progress bar on a terminal
    # where stdout is no terminal (a pipe, a sweep's or cluster's log): one progress line every N seconds
    # and one at each validation; 0: the validation lines only
    progress_every_s: float = 30.0
    strategy: str = "auto"  # Lightning strategy (ddp, ddp_find_unused_parameters_true, ...) or fsdp2 (ours)
    compile: bool = False  # torch.compile the model (the grouped expert kernel then runs in bf16)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation, for checks)
    fused_optimizer: bool = False  # fused AdamW kernel (CUDA)
    chunked_cross_entropy: bool = True  # LM head + loss in row chunks, no [N, V] logits (same values)
    # Lightning's debugging runs. fast_dev_run: N (true = 1) training and N validation batches, no
    # checkpoint, logger, run record or summary.json. overfit_batches: the first N training batches, repeated
    # until max_steps (validation as configured)
    fast_dev_run: Any = 0
    overfit_batches: int = 0

    def validate(self, model: ModelConfig) -> None:
        """Lightning Trainer arguments, checked here so that a bad one fails before data loading; `model`:
        the run's, whose sizes the grouped GEMM on GPU needs aligned."""
        if self.accelerator in ("gpu", "cuda") and model.moe.backend == "grouped":
            sizes = (("model.d_model", model.d_model), ("model.moe.expert_hidden", model.moe.expert_hidden))
            for key, value in sizes:
                if value % 16:
                    raise ConfigError(key, value, "a multiple of 16 on GPU (grouped GEMM alignment)")
        positive("trainer.max_steps", self.max_steps)
        if self.max_steps > MAX_STEPS:
            raise ConfigError(
                "trainer.max_steps",
                self.max_steps,
                f"at most {MAX_STEPS:,} optimizer steps (about {MAX_STEPS / 1e6:.0f}M steps: years on one "
                "GPU at this testbed's sizes; a value like 1e12 is almost surely a typo)",
            )
        positive("trainer.val_check_interval", self.val_check_interval)
        positive("trainer.accumulate_grad_batches", self.accumulate_grad_batches)
        if str(self.precision) not in PRECISIONS:
            raise ConfigError("trainer.precision", self.precision, f"one of {PRECISIONS}")
        if not _devices_ok(self.devices):
            raise ConfigError(
                "trainer.devices",
                self.devices,
                "a count >= 1, -1 (all devices), 'auto' or a list of device ids",
            )
        positive("trainer.num_nodes", self.num_nodes)
        if self.fused_optimizer and str(self.precision) == "16-mixed" and self.gradient_clip_val:
            raise ConfigError(
                "trainer.fused_optimizer",
                self.fused_optimizer,
                "false with trainer.precision=16-mixed and gradient clipping (the fused step unscales "
                "fp16 gradients itself, after clipping would have run); bf16-mixed, or "
                "trainer.gradient_clip_val=0",
            )
        self._validate_strategy()
        limit = self.limit_val_batches
        if isinstance(limit, float) and not limit.is_integer():
            in_range("trainer.limit_val_batches", limit, 0.0, 1.0, low_open=True)
        elif limit > 1:
            self.limit_val_batches = int(limit)  # a batch count (Lightning reads a float as a fraction)
        elif limit < 1:
            raise ConfigError(
                "trainer.limit_val_batches",
                limit,
                "a fraction in (0, 1] or a batch count >= 1 (validation is "
                "where the losses and metrics come from)",
            )
        in_range("trainer.gradient_clip_val", self.gradient_clip_val, 0.0, None)
        positive("trainer.log_every_n_steps", self.log_every_n_steps)
        integer("trainer.num_threads", self.num_threads, 0)
        in_range("trainer.progress_every_s", self.progress_every_s, 0.0, None)
        self._validate_debug_runs()

    def _validate_debug_runs(self) -> None:
        """fast_dev_run as Lightning reads it (true = 1 batch, false = off, or a batch count), stored as the
        count; overfit_batches a batch count (Lightning's fraction form is not offered)."""
        dev = self.fast_dev_run
        if isinstance(dev, bool):
            self.fast_dev_run = int(dev)
        elif not isinstance(dev, int) or dev < 0:
            raise ConfigError(
                "trainer.fast_dev_run", dev, "true (1 batch), false (off) or a number of batches >= 0"
            )
        integer("trainer.overfit_batches", self.overfit_batches, 0)
        if self.fast_dev_run and self.overfit_batches:
            raise ConfigError(
                "trainer.overfit_batches", self.overfit_batches, "0 with trainer.fast_dev_run (one at a time)"
            )

    def _validate_strategy(self) -> None:
        # the usual names are checked without importing Lightning (seconds), so that a bad value elsewhere in
        # the config is reported at once; any other name is looked up in Lightning's registry
        strategies = COMMON_STRATEGIES if self.strategy in COMMON_STRATEGIES else strategy_names()
        if self.strategy not in strategies:
            raise ConfigError("trainer.strategy", self.strategy, f"one of {strategies}")
        if self.strategy.startswith("fsdp") and self.strategy != FSDP2:
            raise ConfigError(
                "trainer.strategy",
                self.strategy,
                f"{FSDP2} for sharded training (FSDP2 with one unit per block, tested against DDP); "
                f"Lightning's '{self.strategy}' wraps the model in the first FSDP API, which is not tested "
                "with this model",
            )
        if self.strategy == FSDP2:
            precisions = ("32-true", "32", "bf16-mixed", "bf16-true", "16-true")  # ModelParallelStrategy's
            if str(self.precision) not in precisions:
                raise ConfigError(
                    "trainer.precision",
                    self.precision,
                    f"with trainer.strategy={FSDP2} one of {list(precisions)}",
                )
            if self.compile:
                raise ConfigError(
                    "trainer.compile",
                    self.compile,
                    f"false with trainer.strategy={FSDP2} (compiling the sharded blocks is not tested here)",
                )


@dataclass
class CSVLoggerConfig:
    """metrics.csv in the run folder: written by every run, listed in `logger` or not (testbed-report and
    resume read it)."""


@dataclass
class TensorBoardLoggerConfig:
    """TensorBoard event files in <run dir>/tensorboard (and the heatmaps as images)."""


@dataclass
class WandbLoggerConfig:
    """Weights & Biases: offline by default (no account; <run dir>/wandb, `wandb sync` uploads later)."""

    project: str = "moe-testbed"
    name: str | None = None  # null: the run folder, as the run prints it at the end
    group: str | None = None  # null: the sweep folder for the jobs of a -m sweep, no group for a single run
    tags: list[str] | None = None  # null: the run's command-line overrides (W&B keeps 64 characters each)
    offline: bool = True
    quiet: bool = True  # W&B's own console lines off (its silent setting), its warnings and errors kept


@dataclass
class LoggerConfig:
    """The loggers of `logger=[csv,tensorboard,wandb]` (conf/logger/): each one chosen is a key here with its
    options; the others are null. CSV is written whatever the list says."""

    csv: CSVLoggerConfig | None = None
    tensorboard: TensorBoardLoggerConfig | None = None
    wandb: WandbLoggerConfig | None = None

    def names(self) -> list[str]:
        """The loggers a run writes to: csv first (always), then the others chosen."""
        chosen = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        return ["csv", *(name for name in chosen if name != "csv")]


LOGGER_SCHEMAS = {"csv": CSVLoggerConfig, "tensorboard": TensorBoardLoggerConfig, "wandb": WandbLoggerConfig}
"""Each logger's options (the fields of LoggerConfig, by name)."""


def parse_logger(node: Any) -> LoggerConfig:
    """The logger section, each chosen logger typed by its own dataclass. The single-logger form of earlier
    runs' configs (checkpoints: {name: wandb, project: ..., offline: ...}) reads as that logger alone."""
    node = dict(node or {"csv": {}})
    schemas = LOGGER_SCHEMAS
    if not isinstance(node.get("name", {}), dict):  # the single-logger form
        name = node.pop("name")
        if name not in schemas:
            raise ConfigError("logger.name", name, f"one of {list(schemas)}")
        options = {k: v for k, v in node.items() if k in ("project", "offline")} if name == "wandb" else {}
        node = {name: options}
    typed = {}
    for name, options in node.items():
        if name not in schemas:
            raise ConfigError(f"logger.{name}", options, f"loggers among {list(schemas)} (conf/logger/)")
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"logger.{name}", options, "a mapping of its options ({}: defaults), or null")
        if options is not None:
            typed[name] = structured(f"logger.{name}", schemas[name], options, fields_of=f"options of {name}")
    return LoggerConfig(**typed)


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

    def validate(self) -> None:
        if self.train_every_n_steps < 0 or self.stiffness_batches < 0 or self.train_counts_window < 0:
            raise ConfigError(
                "metrics.train_every_n_steps/stiffness_batches/train_counts_window",
                (self.train_every_n_steps, self.stiffness_batches, self.train_counts_window),
                "integers >= 0 (0 = off)",
            )
        if not self.ngram_sizes or any(n < 2 for n in self.ngram_sizes):
            raise ConfigError("metrics.ngram_sizes", self.ngram_sizes, "a non-empty list of integers >= 2")


@dataclass
class FinetuneConfig:
    """Post-training: which parameters train (with init_from and a narrowed data.domains)."""

    trainable: Trainable = Trainable.all  # all | routers | routers_and_experts (everything else frozen)
    experts: Any = None  # routers_and_experts: expert ids trained in every MoE layer, or {layer<i>: [ids]};
    # null = all experts. Frozen experts get no gradient and no weight decay.

    def validate(self, model: ModelConfig, strategy: str) -> None:
        """`model`: the run's (its MoE layers and experts); `strategy`: trainer.strategy."""
        if self.experts is None:
            return
        if self.trainable != "routers_and_experts":
            raise ConfigError(
                "finetune.experts", self.experts, "null unless finetune.trainable=routers_and_experts"
            )
        if strategy == FSDP2:
            raise ConfigError(
                "finetune.experts",
                self.experts,
                f"null with trainer.strategy={FSDP2} (the chosen experts train through gradient masks on the "
                "stacked expert weights, which sharding replaces); train the expert path with ddp or one "
                "process",
            )
        num_experts = model.moe.num_experts
        moe_layers = [f"layer{i}" for i in range(model.dense_layers, model.n_layers)]
        per_layer = (
            self.experts if isinstance(self.experts, dict) else dict.fromkeys(moe_layers, self.experts)
        )
        for layer, ids in per_layer.items():
            if layer not in moe_layers:
                raise ConfigError(f"finetune.experts.{layer}", ids, f"keys among the MoE layers {moe_layers}")
            if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < num_experts for i in ids):
                raise ConfigError(
                    f"finetune.experts.{layer}", ids, f"a list of expert ids in [0, {num_experts})"
                )


@dataclass
class ObjectiveConfig:
    """What `testbed-train` returns to a Hydra sweeper (Optuna's objective): a number of the run's
    summary.json (`val/loss`, `val/loss/<domain>`, `spec/<metric>/mean`, ...) and whether the search minimizes
    or maximizes it. The Optuna sweeper's direction follows `direction`."""

    key: str = "val/loss"
    direction: Direction = Direction.minimize

    def validate(self) -> None:
        if not self.key.strip():
            raise ConfigError("objective.key", self.key, "a key of the run's summary.json, e.g. val/loss")


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
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # Lightning callbacks by name, each {_target_: <class>, ...its arguments} (conf/callbacks/), or null
    callbacks: dict[str, Any] = field(default_factory=dict)


SECTIONS = {
    f.name: f.default_factory
    for f in dataclasses.fields(RunConfig)
    if dataclasses.is_dataclass(f.default_factory)
}
"""The sections typed by their own dataclass (model, data, trainer, ...), by name."""
TOP_LEVEL_KEYS = {f.name for f in dataclasses.fields(RunConfig)}
COMPONENT_REGISTRIES: tuple[Registry, ...] = (ROUTERS, BALANCE, AUX_LOSSES)
"""The registries whose entries a run section names (router, balance, aux_loss)."""


def _store_schemas() -> None:
    """`run_schema`, and each registered component's option defaults (its config dataclass, as plain
    values: parse_config types them) as registry/<group>/<name>, which conf/<group>/<name>.yaml lists first
    in its defaults: the YAML then states only what differs, and every option exists to be overridden by key
    (`router.top_k=4`) without the YAML restating it."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for registry in COMPONENT_REGISTRIES:
        for name in registry.names():
            node = plain(registry.config_class(name)())
            store.store(group=f"registry/{registry.config_key}", name=name, node=node)


_store_schemas()


def allowed_for(key: str) -> str | None:
    """What the schema allows at a dotted key of the composed config ("one of [...]", "an integer", ...), or
    None for a key the schema leaves open (router, balance, aux_loss) or does not have."""
    expected = field_type(RunConfig, key)
    return None if expected is None or expected is Any else type_name(expected)


def _component(registry: Registry, name: str, options: dict, key: str) -> Any:
    """A router/balance/aux-loss config, typed through the dataclass of the component it names (so an
    unknown option, `renormalize=nope` or `jitter=abc` fail instead of passing)."""
    config_cls = registry.config_class(name, key)
    return structured(key, config_cls, options, fields_of=f"options of {registry.kind} '{name}'")


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
    sections = {
        name: parse_data(raw.get(name))
        if schema is DataConfig
        else parse_logger(raw.get(name))
        if schema is LoggerConfig
        else structured(name, schema, raw.get(name))
        for name, schema in SECTIONS.items()
    }

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
        seed=integer("seed", raw.get("seed", 0), 0, 2**32 - 1),
        run_name=str(raw.get("run_name", "run")),
        init_from=raw.get("init_from"),
        resume=None if raw.get("resume") is None else str(raw.get("resume")),
        overwrite=strict_bool("overwrite", raw.get("overwrite", False)),
        callbacks=parse_callbacks(raw.get("callbacks")),
        **sections,
    )
    validate(run)
    run.trainer.strategy = resolve_strategy(run)
    return run


def parse_callbacks(node: Any) -> dict[str, dict]:
    """The `callbacks` section: name -> {_target_: <dotted class path>, ...arguments}; a null entry is
    dropped (`callbacks.early_stopping=null` turns one off). The classes are imported and built by the
    training command (testbed.train.run_options.build_callbacks), which checks them further."""
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise ConfigError(
            "callbacks", node, "a mapping of name to {_target_: <class>, ...} (conf/callbacks/)"
        )
    out = {}
    for name, entry in node.items():
        if entry is None:
            continue
        target = entry.get("_target_") if isinstance(entry, dict) else None
        if not isinstance(target, str) or not target.strip():
            raise ConfigError(
                f"callbacks.{name}",
                entry,
                "a mapping with _target_: <dotted path of a Lightning callback class> and its arguments",
            )
        out[str(name)] = dict(entry)
    return out


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


COMMON_STRATEGIES = ("auto", FSDP2, "ddp", "ddp_spawn", "ddp_find_unused_parameters_true")
"""Strategy names accepted without importing Lightning (each is in its registry: tests/test_fast_start.py)."""


def strategy_names() -> list[str]:
    """Lightning's registered strategy names (ddp, ddp_spawn, fsdp, ...) plus "auto" and "fsdp2" (ours:
    FSDP2 through Lightning's ModelParallelStrategy, testbed/train/sharding.py)."""
    # imported here: lightning adds ~5 s to every import of testbed.config (measured 6.8 s vs torch 1.7 s)
    from lightning.pytorch.strategies import StrategyRegistry

    return sorted({"auto", FSDP2, *StrategyRegistry.available_strategies()})


def check_hardware(run: RunConfig) -> None:
    """The accelerator exists on this machine (a training run, not `testbed-analyze`, asks for it)."""
    if run.trainer.accelerator not in ("gpu", "cuda"):
        return
    import torch  # here, and for a GPU trainer only: a config is checked without torch (seconds of import)

    if not torch.cuda.is_available():
        raise ConfigError(
            "trainer.accelerator",
            run.trainer.accelerator,
            "'cpu' on this machine: it has no CUDA GPU (torch.cuda.is_available() is false); use trainer=cpu",
        )


def resolve_strategy(run: RunConfig) -> str:
    """The Lightning strategy to use: DDP with a gate-less router (its options' `is_gateless()`) needs
    `find_unused_parameters`, which is chosen here (the gate never gets a gradient, and plain DDP fails at
    the first backward)."""
    t = run.trainer
    distributed = t.strategy in ("ddp", "ddp_spawn") or (
        t.strategy == "auto" and (t.num_nodes > 1 or t.devices not in (1, "1", "auto"))
    )
    if distributed and run.router.is_gateless():
        base = "ddp" if t.strategy == "auto" else t.strategy
        return f"{base}_find_unused_parameters_true"
    return t.strategy


def validate(run: RunConfig) -> None:
    """Checks of values that cannot work: each section checks itself beside its component (given what it
    needs of the others), then the router, balancing method and auxiliary losses, each on its own and against
    each other. None of them needs torch."""
    validate_model(run.model)
    run.data.validate(run.model.max_seq_len)
    run.trainer.validate(run.model)
    run.finetune.validate(run.model, run.trainer.strategy)
    run.metrics.validate()
    run.optim.validate(run.trainer.max_steps)
    run.objective.validate()
    if run.init_from is not None and Path(str(run.init_from)).is_dir():
        raise ConfigError(
            "init_from",
            run.init_from,
            "a checkpoint file (.ckpt), not a directory; for a run folder pass "
            f"{Path(str(run.init_from)) / 'checkpoints' / 'last.ckpt'}",
        )
    validate_components(run)


def validate_model(m: ModelConfig) -> None:
    """The model section (ModelConfig and MoEConfig live in testbed/model/schema.py, which imports nothing
    of the config's checks)."""
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "dense_hidden", "max_seq_len"):
        positive(f"model.{key}", getattr(m, key))
    positive("model.moe.num_experts", m.moe.num_experts)
    positive("model.moe.expert_hidden", m.moe.expert_hidden)
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
    capacity = m.moe.capacity_factor
    if capacity is not None and capacity <= 0:
        raise ConfigError("model.moe.capacity_factor", capacity, "null (dropless) or a float > 0")


def validate_components(run: RunConfig) -> None:
    """The router, the balancing method and each auxiliary loss check their own options (their options'
    `check`: run.router etc. are instances of the config dataclasses, testbed/routing/options.py and
    testbed/losses/options.py); then what they need of each other and of the model, from the facts their
    options state. The components' classes (and torch) are not imported."""
    run.router.check(run, "router")
    capacity = run.model.moe.capacity_factor
    if capacity is not None and not run.router.token_choice:
        raise ConfigError(
            "model.moe.capacity_factor",
            capacity,
            f"null with router '{run.router.name}', which sets its own capacity (router.capacity_factor)",
        )
    if run.balance.stateful and not run.router.supports_expert_bias:
        supported = [name for name in ROUTERS.names() if ROUTERS.config_class(name).supports_expert_bias]
        raise ConfigError(
            "balance",
            run.balance.name,
            f"a router with expert-bias support {supported} (router is '{run.router.name}'); "
            "use balance=load_balance or balance=none",
        )
    run.balance.check("balance")
    for name, options in run.aux_loss.items():
        options.check(f"aux_loss.{name}")


def _swiglu_params(d_model: int, hidden: int) -> int:
    """A SwiGLU feed-forward's weights: d x 2h in, h x d out."""
    return 3 * d_model * hidden


def _params(m: ModelConfig, routed_experts: int) -> int:
    d, moe = m.d_model, m.moe
    embeddings = m.vocab_size * d * (1 if m.tie_embeddings else 2)  # the LM head shares them when tied
    attention = 4 * d * d + 2 * d  # qkv and output projections, and the block's two RMSNorm weights
    dense_ffn = _swiglu_params(d, m.dense_hidden)
    moe_ffn = (
        d * moe.num_experts  # the router's gate
        + routed_experts * _swiglu_params(d, moe.expert_hidden)
        + _swiglu_params(d, moe.num_shared_experts * moe.expert_hidden)
    )
    moe_layers = m.n_layers - m.dense_layers
    return embeddings + m.n_layers * attention + m.dense_layers * dense_ffn + moe_layers * moe_ffn + d


def num_total_params(model: ModelConfig) -> int:
    """Every parameter of the model `model` describes, tied embeddings counted once (the count of
    MoETransformer's `parameters()`), from its sizes alone."""
    return _params(model, model.moe.num_experts)


def num_active_params(model: ModelConfig, top_k: int) -> int:
    """The parameters one token runs through: `num_total_params` with `top_k` routed experts per MoE layer
    instead of all of them (the router's gate and the shared experts count in full)."""
    return _params(model, top_k)
