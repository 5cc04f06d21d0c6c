"""Entry points: `testbed-train` (Hydra). Validates config and data before any training starts."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from testbed import CONF_DIR
from testbed.errors import ConfigError, TestbedError

if TYPE_CHECKING:
    from testbed.config import RunConfig

log = logging.getLogger(__name__)

TRAINING_MODULES = (
    "lightning",
    "testbed.data.datamodule",
    "testbed.train.callbacks",
    "testbed.train.module",
    "testbed.train.progress",
    "testbed.train.run_loggers",
    "testbed.train.summary",
)
"""What a run imports once its config is accepted (this module imports them only then, so that --help and a
config error answer at once): a process that starts many runs (testbed-experiment's forkserver) preloads
them."""


def hydra_choices() -> dict[str, str]:
    try:
        choices = HydraConfig.get().runtime.choices
        return {k: str(v) for k, v in choices.items() if not k.startswith("hydra")}
    except ValueError:  # not running under Hydra (tests call run_training directly)
        return {}


def run_training(cfg: DictConfig, run_dir: str | Path, quiet: bool = False, callbacks: tuple = ()) -> dict:
    """Validate, train, validate at the end, write summary.json; returns the summary.

    The run folder policy comes first: a folder holding a run is refused unless `resume` or `overwrite=true`
    is given, and a lock file keeps other processes out for the run's lifetime. `callbacks`: extra Lightning
    callbacks (tests use them to interrupt a run at a chosen step)."""
    from testbed.config import parse_config
    from testbed.train.checkpoint import RunLock, is_launch_rank_zero
    from testbed.train.run_options import build_callbacks
    from testbed.train.threads import set_cpu_threads

    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)"
    )  # Lightning/torch version skew
    # Under DDP every rank validates the whole validation set, so the validation and routing metrics are the
    # same on every rank and need no all-reduce; Lightning would advise sync_dist=True once per key
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|spec|init)/")
    # a resumed run's sampler continues the data stream itself (DomainBatchSampler.skip, tested to equality);
    # Lightning cannot see that and warns on every mid-epoch resume
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before")
    run = parse_config(cfg)
    run_dir = Path(run_dir)
    if run.trainer.fast_dev_run and run.resume is not None:
        raise ConfigError(
            "resume", run.resume, "null with trainer.fast_dev_run (it continues and writes nothing)"
        )
    callbacks = (*callbacks, *build_callbacks(run, run_dir))  # the callbacks group, checked before any file
    run_dir.mkdir(parents=True, exist_ok=True)
    set_cpu_threads(run, verbose=is_launch_rank_zero())  # one line, from the process that speaks
    if not is_launch_rank_zero():  # a DDP rank started by Lightning: rank 0 holds the folder
        return _train(run, run_dir, quiet, callbacks, owner=False)
    with RunLock(run_dir):
        return _train(run, run_dir, quiet, callbacks, owner=True, cfg=cfg)


def ended_run(run: RunConfig, run_dir: Path) -> dict | None:
    """resume=auto on a run that already ended (finished, or failed: rerunning a deterministic failure fails
    again) returns its summary without training, so that a rerun of a sweep continues only the others."""
    from testbed.train.checkpoint import read_status

    status = read_status(run_dir)
    if run.resume != "auto" or status not in ("finished", "failed"):
        return None
    log.info("resume=auto: the run in %s has already ended (status %s); not trained again", run_dir, status)
    return json.loads((run_dir / "summary.json").read_text())


def _train(
    run: RunConfig, run_dir: Path, quiet: bool, extra_callbacks: tuple, owner: bool, cfg: DictConfig = None
) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from testbed.config import FSDP2, plain
    from testbed.data.datamodule import DomainMixDataModule
    from testbed.routing.balanced_assignment import AuctionUnfinished
    from testbed.safe_load import trusted
    from testbed.train.callbacks import SpecializationMetrics
    from testbed.train.checkpoint import (
        LAST,
        DirectCheckpointIO,
        PeerLost,
        RunCheckpoint,
        RunInterrupted,
        TrainingDiverged,
        check_same_run,
        is_launch_rank_zero,
        let_peers_report_first,
        load_weights,
        peer_lost,
        prepare_run_dir,
        read_checkpoint,
        truncate_csv,
        write_run_record,
    )
    from testbed.train.finetune import trainable_parameter_count
    from testbed.train.module import MoELanguageModel
    from testbed.train.progress import progress_callback, quiet_lightning_logs
    from testbed.train.run_loggers import build_loggers, finish_loggers
    from testbed.train.run_options import repeat_first_batches
    from testbed.train.sharding import FSDP2Strategy
    from testbed.train.summary import print_summary, unigram_entropies, write_summary

    fast_dev_run = run.trainer.fast_dev_run  # N batches of each, nothing written (no folder policy either)
    if owner and fast_dev_run:
        resume_from = None
    elif owner:
        ended = ended_run(run, run_dir)
        if ended is not None:
            return ended
        resume_from = prepare_run_dir(run_dir, run.resume, run.overwrite)
    else:
        auto = run_dir / LAST
        resume_from = (auto if auto.is_file() else None) if run.resume == "auto" else run.resume
    payload = read_checkpoint(Path(resume_from)) if resume_from else None
    if payload is not None:
        check_same_run(plain(run), payload, Path(resume_from))
    if owner and not fast_dev_run:  # accepted: only now the folder gets this run's record (.hydra/, cli.log)
        write_run_record(run_dir, cfg)
    L.seed_everything(run.seed, workers=True, verbose=False)

    datamodule = DomainMixDataModule(run.data, seed=run.seed)
    datamodule.setup("fit")  # loads and checks every data file before training starts
    if run.trainer.overfit_batches:
        repeat_first_batches(datamodule, run.trainer.overfit_batches)
    vocab = datamodule.vocab_size()
    if vocab > run.model.vocab_size:
        raise ConfigError(
            "model.vocab_size", run.model.vocab_size, f"at least the tokenizer's vocabulary size ({vocab})"
        )

    module = MoELanguageModel(run, datamodule.domains)
    if run.init_from and payload is None:
        load_weights(module, run.init_from)
    run_state = (payload or {}).get("testbed_run", {})
    if payload is not None:
        datamodule.train_start_batch = payload["testbed"]["batches_seen"]
        if owner:  # rows the interrupted run logged after its checkpoint are logged again
            truncate_csv(run_dir / "metrics.csv", run_state.get("csv_rows", 0))
        log.info("resuming from %s (step %s)", resume_from, payload.get("global_step"))
    quiet_lightning_logs()
    if not quiet and is_launch_rank_zero():
        total = sum(p.numel() for p in module.parameters())
        trainable = trainable_parameter_count(module.model, run.finetune)
        print(f"model: {total:,} parameters ({trainable:,} trainable)")
    scratch = Path(tempfile.mkdtemp(prefix="testbed-fast-dev-run-")) if fast_dev_run else None
    metrics_callback = SpecializationMetrics(scratch or run_dir)  # a fast_dev_run's tables and plots: dropped
    # a dense model (model=<name>_dense) has no routing to measure: no routing metrics, counts or plots
    callbacks = [*extra_callbacks, metrics_callback] if module.model.moe_layers else [*extra_callbacks]
    # the bar on a terminal; plain lines every trainer.progress_every_s and at validations elsewhere
    progress = None if quiet else progress_callback(run.trainer.progress_bar, run.trainer.progress_every_s)
    if progress is not None:
        callbacks.append(progress)
    start = time.perf_counter()
    checkpointer = RunCheckpoint(run_dir, start, previous_wall_time=run_state.get("wall_time_s", 0.0))
    if run.trainer.enable_checkpointing and not fast_dev_run:
        callbacks.append(checkpointer)
        module.checkpoint_path = str(run_dir / LAST)
    t = run.trainer
    let_peers_report_first()  # a multi-process run: rank 0 reports a lost peer itself
    trainer = L.Trainer(
        accelerator=t.accelerator,
        strategy=FSDP2Strategy() if t.strategy == FSDP2 else t.strategy,
        devices=t.devices,
        num_nodes=t.num_nodes,
        precision=t.precision,
        max_steps=t.max_steps,
        # Lightning counts micro-batches here; trainer.val_check_interval counts optimizer steps
        val_check_interval=min(t.val_check_interval, t.max_steps) * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        logger=False if fast_dev_run else build_loggers(run, run_dir),
        callbacks=callbacks,
        # our RunCheckpoint writes last.ckpt (every validation, SIGTERM/SIGUSR1); Lightning's checkpointing
        # only for a ModelCheckpoint of the callbacks group (best k on a metric)
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        fast_dev_run=fast_dev_run or False,
        enable_progress_bar=False,  # ours (testbed.train.progress), counting optimizer steps of the run
        enable_model_summary=False,  # its FLOPs column reads 0; the parameter counts are printed below
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
        plugins=[DirectCheckpointIO()],  # no staging copy in /tmp: RunCheckpoint renames into place
    )
    summary_args = dict(
        run=run,
        choices=hydra_choices(),
        unigram=unigram_entropies(datamodule),
        data=datamodule.describe(),
    )
    initial = dict((payload or {}).get("testbed", {}).get("initial_metrics", {}))
    try:
        if run.init_from and payload is None:  # the starting point's validation (init/val/loss...)
            trainer.validate(module, datamodule=datamodule, verbose=False)
            initial = {f"init/{k}": v for k, v in module.last_val_metrics.items()}
        module.initial_metrics = initial
        # the checkpoint holds tensors and plain containers only (RNG states as tensors and ints):
        # Lightning reads it with weights_only=True too, unless TESTBED_TRUST_CHECKPOINTS=1
        trainer.fit(
            module,
            datamodule=datamodule,
            ckpt_path=str(resume_from) if resume_from else None,
            weights_only=not trusted(),
        )
        module.check_finite()
        if module.last_val_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
    except (TrainingDiverged, RunInterrupted, AuctionUnfinished) as err:  # before RuntimeError: the
        # auction's error is one too
        _record_stop(trainer, module, checkpointer, metrics_callback, run_dir, summary_args, err)
        raise
    except RuntimeError as err:
        if not peer_lost(err, trainer.world_size):
            raise
        saved = checkpointer.saved_step
        where = f"{run_dir / LAST} (step {saved})" if saved is not None else "none was saved"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        lost = PeerLost(
            f"another process of this {trainer.world_size}-process run stopped at step {trainer.global_step} "
            f"(this process's collective failed: {first_line[:200]}); last checkpoint: {where}; "
            "check the other process's log, then run the same command with resume=auto",
            trainer.global_step,
        )
        _record_stop(trainer, module, checkpointer, metrics_callback, run_dir, summary_args, lost)
        raise lost from err
    finish_loggers(trainer, module)
    if fast_dev_run:
        shutil.rmtree(scratch, ignore_errors=True)
        return fast_dev_run_result(trainer, module, quiet)

    summary = write_summary(
        run_dir,
        **summary_args,
        **training_state(trainer, module, checkpointer, metrics_callback),
        extra={"trainable_params": trainable_parameter_count(module.model, run.finetune), **initial},
    )
    if not quiet and trainer.is_global_zero:
        print_summary(summary)
        print(f"run folder: {run_dir}")
    return summary


def fast_dev_run_result(trainer, module, quiet: bool) -> dict:
    """What a fast_dev_run reports (printed, returned, never written): its steps and validation losses."""
    result = {"status": "fast_dev_run", "steps": trainer.global_step, **module.last_val_metrics}
    if not quiet and trainer.is_global_zero:
        loss = module.last_val_metrics.get("val/loss", math.nan)
        print(
            f"fast_dev_run: {trainer.global_step} training step(s) and "
            f"{trainer.num_val_batches[0] if trainer.num_val_batches else 0} validation batch(es) ran; "
            f"val/loss {loss:.4f} on those batches; nothing written (no checkpoint, log or summary.json)"
        )
    return result


def _record_stop(
    trainer, module, checkpointer, metrics_callback, run_dir: Path, summary_args: dict, err
) -> None:
    """summary.json of a run that stopped before its end: "failed" (diverged, auction unfinished) or
    "interrupted" (a signal, a lost peer process: resumable with resume=auto)."""
    from testbed.routing.balanced_assignment import AuctionUnfinished
    from testbed.train.checkpoint import LAST, PeerLost, RunInterrupted, TrainingDiverged
    from testbed.train.summary import write_summary

    failed = isinstance(err, (TrainingDiverged, AuctionUnfinished))
    for logger in trainer.loggers:
        logger.save()
    if not trainer.is_global_zero:
        return
    extra = {"error": str(err)}
    if isinstance(err, TrainingDiverged):
        extra |= {"failed_step": err.step, "failed_term": err.term}
    if isinstance(err, RunInterrupted):
        extra["signal"] = signal_name(err.signum)
    if isinstance(err, PeerLost):
        extra["peer_lost"] = True
    extra |= {
        "checkpoint": str(run_dir / LAST) if (run_dir / LAST).is_file() else None,
        "checkpoint_step": checkpointer.saved_step,
    }
    write_summary(
        run_dir,
        **summary_args,
        **training_state(trainer, module, checkpointer, metrics_callback),
        status="failed" if failed else "interrupted",
        extra=extra,
    )


def training_state(trainer, module, checkpointer, metrics_callback) -> dict:
    """What summary.json records of where training stands (finished, failed or interrupted alike)."""
    return {
        "steps": trainer.global_step,
        "tokens_seen": module.tokens_seen,
        "wall_time": checkpointer.wall_time(),
        "val_metrics": module.last_val_metrics,
        "spec": metrics_callback.last_metrics,
        "coefficients": module.loss_coefficients,
    }


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_train(cfg: DictConfig) -> float | None:
    """One run; returns the number at objective.key of its summary (what a sweeper such as Optuna reads)."""
    from testbed.config import check_hardware, parse_config
    from testbed.train.sweeps import objective_value

    try:
        run = parse_config(cfg)
        log.debug("the run's composed config:\n%s", OmegaConf.to_yaml(cfg))  # debug=default shows it
        check_hardware(run)  # a GPU config on a machine without one fails here, not in Lightning
        summary = run_training(cfg, HydraConfig.get().runtime.output_dir)
        return objective_value(summary, run.objective.key)
    except TestbedError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def check_group_choices(argv: list[str], conf_dir: str = CONF_DIR) -> None:
    """Reject `group=option` overrides naming no YAML in conf/<group>/, listing the options that exist.

    Hydra reports these too, but for list groups (aux_loss=[...]) without the allowed names.
    """
    groups = {
        p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in Path(conf_dir).iterdir() if p.is_dir()
    }
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "hydra")):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups:
            continue
        # Also sweeps of lists: aux_loss=[z_loss],[z_loss,variance]
        names = [v.strip() for v in value.replace("[", ",").replace("]", ",").split(",") if v.strip()]
        for name in names:
            if name not in groups[key]:
                raise ConfigError(key, name, f"one of {groups[key]} (files in conf/{key}/)")


HYDRA_CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")


def quote_values_with_equals(argv: list[str]) -> list[str]:
    """`init_from=/runs/lr=1e-3/last.ckpt` -> `init_from='/runs/lr=1e-3/last.ckpt'`: Hydra's override
    grammar rejects a bare `=` in a value, which paths of sweep folders often hold. A value the grammar
    reads as it is (`range(10,100,step=10)`, `tag(log,interval(1e-4,1e-2))`) is left alone."""
    parser = OverridesParser.create()
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-") and "=" in value and value[:1] not in ("'", '"'):
            try:
                parser.parse_override(arg)
            except HydraException:
                arg = f"{key}='{value.replace(chr(39), chr(92) + chr(39))}'"
        out.append(arg)
    return out


def first_sweep_value(override) -> str | None:
    """The value of a sweep the pre-check composes first: a choice's first, a range's start, an interval's
    lower bound; None for glob(...) (Hydra expands it to options that exist)."""
    if override.is_interval_sweep():
        return str(override.value().start)
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        return None
    return next(iter(override.sweep_string_iterator()), "")


def check_overrides(argv: list[str], conf_dir: str = CONF_DIR) -> list[str]:
    """Compose the config with the command line's overrides (the first value of each sweep) so that a key
    that does not exist (`foo=1`) or a malformed override is a ConfigError (exit 2), not Hydra's exit 1.
    With -m, every value each sweep can give is checked too (testbed.train.sweeps); returns the overrides
    the sweep needs added (the Optuna sweeper's direction from objective.direction)."""
    from testbed.train.sweeps import is_multirun

    if any(arg.startswith(HYDRA_CONFIG_FLAGS) for arg in argv):
        return []  # another config tree: Hydra checks it
    parser = OverridesParser.create()
    concrete, sweeps = [], []
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "hydra.", "hydra/", "+hydra", "~hydra")):
            continue
        key, _, value = arg.partition("=")
        try:
            override = parser.parse_override(arg)
        except HydraException as err:
            raise ConfigError(
                key.lstrip("+~"),
                value,
                f"a value in Hydra's override syntax ({str(err).splitlines()[0]}); "
                "quote values with special characters: key='...'",
            ) from None
        if override.is_sweep_override():
            sweeps.append(override)
            first = first_sweep_value(override)
            if first is not None:
                concrete.append(f"{override.get_key_element()}={first}")
        else:
            concrete.append(arg)
    try:
        if concrete:
            compose_overrides(concrete, conf_dir)
    except ConfigError as err:  # a sweep's first value: say which sweep it came from
        swept = next((o for o in sweeps if o.get_key_element().lstrip("+~") == err.key), None)
        if swept is None:
            raise
        raise ConfigError(err.key, err.value, f"{err.allowed} (the sweep {swept.input_line})") from None
    if not is_multirun(argv):
        return []
    return check_multirun(argv, concrete, sweeps, conf_dir)


def check_multirun(argv: list[str], concrete: list[str], sweeps: list, conf_dir: str) -> list[str]:
    """A sweep's pre-check: compose with the command line's hydra/... and hydra.* overrides to find the
    sweeper and its search space, check every value each sweep can give (testbed.train.sweeps), and
    return the Optuna sweeper's direction override when it must follow objective.direction."""
    from testbed.config import parse_config
    from testbed.train.sweeps import (
        check_sweep_values,
        direction_overrides,
        is_sampling_sweeper,
        search_space,
    )

    hydra_args = [a for a in argv if "=" in a and a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    groups = {p.name for p in Path(conf_dir).iterdir() if p.is_dir()}

    def compose_run(overrides: list[str]) -> dict:
        try:
            return OmegaConf.to_container(compose("config", overrides=overrides), resolve=False)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError("command line", " ".join(overrides), str(err).splitlines()[0]) from None

    with initialize_config_dir(conf_dir, version_base="1.3"):
        try:
            full = compose("config", overrides=[*concrete, *hydra_args], return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(
                "command line",
                " ".join(hydra_args),
                f"hydra settings that compose ({str(err).splitlines()[0]}); the sweepers and launchers of "
                "conf/hydra/ need `pip install -e .[sweep]`",
            ) from None
        sweeper = OmegaConf.to_container(full.hydra.sweeper, resolve=False)
        direction = OmegaConf.select(full, "hydra.sweeper.direction", default=None)
        if OmegaConf.is_config(direction):  # a list of directions (several objectives)
            direction = OmegaConf.to_container(direction)
        sweeper["direction"] = direction
        base = OmegaConf.to_container(full, resolve=False)
        base.pop("hydra", None)
        sampling = is_sampling_sweeper(sweeper)
        check_sweep_values(search_space(sweeps, sweeper), concrete, base, groups, compose_run, sampling)
    return direction_overrides(argv, sweeper, parse_config(base).objective.direction.value)


def compose_overrides(concrete: list[str], conf_dir: str) -> None:
    """Compose the config with `concrete` (no sweeps); an override Hydra refuses is a ConfigError naming
    its key and what is allowed there."""
    from testbed.config import allowed_for

    with initialize_config_dir(conf_dir, version_base="1.3"):
        try:
            compose("config", overrides=concrete)
        except (HydraException, OmegaConfBaseException) as err:
            existing = re.search(r"An item is already at '([^']+)'", str(err))
            if existing:  # `+key=value` for a key the config has (e.g. +trainer.num_nodes=2)
                key = existing.group(1)
                arg = next(a for a in concrete if a.startswith("+") and a.lstrip("+").startswith(f"{key}="))
                value = arg.split("=", 1)[1]
                raise ConfigError(
                    arg.split("=", 1)[0],
                    value,
                    f"'+' adds a new key, and {key} exists already: write {key}={value} (without '+')",
                ) from None
            cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
            key = getattr(cause, "full_key", None) or ""
            arg = next((a for a in concrete if a.split("=", 1)[0].lstrip("+~") == key), None)
            if not key or arg is None:
                raise ConfigError("command line", " ".join(concrete), str(err).splitlines()[0]) from None
            if isinstance(cause, ValidationError):  # a value the typed schema (run_schema) refuses
                allowed = allowed_for(key) or str(cause).splitlines()[0]
                raise ConfigError(key, arg.split("=", 1)[1], allowed) from None
            parent = key.rpartition(".")[0]
            base = compose("config", overrides=[a for a in concrete if a is not arg])
            node = OmegaConf.select(base, parent) if parent else base
            keys = sorted(node.keys()) if hasattr(node, "keys") else []
            raise ConfigError(
                key,
                arg.split("=", 1)[1],
                f"an existing key ({parent or 'top-level'} keys: {keys}); to add a new key write +{key}=...",
            ) from None


def check_output_dirs(argv: list[str]) -> None:
    """hydra.run.dir / hydra.sweep.dir must be a folder that exists or can be made: a path that is a file,
    or under a file, or in a folder this user cannot write, is refused here before Hydra starts (Hydra
    would end in a traceback)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key.lstrip("+~") not in ("hydra.run.dir", "hydra.sweep.dir") or "${" in value:
            continue
        path = Path(value.strip("'\"")).expanduser().absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            what = "is a file" if existing == path else f"is under a file ({existing})"
            raise ConfigError(key.lstrip("+~"), value, f"a folder for the run's files; {path} {what}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(
                key.lstrip("+~"), value, f"a folder this user can write; {existing} is not writable"
            )


def refuse_used_run_dir(argv: list[str]) -> None:
    """A single run into an explicit `hydra.run.dir` that already holds a run is refused here, before Hydra
    starts: Hydra would otherwise write the new run's `.hydra/` over the old run's first. (Multirun job
    folders are fresh; the same check runs again in `run_training` for every run.)"""
    from testbed.train.checkpoint import prepare_run_dir

    if any(arg in ("-m", "--multirun") for arg in argv):
        return
    values = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-"):
            values[key.lstrip("+~")] = value.strip("'\"")
    run_dir = values.get("hydra.run.dir")
    resume = values.get("resume")
    if run_dir is None or (resume not in (None, "null")) or values.get("overwrite", "").lower() == "true":
        return

    prepare_run_dir(Path(run_dir), None, False)  # raises RunDirError for a used folder, changes nothing


HELP_FLAGS = ("--help", "-h")
SHOW_FLAGS = ("--cfg", "-c", "--info", "-i", "--hydra-help")
"""Hydra's flags that print and train nothing."""


def help_text(conf_dir: str = CONF_DIR) -> str:
    """`testbed-train --help`: how to pass options, the config groups and their options (the default first),
    and where the rest is. Read from conf/ alone: no torch, no Lightning, no composition."""
    conf = Path(conf_dir)
    defaults = {}
    for entry in OmegaConf.to_container(OmegaConf.load(conf / "config.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                defaults[key] = value
    lines = [
        "testbed-train: train one MoE run, or a sweep of runs (Hydra)",
        "",
        "  testbed-train [key=value ...]             one run, in outputs/<date>/<time>/",
        "  testbed-train -m key=a,b [key=value ...]  a sweep, one run per value: multirun/<date>/<time>/<n>/",
        "  make train ARGS='key=value ...'           the same through make (quote ARGS)",
        "",
        "config groups (group=option, the default first; aux_loss and logger take lists: logger=[csv,wandb])",
    ]
    for group in sorted(p for p in conf.iterdir() if p.is_dir() and p.name != "hydra"):
        options = sorted(f.stem for f in group.glob("*.yaml") if not f.stem.startswith("_"))
        default = defaults.get(group.name)
        chosen = [str(d) for d in default] if isinstance(default, list) else [str(default)] if default else []
        first = [o for o in chosen if o in options]
        shown = ", ".join([*(f"{o} (default)" for o in first), *(o for o in options if o not in first)])
        lines += textwrap.wrap(shown, 100, initial_indent=f"  {group.name}: ", subsequent_indent="      ")
    for group in sorted(p for p in (conf / "hydra").iterdir() if p.is_dir()):
        lines.append(f"  hydra/{group.name}: {', '.join(sorted(f.stem for f in group.glob('*.yaml')))}")
    lines += [
        "",
        "options by key, e.g.: trainer.max_steps=300 optim.lr=1e-3 router.top_k=1 seed=1 resume=auto",
        "  trainer.num_threads=N (0: chosen from the machine's load)  trainer.progress_every_s=S",
        "  hydra.run.dir=<folder>  overwrite=true",
        "",
        "every option with its value: testbed-train --cfg job [key=value ...]   Hydra's flags: --hydra-help",
        "docs: docs/configuration.md (groups, options, sweeps), docs/running.md (output, resume, faults)",
    ]
    return "\n".join(lines)


def check_logger_options(argv: list[str]) -> None:
    """`logger.<name>.<option>=...` needs <name> among the loggers (`logger=[csv,<name>]`): the options of
    a logger that is not chosen are null, and Hydra would fail on them with an assertion."""
    chosen = {"csv"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "logger":
            chosen |= {v.strip() for v in re.split(r"[\[\],]", value) if v.strip()}
    for arg in argv:
        key, sep, value = arg.partition("=")
        parts = key.lstrip("+~").split(".")
        if sep and len(parts) > 2 and parts[0] == "logger" and parts[1] not in chosen:
            raise ConfigError(
                key.lstrip("+~"),
                value,
                f"options of a chosen logger: add {parts[1]} to the list, "
                f"logger=[{','.join(sorted(chosen))},{parts[1]}]",
            )


def check_values(argv: list[str], conf_dir: str = CONF_DIR) -> None:
    """A single run's values (optim.lr=-1, a GPU trainer on a machine without one) refused before Hydra and
    Lightning start, as the run itself would refuse them; a sweep's are checked by check_overrides."""
    from testbed.config import check_hardware, parse_config
    from testbed.train.sweeps import is_multirun

    if is_multirun(argv) or any(arg.startswith((*HYDRA_CONFIG_FLAGS, *SHOW_FLAGS)) for arg in argv):
        return  # a sweep, another config tree, or a config to be shown (--cfg job optim.lr=-1 shows it)
    overrides = [
        a for a in argv if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")
    ]
    with initialize_config_dir(conf_dir, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    check_hardware(parse_config(cfg))


def train_main() -> None:
    if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        print(help_text())  # before anything heavy is imported: at once
        return
    import testbed.config  # noqa: F401 - registers the schema (run_schema) that Hydra composes onto
    from testbed.train.quiet import quiet_plugin_logs
    from testbed.train.sweeps import experiment_overrides, sweeper_params_as_overrides

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    quiet_plugin_logs()  # the Optuna sweeper's setup lines
    try:
        argv = sweeper_params_as_overrides(sys.argv[1:])
        sys.argv[1:] = experiment_overrides(quote_values_with_equals(argv), CONF_DIR)
        check_group_choices(sys.argv[1:])
        check_logger_options(sys.argv[1:])
        sys.argv[1:] = [*sys.argv[1:], *check_overrides(sys.argv[1:])]
        check_values(sys.argv[1:])
        check_output_dirs(sys.argv[1:])
        refuse_used_run_dir(sys.argv[1:])
    except TestbedError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    _hydra_train()


if __name__ == "__main__":
    train_main()
