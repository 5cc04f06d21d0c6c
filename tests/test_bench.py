"""The benchmark scripts run (at tiny sizes, CPU); their numbers are not asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "data=shipped",  # the sample's small token store (the large mix's takes a minute to build)
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


@pytest.mark.heavy
def test_metrics_overhead_benchmark_runs(tmp_path):
    data = run_benchmark(
        "metrics_overhead.py", tmp_path / "bench.json", "--steps", "2", "--warmup", "1", *SMALL
    )
    base, with_stats = data["step_ms_without_stats"], data["step_ms_with_stats"]
    assert base > 0 and with_stats > 0
    # the reported overheads are the ratios of the reported medians (to their rounding)
    assert data["overhead_collected_step"] == pytest.approx((with_stats - base) / base, abs=2e-3)
    assert data["overhead_amortized"] == pytest.approx(
        data["overhead_collected_step"] / data["train_every_n_steps"], abs=1e-5
    )


def test_moe_layer_benchmark_runs_at_tiny_sizes(tmp_path):
    rows = run_benchmark("moe_layer.py", tmp_path / "moe.json", "--tiny", "--repeats", "2")["rows"]
    assert len(rows) == 2 and all(r["grouped_ms"] > 0 and r["dense_ms"] > 0 for r in rows)
    for r in rows:  # the ratios are those of the reported times
        assert r["grouped_over_loop"] == pytest.approx(r["loop_ms"] / r["grouped_ms"], rel=2e-2)
        assert r["moe_over_dense"] == pytest.approx(r["dense_ms"] / r["grouped_ms"], rel=2e-2)


@pytest.mark.heavy  # `make bench` runs it; the MoE-layer benchmark's smoke stays in CI
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
    tokens = rows[0]["tokens_per_s"] * rows[0]["step_ms"] / 1000  # tokens per step, the same for both
    assert tokens == pytest.approx(16 * 128, rel=2e-2)  # the default batch: 16 x 128 tokens
    assert rows[1]["ratio_to_baseline"] == pytest.approx(rows[1]["step_ms"] / rows[0]["step_ms"], rel=2e-2)
    # MFU = tokens/s x FLOPs per token / peak: the same FLOPs per token, so MFU scales as tokens/s
    assert rows[1]["mfu"] / rows[0]["mfu"] == pytest.approx(
        rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], rel=5e-2
    )
