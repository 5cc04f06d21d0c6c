"""Numbers in experiment READMEs come from the committed runs: rebuild a table with testbed-report and
find it, line for line, in the README."""

from pathlib import Path

import pytest

from testbed.analysis import report

ROOT = Path(__file__).resolve().parents[1]


def without_epochs(row: str) -> str:
    """A regime row as the READMEs hold it: written before testbed-report's `max epochs` column (the
    second-to-last cell; empty for these runs, whose summaries predate the per-domain epochs)."""
    cells = row.split(" | ")
    return " | ".join(cells[:-2] + cells[-1:])


def in_readme(row: str, readme) -> bool:
    return row in readme or without_epochs(row) in readme


def test_regime_readme_micro_table_rebuilds_from_committed_runs(capsys):
    runs = ROOT / "experiments" / "regime" / "runs"
    dirs = [str(runs / name) for name in ("micro", "micro_hash", "micro_renorm")]
    assert report.main([*dirs, "--columns", "val/loss", "--no-committed-baselines"]) == 0
    text = capsys.readouterr().out
    regime_rows = [line for line in text.split("Regime check")[1].splitlines() if line.startswith("| model=")]
    regime_rows += [line for line in text.split("Regime check")[1].splitlines() if line.startswith("| r")]
    readme = (ROOT / "experiments" / "regime" / "README.md").read_text()
    assert len(regime_rows) == 5
    for row in regime_rows:
        assert in_readme(row, readme), row


def test_x7_readme_tables_rebuild_from_committed_runs(capsys):
    runs = ROOT / "experiments" / "x7_scale" / "runs"
    cols = "val/loss,spec/utilization/mean,spec/max_violation/mean,spec/purity/mean,spec/nmi/mean,"
    cols += "spec/reference_precision/mean,spec/domain_isolation/mean"
    dirs = [str(runs / name) for name in ("micro_batch", "global", "dense_active", "hash")]
    assert report.main([*dirs, "--columns", cols, "--no-committed-baselines"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith(("| tiny", "| model="))]
    readme = (ROOT / "experiments" / "x7_scale" / "README.md").read_text()
    assert len(rows) == 8
    for row in rows:
        assert in_readme(row, readme), row
    assert (
        report.main(
            [
                *dirs[:2],
                "--no-committed-baselines",
                "--columns",
                "val/loss",
                "--compare",
                "balance.scope=micro_batch;router=",
                "balance.scope=global;router=",
                "--compare-metric",
                "spec/purity/mean",
            ]
        )
        == 0
    )
    assert "+0.0364 ± 0.0177" in capsys.readouterr().out
    assert "| purity | +0.0364 ± 0.0177 | 0.0125 | excludes 0 |" in readme


@pytest.mark.parametrize(
    ("folder", "wanted", "rows_expected"),
    [
        # the 8,192-token-step rerun: references, EB and LBL (Sinkhorn has one seed there)
        ("scope_8k", ("router=hash", "router=oracle", "balance=expert_bias", "coefficient=0.1"), 8),
        # the current X1: the same plus dense, Sinkhorn, BA and the mixed-batch control (coefficient=0.1)
        (
            "",
            (
                "router=hash",
                "router=oracle",
                "balance=expert_bias",
                "coefficient=0.1",
                "micro_dense",
                "router=sinkhorn",
                "router=balanced_assignment",
            ),
            16,
        ),
    ],
)
def test_x1_readme_regime_rows_rebuild_from_committed_runs(capsys, folder, wanted, rows_expected):
    """The regime-check rows of an X1 README are testbed-report's rows for the committed runs."""
    base = ROOT / "experiments" / "x1_scope" / folder
    assert_regime_rows_in_readme(capsys, base, [base / "runs"], rows_expected, wanted)


@pytest.mark.parametrize(
    ("folder", "dirs", "rows_expected"),
    [
        ("x2_capacity", ["runs", "../x1_scope/runs/dense", "../x1_scope/runs/references"], 7),
        ("x8_lbl_value", ["runs", *(f"../x1_scope/runs/lbl/s{s}-1" for s in range(3)),
                          "../x1_scope/runs/dense", "../x1_scope/runs/references"], 7),
        ("x4_guo_losses", ["runs/pretrain", "runs/variance_weight", "../x1_scope/runs/dense",
                           "../x1_scope/runs/references"], 9),
        ("x6_dbes", ["runs/pretrain", "../regime/runs/micro", "../regime/runs/micro_hash",
                     *(f"../x3_router_types/runs/references/s{s}-0" for s in range(3))], 6),
        ("x3_router_types", ["runs", "../regime/runs/micro", "../regime/runs/micro_renorm"], 8),
        ("x5_quiz", ["runs", *(f"../regime/runs/micro/s{s}-{i}" for s in range(3) for i in (0, 2)),
                     "../regime/runs/micro_hash"], 7),
    ],
)  # fmt: skip
def test_x2_to_x8_readme_regime_rows_rebuild_from_committed_runs(capsys, folder, dirs, rows_expected):
    """The regime rows of the X2-X6 and X8 READMEs are testbed-report's rows for their committed runs
    with the references (X1's; the regime experiment's for X3, X5 and X6), as rebuild.sh makes them."""
    base = ROOT / "experiments" / folder
    assert_regime_rows_in_readme(capsys, base, [(base / d).resolve() for d in dirs], rows_expected)


def assert_regime_rows_in_readme(capsys, base, dirs, rows_expected, wanted=None):
    """testbed-report's regime-check rows for `dirs` (those whose configuration names one of `wanted`, or
    all) number `rows_expected` and stand in base/README.md, whole or without the dense-total column."""
    assert report.main([*map(str, dirs), "--columns", "val/loss", "--no-committed-baselines"]) == 0
    lines = capsys.readouterr().out.split("Regime check")[1].splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| config", "|---"))]
    if wanted is not None:
        rows = [line for line in rows if any(k in line.split(" | ")[0] for k in wanted)]
    assert len(rows) == rows_expected
    readme_rows = {line for line in (base / "README.md").read_text().splitlines() if line.startswith("| ")}
    for row in rows:
        # whole, or without the dense-total column; runs committed before `max epochs` also without it
        forms = [row, without_epochs(row)]
        forms += [" | ".join(f.split(" | ")[:4] + f.split(" | ")[5:]) for f in list(forms)]
        assert any(form in readme_rows for form in forms), row


def test_regime_large_readme_rows_rebuild_from_committed_runs(capsys):
    """The default run's regime check on the large mix (experiments/regime_large): its four rows."""
    base = ROOT / "experiments" / "regime_large"
    assert_regime_rows_in_readme(capsys, base, [base], 4)


LR_LADDER = ["--reference", "hash_lr1e-2", "--ladder-baselines", "dense_active_lr1e-2"]


@pytest.mark.parametrize(
    ("args", "least"),
    [  # rebuild.sh's reports: the token ladder, its whole-validation rescoring (against hash and against
        # the default run), the mechanism runs
        (["../regime_large", "runs", "mechanism/renorm", "--ladder"], 2 + 6 + 1 + 4),
        (["runs", "--ladder", "--ladder-metric", "analysis/val/loss"], 2 + 2 + 1 + 2),
        (["runs", "--ladder", "--ladder-metric", "analysis/val/loss", "--reference", "moe"], 2 + 2 + 1 + 2),
        (["../regime_large", "mechanism", "--ladder", "--reference", "moe"], 2 + 4 + 1 + 4),
        (
            ["../regime_large"]
            + sorted(  # rebuild.sh's selection: the 16-expert models' sweep (fine64 / hash64 are fine_lr's)
                f"mechanism/{p.name}"
                for model in ("moe", "hash", "dense_active", "dense_total", "renorm")
                for p in (ROOT / "experiments/ladder/mechanism").glob(f"{model}_lr*")
            )
            + ["--ladder", "--reference", "moe_lr1e-2"],
            2 + 4 + 1 + 4,
        ),
        (  # the ladder at lr 1e-2, against hash and dense-active at that rate
            ["mechanism/moe_lr1e-2", "mechanism/hash_lr1e-2", "mechanism/dense_active_lr1e-2", "runs_lr"]
            + ["--ladder", *LR_LADDER],
            2 + 3 + 1 + 6,
        ),
        (["runs_lr", "--ladder", "--ladder-metric", "analysis/val/loss", *LR_LADDER], 2 + 3 + 1 + 4),
        (  # 64 fine-grained experts against their own hash baseline
            ["../regime_large", "mechanism/fine64", "mechanism/fine64_renorm", "mechanism/hash64"]
            + [
                "--ladder",
                "--reference",
                "hash64",
                "--ladder-baselines",
                "hash,dense_active,dense_total,fine64",
            ],
            2 + 7 + 1 + 5,
        ),
        (  # ... and at lr 1e-2, beside the 16-expert models at that rate
            [f"mechanism/{m}_lr1e-2" for m in ("moe", "hash", "dense_active", "fine64", "hash64")]
            + ["--ladder", "--reference", "hash64_lr1e-2"]
            + ["--ladder-baselines", "moe_lr1e-2,hash_lr1e-2,dense_active_lr1e-2"],
            2 + 5 + 1 + 4,
        ),
        (  # the token ladder at tiny: the scale grid's 1,500 steps and run_tiny.sh's 3,000
            ["scale/tiny/runs", "tiny", "--ladder", "--ladder-baselines", "dense_active"],
            2 + 6 + 1 + 5 + 2,
        ),
    ],
    ids=[
        "ladder",
        "rescored",
        "rescored_vs_default",
        "mechanism",
        "best_rate",
        "lr_ladder",
        "lr_rescored",
        "fine",
        "fine_lr",
        "tiny",
    ],
)
def test_ladder_readme_tables_rebuild_from_committed_runs(capsys, monkeypatch, args, least):
    """Every row of the ladder's tables (experiments/ladder/README.md) is testbed-report --ladder's row for
    the committed runs, as rebuild.sh makes it."""
    base = ROOT / "experiments" / "ladder"
    monkeypatch.chdir(base)
    assert report.main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    assert len(rows) >= least  # the headers, the configurations, max epochs, gains
    readme = set((base / "README.md").read_text().splitlines())
    missing = [row for row in rows if row not in readme]
    assert not missing, missing


def assert_gate_mass_rows_in_readme(capsys, runs: list[str]) -> None:
    """testbed-report's gate-mass table of `runs` (relative to experiments/ladder, the working folder) stands
    row for row in experiments/ladder/README.md, as rebuild.sh makes it."""
    columns = "analysis/spec/gate_mass/mean,spec/gate_mass/mean,val/loss"
    assert report.main([*runs, "--columns", columns]) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()
    assert len(table) >= 2 + 3 and table[0].startswith("| ")
    readme = set((ROOT / "experiments/ladder/README.md").read_text().splitlines())
    assert not [row for row in table if row not in readme]


def test_ladder_gate_mass_rows_rebuild_from_committed_runs(capsys, monkeypatch):
    """The learned router's gate mass at 1,500 steps: LBL 1e-3 (scored afterwards), the rate sweep and the
    64 fine-grained experts (top-8) at 3e-3 and 1e-2."""
    base = ROOT / "experiments" / "ladder"
    monkeypatch.chdir(base)
    rates = sorted(f"mechanism/{p.name}" for p in (base / "mechanism").glob("moe_lr*"))
    fine = ["mechanism/fine64", "mechanism/fine64_lr1e-2"]
    assert_gate_mass_rows_in_readme(capsys, ["mechanism/lbl_1e-3", *rates, *fine])


def test_ladder_gate_mass_up_the_learning_rate_ladder(capsys, monkeypatch):
    """The gate mass of the learned router at lr 1e-2, one row a rung (lr_gate_mass.md)."""
    base = ROOT / "experiments" / "ladder"
    monkeypatch.chdir(base)
    rungs = sorted(f"runs_lr/{p.parent.name}/moe_lr1e-2" for p in base.glob("runs_lr/*/moe_lr1e-2"))
    assert_gate_mass_rows_in_readme(capsys, ["mechanism/moe_lr1e-2", *rungs])


def test_scale_ladder_rank_rows_rebuild_from_committed_runs(capsys, monkeypatch):
    """The scale ladder's ranking (rebuild.sh's scale/rank_micro_tiny.md): every table row and every rho line
    of testbed-report --rank stands in experiments/ladder/README.md, and each size's regime check rows."""
    base = ROOT / "experiments" / "ladder"
    monkeypatch.chdir(base)
    args = ["--rank", "scale/micro/runs", "scale/tiny/runs", "--rank-reference", "lbl_micro_batch"]
    assert report.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith(("| ", "Spearman rho", "Over the "))]
    # loss: header, 6 configurations, 2 rho lines (all, routed), header, 5 differences; purity (no dense
    # model): header, 5 configurations, 1 rho line, header, 4 differences
    assert len(rows) == (1 + 6 + 2 + 1 + 5) + (1 + 5 + 1 + 1 + 4)
    readme = set((base / "README.md").read_text().splitlines())
    assert not [row for row in rows if row not in readme]
    for size in ("micro", "tiny"):
        assert report.main([f"scale/{size}/runs"]) == 0
        regime = capsys.readouterr().out.split("Regime check")[1].splitlines()
        rows = [line for line in regime if line.startswith("| model=")]
        assert len(rows) == 6 and not [row for row in rows if row not in readme]
