"""`testbed-report <run or sweep dir> [...]`: one Markdown (and CSV) table of runs side by side.

Each run directory holds `summary.json` (written at the end of training) and `.hydra/overrides.yaml`
(what the sweep set). A directory with `.hydra/` but no `summary.json` is a failed or unfinished run:
it is listed under the table, never dropped silently.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import yaml

DEFAULT_COLUMNS = (
    "val/loss",
    "spec/utilization/mean",
    "spec/max_violation/mean",
    "spec/gate_entropy/mean",
    "spec/purity/mean",
    "spec/nmi/mean",
    "spec/reference_precision/mean",
    "spec/drop_rate/mean",
)


def find_runs(roots: list[Path]) -> tuple[list[dict], list[Path]]:
    """(finished runs with their overrides, run directories without summary.json)."""
    finished, failed = [], []
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        candidates = {p.parent for p in root.rglob(".hydra")} | {p.parent for p in root.rglob("summary.json")}
        for run_dir in sorted(candidates, key=lambda p: (len(p.parts), str(p))):
            summary_path = run_dir / "summary.json"
            overrides_path = run_dir / ".hydra" / "overrides.yaml"
            overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.exists() else []
            if not summary_path.exists():
                failed.append(run_dir)
                continue
            summary = json.loads(summary_path.read_text())
            finished.append({"dir": run_dir, "overrides": overrides or [], "summary": summary})
    return finished, failed


def varying_overrides(runs: list[dict]) -> list[str]:
    """Override keys whose value differs between runs (the swept ones), in first-seen order."""
    values: dict[str, set] = {}
    for run in runs:
        for item in run["overrides"]:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    keys = [k for k, v in values.items() if len(v) > 1 or len(runs) == 1]
    return keys or list(values)


def format_value(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return "" if value is None else str(value)


def table_rows(runs: list[dict], columns: tuple[str, ...]) -> tuple[list[str], list[list]]:
    keys = varying_overrides(runs)
    header = ["run", *keys, *columns]
    rows = []
    for run in runs:
        settings = dict(item.partition("=")[::2] for item in run["overrides"])
        rows.append(
            [run["dir"].name, *[settings.get(k, "") for k in keys], *[run["summary"].get(c) for c in columns]]
        )
    return header, rows


def markdown(header: list[str], rows: list[list], failed: list[Path]) -> str:
    short = [h.replace("spec/", "").replace("/mean", "") for h in header]
    lines = ["| " + " | ".join(short) + " |", "|" + "---|" * len(short)]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in rows]
    if failed:
        lines += ["", f"Runs without summary.json (failed or unfinished): {len(failed)}"]
        lines += [f"- {p}" for p in failed]
    return "\n".join(lines)


def frontier_plots(runs: list[dict], out_dir: Path) -> list[Path]:
    """Utilization vs specialization across runs (purity, nmi, reference precision); oracle, hash marked."""
    from testbed.analysis.plots import specialization_scatter

    keys = varying_overrides(runs)
    points = []
    for run in runs:
        summary = run["summary"]
        settings = dict(item.partition("=")[::2] for item in run["overrides"])
        router = summary.get("config", {}).get("router", settings.get("router", ""))
        label = " ".join(settings.get(k, "") for k in keys) or run["dir"].name
        point = {"label": label, "kind": router if router in ("oracle", "hash") else "router"}
        point.update(
            {
                m: summary.get(f"spec/{m}/mean")
                for m in ("utilization", "purity", "nmi", "reference_precision")
            }
        )
        if point["utilization"] is not None:
            points.append(point)
    paths = []
    for metric in ("purity", "nmi", "reference_precision"):
        if points and all(p[metric] is not None for p in points):
            path = out_dir / f"frontier_{metric}.png"
            specialization_scatter(
                points, out_path=path, x="utilization", y=metric, title=f"utilization vs {metric}"
            )
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testbed-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories (searched recursively)")
    parser.add_argument("--columns", default=",".join(DEFAULT_COLUMNS), help="summary.json keys to show")
    parser.add_argument("--out", type=Path, help="write the Markdown table here (and a .csv beside it)")
    parser.add_argument(
        "--plots", action="store_true", help="also write frontier_*.png beside --out (or in .)"
    )
    args = parser.parse_args(argv)
    try:
        runs, failed = find_runs(args.dirs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs and not failed:
        print(
            f"error: no runs found under {[str(d) for d in args.dirs]} (looked for summary.json)",
            file=sys.stderr,
        )
        return 2
    header, rows = table_rows(runs, tuple(c for c in args.columns.split(",") if c))
    text = markdown(header, rows, failed)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        with args.out.with_suffix(".csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
    if args.plots:
        for path in frontier_plots(runs, args.out.parent if args.out else Path(".")):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
