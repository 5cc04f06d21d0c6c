"""X1 figure: specialization and utilization against balancing scope, one line per method x batch
composition, one column per mix (mean ± std over seeds, from testbed-report's CSV).

    python experiments/x1_scope/old_scale/plot_scope.py experiments/x1_scope/old_scale/report.csv experiments/x1_scope/old_scale/scope.png
"""

import csv
import sys

from matplotlib.figure import Figure

SCOPES = ("sequence", "micro_batch", "global")
METHODS = {"lbl": "LBL", "eb": "EB", "sinkhorn": "SH"}
METRICS = ("spec/purity/mean", "spec/nmi/mean", "spec/utilization/mean")


def main(csv_path: str, out: str) -> None:
    rows = list(csv.DictReader(open(csv_path)))
    fig = Figure(figsize=(9, 8), layout="constrained")
    axes = fig.subplots(len(METRICS), 2, sharex=True)
    for col, mix in enumerate(("shipped", "languages")):
        refs = {r["router"]: r for r in rows if r["sweep"] == "references" and r["data"] == mix}
        for row, metric in enumerate(METRICS):
            ax = axes[row][col]
            for sweep, name in METHODS.items():
                for comp, style in (("mixed", "-"), ("homogeneous", "--")):
                    picked = [
                        next(
                            r
                            for r in rows
                            if r["sweep"] == sweep
                            and r["data"] == mix
                            and r["data.batch_composition"] == comp
                            and (r.get("balance.scope") or r.get("router.scope")) == scope
                        )
                        for scope in SCOPES
                    ]
                    means = [float(r[f"{metric}:mean"]) for r in picked]
                    stds = [float(r[f"{metric}:std"]) for r in picked]
                    ax.errorbar(
                        range(3),
                        means,
                        yerr=stds,
                        ls=style,
                        marker="o",
                        ms=3,
                        capsize=2,
                        label=f"{name} {comp}",
                    )
            if metric != "spec/utilization/mean":
                ax.axhline(float(refs["hash"][f"{metric}:mean"]), color="gray", lw=0.8, ls=":", label="hash")
            ax.set_title(
                f"{mix} mix: {metric.split('/')[1]} (oracle = {float(refs['oracle'][f'{metric}:mean']):.3f})",
                fontsize=8,
            )
            ax.set_xticks(range(3), SCOPES, fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncols=2)
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
