"""Progress and console logging of a training run (docs/running.md, "What a run prints").

- `progress_callback`: on a terminal, `StepProgressBar` (a Rich bar over the run's optimizer steps, total
  trainer.max_steps, with the last validation loss and the tokens per second); elsewhere (a pipe, a sweep's
  or a cluster's log file) `ProgressLines`: one plain line every trainer.progress_every_s seconds and one at
  each validation, with the step, tokens/s, ETA and the last validation loss. Both read host values only
  (no device sync).
- `rich_log_handler` / `PendingRunLog`: the console handler and the run's cli.log of Python logging in every
  run (Hydra job_logging `rich`).
- `quiet_lightning_logs` (testbed.train.quiet): drops Lightning's lines that nobody can act on.
"""

from __future__ import annotations

import logging
import sys
import time

from lightning.pytorch.callbacks import Callback
from rich.logging import RichHandler

from testbed.train.quiet import quiet_lightning_logs as quiet_lightning_logs  # re-exported

log = logging.getLogger(__name__)


class RunClock:
    """Steps and tokens per second since this process started training (a resumed run starts at its
    checkpoint's step), and the time left to trainer.max_steps at that pace."""

    def __init__(self):
        self.start: tuple[float, int, int] | None = None

    def begin(self, trainer, pl_module) -> None:
        self.start = (time.perf_counter(), trainer.global_step, getattr(pl_module, "tokens_seen", 0))

    def rates(self, trainer, pl_module) -> tuple[float | None, float | None]:
        """(steps/s, tokens/s), None before the first step."""
        if self.start is None:
            return None, None
        seconds = time.perf_counter() - self.start[0]
        steps = trainer.global_step - self.start[1]
        tokens = getattr(pl_module, "tokens_seen", 0) - self.start[2]
        if seconds <= 0 or steps <= 0:
            return None, None
        return steps / seconds, tokens / seconds

    def eta(self, trainer, pl_module) -> float | None:
        per_second, _ = self.rates(trainer, pl_module)
        if per_second is None:
            return None
        return max(trainer.max_steps - trainer.global_step, 0) / per_second


def duration(seconds: float | None) -> str:
    """3h05m, 12m40s, 45s; "?" when unknown."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def tokens_rate(tokens_per_s: float | None) -> str:
    return "? tok/s" if tokens_per_s is None else f"{tokens_per_s:,.0f} tok/s"


def last_val(pl_module) -> str | None:
    """The last validation loss and its step ("val 4.123 (step 250)"), None before the first validation."""
    loss = getattr(pl_module, "last_val_metrics", {}).get("val/loss")
    if loss is None:
        return None
    step = getattr(pl_module, "last_val_step", None)
    return f"val {loss:.3f}" + (f" (step {step})" if step is not None else "")


class ProgressLines(Callback):
    """Plain progress lines where stdout is no terminal: a Rich bar there shows nothing until the end. One
    line every `every_s` seconds (0: none) and one after each validation, each a log record of its own:

        step 250/1500 (17%) | 3,120 tok/s | ETA 6m40s | val 4.512 (step 250)
    """

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.clock = RunClock()
        self.last_line = 0.0

    def line(self, trainer, pl_module) -> str:
        step, total = trainer.global_step, trainer.max_steps
        _, tokens = self.clock.rates(trainer, pl_module)
        parts = [
            f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)",
            tokens_rate(tokens),
            f"ETA {duration(self.clock.eta(trainer, pl_module))}",
        ]
        val = last_val(pl_module)
        return " | ".join([*parts, val] if val else parts)

    def emit(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            log.info(self.line(trainer, pl_module))
        self.last_line = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.begin(trainer, pl_module)
        self.last_line = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_s > 0 and time.perf_counter() - self.last_line >= self.every_s:
            self.emit(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.emit(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.clock.start is not None:
            steps = trainer.global_step - self.clock.start[1]
            seconds = time.perf_counter() - self.clock.start[0]
            _, tokens = self.clock.rates(trainer, pl_module)
            log.info("trained %d steps in %s (%s)", steps, duration(seconds), tokens_rate(tokens))


class StepProgressBar(Callback):
    """The bar on a terminal: optimizer steps of the whole run (a resumed run starts at its step), one bar
    from the first step to trainer.max_steps, left on screen once at the end:

        train ━━━━━━━━━━━━━━━━━━━━━━━━ 1207/1500 2:31 • 0:36 val 4.123 · 3,120 tok/s

    "val" replaces "train" while a validation runs. Text never wraps: on a narrow terminal the metrics are
    cut short at its edge."""

    REFRESH_PER_SECOND = 4

    def __init__(self):
        self.clock = RunClock()
        self.progress = None
        self.task = None
        self.shown_step = -1

    def _columns(self) -> list:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        def fixed() -> Column:
            return Column(no_wrap=True)

        def cut() -> Column:  # the metrics: cut at the terminal's edge, never wrapped
            return Column(no_wrap=True, overflow="crop")

        return [
            TextColumn("{task.description}", table_column=fixed()),
            BarColumn(bar_width=24),
            MofNCompleteColumn(table_column=fixed()),
            TimeElapsedColumn(table_column=fixed()),
            TextColumn("•", table_column=fixed()),
            TimeRemainingColumn(table_column=fixed()),
            TextColumn("{task.fields[info]}", markup=False, table_column=cut()),
        ]

    def info(self, trainer, pl_module) -> str:
        _, tokens = self.clock.rates(trainer, pl_module)
        val = getattr(pl_module, "last_val_metrics", {}).get("val/loss")
        parts = ([f"val {val:.3f}"] if val is not None else []) + ([tokens_rate(tokens)] if tokens else [])
        return " · ".join(parts)

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from rich import get_console
        from rich.progress import Progress

        self.clock.begin(trainer, pl_module)
        self.progress = Progress(
            *self._columns(), console=get_console(), refresh_per_second=self.REFRESH_PER_SECOND
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=trainer.max_steps, completed=trainer.global_step, info=""
        )

    def _update(self, trainer, pl_module, description: str | None = None) -> None:
        if self.progress is None:
            return
        fields = {"description": description} if description else {}
        self.progress.update(
            self.task, completed=trainer.global_step, info=self.info(trainer, pl_module), **fields
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.shown_step:  # once per optimizer step (not per micro-batch)
            self.shown_step = trainer.global_step
            self._update(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._update(trainer, pl_module, description="val  ")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._update(trainer, pl_module, description="train")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()  # the last frame stays on screen, once
            self.progress = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._update(trainer, pl_module, description="train")
        self.stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.stop()

    def teardown(self, trainer, pl_module, stage) -> None:
        self.stop()


def progress_callback(progress_bar: bool, every_s: float, stream=None) -> Callback | None:
    """The run's progress display: the bar where `stream` (stdout) is a terminal and `progress_bar` is on,
    the plain lines where it is not (whatever `progress_bar` says: a log file has no bar to turn off)."""
    stream = sys.stdout if stream is None else stream
    if stream.isatty():
        return StepProgressBar() if progress_bar else None
    return ProgressLines(every_s)


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
