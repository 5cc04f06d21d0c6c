"""The benchmark scripts run (at tiny sizes, CPU); their numbers are not asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_metrics_overhead_benchmark_runs(tmp_path):
    out = tmp_path / "bench.json"
    small = [
        "model.d_model=32",
        "model.n_heads=2",
        "model.n_layers=2",
        "model.moe.expert_hidden=32",
        "data.max_train_tokens_per_domain=4096",
        "data.val_tokens_per_domain=256",
    ]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "metrics_overhead.py"),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
            *small,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["step_ms_without_stats"] > 0 and data["step_ms_with_stats"] > 0


@pytest.mark.slow
def test_moe_layer_benchmark_runs_at_tiny_sizes(tmp_path):
    out = tmp_path / "moe.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "moe_layer.py"),
            "--tiny",
            "--repeats",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["grouped_ms"] > 0 and r["dense_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_step_time_benchmark_reports_ratios_and_throughput(tmp_path):
    out = tmp_path / "steps.json"
    common = (
        "model.d_model=32 model.n_heads=2 model.n_layers=2 model.moe.expert_hidden=32 "
        "data.max_train_tokens_per_domain=4096 data.val_tokens_per_domain=256"
    )
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "step_time.py"),
            "--common",
            common,
            "--variant",
            "aux_loss=[]",
            "--variant",
            "aux_loss=[orthogonality]",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--peak-tflops",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["ratio_to_baseline"] == 1.0 and all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in rows)
