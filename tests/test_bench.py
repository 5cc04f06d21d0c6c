"""The benchmark scripts run (at tiny sizes, CPU); their numbers are not asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.moe.expert_hidden=32",
    "data.max_train_tokens_per_domain=4096",
    "data.val_tokens_per_domain=256",
]

pytestmark = pytest.mark.slow


def run_benchmark(script: str, out: Path, *args: str) -> dict:
    """Run benchmarks/<script> with `--json out` and return what it wrote."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


def test_metrics_overhead_benchmark_runs(tmp_path):
    data = run_benchmark(
        "metrics_overhead.py", tmp_path / "bench.json", "--steps", "2", "--warmup", "1", *SMALL
    )
    assert data["step_ms_without_stats"] > 0 and data["step_ms_with_stats"] > 0


def test_moe_layer_benchmark_runs_at_tiny_sizes(tmp_path):
    rows = run_benchmark("moe_layer.py", tmp_path / "moe.json", "--tiny", "--repeats", "2")["rows"]
    assert len(rows) == 2 and all(r["grouped_ms"] > 0 and r["dense_ms"] > 0 for r in rows)


def test_step_time_benchmark_reports_ratios_and_throughput(tmp_path):
    rows = run_benchmark(
        "step_time.py",
        tmp_path / "steps.json",
        "--common",
        " ".join(SMALL),
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
    )["rows"]
    assert rows[0]["ratio_to_baseline"] == 1.0 and all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in rows)
