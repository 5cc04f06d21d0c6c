"""Token ladders (`testbed-report <dirs> --ladder`): configurations run at several lengths, each run with its
own learning-rate schedule, compared at every rung.

A run's configuration is its `run_name` (the role: `moe`, `hash`, `dense_active`, ...; an unnamed run of an
experiment grid: its sweep), its rung the number of optimizer steps it trained (`steps` in summary.json;
tokens = `tokens_seen`). At each rung the gain of a configuration over a baseline is baseline val loss - its
val loss per seed (> 0: it is better), paired by seed, with the 95% t interval over the seed pairs and the
paired t-test's p. The comparisons with the reference (hash by default) form one family per report:
Holm-adjusted p-values (testbed.analysis.inference) say which survive. The trend of the gain over the
reference is a least-squares line in log2(tokens) over every seed pair of every rung: its slope is the change
per doubling of the tokens, and where it crosses 0 is an extrapolation, reported as such and only from three
rungs on, when the slope's interval excludes 0.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from scipy import stats

from testbed.analysis.inference import ci95, holm, one_sample_p, trend
from testbed.plots import (
    DEFAULT_MARKER,
    DENSE_MARKER,
    VARIANT_DASHES,
    _shade,
    method_colour,
    method_markers,
    save_figure,
)

ROLE_LABELS = {
    "moe": "top-2 softmax + LBL",
    "lbl_micro_batch": "top-2 + LBL, micro-batch scope",
    "lbl_sequence": "top-2 + LBL, sequence scope",
    "eb": "top-2 + expert bias",
    "sinkhorn": "Sinkhorn top-2",
    "hash": "hash",
    "dense_active": "dense (active params)",
    "dense_total": "dense (total params)",
    "renorm": "top-2 + LBL, renormalised gates",
    "freeze": "top-2 + LBL, router frozen at step 300",
    "hash_start": "top-2 + LBL, hash for 300 steps first",
    "lbl_1e-3": "top-2 + LBL 1e-3",
    "init_0.1": "top-2 + LBL, router init x0.1",
    "init_10": "top-2 + LBL, router init x10",
    "fine64": "top-8 of 64 fine-grained experts",
    "hash64": "hash, 64 fine-grained experts",
    "fine64_renorm": "top-8 of 64 fine-grained experts, renormalised gates",
}
"""Legend names of the ladder's roles and mechanism runs (run_name); the learning-rate sweep's
`<role>_lr<rate>` reads "<role's name>, lr <rate>"; the scale ladder's sweeps (lbl_micro_batch, lbl_sequence,
eb, sinkhorn, hash, dense_active) by the same names; other run names are shown as they are."""
LR_SUFFIX = re.compile(r"^(?P<role>.+)_lr(?P<rate>[0-9.e+-]+)$")
ROLE_METHODS = {  # the method whose colour and marker a role is drawn in (testbed/plots.py's one style)
    "moe": ("LBL", 0),
    "lbl_micro_batch": ("LBL", 0),  # the scale ladder's default router
    "lbl_sequence": ("LBL", 1),
    "eb": ("EB", 0),
    "sinkhorn": ("SH", 0),
    "hash": ("hash", 0),
    "dense_active": ("dense", 0),
    "dense_total": ("dense", 1),
    "renorm": ("LBL", 1),  # a variant of the default run: its method's colour, shaded, another dash
    "freeze": ("LBL", 2),
    "hash_start": ("LBL", 3),
}
"""role: (method, variant): variant 0 is the method's own look, higher ones a shade of its colour and a
dashed line, so that a mechanism run reads as a change to the default run."""
DENSE = ("dense_active", "dense_total")
BASELINES = ("hash", "dense_active", "dense_total")


def split_rate(role: str) -> tuple[str, str | None]:
    """(the role, its learning rate) of a `<role>_lr<rate>` run name; (role, None) for a role without one
    (a named role, such as `lbl_1e-3`, is never split)."""
    match = None if role in ROLE_LABELS else LR_SUFFIX.match(role)
    return (match["role"], match["rate"]) if match else (role, None)


def base_role(role: str) -> str:
    """The role without a learning-rate suffix: `dense_active_lr1e-2` -> `dense_active`."""
    return split_rate(role)[0]


def label(role: str) -> str:
    base, rate = split_rate(role)
    return f"{label(base)}, lr {rate}" if rate else ROLE_LABELS.get(role, role)


def role_style(role: str) -> dict:
    """Matplotlib keywords (colour, marker, line style) of a role, the same in every panel and figure."""
    base, rate = split_rate(role)
    if rate and base in ROLE_METHODS:  # a rate of a known role
        # a shade per half-decade of the rate: four neighbouring rates (1e-3 ... 3e-2) all differ
        half_decades = round(2 * math.log10(float(rate)))
        method, variant = ROLE_METHODS[base][0], 1 + half_decades % len(VARIANT_DASHES)
    else:
        method, variant = ROLE_METHODS.get(role, (role, 0))
    colour = method_colour(method)
    marker = DENSE_MARKER if method == "dense" else method_markers().get(method, DEFAULT_MARKER)
    if variant:
        return {
            "color": _shade(colour, variant),
            "marker": marker,
            "linestyle": VARIANT_DASHES[(variant - 1) % len(VARIANT_DASHES)],
        }
    return {"color": colour, "marker": marker, "linestyle": "-"}


def collect(runs: list[dict], metric: str = "val/loss", value_of=None) -> dict[str, dict[int, dict]]:
    """{role: {steps: {seed: (value, tokens, max_epochs, doc_ci95)}}} over the finished runs that record
    `metric`: a summary.json key, or whatever `value_of(run, metric)` reads (testbed-report's run_value:
    `analysis/val/loss`, the loss testbed-analyze measured). doc_ci95, the interval over validation
    documents, is the summary's and belongs to val/loss only."""
    table: dict[str, dict[int, dict]] = {}
    for run in runs:
        summary = run["summary"]
        value = value_of(run, metric) if value_of is not None else summary.get(metric)
        if not isinstance(value, int | float) or not math.isfinite(value) or summary.get("init_from"):
            continue
        role = ladder_role(run)
        steps = int(summary.get("steps") or 0)
        epochs = summary.get("regime/max_epochs")
        doc_ci95 = summary.get("val/doc_ci95") if metric == "val/loss" else None
        entry = (float(value), int(summary.get("tokens_seen") or 0), epochs, doc_ci95)
        table.setdefault(role, {}).setdefault(steps, {})[summary.get("seed")] = entry
    return table


UNNAMED_RUN = "default"
"""conf/config.yaml's run_name: the name of a run nobody named."""


def ladder_role(run: dict) -> str:
    """A run's configuration on the ladder: its run_name; for an unnamed run (run_name left at the config's
    `default`) of an experiment grid, its sweep (the scale ladder's grids name their configurations by sweep:
    `scale/tiny/runs/hash/s0/0`); else the folder above its seed folder."""
    name = run["summary"].get("run_name")
    if (not name or name == UNNAMED_RUN) and run.get("sweep"):
        return str(run["sweep"])
    return str(name or Path(run["dir"]).parent.name)


def ordered_roles(table: dict) -> list[str]:
    known = [r for r in ROLE_LABELS if r in table]
    return known + sorted(r for r in table if r not in ROLE_LABELS)


def rung_tokens(table: dict, steps: int) -> float:
    tokens = [t for role in table.values() for _, t, *_ in role.get(steps, {}).values() if t]
    return float(np.median(tokens)) if tokens else math.nan


def gains(table: dict, role: str, baseline: str, steps: int) -> list[float]:
    """baseline - role per seed both ran at this rung (> 0: role better)."""
    mine, theirs = table.get(role, {}).get(steps, {}), table.get(baseline, {}).get(steps, {})
    return [theirs[s][0] - mine[s][0] for s in sorted(mine, key=str) if s in theirs]


def _cell(mean: float, half: float, n: int, digits: int = 3, signed: bool = True) -> str:
    if n == 0:
        return ""
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text + (f" ± {half:.{digits}f}" if n > 1 else "") + f" ({n})"


def ladder_report(
    runs: list[dict],
    reference: str = "hash",
    metric: str = "val/loss",
    value_of=None,
    baselines: tuple[str, ...] = BASELINES,
) -> tuple[str, list[list], dict]:
    """(Markdown, CSV rows, figure data) of the ladder in `runs`, on `metric` (see `collect`). `baselines`:
    the run names every configuration is also compared with (a column each; the reference comes first),
    e.g. ("dense_active_lr1e-2",) for a ladder at another learning rate. A dense role (a dense baseline, at
    any rate, among them) is a baseline only, never a compared configuration."""
    table = collect(runs, metric, value_of)
    if not table:
        return f"no finished runs with {metric}", [], {}
    roles = ordered_roles(table)
    rungs = sorted({steps for role in table.values() for steps in role})
    tokens = {s: rung_tokens(table, s) for s in rungs}
    docs = (
        "[docs ±x]: the runs' mean half-width of the 95% bootstrap interval over validation documents, where "
        "recorded; "
        if metric == "val/loss"
        else ""
    )
    scored = "" if metric == "val/loss" else f"`{metric}`, "
    lines = [
        f"Validation loss ({scored}nats/token; mean ± 95% CI over seeds (n); {docs}max epochs: "
        "the most any run of the rung read a domain's training tokens):",
        "",
        "| configuration | " + " | ".join(f"{s:,} steps ({tokens[s] / 1e6:.1f}M tok)" for s in rungs) + " |",
        "|---|" + "---|" * len(rungs),
    ]
    for role in roles:
        cells = []
        for s in rungs:
            entries = list(table[role].get(s, {}).values())
            values = [v for v, *_ in entries]
            cell = _cell(*ci95(values), digits=4, signed=False) if values else ""
            documents = [d for *_, d in entries if isinstance(d, int | float)]
            if documents:  # the runs' own sampling uncertainty over validation documents (mean half-width)
                cell += f" [docs ±{np.mean(documents):.4f}]"
            cells.append(cell)
        lines.append(f"| {label(role)} | " + " | ".join(cells) + " |")
    epochs = [
        max(
            (
                e
                for role in table.values()
                for _, _, e, _ in role.get(s, {}).values()
                if isinstance(e, int | float)
            ),
            default=math.nan,
        )
        for s in rungs
    ]
    lines.append("| max epochs | " + " | ".join("" if math.isnan(e) else f"{e:.2f}" for e in epochs) + " |")

    # paired gains; the family: every configuration against the reference at every rung
    rows, csv_rows = (
        [],
        [["steps", "tokens", "configuration", "baseline", "gain_mean", "ci95_half", "n", "p", "p_holm"]],
    )
    baselines = (reference, *(b for b in baselines if b != reference))
    dense_baselines = {b for b in baselines if base_role(b) in DENSE}
    for s in rungs:
        for role in roles:
            for baseline in baselines:
                if role == baseline or role in DENSE or role in dense_baselines:
                    continue
                diffs = gains(table, role, baseline, s)
                if not diffs:
                    continue
                mean, half, n = ci95(diffs)
                rows.append(
                    {
                        "steps": s,
                        "role": role,
                        "baseline": baseline,
                        "mean": mean,
                        "half": half,
                        "n": n,
                        "p": one_sample_p(diffs),
                        "diffs": diffs,
                    }
                )
    family = [r for r in rows if r["baseline"] == reference]
    for r, adjusted in zip(family, holm([r["p"] for r in family]), strict=True):
        r["p_holm"] = adjusted
    lines += [
        "",
        f"Gains (baseline val loss - configuration val loss, > 0: the configuration is better; mean ± 95% CI "
        f"over seed pairs (n); p: paired t-test; Holm: adjusted over the {len(family)} comparisons with "
        f"{label(reference)}, the family of this report):",
        "",
        "| steps | tokens | configuration | over "
        + " | over ".join(label(b) for b in baselines)
        + f" | p vs {label(reference)} | Holm p |",
        "|---|---|---|" + "---|" * (len(baselines) + 2),
    ]
    for s in rungs:
        for role in roles:
            mine = [r for r in rows if r["steps"] == s and r["role"] == role]
            if not mine:
                continue
            cells = []
            for baseline in baselines:
                r = next((r for r in mine if r["baseline"] == baseline), None)
                cells.append(_cell(r["mean"], r["half"], r["n"]) if r else "")
            ref = next((r for r in mine if r["baseline"] == reference), None)
            p = f"{ref['p']:.3g}" if ref and math.isfinite(ref["p"]) else ""
            ph = f"{ref['p_holm']:.3g}" if ref and math.isfinite(ref.get("p_holm", math.nan)) else ""
            lines.append(
                f"| {s:,} | {tokens[s] / 1e6:.1f}M | {label(role)} | "
                + " | ".join(cells)
                + f" | {p} | {ph} |"
            )
    for r in rows:
        csv_rows.append(
            [
                r["steps"],
                int(tokens[r["steps"]]),
                r["role"],
                r["baseline"],
                f"{r['mean']:.6f}",
                f"{r['half']:.6f}",
                r["n"],
                f"{r['p']:.6g}",
                f"{r.get('p_holm', math.nan):.6g}",
            ]
        )

    # crossing and trend per configuration against the reference
    lines += [
        "",
        f"Against {label(reference)} over the ladder (trend: least squares of the per-seed gain on "
        "log2 tokens; slope = change per doubling, 95% CI):",
        "",
    ]
    dense_panel = next((b for b in baselines if base_role(b) == "dense_active"), "dense_active")
    figure = {"tokens": tokens, "rungs": rungs, "series": {}, "panels": (reference, dense_panel)}
    for role in roles:
        mine = [r for r in family if r["role"] == role]
        if not mine:
            continue
        xs = [math.log2(tokens[r["steps"]]) for r in mine for _ in r["diffs"]]
        ys = [d for r in mine for d in r["diffs"]]
        fit = trend(xs, ys)
        lines.append(f"- {label(role)}: " + crossing_sentence(mine, tokens, fit))
    for baseline in figure["panels"]:
        figure["series"][baseline] = {
            role: [
                (tokens[r["steps"]], r["mean"], r["half"], r["n"])
                for r in rows
                if r["role"] == role and r["baseline"] == baseline
            ]
            for role in roles
            if any(r["role"] == role and r["baseline"] == baseline for r in rows)
        }
    return "\n".join(lines), csv_rows, figure


def crossing_sentence(rows: list[dict], tokens: dict, fit: dict) -> str:
    """Where the gain over the reference changes sign, which rungs' intervals exclude 0, and the trend."""
    parts = []
    ahead = [r for r in rows if r["n"] > 1 and r["mean"] - r["half"] > 0]
    behind = [r for r in rows if r["n"] > 1 and r["mean"] + r["half"] < 0]
    signs = [(r["steps"], r["mean"] > 0) for r in rows]
    flips = [(a, b) for (a, sa), (b, sb) in zip(signs, signs[1:], strict=False) if sa != sb]
    if ahead:
        parts.append("ahead (CI excludes 0) at " + ", ".join(f"{r['steps']:,}" for r in ahead) + " steps")
    if behind:
        parts.append("behind (CI excludes 0) at " + ", ".join(f"{r['steps']:,}" for r in behind) + " steps")
    if flips:
        parts.append(
            "the mean gain changes sign between " + "; ".join(f"{a:,} and {b:,}" for a, b in flips) + " steps"
        )
    elif rows:
        parts.append(
            "no crossing within the ladder (the mean gain is "
            + ("positive" if rows[0]["mean"] > 0 else "negative")
            + " at every rung)"
        )
    if math.isfinite(fit["slope"]):
        text = f"trend {fit['slope']:+.4f} ± {fit['slope_half']:.4f} nats per doubling (n = {fit['n']})"
        rungs = len({r["steps"] for r in rows})
        if rungs < 3:
            text += (
                f"; over {rungs} rungs, no extrapolation (a line through two rungs says nothing of curvature)"
            )
        elif abs(fit["slope"]) > fit["slope_half"] and fit["slope"] > 0 and all(r["mean"] < 0 for r in rows):
            x0 = 2 ** fit["x0"]
            text += (
                f"; extrapolated, the line reaches 0 at about {x0 / 1e6:.3g}M tokens "
                f"({x0 / tokens[rows[-1]['steps']]:.1f}x the longest rung), an extrapolation, not a "
                "measurement"
            )
        elif abs(fit["slope"]) <= fit["slope_half"]:
            text += "; the slope's interval includes 0"
        parts.append(text)
    return "; ".join(parts) + "."


def ladder_figure(figure: dict, out_path: Path, reference: str = "hash") -> Path:
    """Two panels over tokens (log axis): the gain over the reference and over the dense model of equal
    active parameters (the report's dense-active baseline, at its rate), mean per rung with its 95% CI as a
    band (as error bars where a rung has one point)."""
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for ax, baseline in zip(axes, figure.get("panels", (reference, "dense_active")), strict=True):
        for role, points in figure["series"].get(baseline, {}).items():
            points = sorted(points)
            x = np.array([p[0] for p in points])
            mean = np.array([p[1] for p in points])
            half = np.nan_to_num(np.array([p[2] for p in points]))
            (line,) = ax.plot(x, mean, markersize=4, label=label(role), **role_style(role))
            ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.18, lw=0)
            if len(x) == 1:
                ax.errorbar(x, mean, yerr=half, color=line.get_color(), capsize=3)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xscale("log")
        rungs = sorted(t for t in figure["tokens"].values() if math.isfinite(t))
        ax.set_xticks(rungs, [f"{t / 1e6:.1f}M" for t in rungs])  # the rungs, in plain millions
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("training tokens (each rung its own schedule)")
        finish_axes(ax, f"gain over {label(baseline)} (nats/token)", f"vs {label(baseline)}: > 0 = better")
    return save_figure(fig, out_path)


def finish_axes(ax, ylabel: str, title: str, **grid) -> None:
    """The ladder figures' common finish: labels, plain y ticks (no offset), a light grid, the legend."""
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.grid(alpha=0.3, **(grid or {"which": "both"}))
    ax.legend(fontsize=8)


def config_seed_values(runs: list[dict], metric: str) -> dict[str, dict[int, float]]:
    """{configuration: {seed: value}}: the configuration of a run is its sweep (the first folder below the
    report root in an experiment grid's output), else its run_name."""
    out: dict[str, dict[int, float]] = {}
    for run in runs:
        value = run["summary"].get(metric)
        if isinstance(value, int | float) and math.isfinite(value):
            name = run.get("sweep") or str(run["summary"].get("run_name"))
            seeds = out.setdefault(name, {})
            seeds[int(run["summary"].get("seed", len(seeds)))] = float(value)
    return out


def config_values(runs: list[dict], metric: str) -> dict[str, list[float]]:
    """{configuration: [value per seed]} (`config_seed_values` without the seeds)."""
    return {name: list(seeds.values()) for name, seeds in config_seed_values(runs, metric).items()}


def rank_differences(
    a: dict[str, dict[int, float]], b: dict[str, dict[int, float]], reference: str
) -> dict[str, tuple[tuple[float, float, int], tuple[float, float, int]]]:
    """Per configuration in both scales (the reference left out): its difference from the reference, paired
    by seed, as (mean, 95% half-width, n) at the smaller and at the larger scale."""

    def paired(values: dict[str, dict[int, float]], name: str) -> tuple[float, float, int]:
        mine, theirs = values[name], values[reference]
        return ci95([mine[s] - theirs[s] for s in sorted(mine) if s in theirs])

    return {name: (paired(a, name), paired(b, name)) for name in sorted((set(a) & set(b)) - {reference})}


def rank_agreement(
    a: dict[str, list[float]], b: dict[str, list[float]], draws: int = 2000, seed: int = 0
) -> dict:
    """Spearman's rho between the configurations' mean values at two scales (the configurations both have),
    with a 95% percentile bootstrap interval: each draw resamples every configuration's seeds with
    replacement at each scale independently."""

    names = sorted(set(a) & set(b))
    if len(names) < 3:
        return {"names": names, "rho": math.nan, "low": math.nan, "high": math.nan}
    rho = float(stats.spearmanr([np.mean(a[n]) for n in names], [np.mean(b[n]) for n in names]).statistic)
    rng = np.random.default_rng(seed)
    draws_rho = []
    for _ in range(draws):
        ma = [np.mean(rng.choice(a[n], len(a[n]))) for n in names]
        mb = [np.mean(rng.choice(b[n], len(b[n]))) for n in names]
        value = stats.spearmanr(ma, mb).statistic
        if math.isfinite(value):
            draws_rho.append(value)
    low, high = np.percentile(draws_rho, [2.5, 97.5]) if draws_rho else (math.nan, math.nan)
    return {"names": names, "rho": rho, "low": float(low), "high": float(high)}


def rank_report(
    runs_a: list[dict],
    runs_b: list[dict],
    labels: tuple[str, str],
    metrics: tuple[str, ...],
    reference: str | None = None,
) -> str:
    """Per metric: each configuration's mean (and rank) at both scales; Spearman's rho with its interval,
    over all configurations and over the routed ones; with a reference configuration, every other one's
    difference from it, paired by seed, at both scales (`difference_table`)."""
    lines = []
    for metric in metrics:
        a, b = config_values(runs_a, metric), config_values(runs_b, metric)
        result = rank_agreement(a, b)
        names = result["names"]
        if not names:
            lines += [f"{metric}: no configuration in both", ""]
            continue
        rank_a = {n: r for r, n in enumerate(sorted(names, key=lambda n: np.mean(a[n])), 1)}
        rank_b = {n: r for r, n in enumerate(sorted(names, key=lambda n: np.mean(b[n])), 1)}
        lines += [
            f"{metric} (mean over seeds (n), rank 1 = lowest):",
            "",
            f"| configuration | {labels[0]} | rank | {labels[1]} | rank |",
            "|---|---|---|---|---|",
        ]
        for n in sorted(names, key=lambda n: rank_a[n]):
            lines.append(
                f"| {label(n)} | {np.mean(a[n]):.4f} ({len(a[n])}) | {rank_a[n]} | {np.mean(b[n]):.4f} "
                f"({len(b[n])}) | {rank_b[n]} |"
            )
        only = sorted(set(a) ^ set(b))
        lines += [
            "",
            f"Spearman rho over the {len(names)} configurations: {result['rho']:+.3f} (95% bootstrap "
            f"interval over seeds {result['low']:+.3f} to {result['high']:+.3f})"
            + (f"; in one scale only (left out): {', '.join(only)}" if only else ""),
        ]
        routed = {n: a[n] for n in names if not n.startswith(DENSE_PREFIX)}
        if len(routed) < len(names):
            routed_result = rank_agreement(routed, {n: b[n] for n in routed})
            lines.append(
                f"Over the {len(routed)} routed configurations (dense models left out: that they rank "
                f"last is the regime check, not a ranking of routers): {routed_result['rho']:+.3f} "
                f"({routed_result['low']:+.3f} to {routed_result['high']:+.3f})"
            )
        if reference is not None and reference in names:
            lines += ["", *difference_table(runs_a, runs_b, labels, metric, reference)]
        lines.append("")
    return "\n".join(lines).rstrip()


def scale_differences(runs_a: list[dict], runs_b: list[dict], metric: str, reference: str) -> dict:
    """`rank_differences` of two grids' runs."""
    return rank_differences(config_seed_values(runs_a, metric), config_seed_values(runs_b, metric), reference)


DENSE_PREFIX = "dense"  # configurations named dense* are the dense baselines (the ladder's and grids' names)


def difference_table(
    runs_a: list[dict], runs_b: list[dict], labels: tuple[str, str], metric: str, reference: str
) -> list[str]:
    """Markdown lines: each configuration minus the reference, paired by seed, at both scales, and whether
    the sign is the same (a difference whose interval includes 0 at either scale is not a sign to compare)."""
    diffs = scale_differences(runs_a, runs_b, metric, reference)
    lines = [
        f"{metric} minus {label(reference)}'s, paired by seed (mean ± 95% CI (pairs)):",
        "",
        f"| configuration | {labels[0]} | {labels[1]} | same sign, both intervals excluding 0 |",
        "|---|---|---|---|",
    ]
    for name, cells in sorted(diffs.items(), key=lambda item: item[1][0][0]):
        excluded = [math.isfinite(h) and abs(m) > h for m, h, _ in cells]
        verdict = "n/a (an interval includes 0)"
        if all(excluded):
            verdict = "yes" if np.sign(cells[0][0]) == np.sign(cells[1][0]) else "no: reversed"
        cols = " | ".join(_cell(m, h, n, digits=4) for m, h, n in cells)
        lines.append(f"| {label(name)} | {cols} | {verdict} |")
    return lines


def rank_figure(
    runs_a: list[dict],
    runs_b: list[dict],
    labels: tuple[str, str],
    metric: str,
    reference: str,
    out_path: Path,
) -> Path:
    """Each configuration's difference from the reference (paired by seed, 95% CI as error bars) at the two
    scales side by side, configurations in the order of the smaller scale's differences."""
    diffs = scale_differences(runs_a, runs_b, metric, reference)
    names = sorted(diffs, key=lambda n: diffs[n][0][0])
    fig = Figure(figsize=(max(4.5, 1.1 * len(names) + 1.5), 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    for i, (scale, marker) in enumerate(zip(labels, ("o", "s"), strict=True)):
        mean = np.array([diffs[n][i][0] for n in names])
        half = np.nan_to_num(np.array([diffs[n][i][1] for n in names]))
        ax.errorbar(x + (i - 0.5) * 0.25, mean, yerr=half, fmt=marker, capsize=3, markersize=5, label=scale)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x, [label(n) for n in names], rotation=20, ha="right", fontsize=8)
    title = f"difference from {label(reference)} (paired by seed, 95% CI); < 0 = lower"
    finish_axes(ax, f"{metric} difference", title, axis="y")
    return save_figure(fig, out_path)
