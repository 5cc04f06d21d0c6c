"""The progress bar and console logging of a training run (README: "Console output").

- `RunProgressBar`: Lightning's Rich bar counts optimizer steps here, so its description says "train"
  instead of "Epoch 0/-2" (the loader is endless and max_epochs is -1), and it shows the last validation
  loss and the tokens per second since the run (re)started: host values only, no device sync.
- `rich_log_handler`: the console handler of Python logging in every run (Hydra job_logging `rich`).
- `quiet_lightning_logs`: drops Lightning's advertising tip from its console log.
"""

from __future__ import annotations

import logging
import sys
import time

from lightning.pytorch.callbacks import RichProgressBar
from rich.logging import RichHandler


class RunProgressBar(RichProgressBar):
    def __init__(self):
        super().__init__(leave=True)
        self._start: tuple[float, int] | None = None

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = (time.perf_counter(), pl_module.tokens_seen)

    def get_metrics(self, trainer, pl_module) -> dict:
        items: dict = {}
        val = getattr(pl_module, "last_val_metrics", {}).get("val/loss")
        if val is not None:
            items["val"] = f"{val:.3f}"
        if self._start is not None:
            seconds = time.perf_counter() - self._start[0]
            tokens = pl_module.tokens_seen - self._start[1]
            if seconds > 0 and tokens > 0:
                items["tok/s"] = f"{tokens / seconds:,.0f}"
        return items


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage().lower()


def rich_log_handler() -> logging.Handler:
    """The console handler of every run (conf/hydra/job_logging/rich.yaml). On a terminal, Rich's: time and
    level columns, no source paths. Elsewhere (a sweep's log file, a pipe, CI) one plain line per record,
    "HH:MM:SS LEVEL message", which neither wraps nor pads, so grep finds every message whole."""
    if sys.stdout.isatty():
        return RichHandler(show_path=False, markup=False, log_time_format="[%X]")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S"))
    return handler


class PendingRunLog(logging.FileHandler):
    """The run's cli.log (conf/hydra/job_logging/rich.yaml), opened only once the run is accepted: until
    `accept_run_log()` its records wait in memory, so a run that is refused or skipped (a used folder, a
    held lock, a finished run under resume=auto) appends nothing to the log of the run in that folder."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None):
        super().__init__(filename, mode, encoding, delay=True)
        self.accepted = False
        self.pending: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.accepted:
            super().emit(record)
        else:
            self.pending.append(record)

    def accept(self) -> None:
        self.accepted = True
        for record in self.pending:
            super().emit(record)
        self.pending = []


def accept_run_log() -> None:
    """Open the run's cli.log and write what was logged before the run was accepted."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PendingRunLog):
            handler.accept()


def quiet_lightning_logs() -> None:
    """Install the filter once on Lightning's console logger."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in logger.filters):
        logger.addFilter(_DropAdverts())
