"""Run folders are never shared silently: a used folder is refused (exit 2) unless resume or overwrite=true
is given, overwrite leaves nothing of the old run, and a lock keeps a second process out."""

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from testbed.errors import CheckpointError, ConfigError
from testbed.train.checkpoint import RunDirError, RunLock
from testbed.train.cli import run_training
from tests.conftest import compose, synth_overrides

pytestmark = pytest.mark.slow

SHORT = ("trainer.num_threads=1", "trainer.max_steps=2", "trainer.val_check_interval=2")


def train(root, run_dir, *extra, **kwargs):
    return run_training(compose(synth_overrides(root, *SHORT, *extra)), run_dir, quiet=True, **kwargs)


def test_used_folder_is_refused_and_overwrite_clears_it(synth_mix, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = train(synth_mix, tmp_path)
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]  # no filter needed now
    assert first["status"] == "finished"
    with pytest.raises(RunDirError) as err:
        train(synth_mix, tmp_path, "seed=1")
    message = str(err.value)
    assert f"run folder {tmp_path} already holds a run" in message and "status finished" in message
    assert "resume=auto" in message and "overwrite=true" in message
    assert json.loads((tmp_path / "summary.json").read_text())["seed"] == 0  # untouched

    (tmp_path / "routing" / "counts_step999.pt").write_bytes(b"old")
    (tmp_path / "plots" / "heatmap_step999.png").write_bytes(b"old")
    second = train(synth_mix, tmp_path, "seed=1", "overwrite=true")
    assert second["seed"] == 1 and json.loads((tmp_path / "summary.json").read_text())["seed"] == 1
    assert sorted(p.name for p in (tmp_path / "routing").iterdir()) == [
        "counts_step2.pt",
        "train_counts_step2.pt",
    ]
    assert not (tmp_path / "plots" / "heatmap_step999.png").exists()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # the new run's rows only: its step-0 routing measurement (train/spec) and its one validation
    assert len(rows) == 2
    assert rows[0]["step"] == "0" and rows[0]["train/spec/purity/mean"] and not rows[0]["val/loss"]
    assert rows[1]["val/loss"] and float(rows[1]["val/loss"]) == pytest.approx(second["val/loss"])


def test_resume_auto_on_a_finished_run_does_not_train_again(synth_mix, tmp_path):
    first = train(synth_mix, tmp_path)
    mtime = (tmp_path / "summary.json").stat().st_mtime_ns
    again = train(synth_mix, tmp_path, "resume=auto")
    assert again == json.loads(json.dumps(first)) and (tmp_path / "summary.json").stat().st_mtime_ns == mtime


def test_resume_auto_without_a_checkpoint_starts_fresh(synth_mix, tmp_path):
    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,9.0\n")  # a run killed before any checkpoint
    summary = train(synth_mix, tmp_path, "resume=auto")
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert "9.0" not in (tmp_path / "metrics.csv").read_text()


def test_bad_resume_and_overwrite_values(synth_mix, tmp_path):
    with pytest.raises(RunDirError, match="resume and overwrite=true exclude each other"):
        train(synth_mix, tmp_path / "a", "resume=auto", "overwrite=true")
    with pytest.raises(
        CheckpointError, match=r"resume: checkpoint .*none.ckpt does not exist; allowed: auto"
    ):
        train(synth_mix, tmp_path / "b", f"resume={tmp_path / 'none.ckpt'}")
    with pytest.raises(ConfigError, match="config key 'overwrite': got 'yes'; allowed: true or false"):
        train(synth_mix, tmp_path / "c", "overwrite=yes")
    train(synth_mix, tmp_path / "d")
    with pytest.raises(CheckpointError, match=r"written by a run with other settings \(optim.lr\)"):
        train(
            synth_mix,
            tmp_path / "d",
            f"resume={tmp_path / 'd' / 'checkpoints' / 'last.ckpt'}",
            "optim.lr=0.5",
        )


def test_a_second_process_in_the_same_folder_is_refused(synth_mix, tmp_path):
    with RunLock(tmp_path):  # another training process holds the folder
        with pytest.raises(RunDirError, match=rf"in use by another training process \(pid {os.getpid()}"):
            train(synth_mix, tmp_path)
    assert not (tmp_path / "summary.json").exists()
    assert train(synth_mix, tmp_path)["status"] == "finished"  # the lock is released with its holder
    assert not (tmp_path / ".run.lock").exists()


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.heavy  # five CLI processes (100-180 s); the refusals themselves are checked in the suite by
# test_used_folder_is_refused_and_overwrite_clears_it, test_a_second_process_in_the_same_folder_is_refused
# and test_resume_auto_on_a_finished_run_does_not_train_again
def test_refused_or_skipped_runs_leave_every_file_as_it_was(synth_mix, tmp_path):
    """The run's record (.hydra/, cli.log) is written only once a run is accepted: a new run into the used
    folder (refused before Hydra starts, exit 2), resume=auto with another lr on a finished run (skipped,
    exit 0), a second process while the folder is locked (refused), and overwrite=true with other settings
    while it is locked (refused, nothing deleted) change no byte."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    exe = os.path.join(os.path.dirname(sys.executable), "testbed-train")
    args = [exe, *synth_overrides(synth_mix, *SHORT), f"hydra.run.dir={tmp_path}"]
    assert subprocess.run(args, capture_output=True, text=True, env=env, timeout=300).returncode == 0
    before = snapshot(tmp_path)
    assert {Path(".hydra/overrides.yaml"), Path(".hydra/config.yaml"), Path("cli.log")} <= set(before)
    result = subprocess.run([*args, "seed=7"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: run folder {tmp_path} already holds a run" in result.stderr
    assert snapshot(tmp_path) == before
    skipped = subprocess.run([*args, "resume=auto", "optim.lr=1e-3"], capture_output=True, text=True, env=env)
    assert skipped.returncode == 0 and "not trained again" in skipped.stdout + skipped.stderr
    assert snapshot(tmp_path) == before
    with RunLock(tmp_path):  # another process is training in the folder
        for extra in (["resume=auto", "seed=1"], ["overwrite=true", "seed=5", "router=sigmoid"]):
            refused = subprocess.run([*args, *extra], capture_output=True, text=True, env=env, timeout=300)
            assert refused.returncode == 2 and "in use by another training process" in refused.stderr, (
                refused.stderr
            )
            assert {k: v for k, v in snapshot(tmp_path).items() if k.name != ".run.lock"} == before


def test_which_trainer_settings_may_change_on_resume(caplog):
    """Every trainer key is classified (refused, allowed with a notice, allowed silently); clipping is
    refused, a longer max_steps is allowed with what it does to the cosine schedule, threads silently."""
    import dataclasses
    import logging

    from testbed.config import TrainerConfig, parse_config, plain
    from testbed.errors import CheckpointError
    from testbed.train.checkpoint import RESUME_TRAINER, check_same_run
    from tests.conftest import compose

    assert set(RESUME_TRAINER) == {f.name for f in dataclasses.fields(TrainerConfig)}
    saved = plain(parse_config(compose(["trainer.max_steps=40", "optim.warmup_steps=4"])))
    payload = {"hyper_parameters": {"run": saved}, "global_step": 20}

    def resumed(*overrides):
        return plain(parse_config(compose(["trainer.max_steps=40", "optim.warmup_steps=4", *overrides])))

    with pytest.raises(CheckpointError, match=r"other settings \(trainer.gradient_clip_val\)"):
        check_same_run(resumed("trainer.gradient_clip_val=0.5"), payload, Path("x.ckpt"))
    with caplog.at_level(logging.WARNING):
        check_same_run(resumed("trainer.num_threads=3"), payload, Path("x.ckpt"))
        assert not caplog.records
        check_same_run(resumed("trainer.max_steps=60"), payload, Path("x.ckpt"))
    (record,) = caplog.records
    # at step 20 of 40 (4 warmup) the factor is 0.1 + 0.9 * 0.5 * (1 + cos(pi * 16/36)) = 0.1 + 0.45 * 1.1736
    # = 0.628; planned for 60 steps: 0.1 + 0.45 * (1 + cos(pi * 16/56)) = 0.1 + 0.45 * 1.6235 = 0.831
    assert "trainer.max_steps changed from 40 to 60" in record.getMessage()
    assert "from 0.628 to 0.831 x optim.lr" in record.getMessage()


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_full_disk_stops_with_what_survived(synth_mix, tmp_path, monkeypatch, fail_at):
    """The checkpoint write fails with ENOSPC (the first save, or the second): a SaveFailed error (exit 2 on
    the command line) naming the folder, the last good checkpoint and how to go on; no temporary file left,
    and the earlier checkpoint intact and loadable."""
    import errno

    import lightning as L
    import torch

    from testbed.train.checkpoint import SaveFailed

    real = L.Trainer.save_checkpoint
    calls = []

    def save(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == fail_at:
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", save)
    with pytest.raises(SaveFailed, match="No space left on device") as err:
        train(synth_mix, tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=2")
    message = str(err.value)
    assert f"in {tmp_path / 'checkpoints'}" in message and "resume=auto" in message
    assert not list((tmp_path / "checkpoints").glob(".last.*.tmp"))
    if fail_at == 1:
        assert "none was saved" in message and not (tmp_path / "checkpoints" / "last.ckpt").exists()
    else:
        assert "the last good checkpoint is" in message and "(step 2)" in message
        assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
        # continued once there is room: a save killed mid-write earlier left its temporary file; it goes
        monkeypatch.setattr(L.Trainer, "save_checkpoint", real)
        (tmp_path / "checkpoints" / ".last.4242.tmp").write_bytes(b"torn")
        resumed = train(
            synth_mix, tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=2", "resume=auto"
        )
        assert resumed["status"] == "finished" and resumed["steps"] == 6
        assert not list((tmp_path / "checkpoints").glob(".last.*.tmp"))


def test_checkpoints_are_not_staged_in_the_system_temp_folder(synth_mix, tmp_path, monkeypatch):
    """Every save goes straight to the run folder's temporary name and is renamed into place: nothing is
    written to the system temp folder (Lightning's default stages each save there first, and a kill or a full
    disk left that file behind), so a run leaves it as it found it."""
    import tempfile

    import torch

    system_temp = tmp_path / "system_temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    staged = []
    real_mkstemp = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: staged.append(a) or real_mkstemp(*a, **k))
    summary = train(synth_mix, tmp_path / "run", "trainer.max_steps=6", "trainer.val_check_interval=2")
    assert summary["status"] == "finished"
    assert staged == [] and list(system_temp.iterdir()) == []
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
