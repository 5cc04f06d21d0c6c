"""Run options in Lightning's terms: the `callbacks` group (Lightning callbacks built from `_target_`
entries, conf/callbacks/) and `trainer.overfit_batches` (the first N training batches, repeated)."""

from __future__ import annotations

import itertools
import logging
import re
import warnings
from pathlib import Path

from torch.utils.data import DataLoader

from testbed.config import RunConfig
from testbed.errors import ConfigError

log = logging.getLogger(__name__)
SPEC_KEY = re.compile(r"spec/[a-z_]+/(mean|layer\d+)")


def validation_keys(run: RunConfig) -> list[str]:
    """The numbers each validation logs that a callback may monitor (spec/<metric>/... only with MoE
    layers: a dense model has no routing to measure)."""
    keys = ["val/loss", "val/doc_ci95", *(f"val/loss/{domain}" for domain in run.data.domains)]
    if run.model.dense_layers < run.model.n_layers:
        keys.append("spec/<metric>/mean or spec/<metric>/layer<i>")
    return keys


def check_monitor(run: RunConfig, key: str, monitor) -> None:
    known = [k for k in validation_keys(run) if not k.startswith("spec/")]
    moe = run.model.dense_layers < run.model.n_layers
    if isinstance(monitor, str) and (monitor in known or (moe and SPEC_KEY.fullmatch(monitor))):
        return
    raise ConfigError(
        f"{key}.monitor", monitor, f"a number logged at each validation: {validation_keys(run)}"
    )


def build_callbacks(run: RunConfig, run_dir: Path) -> list:
    """The Lightning callbacks of `run.callbacks`, each instantiated from its `_target_` with its other keys
    as arguments. Checked first: the target is a Lightning Callback class; EarlyStopping and
    ModelCheckpoint monitor a number each validation logs, with a patience >= 0; a ModelCheckpoint needs
    trainer.enable_checkpointing and saves under <run dir>/checkpoints/best/ unless its dirpath says
    otherwise. Any argument the class refuses is a ConfigError naming the entry."""
    if not run.callbacks:
        return []
    from hydra.utils import get_class, instantiate
    from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

    built = []
    for name, entry in run.callbacks.items():
        key = f"callbacks.{name}"
        target = entry["_target_"]
        try:
            cls = get_class(target)
        except Exception:  # noqa: BLE001 - Hydra wraps the import error; the message says what to give
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            raise ConfigError(
                f"{key}._target_",
                target,
                "the import path of a Lightning callback class (lightning.pytorch.callbacks.EarlyStopping)",
            )
        options = {k: v for k, v in entry.items() if k != "_target_"}
        if issubclass(cls, (EarlyStopping, ModelCheckpoint)) and options.get("monitor") is not None:
            check_monitor(run, key, options["monitor"])
        if issubclass(cls, EarlyStopping):
            if "monitor" not in options:
                raise ConfigError(f"{key}.monitor", None, f"the number to watch: {validation_keys(run)}")
            patience = options.get("patience", 3)
            if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
                raise ConfigError(
                    f"{key}.patience", patience, "an integer >= 0 (validations without improvement)"
                )
        if issubclass(cls, ModelCheckpoint):
            if not run.trainer.enable_checkpointing:
                raise ConfigError(
                    key,
                    target,
                    "no checkpoint callback with trainer.enable_checkpointing=false (callbacks.<name>=null "
                    "drops it)",
                )
            if options.get("dirpath") is None:
                options["dirpath"] = str(Path(run_dir) / "checkpoints" / "best")
        try:
            built.append(instantiate({"_target_": target, **options}))
        except Exception as err:  # noqa: BLE001 - any refusal of the class, as a ConfigError
            cause = err.__cause__ or err
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise ConfigError(key, entry, f"arguments {cls.__name__} accepts ({reason})") from None
        arguments = ", ".join(f"{k}={v!r}" for k, v in options.items())
        log.debug("callback %s: %s(%s)", name, target, arguments)
    return built


def repeat_first_batches(datamodule, count: int) -> None:
    """trainer.overfit_batches: the data module's training loader serves its first `count` batches, the
    same ones in the same order every epoch (Lightning's overfit_batches limits each epoch to N batches,
    but this module's sampler continues its random stream from epoch to epoch)."""
    make = datamodule.train_dataloader
    # Lightning logs every log_every_n_steps optimizer steps across epochs; its notice that an epoch is
    # shorter than that interval does not apply
    warnings.filterwarnings(
        "ignore", message=r"The number of training batches \(\d+\) is smaller than the logging"
    )

    def train_dataloader() -> DataLoader:
        loader = make()
        fixed = list(itertools.islice(iter(loader.batch_sampler), count))
        return DataLoader(
            loader.dataset,
            batch_sampler=fixed,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )

    datamodule.train_dataloader = train_dataloader
    log.info("overfit_batches: the first %d training batches, the same ones every epoch", count)
