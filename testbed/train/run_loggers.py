"""The loggers of a run (`logger=[csv,tensorboard,wandb]`, conf/logger/).

metrics.csv is written by every run, whatever the list says: testbed-report reads the curves from it and a
resumed run truncates it to its checkpoint. TensorBoard and W&B come on top, in the order listed. W&B's run
name, group, tags and project come from the config (`logger.wandb.*`), each with a default read from the run:
the run folder as the name, the sweep folder as the group of a `-m` job, the command line's overrides as the
tags. W&B is quiet by default: its own console lines (about 30 per run) are off, and one line says where an
offline run is and how to upload it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from testbed.train.checkpoint import RunCSVLogger

log = logging.getLogger(__name__)

WANDB_TAG_LENGTH = 64
"""W&B refuses longer tags."""


def build_loggers(run, run_dir: Path) -> list:
    """CSV first (Lightning's `trainer.logger` is the first; metrics.csv in the run folder), then the other
    loggers chosen in `run.logger`."""
    run_dir = Path(run_dir)
    built = [RunCSVLogger(str(run_dir), name="", version="")]  # appends to metrics.csv when resuming
    if run.logger.tensorboard is not None:
        # hp_metric: the final val/loss (finish_loggers), not Lightning's placeholder -1
        built.append(TensorBoardLogger(str(run_dir), name="tensorboard", version="", default_hp_metric=False))
    if run.logger.wandb is not None:
        built.append(wandb_logger(run.logger.wandb, run_dir))
    return built


def display_path(path: Path) -> str:
    """`path` relative to the working folder when under it (as the run's own lines show it), else whole."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def hydra_job() -> tuple[str | None, list[str]]:
    """(the sweep folder of a -m job or None, the job's command-line overrides); (None, []) outside Hydra."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under Hydra (tests call run_training directly)
        return None, []
    sweep = display_path(Path(hydra_cfg.sweep.dir)) if hydra_cfg.mode == RunMode.MULTIRUN else None
    return sweep, list(hydra_cfg.overrides.task)


def wandb_tags(overrides: list[str]) -> list[str]:
    """The overrides that make a W&B tag: not Hydra's own settings, at most 64 characters, each once."""
    tags = []
    for override in overrides:
        if override.lstrip("+~").startswith(("hydra.", "hydra/")) or len(override) > WANDB_TAG_LENGTH:
            continue
        if override not in tags:
            tags.append(override)
    return tags


def wandb_settings(options, run_dir: Path) -> dict:
    """wandb.init's arguments for `options` (WandbLoggerConfig) and the run folder, defaults filled in."""
    sweep, overrides = hydra_job()
    return {
        "project": options.project,
        "name": options.name or display_path(run_dir),
        "group": options.group or sweep,
        "tags": list(options.tags) if options.tags is not None else wandb_tags(overrides),
        "mode": "offline" if options.offline else "online",
    }


def wandb_logger(options, run_dir: Path) -> WandbLogger:
    import wandb

    settings = wandb_settings(options, run_dir)
    # quiet through wandb's settings and offline through wandb.init's mode, not through WANDB_SILENT or
    # Lightning's offline flag (which sets WANDB_MODE): the environment would stay set for the later jobs of
    # a sweep in this process
    logger = WandbLogger(
        save_dir=str(run_dir),
        settings=wandb.Settings(silent=options.quiet),
        **settings,
    )
    # Lightning passes wandb.init `anonymous=None` unasked, and W&B answers every run with a deprecation
    # warning about that setting (nothing a user can act on): the key is left out
    init_args = getattr(logger, "_wandb_init", {})
    if init_args.get("anonymous", "") is None:
        del init_args["anonymous"]
    return logger


def finish_loggers(trainer, module) -> None:
    """TensorBoard's hp_metric becomes the final val/loss; W&B runs are closed so that offline runs are
    complete on disk (summary, media) when training returns, and an offline run's folder is named once."""
    val_loss = module.last_val_metrics.get("val/loss")
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and val_loss is not None:
            logger.log_hyperparams(dict(module.hparams), metrics={"hp_metric": val_loss})
        if isinstance(logger, WandbLogger):
            experiment = logger.experiment
            offline = getattr(experiment.settings, "mode", "") in ("offline", "dryrun")
            folder = getattr(experiment.settings, "sync_dir", None)
            experiment.finish()
            if offline and folder and trainer.is_global_zero:
                log.info("W&B offline run saved; to upload it: wandb sync %s", folder)
