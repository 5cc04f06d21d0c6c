"""Console lines of Lightning and of Hydra's plugins that nobody can act on, dropped where they are logged.

Each is matched by its message on the logger that writes it (a filter on that logger, so the run's other
records and the plugins' useful lines stay): which accelerators Lightning found, how it read the
limit_*_batches, why `fit` stopped (the run prints its own end), the DDP setup banner, its advertising tip;
the Optuna sweeper's setup lines (study name, storage, sampler, directions: all in the sweep's config) and
Optuna's "a new study created". Imports nothing heavy: the entry point installs the plugin filters before
Hydra starts.
"""

from __future__ import annotations

import logging
import re

LIGHTNING_NOISE = re.compile(
    r"^(GPU|TPU|HPU|IPU) available: "
    r"|^`Trainer\(\w+=[^)]*\)` was configured so"
    r"|^`Trainer\.fit` stopped: "
    r"|^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES"
    r"|^Initializing distributed: "
    r"|All distributed processes registered"
    r"|^You are using a CUDA device .* Tensor Cores"
    r"|litlogger",
    re.IGNORECASE,
)
LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",  # rank_zero_info goes through one of these two
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.distributed",
    "lightning.pytorch.accelerators.cuda",
)

PLUGIN_NOISE = re.compile(r"^(Study name|Storage|Sampler|Directions): |^A new study created ")
PLUGIN_LOGGERS = (
    "hydra_plugins.hydra_optuna_sweeper._impl",
    "optuna.storages._in_memory",
    "optuna.storages._rdb.storage",
)


class DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def _install(names: tuple[str, ...], pattern: re.Pattern) -> None:
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMatching) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(DropMatching(pattern))


def quiet_lightning_logs() -> None:
    """Install the filter once on each of Lightning's console loggers."""
    _install(LIGHTNING_LOGGERS, LIGHTNING_NOISE)


def quiet_plugin_logs() -> None:
    """Install the filter once on the Optuna sweeper's and Optuna's loggers (before they exist)."""
    _install(PLUGIN_LOGGERS, PLUGIN_NOISE)
