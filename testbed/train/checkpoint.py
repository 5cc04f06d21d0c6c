"""Checkpoints, resume and run folders: loading weights with clear errors, the run's own `last.ckpt`
(written at every validation and on SIGTERM / SIGUSR1), `resume=auto|<path>`, the used-folder refusal,
`overwrite=true` and the lock that keeps two processes out of one run folder."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.strategies.launchers import subprocess_script
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from testbed.errors import CheckpointError, TestbedError
from testbed.safe_load import load_file
from testbed.train.progress import accept_run_log
from testbed.train.schedule import lr_factor

logger = logging.getLogger(__name__)

LAST = Path("checkpoints") / "last.ckpt"
# What a run writes into its folder; its record (.hydra/, cli.log) is written once the run is accepted
# (`write_run_record`) and cleared with the rest, but alone does not make a folder "used".
RUN_FILES = ("summary.json", "metrics.csv", "hparams.yaml")
RECORD = (".hydra", "cli.log")
RUN_FOLDERS = ("checkpoints", "routing", "plots", "tensorboard", "wandb")
LOCK_NAME = ".run.lock"
INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C


class RunDirError(TestbedError):
    """The run folder holds another run or is in use by another process."""


class SaveFailed(TestbedError):
    """A checkpoint could not be written (disk full, quota, permissions)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class TrainingDiverged(TestbedError):
    """A loss term became NaN or infinite."""

    def __init__(self, message: str, step: int, term: str):
        super().__init__(message)
        self.step, self.term = step, term


class RunInterrupted(TestbedError):
    """SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) stopped the run after a checkpoint was saved."""

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step = signum, step


class DirectCheckpointIO(TorchCheckpointIO):
    """`torch.save` straight to the path it is given. RunCheckpoint already writes a temporary name inside
    the run folder and renames it into place; Lightning's default would stage every save again through a
    temporary file in the system temp folder (an fsspec transaction), which a kill or a full disk leaves
    there for good and which copies every checkpoint twice when /tmp is another file system."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, path)


PEER_REPORT_S = 30
"""Seconds Lightning's process observer waits between looks at the other ranks (its own default: 5)."""


class _PatientObserver(subprocess_script._ChildProcessObserver):
    """Lightning's launcher (rank 0) polls its child ranks and SIGKILLs every process once one has died. At
    its default 5 s that can beat rank 0's own detection (its next collective fails: PeerLost, exit 2, an
    "interrupted" summary naming the checkpoint) whenever rank 0 spends more than 5 s between collectives
    (a validation, a checkpoint write, a loaded machine), and rank 0 then dies without a word. Polling every
    PEER_REPORT_S leaves the observer as the backstop for a rank hung in a collective."""

    def __init__(self, main_pid: int, child_processes: list, sleep_period: int = PEER_REPORT_S) -> None:
        super().__init__(main_pid=main_pid, child_processes=child_processes, sleep_period=sleep_period)


def let_peers_report_first() -> None:
    """Make Lightning's subprocess launcher start `_PatientObserver` (it looks the class up when it launches
    the other ranks)."""
    subprocess_script._ChildProcessObserver = _PatientObserver


class PeerLost(TestbedError):
    """Another process of a multi-process run stopped (killed, out of memory, lost node): this one's next
    collective fails with a backend error instead of hanging; the run resumes from its last checkpoint."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


PEER_FAILURE_WORDS = ("peer", "connection", "gloo", "nccl", "timed out", "timeout", "broken pipe")


def peer_lost(err: BaseException, world_size: int) -> bool:
    """Whether `err` is a collective failing because another process of the run went away (a killed DDP
    rank ends its partner's all-reduce with "Connection reset by peer" under gloo, a timeout or abort under
    NCCL). Only in a multi-process run; anything else is re-raised as it is."""
    if world_size <= 1 or not isinstance(err, RuntimeError):
        return False
    dist_error = getattr(torch.distributed, "DistError", ())
    message = str(err).lower()
    return isinstance(err, dist_error) or any(word in message for word in PEER_FAILURE_WORDS)


def load_weights(module: torch.nn.Module, path: str | Path, what: str = "init_from") -> dict:
    """Copy every parameter of a Lightning checkpoint (or a plain state dict) into `module`; returns the
    loaded payload (its `global_step` and records).

    Missing, unexpected or mis-shaped tensors are reported by name; nothing is silently skipped.
    """
    path = Path(path)
    payload = load_file(path, what)  # tensors and plain containers only (testbed/safe_load.py)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: {path} holds no state_dict")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}"
            for label, names in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]),
            )
            if names
        )
        raise CheckpointError(
            f"{what}: {path} does not fit the configured model ({detail}); "
            "use the same model.* settings as the run that wrote it"
        )
    module.load_state_dict(state)
    return payload


# ---------------------------------------------------------------------------------------------- run folders
def is_launch_rank_zero() -> bool:
    """True in the process that owns the run folder: not a DDP child started by Lightning or a cluster."""
    return all(
        os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    )


def previous_run_files(run_dir: Path) -> list[str]:
    """The files and folders of an earlier run in `run_dir` (empty: the folder is fresh)."""
    return [name for name in (*RUN_FILES, *RUN_FOLDERS) if (run_dir / name).exists()]


def clear_run(run_dir: Path) -> list[str]:
    """Delete an earlier run's files (count tables, plots, metrics.csv, checkpoints, summary.json, ...)."""
    removed = previous_run_files(run_dir)
    for name in [*removed, *(name for name in RECORD if (run_dir / name).exists())]:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def read_status(run_dir: Path) -> str | None:
    """`status` of the summary.json in `run_dir` (summaries written before statuses existed: finished)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return "unreadable"
    return summary.get("status", "finished") if isinstance(summary, dict) else "unreadable"


def prepare_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> Path | None:
    """Apply the run-folder policy before training; returns the checkpoint to resume from (or None).

    A folder that holds a run is refused unless `resume` or `overwrite=true` is given; `overwrite` clears
    the old run's files; `resume=auto` continues from <run_dir>/checkpoints/last.ckpt when it exists and
    otherwise starts fresh (clearing what an interrupted run left without a checkpoint)."""
    if resume is not None and overwrite:
        raise RunDirError(
            "resume and overwrite=true exclude each other: resume continues the run, overwrite deletes it"
        )
    used = previous_run_files(run_dir)
    if resume is None:
        if used and not overwrite:
            status = read_status(run_dir)
            raise RunDirError(
                f"run folder {run_dir} already holds a run ({', '.join(used)}"
                f"{f'; status {status}' if status else ''}); "
                "use resume=auto to continue it, overwrite=true to delete it and start over, "
                "or another hydra.run.dir"
            )
        if used:
            clear_run(run_dir)
        return None
    if resume == "auto":
        checkpoint = run_dir / LAST
        if checkpoint.is_file():
            return checkpoint
        if used:  # an interrupted run that saved no checkpoint: nothing to continue
            logger.warning(
                "resume=auto: no checkpoint in %s; starting over (%s removed)", run_dir, ", ".join(used)
            )
            clear_run(run_dir)
        return None
    checkpoint = Path(resume)
    if checkpoint.is_dir() and (checkpoint / LAST).is_file():
        checkpoint = checkpoint / LAST
    if not checkpoint.is_file():
        raise CheckpointError(
            f"resume: checkpoint {checkpoint} does not exist; allowed: auto (this run folder's "
            f"{LAST}) or the path of a .ckpt file written by a testbed run"
        )
    return checkpoint


def write_run_record(run_dir: Path, cfg) -> None:
    """The record of an accepted run: its cli.log opened (`accept_run_log`), and under Hydra the run's
    .hydra/config.yaml (the composed config), overrides.yaml (the command line's overrides) and hydra.yaml,
    which Hydra itself no longer writes (hydra.output_subdir is null): each to a temporary file, then
    renamed, so the folder never holds a half-written record or another run's label."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    accept_run_log()
    # a save killed mid-write (SIGKILL, power loss) leaves its temporary file; this run holds the folder's
    # lock, so no other process is writing one now
    for leftover in (run_dir / LAST.parent).glob(".last.*.tmp"):
        logger.info("removing %s, left by a checkpoint save that was killed mid-write", leftover)
        leftover.unlink(missing_ok=True)
    if not HydraConfig.initialized():  # the Python API (run_training on a composed config): no Hydra run
        return
    hydra_cfg = HydraConfig.get()
    record = run_dir / ".hydra"
    record.mkdir(exist_ok=True)
    files = {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
    }
    for name, text in files.items():
        temporary = record / f".{name}.{os.getpid()}.tmp"
        temporary.write_text(text)
        os.replace(temporary, record / name)


class RunLock:
    """An exclusive lock file in the run folder for the run's lifetime (POSIX fcntl): a second process that
    trains into the same folder is refused instead of interleaving its files with this one's."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.handle = None

    def __enter__(self) -> RunLock:
        import fcntl  # POSIX only: imported where the lock is taken, so that the module imports anywhere

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirError(
                f"run folder {self.path.parent} is in use by another training process (pid {holder}, "
                f"lock file {self.path}); wait for it to end or use another hydra.run.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


# ---------------------------------------------------------------------------------------------- resume
def read_checkpoint(path: Path) -> dict:
    """The checkpoint to resume from, with a clear error when it is unreadable or not a testbed run's."""
    payload = load_file(path, "resume", mmap=True)  # tensors and plain containers only
    if not isinstance(payload, dict) or "testbed" not in payload or "optimizer_states" not in payload:
        raise CheckpointError(
            f"resume: {path} is not a training checkpoint of a testbed run (no optimizer or run state); "
            "to start from its weights only use init_from"
        )
    return payload


RESUME_SECTIONS = ("model", "data", "optim", "router", "balance", "aux_loss", "finetune", "seed")


def check_same_run(run_config: dict, payload: dict, path: Path) -> None:
    """A resumed run must be the run that wrote the checkpoint: the same model, data, optimizer, routing,
    losses and seed (trainer settings such as threads may differ)."""
    saved = payload.get("hyper_parameters", {}).get("run", {})
    differing = []
    for section in RESUME_SECTIONS:
        old, new = saved.get(section), run_config.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            differing += [f"{section}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            differing.append(section)
    old_trainer, new_trainer = saved.get("trainer") or {}, run_config.get("trainer") or {}
    changed = {
        k: (old_trainer[k], new_trainer.get(k)) for k in old_trainer if old_trainer[k] != new_trainer.get(k)
    }
    differing += [f"trainer.{k}" for k in sorted(changed) if RESUME_TRAINER.get(k, "refused") == "refused"]
    if differing:
        raise CheckpointError(
            f"resume: {path} was written by a run with other settings ({', '.join(differing[:6])}"
            f"{' ...' if len(differing) > 6 else ''}); resume with the same overrides as that run, or start "
            "a new run from its weights with init_from (README: which settings may change on resume)"
        )
    for key in sorted(changed):
        if RESUME_TRAINER.get(key) == "notice":
            old, new = changed[key]
            logger.warning(
                "resume: trainer.%s changed from %s to %s: %s",
                key,
                old,
                new,
                _consequence(key, saved, run_config, payload),
            )


RESUME_TRAINER = {
    # refused: the resumed run would no longer be the run it continues (its results change)
    "precision": "refused",
    "deterministic": "refused",
    "gradient_clip_val": "refused",
    "limit_val_batches": "refused",
    "accumulate_grad_batches": "refused",
    "overfit_batches": "refused",  # another stream of batches
    "fast_dev_run": "refused",  # a smoke run: it neither saves nor resumes a checkpoint
    "chunked_cross_entropy": "silent",  # the same values and gradients either way (tested)
    # allowed with a notice in the log: the run goes on, differently from an uninterrupted run
    "max_steps": "notice",
    "val_check_interval": "notice",
    "compile": "notice",
    "fused_optimizer": "notice",
    "accelerator": "notice",
    "name": "notice",
    "enable_checkpointing": "notice",
    # allowed silently: they cannot change the numbers (the process layout is checked separately)
    "num_threads": "silent",
    "progress_bar": "silent",
    "progress_every_s": "silent",
    "log_every_n_steps": "silent",
    "compile_backend": "silent",
    "devices": "silent",
    "num_nodes": "silent",
    "strategy": "silent",
}
"""What may change when a run resumes, per trainer key (model, data, optim, router, balance, aux_loss,
finetune and seed may not change at all). docs/running.md's resume table lists the same."""


def _consequence(key: str, saved: dict, now: dict, payload: dict) -> str:
    """What a changed trainer setting does to the resumed run (the notice's second half)."""
    if key == "max_steps":
        optim, step = now.get("optim", {}), int(payload.get("global_step", 0))
        old_steps, new_steps = saved["trainer"]["max_steps"], now["trainer"]["max_steps"]
        args = (optim.get("warmup_steps", 0), optim.get("min_lr_ratio", 0.1))
        before, after = lr_factor(step, old_steps, *args), lr_factor(step, new_steps, *args)
        return (
            f"the cosine schedule now ends at step {new_steps}: at step {step} the learning rate goes from "
            f"{before:.3f} to {after:.3f} x optim.lr: the run differs from one planned for {new_steps} steps"
        )
    if key == "val_check_interval":
        return "validations (and checkpoints) now come at the new interval; the final validation is the same"
    if key == "enable_checkpointing":
        return "no more checkpoints will be written" if not now["trainer"][key] else "checkpoints resume"
    return "the numbers may differ in the last bits from an uninterrupted run"


def truncate_csv(path: Path, rows: int) -> None:
    """Keep the header and the first `rows` data rows of metrics.csv: rows logged after the checkpoint by the
    interrupted run are logged again by the resumed one."""
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        lines = list(csv.reader(handle))
    if len(lines) - 1 > rows:
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows(lines[: rows + 1])


def csv_data_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, newline="") as handle:
        return max(0, sum(1 for _ in csv.reader(handle)) - 1)


# ---------------------------------------------------------------------------------------------- callback
class RunCheckpoint(L.Callback):
    """Writes <run_dir>/checkpoints/last.ckpt at the end of every validation during training (after checking
    that no loss went non-finite, so a diverged state is never saved). On SIGTERM / SIGUSR1 (what clusters
    send before pre-emption) or SIGINT (Ctrl-C; a second one stops at once, unsaved) it saves at the end of
    the current optimizer step, or of the validation that follows it, and stops the run with RunInterrupted.
    Saving goes through a temporary file and a rename: a kill during the save leaves the previous checkpoint
    intact."""

    def __init__(self, run_dir: Path, started: float | None = None, previous_wall_time: float = 0.0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LAST
        self.signum: int | None = None
        self.started = started if started is not None else time.perf_counter()
        self.previous_wall_time = previous_wall_time
        self._handlers: dict[int, object] = {}
        self.saved_step: int | None = None
        self.pending = False  # a validation ended inside an optimizer step: save at the step's end

    # signals -------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:  # Ctrl-C twice: stop at once, unsaved
            self._restore_handlers()
            raise KeyboardInterrupt
        self.signum = signum
        if signum == signal.SIGINT:
            print(
                f"\nSIGINT: saving {self.path} at the end of this optimizer step, then stopping "
                "(Ctrl-C again stops at once, without saving)",
                file=sys.stderr,
                flush=True,
            )

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in INTERRUPT_SIGNALS:  # replaces Lightning's SIGTERM handler (it would exit 0, unsaved)
            self._handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def on_train_end(self, trainer, pl_module) -> None:
        """The final weights too, when the last step was not followed by a validation inside training."""
        self._restore_handlers()
        if self.saved_step != trainer.global_step:
            pl_module.check_finite()
            self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    # saving --------------------------------------------------------------------------------------------
    def wall_time(self) -> float:
        return self.previous_wall_time + time.perf_counter() - self.started

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["testbed_run"] = {
            "csv_rows": csv_data_rows(self.run_dir / "metrics.csv"),
            "wall_time_s": self.wall_time(),
        }

    def save(self, trainer, pl_module) -> None:
        for logger in trainer.loggers:  # metrics logged so far reach the disk first: their count is saved
            logger.save()
        temporary = self.path.with_name(f".last.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(temporary), weights_only=False)  # full state; no log line per save
            if trainer.is_global_zero:
                os.replace(temporary, self.path)
        except OSError as err:  # a full disk, a quota, a folder made read-only: say what survived
            temporary.unlink(missing_ok=True)
            last = (
                f"the last good checkpoint is {self.path} (step {self.saved_step})"
                if self.saved_step is not None and self.path.is_file()
                else (
                    f"{self.path} is intact from before this run" if self.path.is_file() else "none was saved"
                )
            )
            raise SaveFailed(
                f"could not save the checkpoint of step {trainer.global_step} in {self.path.parent} "
                f"({err.strerror or err}); {last}; no half-written file is left. Free space there, or copy "
                "the run folder to a roomier disk and continue it there with resume=auto",
                trainer.global_step,
            ) from err
        self.saved_step = trainer.global_step

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            pl_module.check_finite()  # raises TrainingDiverged: the diverged state is never saved

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        if trainer.fit_loop.epoch_loop._should_accumulate():
            # a validation inside an optimizer step (not made by trainer.val_check_interval, which counts
            # optimizer steps; a guard for a Lightning-level interval): the
            # step's accumulated gradients are not in a checkpoint; save at the end of the step instead
            self.pending = True
            return
        self.save(trainer, pl_module)
        self._stop_if_signalled(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """After a signal (or a validation inside the step): save at the end of the optimizer step (the state
        Lightning restarts from), unless a validation follows this step (it saves and stops at its end) or
        this was the last step (on_train_end saves)."""
        if self.signum is None and not self.pending:
            return
        loop = trainer.fit_loop.epoch_loop
        if loop._should_accumulate() or trainer.global_step >= trainer.max_steps:
            return  # mid-accumulation the step's gradients would be lost; after the last step it finishes
        if loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            return
        pl_module.check_finite()
        self.save(trainer, pl_module)
        self.pending = False
        self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer) -> None:
        if self.signum is None:
            return
        name = signal.Signals(self.signum).name
        raise RunInterrupted(
            f"run interrupted by {name} after step {trainer.global_step}: checkpoint {self.path} saved; "
            "continue with resume=auto (same overrides, same run folder)",
            self.signum,
            trainer.global_step,
        )


# ---------------------------------------------------------------------------------------------- metrics log
class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that it continues an existing metrics.csv (a resumed run) instead of
    deleting it: whether the folder may be used was decided by `prepare_run_dir` before training."""

    def __init__(self, log_dir: str):
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])

    def _check_log_dir_exists(self) -> None:
        pass


class RunCSVLogger(CSVLogger):
    """metrics.csv in the run folder, appended to when the run is resumed."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
