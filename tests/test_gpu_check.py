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
@pytest.mark.heavy  # about 1-2 min: `make gpu-check-dry` and `make test-all` run it
def test_dry_run_runs_every_stage_and_writes_the_figures(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
        "moe_layer.json",
        "profile.json",
        "pytest.json",
        "step_time.json",
        "summary.json",
    ]  # at most 8 files: what the device tool brings back from $OUT
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["stages"]] == [
        ("pytest", "ok"),
        ("moe_layer", "ok"),
        ("step_time", "ok"),
        ("profile", "ok"),
        ("train", "ok"),
    ]
    assert report["complete"] is True
    assert report["environment"]["imports_without_wandb_and_datasets"] is True
    assert report["environment"]["device"] == "cpu" and report["seconds"] < report["deadline_s"]
    tests = report["pytest"]  # on CPU every GPU test is collected and skipped
    assert tests["skipped"] >= 9 and tests["passed"] == tests["failed"] == 0
    assert [(r["d"], r["experts"], r["top_k"]) for r in report["moe_layer"]["rows"]] == [
        (64, 8, 2),
        (64, 16, 4),
    ]
    assert report["moe_layer"]["complete"] is True
    (model,) = report["moe_layer"]["models"]  # the model's own layer next to its dense twin
    assert model["model"] == "micro" and model["moe_ms"] > 0 and model["dense_ms"] > 0
    assert model["hf_status"] == "ok" and model["hf_ms"] > 0  # the Hugging Face peer (transformers here)
    assert model["router_fp32_ms"] > 0 and model["router_bf16_ms"] > 0 and 0 < model["router_fp32_share"] < 1
    assert model["torchtitan_status"] == "ok" or model["torchtitan_ms"] is None  # needs Triton: GPU only
    profile = report["profile"]
    assert profile["top"] and profile["busy_ms_per_step"] > 0
    assert set(profile["ms_per_step_by_category"]) <= {c for c, _ in gpu_check_categories()} | {"other"}
    assert (tmp_path / "profile.json").stat().st_size < 1_000_000
    (row,) = report["step_time"]["rows"]
    assert row["variant"] == "trainer.compile=false" and row["tokens_per_s"] > 0
    assert report["summary"]["steps"] == 4 and report["summary"]["config"]["model"] == "micro"
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| train | ok |" in table and "Training run: 4 steps" in table and "tokens/s over" in table
    assert "Profile (CPU operator self time" in table and "| micro | 64 | 8 | 2 |" in table


def gpu_check_categories():
    import profile_step

    return profile_step.CATEGORIES


def test_profile_categories_by_kernel_name():
    import profile_step

    cases = {
        "void cutlass::Kernel<cutlass_80_tensorop_bf16_s16816gemm>": "gemm",
        "aten::_grouped_mm": "grouped_gemm",
        "flash_fwd_kernel": "attention",
        "at::native::radixSortKVInPlace": "sort_index",
        "aten::index_select": "sort_index",
        "multi_tensor_apply_kernel<FusedAdamW>": "optimizer",
        "triton_red_fused_rms_norm_0": "norm_activation",
        "aten::copy_": "copy_cast",
        "at::native::vectorized_elementwise_kernel<mul>": "elementwise",
        "ncclKernel_AllReduce": "other",
    }
    assert {name: profile_step.category(name) for name in cases} == cases


def test_failed_environment_probe_stops_before_any_stage(tmp_path, monkeypatch):
    """No Hydra (wheels not carried): exit 2 at once, the probe's error in gpu_check.json, no stage run."""
    monkeypatch.setattr(gpu_check, "environment", lambda env: {"error": "ModuleNotFoundError: hydra"})
    monkeypatch.setattr(gpu_check, "run_stage", lambda *a: pytest.fail("a stage ran"))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 2
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["stages"] == [] and report["complete"] is False
    assert "hydra" in report["environment"]["error"]


def test_stages_stream_their_output_and_the_report_is_rewritten_after_each(tmp_path, monkeypatch):
    """A stage's lines reach gpu_check.log while it runs; a stage over its limit is killed (status timeout,
    what it printed kept); gpu_check.json holds every stage run so far after each stage."""
    python = sys.executable
    script = "import time; print('first', flush=True); time.sleep(30)"
    plan = [
        {"name": "quick", "command": [python, "-c", "print('hello')"], "limit": 20},
        {"name": "slow", "command": [python, "-c", script], "limit": 3},
    ]
    monkeypatch.setattr(gpu_check, "environment", lambda env: {"device": "cpu"})
    monkeypatch.setattr(gpu_check, "stage_plan", lambda *a: plan)
    seen = []
    run_stage = gpu_check.run_stage

    def spy(stage, limit, env, log):
        report = tmp_path / "gpu_check.json"
        seen.append(
            [s["name"] for s in json.loads(report.read_text())["stages"]] if report.exists() else None
        )
        return run_stage(stage, limit, env, log)

    monkeypatch.setattr(gpu_check, "run_stage", spy)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    assert seen == [None, ["quick"]]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["stages"]] == [("quick", "ok"), ("slow", "timeout")]
    assert report["stages"][1]["output_tail"] == "first\n" and report["stages"][1]["seconds"] < 15
    assert "hello" in (tmp_path / "gpu_check.log").read_text()


def test_stage_limits_fit_the_deadline_and_the_device_command():
    """The GPU plan's limits fit the 8-minute check (the device allows 10 minutes a command)."""
    plan = gpu_check.stage_plan(False, Path("/out"), Path("/work"), 989.0)
    assert [s["name"] for s in plan] == ["pytest", "moe_layer", "step_time", "profile", "train"]
    assert sum(s["limit"] for s in plan) <= 480 - 15
    step = plan[2]["command"]
    assert step[step.index("--peak-tflops") + 1] == "989.0"
    assert [step[i + 1] for i, a in enumerate(step) if a == "--variant"] == [
        "trainer.compile=false",
        "trainer.compile=true",
    ]
    assert "--models" in plan[1]["command"]
    assert "trainer.compile=true" in plan[3]["command"][plan[3]["command"].index("--common") + 1]
    train = plan[4]["command"]
    assert "model=small" in train and "trainer=gpu" in train and "trainer.enable_checkpointing=false" in train
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
