"""Resume: a run interrupted (SIGTERM / SIGUSR1) and resumed with resume=auto gives exactly the numbers of the
uninterrupted run; last.ckpt is written at every validation; the sampler continues where it stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import numpy as np
import pytest
import torch

from testbed.data.datamodule import DomainBatchSampler
from testbed.train.checkpoint import RunInterrupted
from testbed.train.cli import run_training
from tests.conftest import compose, synth_overrides

pytestmark = pytest.mark.slow

BASE = (
    "trainer.num_threads=1",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "metrics.train_every_n_steps=2",
    "metrics.train_counts_window=4",  # the window of training counts crosses the interruption
)
# 8 training sequences per domain: 3 micro-batches per epoch, so the runs cross epoch boundaries
SMALL_EPOCHS = ("data.max_train_tokens_per_domain=256",)


class SendSignal(L.Callback):
    """Sends `signum` to this process after optimizer step `step` (at its validation's end with at_val)."""

    def __init__(self, signum, step, at_val):
        self.signum, self.step, self.at_val = signum, step, at_val

    def on_validation_end(self, trainer, pl_module):
        if self.at_val and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.at_val and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def results(summary):
    return {
        k: v for k, v in summary.items() if k.startswith(("val/", "spec/")) or k in ("steps", "tokens_seen")
    }


@pytest.mark.parametrize(
    ("signum", "step", "at_val", "extra"),
    [
        (signal.SIGTERM, 6, True, ()),
        # 4 accumulated micro-batches per step: the validation comes after step 5 (20 micro-batches)
        (signal.SIGTERM, 5, True, ("trainer.accumulate_grad_batches=4", "trainer.val_check_interval=5")),
        (
            signal.SIGUSR1,
            4,
            False,
            (
                "balance=expert_bias",
                "router.jitter=0.1",
                "trainer.accumulate_grad_batches=2",
                "metrics.train_every_n_steps=3",
                *SMALL_EPOCHS,
            ),
        ),
        (signal.SIGINT, 6, True, ("router.jitter=0.1", *SMALL_EPOCHS)),  # Ctrl-C; at an epoch boundary
    ],
    ids=[
        "sigterm_after_validation",
        "validation_with_accumulation",
        "sigusr1_mid_epoch_expert_bias_accum",
        "sigint_epoch_boundary_jitter",
    ],
)
def test_resumed_run_equals_the_uninterrupted_run(synth_mix, tmp_path, signum, step, at_val, extra):
    def config(*more):
        return compose(synth_overrides(synth_mix, *BASE, *extra, *more))

    full = run_training(config(), tmp_path / "full", quiet=True)
    run_dir = tmp_path / "resumed"
    name = signal.Signals(signum).name
    with pytest.raises(RunInterrupted, match=f"interrupted by {name} after step") as err:
        run_training(config(), run_dir, quiet=True, callbacks=(SendSignal(signum, step, at_val),))
    assert err.value.step == step
    interrupted = json.loads((run_dir / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["signal"] == signal.Signals(signum).name
    assert interrupted["steps"] == interrupted["checkpoint_step"] == step
    assert "val/loss" not in interrupted  # a partial run's numbers are never top-level results
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step

    resumed = run_training(config("resume=auto"), run_dir, quiet=True)
    assert resumed["status"] == full["status"] == "finished"
    assert results(resumed) == results(full)  # equal, not close
    assert len([k for k in results(full) if k.startswith("spec/")]) > 10
    # the metrics log continues: the same rows as the uninterrupted run's, none lost, none twice
    assert (run_dir / "metrics.csv").read_text() == (tmp_path / "full" / "metrics.csv").read_text()
    a = torch.load(tmp_path / "full" / "routing" / "counts_step12.pt")
    b = torch.load(run_dir / "routing" / "counts_step12.pt")
    assert torch.equal(a["counts"], b["counts"])
    a = torch.load(tmp_path / "full" / "routing" / "train_counts_step12.pt", weights_only=True)
    b = torch.load(run_dir / "routing" / "train_counts_step12.pt", weights_only=True)
    assert a["train_steps"] == b["train_steps"] and len(a["train_steps"]) == 4
    assert torch.equal(a["counts"], b["counts"])
    weights_a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    weights_b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)  # expert_bias buffers included


class RecordCheckpointSteps(L.Callback):
    def __init__(self, path):
        self.path, self.steps = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.path.is_file():
            step = torch.load(self.path, weights_only=False)["global_step"]
            if not self.steps or self.steps[-1] != step:
                self.steps.append(step)


def test_last_checkpoint_is_written_at_every_validation(synth_mix, tmp_path):
    recorder = RecordCheckpointSteps(tmp_path / "checkpoints" / "last.ckpt")
    overrides = synth_overrides(synth_mix, "trainer.num_threads=1", "trainer.max_steps=10")
    run_training(
        compose([*overrides, "trainer.val_check_interval=3"]), tmp_path, quiet=True, callbacks=(recorder,)
    )
    assert recorder.steps == [3, 6, 9]  # seen during training; the last validation (step 10) saves too
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10


@pytest.mark.parametrize("composition", ["mixed", "homogeneous"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_skip_continues_the_stream(composition, world_size):
    offsets = np.array([0, 7, 20, 31])

    def sampler():
        return DomainBatchSampler(
            offsets,
            np.ones(3),
            4,
            composition,
            seed=3,
            batches_per_epoch=5,
            rank=world_size - 1,
            world_size=world_size,
        )

    reference = sampler()
    stream = [b for _ in range(3) for b in reference]  # three epochs
    resumed = sampler()
    resumed.skip(7)  # 2 batches into the second epoch
    first = list(resumed)
    assert len(first) == 3  # the rest of that epoch only, so later epochs start where they did
    assert first + list(resumed) == stream[7:]


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    exe = os.path.join(os.path.dirname(sys.executable), "testbed-train")
    return subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_ctrl_c_to_the_cli_saves_and_resume_auto_finishes_identically(synth_mix, tmp_path):
    """The real command: Ctrl-C (SIGINT) after the first checkpoint saves, exits 2 with the same message and
    interrupted summary as SIGTERM; the same command with resume=auto finishes with the uninterrupted run's
    numbers."""
    overrides = synth_overrides(
        synth_mix,
        "trainer.num_threads=1",
        "trainer.max_steps=150",
        "trainer.val_check_interval=10",
        "metrics.plots=false",
    )
    run_dir = tmp_path / "run"
    process = cli(*overrides, f"hydra.run.dir={run_dir}")
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr[-2000:]
    assert "run interrupted by SIGINT after step" in stderr and "resume=auto" in stderr
    assert "Ctrl-C again stops at once" in stderr
    interrupted = json.loads((run_dir / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and 10 <= interrupted["steps"] < 150

    again = cli(*overrides, f"hydra.run.dir={run_dir}", "resume=auto")
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-2000:]
    assert "not resumable" not in stdout + stderr  # the sampler resumes the stream: no Lightning warning
    resumed = json.loads((run_dir / "summary.json").read_text())
    full = run_training(compose(overrides), tmp_path / "full", quiet=True)
    assert resumed["status"] == "finished" and results(resumed) == results(full)
