"""`make gpu-check`'s CPU mode (`--dry-run`): every stage of the GPU check runs end to end at tiny sizes,
so the script cannot rot between the rare tasks that have a GPU; and training needs neither wandb nor
datasets (a bare GPU image has neither)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import compose, synth_overrides

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_the_figures(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
        "moe_layer.json",
        "pytest.json",
        "step_time.json",
        "summary.json",
    ]  # at most 8 files: what the device tool brings back from $OUT
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["stages"]] == [
        ("pytest", "ok"),
        ("moe_layer", "ok"),
        ("step_time", "ok"),
        ("train", "ok"),
    ]
    assert report["environment"]["imports_without_wandb_and_datasets"] is True
    assert report["environment"]["device"] == "cpu" and report["seconds"] < report["deadline_s"]
    tests = report["pytest"]  # on CPU every GPU test is collected and skipped
    assert tests["skipped"] >= 9 and tests["passed"] == tests["failed"] == 0
    assert [(r["d"], r["experts"], r["top_k"]) for r in report["moe_layer"]["rows"]] == [
        (64, 8, 2),
        (64, 16, 4),
    ]
    assert report["moe_layer"]["complete"] is True
    (row,) = report["step_time"]["rows"]
    assert row["variant"] == "trainer.compile=false" and row["tokens_per_s"] > 0
    assert report["summary"]["steps"] == 4 and report["summary"]["config"]["model"] == "micro"
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| train | ok |" in table and "Training run: 4 steps" in table


def test_stage_limits_fit_the_deadline_and_the_device_command():
    """The GPU plan's limits fit the 8-minute check (the device allows 10 minutes a command)."""
    plan = gpu_check.stage_plan(False, Path("/out"), Path("/work"), 989.0)
    assert [s["name"] for s in plan] == ["pytest", "moe_layer", "step_time", "train"]
    assert sum(s["limit"] for s in plan) <= 480 - 15
    step = plan[2]["command"]
    assert step[step.index("--peak-tflops") + 1] == "989.0"
    assert [step[i + 1] for i, a in enumerate(step) if a == "--variant"] == [
        "trainer.compile=false",
        "trainer.compile=true",
    ]
    assert "model=small" in plan[3]["command"] and "trainer=gpu" in plan[3]["command"]
    assert gpu_check.PEAK_BF16_TFLOPS["H100"] == 989.0


def test_training_imports_neither_wandb_nor_datasets(tmp_path, synth_mix, monkeypatch):
    """With wandb and datasets not installed (None in sys.modules makes any import of them fail), a tiny
    training run with the default CSV logger still writes its summary."""
    from testbed.train.cli import run_training

    for name in ("wandb", "datasets"):
        monkeypatch.setitem(sys.modules, name, None)
    overrides = synth_overrides(synth_mix, "trainer.max_steps=2", "trainer.val_check_interval=2")
    summary = run_training(compose(overrides), tmp_path, quiet=True)
    assert summary["steps"] == 2 and json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert sys.modules["wandb"] is None and sys.modules["datasets"] is None
