"""X8: does a lower load-balance loss value mean better balance?

    python experiments/x8_lbl_value/correlation.py multirun/x8/<date_time> [more sweep dirs...]

For every finished run with a logged `train/aux/load_balance`, pairs the mean of its last 5 logged
LBL values (the same window as testbed-report; computed at the run's own scope, on its own training
tokens) with the final validation's max_violation and utilization, and prints Spearman rank correlations
over all runs (scipy.stats.spearmanr). Runs whose summary has `spec/lbl_value/mean` (the LBL value over the
whole validation set: one token set for every run and scope) get the same correlations for that value.
"""

import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

from testbed.analysis.report import curve_of


def main(roots: list[Path]) -> None:
    points = []
    for root in roots:
        for path in sorted(root.rglob("summary.json")):
            curve = curve_of(path.parent, "train/aux/load_balance")
            if not curve:
                continue
            lbl = sum(v for _, v in sorted(curve.items())[-5:]) / len(sorted(curve.items())[-5:])
            s = json.loads(path.read_text())
            fixed = s.get("spec/lbl_value/mean")
            points.append((lbl, s["spec/max_violation/mean"], s["spec/utilization/mean"], fixed, path.parent))
    print(f"runs: {len(points)}")
    lbl = [p[0] for p in points]
    for name, index in (("max_violation", 1), ("utilization", 2)):
        rho, p = spearmanr(lbl, [q[index] for q in points])
        print(f"Spearman(LBL value at the run's scope, {name}) = {rho:.3f} (p = {p:.3g})")
    fixed = [q for q in points if q[3] is not None]
    if len(fixed) > 2:
        print(f"runs with spec/lbl_value (the LBL value on the validation set): {len(fixed)}")
        for name, index in (("max_violation", 1), ("utilization", 2)):
            rho, p = spearmanr([q[3] for q in fixed], [q[index] for q in fixed])
            print(f"Spearman(LBL value on the validation set, {name}) = {rho:.3f} (p = {p:.3g})")


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
