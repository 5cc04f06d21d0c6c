"""Token ladder report (testbed-report --ladder) and the inference helpers: hand-computed values."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from testbed.analysis.inference import ci95, holm, one_sample_p, trend
from testbed.analysis.ladder import collect, label, ladder_report
from testbed.analysis.report import main
from tests.test_report import fake_run


def test_holm_by_hand():
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the running max 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, math.nan])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])  # nan does not count towards m


def test_ci_trend_and_one_sample_p_by_hand():
    mean, half, n = ci95([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    assert one_sample_p([0.1, 0.1, 0.1]) == 0.0 and one_sample_p([0.0, 0.0]) == 1.0
    fit = trend([1, 2, 3, 4], [-3, -2, -1, 0])  # y = x - 4: slope 1, crosses 0 at x = 4, exact fit
    assert fit["slope"] == pytest.approx(1.0) and fit["x0"] == pytest.approx(4.0)
    assert fit["slope_half"] == pytest.approx(0.0, abs=1e-9)


# val loss per (role, steps) and seed: moe behind hash by 0.10 / 0.05 / 0.01 +- a seed wobble, then ahead
LOSSES = {
    ("hash", 100): [4.00, 4.10, 4.20],
    ("moe", 100): [4.10, 4.21, 4.29],  # gains over hash: -0.10, -0.11, -0.09
    ("dense_active", 100): [4.30, 4.40, 4.50],
    ("hash", 200): [3.90, 4.00, 4.10],
    ("moe", 200): [3.86, 3.97, 4.05],  # +0.04, +0.03, +0.05
    ("dense_active", 200): [4.20, 4.30, 4.40],
}


def ladder_dirs(tmp_path, suffix=""):
    """LOSSES as runs; `suffix` (e.g. _lr1e-2) is appended to every run_name."""
    for (role, steps), values in LOSSES.items():
        role += suffix
        for seed, value in enumerate(values):
            fake_run(
                tmp_path / str(steps) / role / f"s{seed}",
                [f"trainer.max_steps={steps}", f"run_name={role}"],
                {
                    "run_name": role,
                    "seed": seed,
                    "steps": steps,
                    "tokens_seen": steps * 2048,
                    "val/loss": value,
                    "val/doc_ci95": 0.01 * (seed + 1),
                    "data": [{"domain": "code", "epochs_at_max_steps": steps / 1000}],
                },
            )
    return tmp_path


def test_ladder_report_pairs_seeds_and_finds_the_crossing(tmp_path, capsys):
    root = ladder_dirs(tmp_path)
    assert (
        main(
            [
                str(root),
                "--ladder",
                "--no-committed-baselines",
                "--out",
                str(root / "r" / "report.md"),
                "--plots",
            ]
        )
        == 0
    )
    text = (root / "r" / "report.md").read_text()
    assert (root / "r" / "ladder.png").stat().st_size > 0
    rows = (root / "r" / "report.csv").read_text().splitlines()
    # the gain of moe over hash at 100 steps: mean of (-0.10, -0.11, -0.09) = -0.10, its CI and p by hand
    diffs = [-0.10, -0.11, -0.09]
    half = stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)
    p = stats.ttest_1samp(diffs, 0).pvalue
    row = next(r.split(",") for r in rows if r.startswith("100,") and ",moe,hash," in r)
    assert float(row[4]) == pytest.approx(-0.10, abs=1e-9) and float(row[5]) == pytest.approx(half, rel=1e-4)
    assert float(row[7]) == pytest.approx(p, rel=1e-4)
    # Holm over the two comparisons with hash (100 and 200 steps)
    p200 = stats.ttest_1samp([0.04, 0.03, 0.05], 0).pvalue
    assert float(row[8]) == pytest.approx(holm([p, p200])[0], rel=1e-4)
    assert "-0.100 ± " + f"{half:.3f} (3)" in text
    assert "| 4.1000 ± " in text and "(3) [docs ±0.0200] |" in text  # the mean of 0.01, 0.02, 0.03
    assert "the mean gain changes sign between 100 and 200 steps" in text
    assert "behind (CI excludes 0) at 100 steps" in text and "ahead (CI excludes 0) at 200 steps" in text
    assert "| max epochs | 0.10 | 0.20 |" in text
    assert "over 2 rungs, no extrapolation" in text and "reaches 0" not in text
    # hash's own gain over dense-active is shown, never a gain of hash over itself
    assert "| 100 | 0.2M | hash |  | +0.300 ± 0.000 (3) |" in text


def test_ladder_extrapolates_only_a_significant_trend(tmp_path):
    runs = []
    for steps, gap in ((100, -0.12), (200, -0.08), (400, -0.04)):
        for seed, wobble in enumerate((-0.005, 0.0, 0.005)):
            for role, loss in (("hash", 4.0), ("moe", 4.0 - gap + wobble)):
                runs.append(
                    {
                        "dir": tmp_path / role,
                        "summary": {
                            "run_name": role,
                            "seed": seed,
                            "steps": steps,
                            "tokens_seen": steps * 1000,
                            "val/loss": loss,
                        },
                    }
                )
    assert set(collect(runs)) == {"hash", "moe"}
    text, _, _ = ladder_report(runs)
    # +0.04 per doubling from -0.04 at 400k tokens: 0 at 800k tokens, 2x the longest rung
    assert "trend +0.0400 ± " in text and "reaches 0 at about 0.8M tokens (2.0x the longest rung)" in text


def test_holm_file_marks_survivors(tmp_path, capsys):
    path = tmp_path / "compare.txt"
    path.write_text("compare a: ... paired t p = 0.01 ...\nnote\ncompare b: ... paired t p = 0.04 ...\n")
    assert main(["--holm", str(path), "--out", str(tmp_path / "holm.txt")]) == 0
    lines = (tmp_path / "holm.txt").read_text().splitlines()
    assert lines[0].endswith("Holm p = 0.02, survives") and lines[2].endswith("Holm p = 0.04, survives")
    assert lines[-1] == "Holm over the 2 paired tests above (family-wise level 0.05): 2 survive."
    assert main(["--holm", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def fake_grids(root, grids: dict, extra: dict | None = None) -> None:
    """Experiment-grid folders root/<grid>/<configuration>/s<seed>/0 with one val/loss per seed."""
    for grid, values in grids.items():
        for name, seeds in values.items():
            for seed, value in enumerate(seeds):
                path = root / grid / name / f"s{seed}" / "0"
                fake_run(path, [f"seed={seed}"], {"seed": seed, "val/loss": value, **(extra or {})})


def test_rank_agreement_by_hand(tmp_path, capsys):
    from testbed.analysis.ladder import rank_agreement

    # the same order at both scales with no seed noise: rho 1 and the interval collapses onto it
    a = {"x": [1.0, 1.0], "y": [2.0, 2.0], "z": [3.0, 3.0]}
    b = {"x": [5.0, 5.0], "y": [6.0, 6.0], "z": [9.0, 9.0], "w": [0.0]}
    result = rank_agreement(a, b, draws=200)
    assert (
        result["names"] == ["x", "y", "z"] and result["rho"] == 1.0 and result["low"] == result["high"] == 1.0
    )
    # reversed order: -1; overlapping seeds at the larger scale widen the interval
    reverse = {"x": [3.0, 3.1], "y": [2.0, 3.05], "z": [1.0, 1.1]}
    result = rank_agreement(a, reverse, draws=500)
    assert result["rho"] == -1.0 and result["low"] == -1.0 and result["high"] > -1.0
    # the CLI on two grids (configuration = sweep folder)
    fake_grids(tmp_path, {"micro": a, "tiny": b}, {"spec/purity/mean": 0.5})
    assert main(["--rank", str(tmp_path / "micro"), str(tmp_path / "tiny"), "--columns", "val/loss"]) == 0
    out = capsys.readouterr().out
    assert "| x | 1.0000 (2) | 1 | 5.0000 (2) | 1 |" in out
    assert (
        "Spearman rho over the 3 configurations: +1.000" in out and "in one scale only (left out): w" in out
    )


def test_rank_differences_by_hand(tmp_path, capsys):
    """--rank-reference: every configuration minus the reference, paired by seed, at both scales, a sign
    comparison only where both intervals exclude 0; rho without the dense model (which ranks last at both
    scales and so inflates rho: 0.8 with it, 0.5 without, by hand); the figure; bad options exit 2."""
    micro = {
        "x": [1.0, 1.1, 1.2],
        "y": [1.5, 1.6, 1.7],  # x + 0.5 on every seed
        "z": [0.9, 1.0, 1.1],  # x - 0.1
        "dense_active": [4.0, 4.0, 4.0],
    }
    tiny = {
        "x": [2.0, 2.1, 2.2],
        "y": [2.3, 2.4, 2.5],  # x + 0.3: the same sign as at micro
        "z": [2.2, 2.3, 2.4],  # x + 0.2: reversed
        "dense_active": [5.0, 5.1, 5.3],
    }
    fake_grids(tmp_path, {"micro": micro, "tiny": tiny})
    args = ["--rank", str(tmp_path / "micro"), str(tmp_path / "tiny"), "--columns", "val/loss"]
    out_file = tmp_path / "report" / "rank.md"
    assert main([*args, "--rank-reference", "x", "--out", str(out_file), "--plots"]) == 0
    out = capsys.readouterr().out
    assert "Spearman rho over the 4 configurations: +0.800" in out
    assert "Over the 3 routed configurations (dense models left out" in out and "): +0.500 (" in out
    assert "| y | +0.5000 ± 0.0000 (3) | +0.3000 ± 0.0000 (3) | yes |" in out
    assert "| z | -0.1000 ± 0.0000 (3) | +0.2000 ± 0.0000 (3) | no: reversed |" in out
    # dense - x: micro 3.0, 2.9, 2.8; tiny 3.0, 3.0, 3.1; half-width t(0.975, 2) * sd / sqrt(3)
    half = [
        stats.t.ppf(0.975, 2) * np.std(d, ddof=1) / np.sqrt(3) for d in ([3.0, 2.9, 2.8], [3.0, 3.0, 3.1])
    ]
    dense = f"| {label('dense_active')} | +2.9000 ± {half[0]:.4f} (3) | +3.0333 ± {half[1]:.4f} (3) | yes |"
    assert dense in out and f"{half[0]:.4f}" == "0.2484"
    assert out_file.read_text().strip() == out[: out.index("wrote")].strip()
    assert (tmp_path / "report" / "rank.png").stat().st_size > 0
    assert main([*args, "--rank-reference", "w"]) == 2
    assert "--rank-reference w: not a configuration of both grids; those in both: dense_active, x, y, z" in (
        capsys.readouterr().err
    )
    assert main([*args, "--rank-reference", "x", "--plots"]) == 2  # no --out: nowhere to put the figure
    assert main([*args, "--out", str(out_file), "--plots"]) == 2  # no reference: nothing to draw
    assert main(args) == 0 and "paired by seed" not in capsys.readouterr().out  # no reference: no table
    # a grid collected into <experiment>/runs (experiments/collect.sh) is labelled by the experiment's folder
    (tmp_path / "scale_micro").mkdir()
    (tmp_path / "micro").rename(tmp_path / "scale_micro" / "runs")
    assert main(["--rank", str(tmp_path / "scale_micro" / "runs"), str(tmp_path / "tiny")]) == 0
    assert "| configuration | scale_micro | rank | tiny | rank |" in capsys.readouterr().out


def test_another_reference_is_a_baseline_column_too(tmp_path):
    runs = [
        {
            "dir": tmp_path,
            "summary": {
                "run_name": role,
                "seed": seed,
                "steps": steps,
                "tokens_seen": steps * 2048,
                "val/loss": value,
            },
        }
        for (role, steps), values in LOSSES.items()
        for seed, value in enumerate(values)
    ]
    text, rows, _ = ladder_report(runs, reference="moe")
    # hash against the default run at 100 steps: moe - hash = +0.10 per seed on average
    row = next(r for r in rows[1:] if r[0] == 100 and r[2] == "hash" and r[3] == "moe")
    assert float(row[4]) == pytest.approx(0.10, abs=1e-9)
    assert "| steps | tokens | configuration | over top-2 softmax + LBL | over hash |" in text


def test_ladder_on_the_loss_testbed_analyze_measured(tmp_path):
    """--ladder-metric analysis/val/loss compares each run's <run>/analysis/analysis.json loss
    (testbed-analyze, e.g. on the whole validation split) instead of summary.json's; a run without one is
    left out; the interval over validation documents belongs to the summary's loss and is not shown."""
    root = ladder_dirs(tmp_path)
    for (role, steps), values in LOSSES.items():
        for seed, value in enumerate(values):
            if role == "moe" and seed == 2:
                continue  # not analysed: not counted
            analysis = root / str(steps) / role / f"s{seed}" / "analysis"
            analysis.mkdir()
            shifted = value + (0.5 if role == "moe" else 0.0)  # moe 0.5 worse than in its summary
            (analysis / "analysis.json").write_text(json.dumps({"val_loss_mean": shifted}))
    out = root / "r" / "report.md"
    args = [str(root), "--ladder", "--no-committed-baselines", "--ladder-metric", "analysis/val/loss"]
    assert main([*args, "--out", str(out)]) == 0
    text = out.read_text()
    assert "Validation loss (`analysis/val/loss`, nats/token" in text and "[docs ±" not in text
    row = next(
        r.split(",")
        for r in out.with_suffix(".csv").read_text().splitlines()
        if r.startswith("100,") and ",moe,hash," in r
    )
    # seeds 0 and 1 only: the summary gains -0.10 and -0.11, each 0.5 worse
    assert float(row[4]) == pytest.approx(-0.605, abs=1e-9) and row[6] == "2"


def test_ladder_roles_are_drawn_in_their_methods_style():
    """The ladder figure draws a role in its method's colour and marker (testbed/plots.py's one style): the
    default run as LBL, hash grey with its X, the dense models brown; a mechanism variant of the default run
    in a shade of LBL's colour with a dashed line; a role is drawn the same in both panels."""
    from matplotlib.colors import to_rgb

    from testbed.analysis.ladder import role_style
    from testbed.plots import DENSE_COLOUR, method_colour, method_markers

    moe, renorm, hash_, dense = (role_style(r) for r in ("moe", "renorm", "hash", "dense_active"))
    assert to_rgb(moe["color"]) == to_rgb(method_colour("LBL")) and moe["marker"] == method_markers()["LBL"]
    assert to_rgb(hash_["color"]) == to_rgb(method_colour("hash")) and hash_["marker"] == "X"
    assert to_rgb(dense["color"]) == to_rgb(DENSE_COLOUR)
    assert renorm["marker"] == moe["marker"] and renorm["linestyle"] != "-"
    assert to_rgb(renorm["color"]) != to_rgb(moe["color"])
    assert role_style("eb") == role_style("eb") and role_style("eb")["color"] != moe["color"]
    assert role_style("moe_lr1e-2")["color"]  # a run name no table knows still gets a fixed colour


def test_learning_rate_runs_read_as_their_model_and_rate():
    """The learning-rate sweep's run names (`<role>_lr<rate>`) read as the role's name and the rate, and
    draw in a shade of the role's method, the same in every process."""
    import subprocess
    import sys

    from testbed.analysis.ladder import label, role_style

    assert label("moe_lr1e-2") == "top-2 softmax + LBL, lr 1e-2"
    assert label("dense_active_lr3e-2") == "dense (active params), lr 3e-2"
    assert label("hash_lr1e-3") == "hash, lr 1e-3" and label("other") == "other"
    assert role_style("hash_lr1e-2")["marker"] == role_style("hash")["marker"]
    assert role_style("hash_lr1e-2")["color"] != role_style("hash")["color"]
    rates = [role_style(f"moe_lr{rate}") for rate in ("1e-3", "3e-3", "1e-2", "3e-2")]
    assert len({(str(s["color"]), str(s["linestyle"])) for s in rates}) == 4  # every rate its own look
    code = "from testbed.analysis.ladder import role_style; print(role_style('moe_lr1e-2'))"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout for _ in range(2)
    }
    assert runs == {f"{role_style('moe_lr1e-2')}\n"}


def test_a_ladder_at_another_rate_compares_with_its_own_baselines(tmp_path, capsys):
    """--reference hash_lr1e-2 --ladder-baselines dense_active_lr1e-2: every run at lr 1e-2; the dense run is
    a baseline column (not a compared configuration, not in the Holm family), the figure's second panel is
    the gain over it, and a baseline nobody ran is refused with exit 2."""
    ladder_dirs(tmp_path, suffix="_lr1e-2")
    out = tmp_path / "r" / "lr.md"
    args = [str(tmp_path), "--ladder", "--no-committed-baselines", "--reference", "hash_lr1e-2"]
    assert (
        main(
            [
                *args,
                "--ladder-baselines",
                "dense_active_lr1e-2",
                "--out",
                str(out),
                "--plots",
                "--ladder-figure",
                "lr.png",
            ]
        )
        == 0
    )
    assert (tmp_path / "r" / "lr.png").stat().st_size > 0 and not (tmp_path / "r" / "ladder.png").exists()
    rows = (tmp_path / "r" / "lr.csv").read_text().splitlines()[1:]
    compared = {(r.split(",")[2], r.split(",")[3]) for r in rows}
    assert compared == {
        ("moe_lr1e-2", "hash_lr1e-2"),
        ("moe_lr1e-2", "dense_active_lr1e-2"),
        ("hash_lr1e-2", "dense_active_lr1e-2"),  # the reference against the dense model too
    }
    # moe over dense at 100 steps: 4.30-4.10, 4.40-4.21, 4.50-4.29 -> mean 0.2, by hand
    row = next(
        r
        for r in (r.split(",") for r in rows)
        if r[0] == "100" and r[2:4] == ["moe_lr1e-2", "dense_active_lr1e-2"]
    )
    assert float(row[4]) == pytest.approx(0.20, abs=1e-9)
    text = out.read_text()
    assert "over dense (active params), lr 1e-2" in text and "the 2 comparisons with hash, lr 1e-2" in text
    assert main([*args, "--ladder-baselines", "dense_active_lr3e-2"]) == 2
    assert "no finished run named dense_active_lr3e-2" in capsys.readouterr().err
    assert main([*args, "--ladder-figure", "../x.png", "--out", str(out), "--plots"]) == 2


def test_grid_runs_without_a_name_join_the_ladder_by_their_sweep(tmp_path, capsys):
    # the scale ladder's tiny grid (run_name left at `default`, configuration = sweep folder) is the
    # 1,500-step rung; longer runs named after the sweeps (run_tiny.sh) are the next rung
    grid = {"hash": [4.00, 4.10, 4.20], "lbl_micro_batch": [4.20, 4.26, 4.37]}  # -0.20, -0.16, -0.17
    for name, seeds in grid.items():
        for seed, value in enumerate(seeds):
            summary = {"run_name": "default", "seed": seed, "steps": 1500, "tokens_seen": 3_072_000}
            fake_run(
                tmp_path / "grid" / name / f"s{seed}" / "0", [f"seed={seed}"], {**summary, "val/loss": value}
            )
    longer = {"hash": [3.80, 3.90, 4.00], "lbl_micro_batch": [3.90, 3.99, 4.11]}  # -0.10, -0.09, -0.11
    for name, seeds in longer.items():
        for seed, value in enumerate(seeds):
            summary = {
                "run_name": name,
                "seed": seed,
                "steps": 3000,
                "tokens_seen": 6_144_000,
                "val/loss": value,
            }
            fake_run(tmp_path / "tiny" / "3000" / name / f"s{seed}", [f"run_name={name}"], summary)
    assert main([str(tmp_path / "grid"), str(tmp_path / "tiny"), "--ladder"]) == 0
    out = capsys.readouterr().out
    # no run is grouped under `default` or under its seed folder
    assert "| default" not in out and "| s0" not in out
    rows = [line for line in out.splitlines() if "top-2 + LBL, micro-batch scope |" in line and "M |" in line]
    assert len(rows) == 2, out
    assert "| 1,500 | 3.1M | top-2 + LBL, micro-batch scope | -0.177 ± " in rows[0]
    assert "| 3,000 | 6.1M | top-2 + LBL, micro-batch scope | -0.100 ± " in rows[1]
    # a run named `default` outside a grid keeps its name
    fake_run(
        tmp_path / "solo" / "s0", ["seed=0"], {"run_name": "default", "seed": 0, "steps": 10, "val/loss": 4.0}
    )
    from testbed.analysis.ladder import ladder_role
    from testbed.analysis.report import find_runs

    (solo,), _ = find_runs([tmp_path / "solo"])
    assert ladder_role(solo) == "default"
