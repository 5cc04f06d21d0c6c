"""A diverged run stops: clear error naming the step and the term, failed summary (strict JSON), the last
good checkpoint kept, exit 2, and testbed-report lists it as failed, never as a result."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from testbed.analysis.report import find_runs
from testbed.train.checkpoint import TrainingDiverged
from testbed.train.cli import run_training
from testbed.train.module import NonFiniteGuard
from testbed.train.summary import strict_json
from tests.conftest import compose, synth_overrides

DIVERGE = (
    "optim.lr=1e3",
    "optim.warmup_steps=1",
    "trainer.num_threads=1",
    "trainer.max_steps=20",
    "trainer.val_check_interval=2",
)


def reject_constant(name):
    raise ValueError(f"bare {name} in JSON")


@pytest.mark.slow
def test_diverged_run_stops_with_a_failed_summary(synth_mix, tmp_path):
    with pytest.raises(TrainingDiverged) as err:
        run_training(compose(synth_overrides(synth_mix, *DIVERGE)), tmp_path, quiet=True)
    message = str(err.value)
    assert f"non-finite loss at step {err.value.step}: {err.value.term} = nan" in message
    assert err.value.term == "lm_loss" and "last good checkpoint is kept" in message
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=reject_constant)
    assert summary["status"] == "failed" and summary["error"] == message
    assert summary["failed_step"] == err.value.step and summary["failed_term"] == "lm_loss"
    assert "val/loss" not in summary and "spec/utilization/mean" not in summary  # no results
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == summary["checkpoint_step"] < err.value.step
    assert all(
        torch.isfinite(v).all() for v in checkpoint["state_dict"].values()
    )  # the diverged state: not saved
    finished, failed = find_runs([tmp_path])
    assert finished == [] and failed == [tmp_path]


@pytest.mark.slow
def test_cli_diverged_run_exits_2(synth_mix, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    exe = os.path.join(os.path.dirname(sys.executable), "testbed-train")
    result = subprocess.run(
        [exe, *synth_overrides(synth_mix, *DIVERGE), f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    assert "error: training diverged: non-finite loss at step" in result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_guard_names_the_first_non_finite_term_and_step():
    guard = NonFiniteGuard()
    finite = {"lm_loss": torch.tensor(2.0), "z_loss": torch.tensor(0.1), "loss": torch.tensor(2.1)}
    guard.update(finite, 1)
    guard.check(1, "ckpt")  # nothing to report
    guard.update(
        {"lm_loss": torch.tensor(2.0), "z_loss": torch.tensor(math.inf), "loss": torch.tensor(math.inf)}, 2
    )
    guard.update(
        {"lm_loss": torch.tensor(math.nan), "z_loss": torch.tensor(0.1), "loss": torch.tensor(math.nan)}, 3
    )
    with pytest.raises(
        TrainingDiverged, match=r"non-finite loss at step 2: z_loss = inf .*detected at step 5"
    ):
        guard.check(5, "ckpt")


def test_strict_json_has_no_bare_nan():
    value = {"a": math.nan, "b": [np.float32(1.5), math.inf, np.int64(3)], "c": torch.tensor(2.0), "d": None}
    cleaned = strict_json(value)
    assert cleaned == {"a": None, "b": [1.5, None, 3], "c": 2.0, "d": None}
    assert json.dumps(cleaned, allow_nan=False) == '{"a": null, "b": [1.5, null, 3], "c": 2.0, "d": null}'


def test_divergence_before_any_checkpoint_says_so(tmp_path):
    """The message names the last good checkpoint only when one exists."""
    from testbed.train.module import NonFiniteGuard

    guard = NonFiniteGuard()
    guard.update({"lm_loss": torch.tensor(float("nan")), "loss": torch.tensor(1.0)}, 3)
    with pytest.raises(TrainingDiverged) as err:
        guard.check(5, str(tmp_path / "checkpoints" / "last.ckpt"))
    assert "no checkpoint was written before it" in str(err.value) and "kept" not in str(err.value)
    assert err.value.step == 3 and err.value.term == "lm_loss"
    (tmp_path / "last.ckpt").write_bytes(b"x")
    with pytest.raises(TrainingDiverged, match="the last good checkpoint is kept"):
        guard.check(5, str(tmp_path / "last.ckpt"))
