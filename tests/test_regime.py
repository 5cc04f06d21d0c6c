"""Regime check: baselines matched by role, gains by hand, report flags; dense configs."""

import copy
import json
import math

import pytest
import torch

from testbed.analysis import report
from testbed.config import parse_config
from testbed.metrics.regime import (
    baseline_role,
    epochs_trained,
    gap_to_unigram,
    regime_check,
    repeated_domains,
)
from testbed.model import MoETransformer
from testbed.plots import metric_title
from tests.conftest import compose


def summary(seed=0, loss=5.0, dense_hidden=None, router="topk_softmax", tokens=4096, name="m"):
    """A hand-made summary.json: a 2-layer MoE (top-2 of 4 experts of hidden 8), or all-dense with
    `dense_hidden`."""
    dense = dense_hidden is not None
    return {
        "seed": seed,
        "steps": 2,
        "tokens_seen": tokens,
        "val/loss": loss,
        "val/loss/a": loss - 0.5,
        "val/loss/b": loss + 0.5,
        "unigram_entropy": {"a": 6.0, "b": 7.0},
        "init_from": None,
        "resolved": {
            "model": {
                "name": name,
                "vocab_size": 64,
                "d_model": 16,
                "n_layers": 2,
                "n_heads": 2,
                "max_seq_len": 32,
                "tie_embeddings": True,
                "rope_base": 10000.0,
                "dense_layers": 2 if dense else 0,
                "dense_hidden": dense_hidden or 64,
                "moe": {"num_experts": 4, "expert_hidden": 8, "num_shared_experts": 0},
            },
            "data": {"name": "x", "domains": ["a", "b"], "seq_len": 32, "batch_size": 4, "cache_dir": None},
            "optim": {"lr": 1e-3, "router_lr_scale": 1.0},
            "trainer": {"max_steps": 2, "accumulate_grad_batches": 1, "gradient_clip_val": 1.0, "devices": 1},
            "router": {"name": router, "top_k": 2},
        },
    }


def test_roles_follow_the_ffn_shape_and_need_equal_settings():
    run = summary()
    assert baseline_role(summary(dense_hidden=16), run) == "dense_active"  # 2 x 8
    assert baseline_role(summary(dense_hidden=32), run) == "dense_total"  # 4 x 8
    assert baseline_role(summary(router="hash"), run) == "hash"
    assert baseline_role(summary(dense_hidden=24), run) is None  # neither shape
    assert baseline_role(summary(dense_hidden=16, tokens=8192), run) is None  # other token count
    other_lr = summary(dense_hidden=16)
    other_lr["resolved"]["optim"]["lr"] = 3e-3
    assert baseline_role(other_lr, run) is None
    router_lr = summary(dense_hidden=16)  # the router's own lr scale does not matter to a dense model
    router_lr["resolved"]["optim"]["router_lr_scale"] = 0.1
    assert baseline_role(router_lr, run) == "dense_active"
    other_width = summary(router="hash")
    other_width["resolved"]["model"]["moe"]["expert_hidden"] = 16
    assert baseline_role(other_width, run) is None  # hash must be the same MoE
    assert baseline_role(summary(dense_hidden=16), summary(dense_hidden=32)) is None  # dense runs have none


def test_gains_paired_by_seed_else_mean_over_seeds():
    run = summary(seed=1, loss=5.0)
    candidates = [
        summary(seed=0, loss=5.3, dense_hidden=16),
        summary(seed=1, loss=5.2, dense_hidden=16),  # same seed: used alone
        summary(seed=0, loss=4.7, dense_hidden=32),
        summary(seed=2, loss=4.9, dense_hidden=32),  # no seed 1: the mean 4.8
        summary(seed=1, loss=5.5, router="hash"),
    ]
    out = regime_check(run, candidates)
    assert out["regime/gain_over_dense_active"] == pytest.approx(0.2)
    assert out["regime/gain_over_dense_total"] == pytest.approx(-0.2)
    assert out["regime/gain_over_hash"] == pytest.approx(0.5)
    # unigram 6 and 7 against domain losses 4.5 and 5.5: gaps 1.5 and 1.5
    assert out["regime/gap_to_unigram"] == pytest.approx(1.5)
    assert out["regime/baselines"]["dense_active"] == {"val/loss": 5.2, "runs": 1, "paired": True}
    assert out["regime/baselines"]["dense_total"]["runs"] == 2
    assert out["regime/baselines"]["dense_total"]["paired"] is False


def test_gap_to_unigram_by_hand():
    s = {"unigram_entropy": {"a": 6.0, "b": 5.0}, "val/loss/a": 5.0, "val/loss/b": 5.5}
    assert gap_to_unigram(s) == pytest.approx((1.0 - 0.5) / 2)
    assert gap_to_unigram({"unigram_entropy": {}}) is None


def write_run(root, name, summ, overrides):
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summ))
    (run_dir / ".hydra" / "overrides.yaml").write_text("\n".join(f"- {o}" for o in overrides) + "\n")


def test_report_prints_regime_and_flags_runs_below_dense(tmp_path, capsys):
    for seed, (moe, dense, hashed) in enumerate([(5.1, 5.0, 5.3), (5.2, 5.0, 5.4), (5.15, 5.0, 5.2)]):
        write_run(tmp_path, f"moe{seed}", summary(seed, moe), ["model=m", f"seed={seed}"])
        write_run(
            tmp_path, f"dense{seed}", summary(seed, dense, dense_hidden=16), ["model=m_dense", f"seed={seed}"]
        )
        write_run(
            tmp_path, f"hash{seed}", summary(seed, hashed, router="hash"), ["model=m_hash", f"seed={seed}"]
        )
    assert report.main([str(tmp_path), "--no-committed-baselines"]) == 0
    text = capsys.readouterr().out.split("Regime check")[1]
    line = next(row for row in text.splitlines() if row.startswith("| model=m | 3 |"))
    cells = [c.strip() for c in line.split("|")]
    # gains over dense-active: -0.1, -0.2, -0.15: mean -0.15, std 0.05, CI t(0.975, 2) = 4.303 x 0.05 / sqrt 3
    assert cells[4] == "-0.150 ± 0.124"
    assert cells[6] == "+0.150 ± 0.215"  # over hash: +0.2, +0.2, +0.05: std 0.0866
    assert "BELOW DENSE-ACTIVE** (3/3 runs)" in line
    assert "| model=m_dense | 3 |" in text and "(dense)" in text


def test_repeated_data_is_flagged_in_the_regime_table_and_report(tmp_path, capsys):
    """epochs_at_max_steps (at trainer.max_steps = 2) scaled by the steps trained: a run stopped at step 1
    of 2 read half as much; any domain past one epoch flags its configuration."""
    once = summary(0, 5.0)
    once["data"] = [{"domain": "a", "epochs_at_max_steps": 0.4}, {"domain": "b", "epochs_at_max_steps": 0.9}]
    assert epochs_trained(once) == {"a": 0.4, "b": 0.9} and repeated_domains(once) == {}
    twice = copy.deepcopy(once)
    twice["data"][1]["epochs_at_max_steps"] = 2.5
    assert repeated_domains(twice) == {"b": 2.5}
    twice["steps"] = 1
    assert repeated_domains(twice) == {"b": 1.25} and regime_check(twice, [])["regime/max_epochs"] == 1.25
    write_run(tmp_path, "short", once, ["model=m", "data=small"])
    write_run(tmp_path, "long", twice, ["model=m", "data=tiny"])
    write_run(tmp_path, "dense", summary(0, 5.2, dense_hidden=16), ["model=m_dense", "data=small"])
    assert report.main([str(tmp_path), "--no-committed-baselines"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split("|")[1].strip(): line for line in out.split("Regime check")[1].splitlines() if "|" in line
    }
    assert "| 0.90 |" in rows["model=m data=small"] and "repeats its data" not in rows["model=m data=small"]
    assert "| 1.25 |" in rows["model=m data=tiny"] and "**repeats its data**" in rows["model=m data=tiny"]
    assert "**Repeated data**: 1 configuration(s)" in out and "- model=m data=tiny: b 1.25" in out


def test_summaries_without_resolved_sections_read_them_from_hydra_config(tmp_path):
    run = summary()
    bare = copy.deepcopy(run)
    del bare["resolved"]["model"]
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(json.dumps({"model": run["resolved"]["model"]}))
    filled = report.with_resolved_config(bare, tmp_path)
    assert filled["resolved"]["model"] == run["resolved"]["model"]


def ffn_parameters(overrides):
    run = parse_config(compose(overrides))
    with torch.device("meta"):  # shapes only: model=base has 1.6B parameters
        model = MoETransformer(run.model, run.router, num_domains=8)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".ffn." in n and ".router." not in n)
    router = sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
    return run, experts, router


@pytest.mark.parametrize("name,top_k", [("micro", 2), ("tiny", 2), ("small", 4), ("base", 4)])
def test_dense_baselines_have_equal_active_and_total_parameters(name, top_k):
    run, moe_ffn, router = ffn_parameters([f"model={name}", f"router.top_k={top_k}"])
    num_experts = run.model.moe.num_experts
    _, dense_ffn, dense_router = ffn_parameters([f"model={name}_dense"])
    _, total_ffn, _ = ffn_parameters([f"model={name}_dense_total"])
    assert dense_router == 0
    assert dense_ffn * num_experts == moe_ffn * top_k  # active: K of E experts
    assert total_ffn == moe_ffn  # total: all E experts
    assert router == run.model.n_layers * run.model.d_model * num_experts  # the unmatched router weights


def test_curves_against_tokens(tmp_path, monkeypatch):
    """--curve-x tokens: a row logged at step s follows s + 1 steps of tokens_seen / steps tokens."""
    s = summary(loss=5.0)
    s["steps"], s["tokens_seen"] = 4, 4096  # 1,024 tokens a step
    write_run(tmp_path, "run", s, ["model=m"])
    (tmp_path / "run" / "metrics.csv").write_text("step,val/loss\n1,6.0\n3,5.0\n")
    captured = {}
    monkeypatch.setattr(report, "training_curves", lambda series, metric, **kw: captured.update(series, **kw))
    runs, _ = report.find_runs([tmp_path])
    report.curve_plots(runs, tmp_path, ("val/loss",), x="tokens")
    xs, mean, _ = captured["model=m"]
    assert list(xs) == [2048.0, 4096.0] and list(mean) == [6.0, 5.0]
    assert captured["x_label"] == "training tokens"
    assert captured["title"] == f"{metric_title('val/loss')} over training (one seed)"  # in words


def test_curve_table_means_over_seeds_at_shared_steps(tmp_path):
    for seed, rows in enumerate(["1,6.0\n3,5.0\n", "1,5.0\n3,4.0\n5,3.0\n"]):
        s = summary(seed=seed)
        s["steps"], s["tokens_seen"] = 4, 4096
        write_run(tmp_path, f"r{seed}", s, ["model=m", f"seed={seed}"])
        (tmp_path / f"r{seed}" / "metrics.csv").write_text("step,val/loss\n" + rows)
    runs, _ = report.find_runs([tmp_path])
    lines = report.curve_table(runs, "val/loss").splitlines()
    assert "| step | tokens (M) | model=m (n=2) |" in lines
    assert "| 2 | 0.002 | 5.500 |" in lines and "| 4 | 0.004 | 4.500 |" in lines
    assert not any(line.startswith("| 6 |") for line in lines)  # step 5 is in one seed only


def test_compare_pairs_by_seed_with_t_interval(tmp_path):
    """B - A per seed: 0.1, 0.2, 0.3 -> mean 0.2, std 0.1, CI 4.303 x 0.1 / sqrt 3 = 0.2484; a seed that
    only A has is left out."""
    for seed, (a, b) in enumerate([(5.0, 5.1), (5.0, 5.2), (5.0, 5.3)]):
        write_run(tmp_path, f"a{seed}", summary(seed, a), ["model=m", f"seed={seed}"])
        write_run(
            tmp_path, f"b{seed}", summary(seed, b), ["model=m", "router.renormalize=True", f"seed={seed}"]
        )
    write_run(tmp_path, "a9", summary(9, 1.0), ["model=m", "seed=9"])
    runs, _ = report.find_runs([tmp_path])
    line = report.compare(runs, "model=m;router.renormalize=", "router.renormalize=true")
    assert "= +0.2000 ± 0.2484 (95% CI over n = 3 seed pairs" in line
    assert "the interval includes 0" in line
    assert "no seed has both" in report.compare(runs, "model=x", "model=m")
    assert f"detectable at 80% power: |effect| >= {report.detectable_effect(0.1, 3):.4f}" in line


def test_detectable_effect_by_hand():
    # many pairs: the normal approximation (z_0.975 + z_0.8) sd / sqrt(n) = (1.95996 + 0.84162) / sqrt(1000)
    assert report.detectable_effect(1.0, 1000) == pytest.approx(2.80158 / 1000**0.5, rel=2e-3)
    # 3 pairs: more than the t-quantile approximation (4.303 + 1.061) x 0.1 / sqrt(3) = 0.3097, far less than
    # nothing; and it scales with the spread
    small = report.detectable_effect(0.1, 3)
    assert 0.3097 < small < 0.45
    assert report.detectable_effect(0.2, 3) == pytest.approx(2 * small)
    assert math.isnan(report.detectable_effect(0.1, 1)) and math.isnan(report.detectable_effect(0.0, 5))


def test_baseline_roots_search_the_sweep_and_the_committed_runs_never_the_checkout(tmp_path):
    from testbed.train.summary import CHECKOUT, baseline_roots

    single = CHECKOUT / "outputs" / "2026-01-01" / "12-00-00"  # a make train run
    assert baseline_roots(single) == [CHECKOUT / "outputs", CHECKOUT / "experiments"]
    job = tmp_path / "exp" / "sweep" / "s0" / "0"  # <out>/<sweep>/<process>/<job> of testbed-experiment
    job.mkdir(parents=True)
    (job.parent / "multirun.yaml").write_text("{}")
    assert baseline_roots(job) == [(tmp_path / "exp").resolve(), CHECKOUT / "experiments"]
    shallow = CHECKOUT / "run"  # its parent's parent contains the checkout: not searched
    assert baseline_roots(shallow) == [CHECKOUT / "experiments"]


def test_post_training_gain_columns_and_sweep_conditions(tmp_path):
    """gain/<key> = init/<key> - <key>; gain_per_mparam/<key> per million trained parameters; `sweep=<name>`
    picks one sweep of a grid (<out>/<sweep>/<process>/<job>). Path gains 0.2, 0.3, 0.1, random-path gains
    0.1, 0.1, 0.05: paired difference 0.1, 0.2, 0.05 -> mean 0.1167."""
    finals = {"path": [4.8, 4.7, 4.9], "random_path": [4.9, 4.9, 4.95]}
    for sweep, losses in finals.items():
        for seed, loss in enumerate(losses):
            summ = {"seed": seed, "init/val/loss/code": 5.0, "val/loss/code": loss}
            summ["trainable_params"] = 50_000
            write_run(tmp_path / sweep / f"s{seed}", "0", summ, [f"seed={seed}", "data.domains=[code]"])
    runs, _ = report.find_runs([tmp_path])
    path_seed0 = next(r for r in runs if r["sweep"] == "path" and r["summary"]["seed"] == 0)
    assert math.isclose(report.run_value(path_seed0, "gain/val/loss/code"), 0.2, abs_tol=1e-12)
    assert math.isclose(report.run_value(path_seed0, "gain_per_mparam/val/loss/code"), 4.0, abs_tol=1e-9)
    assert math.isnan(report.run_value(path_seed0, "gain/val/loss/fiction"))  # no init value: no gain
    path_seed0["summary"]["trainable_params"] = 0  # nothing trained: no per-parameter gain, not a crash
    assert math.isnan(report.run_value(path_seed0, "gain_per_mparam/val/loss/code"))
    line = report.compare(runs, "sweep=random_path", "sweep=path", metric="gain/val/loss/code")
    assert "B (sweep=path) - A (sweep=random_path) = +0.1167 ±" in line and "n = 3 seed pairs" in line


def test_compare_metrics_comma_separated(tmp_path, capsys):
    """--compare-metric a,b: every --compare pair for each metric, metric by metric."""
    for seed, (a, b) in enumerate([(5.0, 5.1), (5.0, 5.2), (5.0, 5.3)]):
        write_run(tmp_path, f"a{seed}", summary(seed, a), ["model=m", f"seed={seed}"])
        write_run(
            tmp_path, f"b{seed}", summary(seed, b), ["model=m", "router.renormalize=True", f"seed={seed}"]
        )
    args = [str(tmp_path), "--no-committed-baselines", "--compare-metric", "val/loss,tokens_seen"]
    assert report.main([*args, "--compare", "router.renormalize=", "router.renormalize=true"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compare")]
    assert len(lines) == 2 and "= +0.2000 ±" in lines[0]
    assert lines[1].startswith(
        "compare tokens_seen: B (router.renormalize=true) - A (router.renormalize=) = +0.0000"
    )
    assert "p = 1;" in lines[1]  # equal in every seed: no evidence of an effect (not p = 0)
