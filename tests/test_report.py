"""testbed-report: runs side by side, swept keys as columns, failed runs listed."""

import json

from testbed.analysis.report import main


def fake_run(path, overrides, summary):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))


def test_report_table_and_failed_runs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(
        sweep / "0", ["router=oracle", "trainer.max_steps=5"], {"val/loss": 4.25, "spec/purity/mean": 1.0}
    )
    fake_run(
        sweep / "1", ["router=hash", "trainer.max_steps=5"], {"val/loss": 5.5, "spec/purity/mean": 0.125}
    )
    fake_run(sweep / "2", ["router=sinkhorn", "trainer.max_steps=5"], None)
    assert main([str(sweep), "--columns", "val/loss,spec/purity/mean", "--out", str(tmp_path / "r.md")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "| run | router | val/loss | purity |"
    assert lines[2] == "| 0 | oracle | 4.250 | 1.000 |"
    assert lines[3] == "| 1 | hash | 5.500 | 0.125 |"
    assert "failed or unfinished): 1" in out and str(sweep / "2") in out
    assert (tmp_path / "r.csv").read_text().splitlines()[1] == "0,oracle,4.25,1.0"


def test_report_missing_dir(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_frontier_plots(tmp_path):
    sweep = tmp_path / "sweep"
    for i, (router, util, purity) in enumerate(
        [("oracle", 1.0, 1.0), ("hash", 0.95, 0.13), ("sigmoid", 0.9, 0.4)]
    ):
        fake_run(
            sweep / str(i),
            [f"router={router}"],
            {
                "config": {"router": router},
                "spec/utilization/mean": util,
                "spec/purity/mean": purity,
                "spec/nmi/mean": purity / 2,
                "spec/reference_precision/mean": purity,
            },
        )
    assert main([str(sweep), "--out", str(tmp_path / "r.md"), "--plots"]) == 0
    for metric in ("purity", "nmi", "reference_precision"):
        assert (tmp_path / f"frontier_{metric}.png").stat().st_size > 1000
