"""Numbers in experiment READMEs come from the committed runs: rebuild a table with testbed-report and
find it, line for line, in the README."""

from pathlib import Path

from testbed.analysis import report

ROOT = Path(__file__).resolve().parents[1]


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
        assert row in readme, row
