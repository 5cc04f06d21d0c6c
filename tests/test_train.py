"""End to end: training runs, summary.json, determinism, init_from, and the real `testbed-train` CLI."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from testbed.errors import CheckpointError
from testbed.metrics.per_layer import HEADLINE
from testbed.train.cli import run_training
from tests.conftest import SYNTH_DOMAINS, compose, synth_overrides

pytestmark = pytest.mark.slow


LEARNING = (
    "seed=7",
    "trainer.max_steps=60",
    "trainer.val_check_interval=30",
    "optim.warmup_steps=5",
    "optim.lr=1e-2",
)


def train(root, run_dir, *extra):
    return run_training(compose(synth_overrides(root, *extra)), run_dir, quiet=True)


@pytest.fixture(scope="module")
def first_run(synth_mix, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_a")
    return run_dir, train(synth_mix, run_dir, *LEARNING)


def test_summary_holds_losses_and_metrics(first_run):
    run_dir, summary = first_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 60
    assert on_disk["status"] == "finished"
    # the validation documents (1 per domain at 512 tokens here: no spread to bootstrap; by hand in
    # tests/test_doc_bootstrap.py)
    assert on_disk["val/documents_min"] >= 1 and on_disk["val/doc_ci95"] >= 0
    assert on_disk["tokens_seen"] == 60 * 8 * 32
    for domain in SYNTH_DOMAINS:  # the LM has learned more than token frequencies
        assert on_disk[f"val/loss/{domain}"] < on_disk["unigram_entropy"][domain]
    for metric in HEADLINE:
        assert f"spec/{metric}/mean" in on_disk
    assert 2 / 6 - 1e-9 <= on_disk["spec/utilization/mean"] <= 1.0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    plots = {p.name for p in (run_dir / "plots").iterdir()}
    assert {"heatmap_step30.png", "heatmap_step60.png", "gate_entropy_per_layer.png"} <= plots
    counts = torch.load(run_dir / "routing" / "counts_step60.pt")
    assert counts["counts"].shape == (2, 3, 6)
    # each validation token is routed to top_k = 2 experts in every layer
    assert torch.all(counts["counts"].sum(dim=(1, 2)) == 2 * counts["tokens"].sum(-1))
    # beside it, the training steps measured so far (every 50: steps 0 and 50), for choices made on
    # training data: 8 sequences x 32 tokens each, every token routed to 2 experts
    trained = torch.load(run_dir / "routing" / "train_counts_step60.pt", weights_only=True)
    assert trained["train_steps"] == [0, 50] and trained["counts"].shape == (2, 3, 6)
    assert torch.all(trained["tokens"].sum(-1) == 2 * 8 * 32)
    assert torch.all(trained["counts"].sum(dim=(1, 2)) == 2 * trained["tokens"].sum(-1))
    assert torch.load(run_dir / "routing" / "train_counts_step30.pt", weights_only=True)["train_steps"] == [0]
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {
        "spec/purity/layer0",
        "spec/nmi/mean",
        "val/loss/alpha",
        "train/aux/load_balance",
        "train/aux/z_loss",
    } <= set(header)


def test_same_seed_same_numbers(first_run, synth_mix, tmp_path):
    _, summary = first_run
    again = train(synth_mix, tmp_path / "again", *LEARNING)
    other = train(synth_mix, tmp_path / "other", *LEARNING, "seed=8")
    keys = [k for k in summary if k.startswith(("val/", "spec/"))]
    assert {k: summary[k] for k in keys} == {k: again[k] for k in keys}
    assert summary["val/loss"] != other["val/loss"]


def test_init_from_checkpoint(first_run, synth_mix, tmp_path):
    run_dir, summary = first_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    resumed = train(
        synth_mix, tmp_path / "resumed", f"init_from={ckpt}", "trainer.max_steps=1", "optim.warmup_steps=1000"
    )
    assert (
        resumed["val/loss"] < summary["val/loss"] + 0.2
    )  # starts from the trained weights, not from scratch
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        train(synth_mix, tmp_path / "bad", f"init_from={ckpt}", "model.moe.num_experts=4")
    with pytest.raises(CheckpointError, match="does not exist"):
        train(synth_mix, tmp_path / "bad2", f"init_from={tmp_path / 'none.ckpt'}")


def cli(*args, cwd=None):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    exe = os.path.join(os.path.dirname(sys.executable), "testbed-train")
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_cli_run_with_readme_overrides(synth_mix, tmp_path):
    out = tmp_path / "x"
    result = cli(*synth_overrides(synth_mix), "router.top_k=1", "trainer.max_steps=4", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resolved"]["router"]["top_k"] == 1
    assert summary["config"]["router"] == "topk_softmax"
    assert "validation loss per domain" in result.stdout


@pytest.mark.heavy  # tests/test_sweeps.py runs multirun sweeps in CI
def test_cli_multirun(synth_mix, tmp_path):
    result = cli(
        "-m",
        *synth_overrides(synth_mix),
        "router.top_k=1,2",
        "trainer.max_steps=3",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    top_ks = sorted(
        json.loads((tmp_path / "sweep" / str(i) / "summary.json").read_text())["resolved"]["router"]["top_k"]
        for i in (0, 1)
    )
    assert top_ks == [1, 2]


def test_cli_bad_input_exits_before_training(synth_mix, tmp_path):
    result = cli(*synth_overrides(synth_mix), "router.top_k=9", f"hydra.run.dir={tmp_path / 'bad'}")
    assert result.returncode == 2
    assert "router.top_k" in result.stderr and "got 9" in result.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
    result = cli("aux_loss=[z_loss,nope]")
    assert result.returncode == 2 and "nope" in result.stderr and "z_loss" in result.stderr


def test_analyze_recomputes_the_run_metrics(first_run, tmp_path, capsys):
    from testbed.hf.cli import analyze_main as analyze

    run_dir, summary = first_run
    out = tmp_path / "analysis"
    assert analyze([str(run_dir), "--out", str(out)]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    for key, value in summary.items():  # same checkpoint, same validation data: the same numbers
        # routing_change compares two validations of one run: nothing to recompute from one checkpoint
        if key.startswith("spec/") and not key.startswith("spec/routing_change/"):
            assert analysis["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    for domain in SYNTH_DOMAINS:
        assert analysis["val_loss"][domain] == pytest.approx(summary[f"val/loss/{domain}"], rel=1e-6)
    assert len(analysis["expert_accuracy"]["layer0"]) == 6
    assert {"heatmap.png", "gate_entropy.png", "summary.md", "routing_counts.pt"} <= {
        p.name for p in out.iterdir()
    }
    assert "| routing_stiffness |" in (out / "summary.md").read_text()
    small = tmp_path / "small"  # --summary-only: the same analysis.json, no plots or counts file
    assert analyze(["--summary-only", str(run_dir), "--out", str(small)]) == 0
    assert {p.name for p in small.iterdir()} == {"analysis.json", "summary.md"}
    assert json.loads((small / "analysis.json").read_text())["val_loss"] == analysis["val_loss"]
    assert analyze([str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_analyze_refuses_a_dense_model_by_name(synth_mix, tmp_path, capsys):
    """A dense run has no routing: testbed-analyze says so (exit 2) instead of failing inside evaluation,
    and names --summary-only, which scores its validation loss: the final validation's loss of the run
    itself when it reads the same validation tokens (the regime check on a rescored split)."""
    from testbed.hf.cli import analyze_main as analyze

    out = tmp_path / "dense"
    dense = [o for o in synth_overrides(synth_mix) if not o.startswith("model.moe.")]
    result = cli(
        *dense,
        "model=micro_dense",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert analyze([str(out)]) == 2
    err = capsys.readouterr().err
    assert "micro_dense" in err and "has no MoE layers" in err and "--summary-only" in err
    assert not (out / "analysis").exists()
    assert analyze([str(out), "--summary-only", "--peers", "all"]) == 2
    assert "--peers" in capsys.readouterr().err and not (out / "analysis").exists()
    assert analyze([str(out), "--summary-only"]) == 0
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert analysis["router"] is None and analysis["model"] == "micro_dense"
    assert analysis["val_loss_mean"] == pytest.approx(summary["val/loss"], abs=1e-5)
    assert sum(analysis["val_tokens"].values()) > 0
    assert sorted(p.name for p in (out / "analysis").iterdir()) == ["analysis.json", "summary.md"]


@pytest.mark.parametrize(
    "overrides",
    [
        ("balance=expert_bias", "balance.scope=global", "trainer.accumulate_grad_batches=3"),
        ("balance=expert_bias", "balance.scope=sequence", "router=sigmoid"),
        ("balance.scope=global", "data.batch_composition=homogeneous", "trainer.accumulate_grad_batches=3"),
        ("router=sinkhorn", "balance=none", "router.scope=global", "trainer.accumulate_grad_batches=2"),
        ("router=balanced_assignment", "balance=none", "router.scope=sequence"),
    ],
    ids=["eb_global_accum", "eb_sequence_sigmoid", "lb_global_homogeneous", "sinkhorn_global", "ba_sequence"],
)
def test_balancing_methods_train_end_to_end(synth_mix, tmp_path, overrides):
    summary = train(synth_mix, tmp_path, *overrides, "trainer.max_steps=6", "trainer.val_check_interval=6")
    assert summary["steps"] == 6 and math.isfinite(summary["val/loss"])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    bias = state["model.blocks.0.ffn.router.expert_bias"]
    if "balance=expert_bias" in overrides:  # 6 optimizer steps of +-gamma (global: whole signs)
        assert bias.abs().max() > 0 and bias.abs().max() <= 6 * 1e-3 + 1e-9
    else:
        assert torch.all(bias == 0)


def test_analyze_routes_as_the_trained_step_for_step_dependent_routers(synth_mix, tmp_path):
    """router.hash_steps routes by token hash for the first steps, then by the learned gate: testbed-analyze
    routes as the checkpoint's step did (the learned gate here), so it recomputes the run's own metrics."""
    from testbed.hf.cli import analyze_main as analyze

    run_dir = tmp_path / "run"
    args = ["router.hash_steps=2", "trainer.max_steps=4", "trainer.val_check_interval=4"]
    args.append("metrics.plots=false")
    result = cli(*synth_overrides(synth_mix), *args, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    out = tmp_path / "analysis"
    assert analyze([str(run_dir), "--out", str(out), "--stiffness-batches", "0"]) == 0
    metrics = json.loads((out / "analysis.json").read_text())["metrics"]
    for key in ("spec/purity/mean", "spec/gate_entropy/mean", "spec/utilization/mean"):
        assert metrics[key] == pytest.approx(summary[key], rel=1e-6, abs=1e-9), key
