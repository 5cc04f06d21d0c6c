"""Figures for the analysis report: domain x expert heatmaps, the utilization-vs-specialization frontier
and per-layer curves. Built on `matplotlib.figure.Figure` directly (Agg canvas, no pyplot global state)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from testbed.layout import block_sizes
from testbed.metrics.specialization import purity, reference_assignment, reference_precision

DPI = 120
MAX_COLUMNS = 4


def save_figure(fig: Figure, out_path: str | Path) -> Path:
    """Save `fig` as a PNG at DPI, creating parent directories; the canvas grows to hold legends placed
    outside the axes (they were clipped at the right edge)."""
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _finish(fig: Figure, out_path: str | Path | None) -> Figure:
    if out_path is not None:
        save_figure(fig, out_path)
    return fig


def _row_normalize(n: np.ndarray) -> np.ndarray:
    """p(e | d) = n[d, e] / sum_e n[d, e]; rows with no assignment stay zero (no division warning)."""
    rows = n.sum(axis=-1, keepdims=True)
    return np.divide(n, rows, out=np.zeros_like(n), where=rows > 0)


def _column_order(n: np.ndarray, order: str) -> np.ndarray:
    """Expert ids in display order: grouped by the oracle block each expert best fills, or plain id order."""
    num_domains, num_experts = n.shape
    if order == "id" or num_domains > num_experts:
        return np.arange(num_experts)
    return np.argsort(reference_assignment(n), kind="stable")  # stable: id order within a block


def domain_expert_heatmaps(
    counts,
    domains: Sequence[str],
    layer_names: Sequence[str],
    out_path: str | Path | None = None,
    title: str | None = None,
    order: str = "reference",
) -> Figure:
    """One panel per MoE layer showing p(e | d) from counts[L, D, E], with the oracle's block layout outlined.

    order="reference" reorders each layer's experts by `reference_assignment`, so a router that specializes
    like the oracle (under any expert ids) shows a block-diagonal picture inside the outlines.
    """
    if order not in ("reference", "id"):
        raise ValueError(f"order must be 'reference' or 'id', got {order!r}")
    n_all = np.asarray(counts, dtype=np.float64)
    if n_all.ndim == 2:
        n_all = n_all[None]
    num_layers, num_domains, num_experts = n_all.shape
    if len(domains) != num_domains or len(layer_names) != num_layers:
        raise ValueError(
            f"counts has shape {n_all.shape} but got {len(domains)} domain and {len(layer_names)} layer names"
        )
    has_layout = num_domains <= num_experts
    probs = _row_normalize(n_all)
    vmax = float(probs.max()) if probs.size and probs.max() > 0 else 1.0

    ncols = min(MAX_COLUMNS, num_layers)
    nrows = math.ceil(num_layers / ncols)
    panel_w, panel_h = 1.2 + 0.28 * num_experts, 1.2 + 0.25 * num_domains
    fig = Figure(
        figsize=(panel_w * ncols + 1.0, panel_h * nrows + (0.4 if title else 0.0)), layout="constrained"
    )
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[num_layers:]:
        fig.delaxes(ax)
    axes = axes[:num_layers]

    image = None
    for layer, ax in enumerate(axes):
        n = n_all[layer]
        cols = _column_order(n, order)
        image = ax.imshow(
            probs[layer][:, cols], cmap="Blues", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest"
        )
        ax.set_xticks(range(num_experts), [str(e) for e in cols], fontsize=6)
        ax.set_yticks(range(num_domains), list(domains), fontsize=6)
        ax.set_xlabel(
            "expert" + (" (grouped by reference block)" if order == "reference" and has_layout else ""),
            fontsize=7,
        )
        if layer % ncols == 0:
            ax.set_ylabel("domain", fontsize=7)
        if has_layout:
            stats = f"purity {purity(n):.2f} · ref. precision {reference_precision(n):.2f}"
            start = 0
            for d, size in enumerate(block_sizes(num_experts, num_domains)):
                ax.add_patch(
                    Rectangle((start - 0.5, d - 0.5), size, 1, fill=False, edgecolor="tab:red", lw=1.0)
                )
                start += size
        else:
            stats = f"purity {purity(n):.2f} · D > E: no oracle layout"
        ax.set_title(f"{layer_names[layer]}\n{stats}", fontsize=7)
    colorbar = fig.colorbar(image, ax=axes, shrink=0.9)
    colorbar.set_label("p(expert | domain)", fontsize=7)
    colorbar.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return _finish(fig, out_path)


# The Testbed paper's frontier: one marker per balancing method, one colour per balancing scope.
METHOD_MARKERS = {
    "LBL": "o",
    "EB": "s",
    "SH": "^",
    "BA": "D",
    "EC": "v",
    "oracle": "*",
    "hash": "X",
    "none": "P",
}
SCOPE_COLOURS = {"sequence": "tab:blue", "micro_batch": "tab:orange", "global": "tab:green", "": "black"}
# colours for configurations that share a method, a scope and a batch composition (X3's two top-k variants,
# X4's loss sets): distinct hues, none of them a scope's colour
VARIANT_COLOURS = [
    *("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"),
    *(matplotlib.colormaps["Dark2"].colors),
]
AXIS_LABELS = {
    "utilization": "utilization (1 = perfect balance)",
    "purity": "purity (1 = every expert serves one domain)",
    "nmi": "NMI(domain; expert)",
    "reference_precision": "reference precision (agreement with the oracle's blocks)",
    "val/loss": "validation loss (nats/token)",
    "train/loss": "training loss (nats/token)",
    "gate_entropy": "gate entropy (1 = uniform router)",
    "dead_experts": "dead experts (fraction)",
    "max_violation": "max violation (0 = perfect balance)",
    "routing_variance": "routing variance",
    "expert_overlap": "expert overlap (mean cosine)",
    "routing_change": "top-1 changes since the last validation (fraction)",
    "lbl_value": "load-balance loss value (1 = balanced)",
    "drop_rate": "dropped assignments (fraction)",
}
# metrics that are fractions in [0, 1]: their axes start at 0, never below
FRACTIONS = {
    *("utilization", "purity", "nmi", "reference_precision", "dead_experts", "drop_rate", "gate_entropy"),
    *("routing_change", "domain_isolation", "routing_specialization", "effective_rank"),
}


def metric_label(key: str) -> str:
    """A readable axis label for a metric key (spec/<m>/mean, train/spec/<m>/mean, quiz/<m>)."""
    if key in AXIS_LABELS:
        return AXIS_LABELS[key]
    name = metric_name(key)
    label = AXIS_LABELS.get(name, name.replace("_", " "))
    return f"{label}, training batch" if key.startswith("train/spec/") else label


def metric_name(key: str) -> str:
    parts = [p for p in key.split("/") if p not in ("spec", "train", "quiz", "mean", "val")]
    return parts[0] if parts else key


def _fraction_axis(ax, key: str) -> None:
    if metric_name(key) in FRACTIONS:
        low, high = ax.get_ylim()
        ax.set_ylim(0.0, max(high, 0.05))


def frontier_scatter(
    points: Sequence[Mapping],
    out_path: str | Path | None = None,
    x: str = "utilization",
    y: str = "purity",
    title: str | None = None,
) -> Figure:
    """The specialization-vs-utilization frontier with a marker per `method` and a colour per `scope`
    (a point's keys; references such as oracle and hash have scope ""). Hollow markers: mixed batches
    (`hollow`). Error bars: `xerr`/`yerr`. Two legends: methods (grey) and scopes (colours)."""
    fig = Figure(figsize=(6.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colours, variants, variant_title = _variant_colours(points)
    for p, colour in zip(points, colours, strict=True):
        marker = METHOD_MARKERS.get(p.get("method", "none"), "P")
        px, py = float(p[x]), float(p[y])
        if p.get("xerr") or p.get("yerr"):
            ax.errorbar(px, py, xerr=p.get("xerr") or 0.0, yerr=p.get("yerr") or 0.0, fmt="none",
                        ecolor=colour, alpha=0.5, elinewidth=0.8, capsize=2, zorder=2)  # fmt: skip
        face = "none" if p.get("hollow") else colour
        size = 140 if marker == "*" else 55
        ax.scatter(
            [px], [py], marker=marker, s=size, facecolors=face, edgecolors=colour, linewidths=1.2, zorder=3
        )
    methods = list(dict.fromkeys(p.get("method", "none") for p in points))
    scopes = [s for s in SCOPE_COLOURS if s and SCOPE_COLOURS[s] in colours]  # the scope colours drawn
    handles = [
        Line2D([], [], ls="", marker=METHOD_MARKERS.get(m, "P"), color="dimgray", label=m) for m in methods
    ]
    if any(p.get("hollow") for p in points):
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="dimgray", label="mixed batches"))
    first = ax.legend(handles=handles, title="method", fontsize=7, title_fontsize=7, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    if scopes:  # a second legend replaces the axes' legend: keep the first as an artist
        ax.add_artist(first)
        scope_handles = [Line2D([], [], ls="", marker="s", color=SCOPE_COLOURS[s], label=s) for s in scopes]
        ax.legend(handles=scope_handles, title="scope", fontsize=7, title_fontsize=7, loc="lower left",
                  bbox_to_anchor=(1.01, 0.0))  # fmt: skip
    if variants:
        fig.legend(handles=variants, title=variant_title, fontsize=7, title_fontsize=7,
                   loc="outside lower center", ncols=2)  # fmt: skip
    _style(ax, AXIS_LABELS.get(x, x), AXIS_LABELS.get(y, y), title, legend=False)
    return _finish(fig, out_path)


def _variant_colours(points: Sequence[Mapping]) -> tuple[list, list[Line2D], str]:
    """Each point's colour: its scope's colour, or, where several points share a method, a scope and a batch
    composition, a colour of their own each (VARIANT_COLOURS), with legend handles naming the settings that
    tell them apart (the words of their `label`s not common to all of them; prefixed by method and scope
    when several such sets exist, else named in the legend title that is returned)."""
    key = [(p.get("method", "none"), p.get("scope", ""), bool(p.get("hollow"))) for p in points]
    colours: list = [SCOPE_COLOURS.get(p.get("scope", ""), "tab:gray") for p in points]
    clashes = [k for k in dict.fromkeys(key) if key.count(k) > 1]
    handles, palette = [], itertools.cycle(VARIANT_COLOURS)
    for k in clashes:
        members = [i for i, other in enumerate(key) if other == k]
        words = [str(points[i].get("label", "")).split() for i in members]
        common = set.intersection(*(set(w) for w in words))
        prefix = f"{k[0]} {k[1] or 'no'} scope: " if len(clashes) > 1 else ""
        for i, w in zip(members, words, strict=True):
            colours[i] = next(palette)
            name = " ".join(word for word in w if word not in common) or points[i].get("label") or f"#{i}"
            face = "none" if k[2] else colours[i]
            marker = METHOD_MARKERS.get(k[0], "P")
            handles.append(
                Line2D([], [], ls="", marker=marker, mfc=face, color=colours[i], label=prefix + name)
            )
    if len(clashes) == 1:
        method, scope, hollow = clashes[0]
        title = f"{method}, {f'{scope} scope' if scope else 'no scope'}{', mixed batches' if hollow else ''}"
    else:
        title = "same method and scope"
    return colours, handles, title


def _style(ax, xlabel: str, ylabel: str, title: str | None, legend: bool) -> None:
    """Shared look of the line and scatter plots: small fonts, light grid."""
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)


def per_layer_curves(
    series: Mapping[str, Sequence[float]],
    metric: str,
    out_path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """One line per label over the layer index (e.g. gate entropy per layer, as in Chernov 2025)."""
    fig = Figure(figsize=(5.0, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for label, values in series.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=label)
    num_layers = max((len(v) for v in series.values()), default=0)
    ax.set_xticks(range(num_layers))
    _style(ax, "layer", metric_label(metric), title, legend=bool(series))
    _fraction_axis(ax, metric)
    return _finish(fig, out_path)


def training_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    metric: str,
    out_path: str | Path | None = None,
    title: str | None = None,
    x_label: str = "step",
) -> Figure:
    """One line per label over training steps (or tokens) from (x, mean, std), the spread shaded."""
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for label, (steps, mean, std) in series.items():
        steps, mean, std = (np.asarray(a, dtype=float) for a in (steps, mean, std))
        (line,) = ax.plot(steps, mean, marker="o" if len(steps) < 4 else None, markersize=3, label=label)
        if np.any(std > 0):
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
    _style(ax, x_label, metric_label(metric), title, legend=bool(series))
    _fraction_axis(ax, metric)
    if len(series) > 8:
        ax.legend(fontsize=5, ncols=2)
    return _finish(fig, out_path)


def confusion_figure(
    domains: Sequence[str], matrix: np.ndarray, out_path: str | Path | None = None, title: str | None = None
) -> Figure:
    """A confusion matrix [true, predicted] (window counts), row-normalised, each cell labelled with its
    percentage (testbed.data.distinguish)."""
    rates = _row_normalize(np.asarray(matrix, dtype=np.float64))
    size = 1.2 + 0.55 * len(domains)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xlabel("predicted domain")
    ax.set_ylabel("true domain (held-out windows)")
    for i, j in itertools.product(range(len(domains)), repeat=2):
        if rates[i, j] >= 0.0005:
            colour = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, f"{100 * rates[i, j]:.1f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true domain's windows")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _finish(fig, out_path)
