"""Figures for the analysis report: domain x expert heatmaps, the utilization-vs-specialization frontier
and per-layer curves. Built on `matplotlib.figure.Figure` directly (Agg canvas, no pyplot global state)."""

from __future__ import annotations

import itertools
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, ScalarFormatter
from scipy import stats

from testbed.layout import block_sizes
from testbed.losses import BALANCE
from testbed.metrics.specialization import purity, reference_assignment, reference_precision
from testbed.registry import label_of
from testbed.routing import ROUTERS
from testbed.scope import SCOPES

DPI = 120
MAX_COLUMNS = 4
MIN_FONT = 7  # points at the saved size: the smallest text of any figure


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
    """One panel per MoE layer (or configuration) showing p(e | d) from counts[L, D, E], with the oracle's
    block layout outlined; at most MAX_COLUMNS panels a row, every text at least MIN_FONT points at the saved
    size (the panels are sized for that: a figure that stays readable at page width).

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
    # an expert's column holds a rotated MIN_FONT tick label (0.1 in); more than 24 experts: every k-th label
    step = max(1, math.ceil(num_experts / 24))
    axis_w = max(1.1, min(0.1 * num_experts / step, 2.4))
    axis_h = max(0.8, 0.15 * num_domains)
    label_w = 0.1 + 0.055 * max((len(str(d)) for d in domains), default=1)
    title_lines = max(len(_wrap(str(name), axis_w).splitlines()) for name in layer_names) + 1
    fig = Figure(
        figsize=(
            label_w + ncols * (axis_w + 0.2) + 0.9,
            nrows * (axis_h + 0.45 + 0.14 * title_lines) + 0.35 + (0.3 if title else 0.0),
        ),
        layout="constrained",
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
        labels = [str(e) if i % step == 0 else "" for i, e in enumerate(cols)]
        ax.set_xticks(range(num_experts), labels, fontsize=MIN_FONT, rotation=90)
        ax.tick_params(length=2, pad=1)
        if layer % ncols == 0:
            ax.set_yticks(range(num_domains), list(domains), fontsize=MIN_FONT)
        else:
            ax.set_yticks(range(num_domains), [])
        if has_layout:
            scores = f"purity {purity(n):.2f} · ref. {reference_precision(n):.2f}"
            start = 0
            for d, size in enumerate(block_sizes(num_experts, num_domains)):
                ax.add_patch(
                    Rectangle((start - 0.5, d - 0.5), size, 1, fill=False, edgecolor="tab:red", lw=0.8)
                )
                start += size
        else:
            scores = f"purity {purity(n):.2f} · no oracle layout (D > E)"
        ax.set_title(f"{_wrap(str(layer_names[layer]), axis_w)}\n{scores}", fontsize=MIN_FONT, pad=3)
    fig.supxlabel(
        "expert"
        + (" (grouped by the oracle's blocks, outlined)" if order == "reference" and has_layout else ""),
        fontsize=MIN_FONT + 1,
    )
    colorbar = fig.colorbar(image, ax=axes, shrink=0.9 if nrows > 1 else 1.0, aspect=25)
    colorbar.set_label("p(expert | domain)", fontsize=MIN_FONT + 1)
    colorbar.ax.tick_params(labelsize=MIN_FONT)
    if title:
        suffix = "; ref. = reference precision" if has_layout else ""
        fig.suptitle(title + suffix, fontsize=MIN_FONT + 2)
    return _finish(fig, out_path)


def _wrap(text: str, width_in: float) -> str:
    """`text` broken at spaces into lines that fit `width_in` inches at MIN_FONT points."""
    return textwrap.fill(text, width=max(12, int(width_in * 72 / (0.5 * MIN_FONT))), break_long_words=False)


# The Testbed paper's frontier: one marker per balancing method, one colour per balancing scope.
DEFAULT_MARKER = "P"  # a method without a marker of its own (no balancing, an unregistered name)


def method_markers() -> dict[str, str]:
    """Each balancing method's marker, by the name reports give it ("LBL": "o", "SH": "^", "oracle": "*"):
    the `marker` class attribute of every registered router and balancing method that has one."""
    classes = [cls for registry in (ROUTERS, BALANCE) for _, (cls, _) in registry.items()]
    return {label_of(cls): cls.marker for cls in classes if cls.marker and label_of(cls)}


def off_scale_methods() -> set[str]:
    """References drawn off the axes' scale (marked at its edge) so that they do not set the axis: the
    routers that are an upper reference (Router.reference "upper": the oracle)."""
    return {label_of(cls) for _, (cls, _) in ROUTERS.items() if cls.reference == "upper"}


SCOPE_COLOURS = {**dict(zip(SCOPES, ("tab:blue", "tab:orange", "tab:green"), strict=True)), "": "black"}
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
    "train/aux/load_balance": "load-balance loss, training batch (1 = balanced)",
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


def t_interval(values, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, half-width of the 95% t confidence interval) over `axis` (the seeds):
    t_{0.975, n-1} * sd / sqrt(n), sd the sample standard deviation (ddof=1); half-width 0 for n < 2 (one
    seed: no interval, no band)."""
    data = np.asarray(values, dtype=np.float64)
    mean = data.mean(axis=axis)
    n = data.shape[axis]
    if n < 2:
        return mean, np.zeros_like(mean)
    return mean, stats.t.ppf(0.975, n - 1) * data.std(axis=axis, ddof=1) / math.sqrt(n)


def spread_label(n: int | Sequence[int]) -> str:
    """What an error bar or band shows, for titles: 'mean ± 95% CI over n = 3 seeds' (n the seed counts)."""
    counts = sorted({int(c) for c in ([n] if isinstance(n, int | np.integer) else n)})
    if not counts or counts[-1] < 2:
        return "one seed, no interval"
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"mean ± 95% CI over n = {seeds} seeds"


SETTING_WORDS = {"coefficient": "coef.", "capacity_factor": "cf", "eval_balanced": "balanced eval"}
TRUE_WORDS = {"renormalize": "renormalized", "eval_balanced": "balanced eval"}


def readable_setting(key: str, value: str) -> str:
    """One Hydra override as legend words without '=': renormalize=true -> renormalized,
    data.batch_composition=mixed -> mixed batches, aux_loss=[z_loss,variance] -> z_loss+variance,
    balance.coefficient=0.01 -> coef. 0.01, model.moe.capacity_factor=null -> dropless."""
    name, value = key.rpartition(".")[2], str(value).rpartition("/")[2]
    if name == "batch_composition":
        return f"{value} batches"
    if name == "capacity_factor" and value.lower() in ("null", "none"):
        return "dropless"
    if value.lower() == "true":
        return TRUE_WORDS.get(name, name)
    if value.lower() == "false":
        return f"no {name}"
    if value.startswith("[") and value.endswith("]"):
        items = [v.strip() for v in value[1:-1].split(",") if v.strip()]
        joined = "+".join(items) or "none"
        return joined if name in ("aux_loss", "experts") else f"{name.replace('_', ' ')}: {joined}"
    if name in ("scope", "router", "balance", "model", "sweep"):
        return value
    return f"{SETTING_WORDS.get(name, name.replace('_', ' '))} {value}"


def readable_label(label: str) -> str:
    """A legend label with every 'key=value' word rewritten by `readable_setting` (no raw overrides)."""
    words = [readable_setting(*w.split("=", 1)) if "=" in w else w for w in str(label).split()]
    return " ".join(w for w in words if w).replace("=", " ")


def frontier_scatter(
    points: Sequence[Mapping],
    out_path: str | Path | None = None,
    x: str = "utilization",
    y: str = "purity",
    title: str | None = None,
) -> Figure:
    """The specialization-vs-utilization frontier with a marker per `method` and a colour per `scope`
    (a point's keys; references such as oracle and hash have scope ""). Hollow markers: mixed batches
    (`hollow`). Error bars: `xerr`/`yerr` (the report: 95% CI half-widths). Two legends: methods (grey) and
    scopes (colours). The y axis spans the other points; an oracle outside that span is marked at the
    axes' edge with its value ("oracle: 1.00") instead of squashing them into a strip."""
    fig = Figure(figsize=(6.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    markers, off_scale = method_markers(), off_scale_methods()
    colours, variants, variant_title = _variant_colours(points, markers)
    limits = _frontier_limits(points, y, off_scale)
    for p, colour in zip(points, colours, strict=True):
        marker = markers.get(p.get("method", "none"), DEFAULT_MARKER)
        px, py = float(p[x]), float(p[y])
        face = "none" if p.get("hollow") else colour
        size = 140 if marker == "*" else 55
        if limits and p.get("method") in off_scale and not limits[0] <= py <= limits[1]:
            _mark_off_scale(ax, p.get("method"), px, py, limits, marker, size, face, colour)
            continue
        if p.get("xerr") or p.get("yerr"):
            ax.errorbar(px, py, xerr=p.get("xerr") or 0.0, yerr=p.get("yerr") or 0.0, fmt="none",
                        ecolor=colour, alpha=0.6, elinewidth=0.8, capsize=2, zorder=2)  # fmt: skip
        ax.scatter(
            [px], [py], marker=marker, s=size, facecolors=face, edgecolors=colour, linewidths=1.2, zorder=3
        )
    if limits:
        ax.set_ylim(*limits)
    methods = list(dict.fromkeys(p.get("method", "none") for p in points))
    scopes = [s for s in SCOPE_COLOURS if s and SCOPE_COLOURS[s] in colours]  # the scope colours drawn
    handles = [
        Line2D([], [], ls="", marker=markers.get(m, DEFAULT_MARKER), color="dimgray", label=m)
        for m in methods
    ]
    if any(p.get("hollow") for p in points):
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="dimgray", label="mixed batches"))
    first = ax.legend(handles=handles, title="method", fontsize=MIN_FONT, title_fontsize=MIN_FONT + 1,
                      loc="upper left", bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    if scopes:  # a second legend replaces the axes' legend: keep the first as an artist
        ax.add_artist(first)
        scope_handles = [Line2D([], [], ls="", marker="s", color=SCOPE_COLOURS[s], label=s) for s in scopes]
        ax.legend(handles=scope_handles, title="scope", fontsize=MIN_FONT, title_fontsize=MIN_FONT + 1,
                  loc="lower left", bbox_to_anchor=(1.01, 0.0))  # fmt: skip
    if variants:
        fig.legend(handles=variants, title=variant_title, fontsize=MIN_FONT, title_fontsize=MIN_FONT + 1,
                   loc="outside lower center", ncols=2)  # fmt: skip
    _style(ax, AXIS_LABELS.get(x, x), AXIS_LABELS.get(y, y), title, legend=False)
    if title and limits and any(p.get("method") in off_scale and float(p[y]) > limits[1] for p in points):
        ax.set_title(title, fontsize=MIN_FONT + 2, pad=12)  # above the marker on the top edge
    return _finish(fig, out_path)


def _frontier_limits(points: Sequence[Mapping], y: str, off_scale: set[str]) -> tuple[float, float] | None:
    """The y range of the points that are not `off_scale` references (error bars included, a margin
    around, headroom at the top for an off-scale mark; never below 0 for a fraction); None when no reference
    lies outside it (the axes scale themselves)."""
    others = [p for p in points if p.get("method") not in off_scale]
    references = [float(p[y]) for p in points if p.get("method") in off_scale]
    if not others or not references:
        return None
    low = min(float(p[y]) - float(p.get("yerr") or 0.0) for p in others)
    high = max(float(p[y]) + float(p.get("yerr") or 0.0) for p in others)
    span = max(high - low, 0.05 * max(abs(high), 1e-3))
    above, below = (
        any(r > high + 0.25 * span for r in references),
        any(r < low - 0.25 * span for r in references),
    )
    if not (above or below):
        return None
    bottom, top = low - (0.25 if below else 0.1) * span, high + (0.25 if above else 0.1) * span
    if metric_name(y) in FRACTIONS:
        bottom = max(bottom, 0.0)
    return bottom, top


def _mark_off_scale(ax, name, px, py, limits, marker, size, face, colour) -> None:
    """A reference beyond the y axis: its marker on the axes' edge (top or bottom) and, beside it, its value
    with an arrow pointing off the scale ("oracle: 1.00 ↑")."""
    top = py > limits[1]
    edge = limits[1] if top else limits[0]
    ax.scatter([px], [edge], marker=marker, s=size, facecolors=face, edgecolors=colour, linewidths=1.2,
               zorder=4, clip_on=False)  # fmt: skip
    ax.annotate(
        f"{name}: {py:.2f} {'↑' if top else '↓'}",
        xy=(px, edge),
        xytext=(-9, -4 if top else 4),
        textcoords="offset points",
        ha="right",
        va="top" if top else "bottom",
        fontsize=MIN_FONT + 1,
        annotation_clip=False,
    )


def _variant_colours(points: Sequence[Mapping], markers: Mapping[str, str]) -> tuple[list, list[Line2D], str]:
    """Each point's colour: its scope's colour, or, where several points share a method, a scope and a batch
    composition, a colour of their own each (VARIANT_COLOURS), with legend handles naming the settings that
    tell them apart (the parts of their `label`s not common to all of them: comma-separated parts and a
    trailing "(...)", or words when no label has a comma; written without '='; prefixed by method and scope
    when several such sets exist, else named in the legend title that is returned)."""
    key = [(p.get("method", "none"), p.get("scope", ""), bool(p.get("hollow"))) for p in points]
    colours: list = [SCOPE_COLOURS.get(p.get("scope", ""), "tab:gray") for p in points]
    clashes = [k for k in dict.fromkeys(key) if key.count(k) > 1]
    handles, palette = [], itertools.cycle(VARIANT_COLOURS)
    for k in clashes:
        members = [i for i, other in enumerate(key) if other == k]
        labels = [str(points[i].get("label", "")) for i in members]
        if any("," in t for t in labels):  # "LBL, micro_batch, mixed batches (x6_dbes)": parts and "(...)"
            parts = [[_unparenthesize(w) for w in re.split(r",|\s(?=\()", t) if w.strip()] for t in labels]
            joiner = ", "
        else:
            parts, joiner = [t.split() for t in labels], " "
        common = set.intersection(*(set(w) for w in parts))
        prefix = f"{k[0]} {k[1] or 'no'} scope: " if len(clashes) > 1 else ""
        for i, w in zip(members, parts, strict=True):
            colours[i] = next(palette)
            name = joiner.join(part for part in w if part not in common) or points[i].get("label") or f"#{i}"
            face = "none" if k[2] else colours[i]
            marker = markers.get(k[0], DEFAULT_MARKER)
            handles.append(
                Line2D(
                    [],
                    [],
                    ls="",
                    marker=marker,
                    mfc=face,
                    color=colours[i],
                    label=readable_label(prefix + name),
                )
            )
    if len(clashes) == 1:
        method, scope, hollow = clashes[0]
        title = f"{method}, {f'{scope} scope' if scope else 'no scope'}{', mixed batches' if hollow else ''}"
    else:
        title = "same method and scope"
    return colours, handles, title


def _unparenthesize(part: str) -> str:
    part = part.strip()
    return part[1:-1] if part.startswith("(") and part.endswith(")") else part


def _style(ax, xlabel: str, ylabel: str, title: str | None, legend: bool) -> None:
    """Shared look of the line and scatter plots: fonts of at least MIN_FONT points, light grid, plain tick
    numbers (no offset such as '+4.4' or factor such as '1e6' in an axis corner)."""
    ax.set_xlabel(xlabel, fontsize=MIN_FONT + 1)
    ax.set_ylabel(ylabel, fontsize=MIN_FONT + 1)
    ax.tick_params(labelsize=MIN_FONT)
    for axis in (ax.xaxis, ax.yaxis):
        formatter = axis.get_major_formatter()
        if type(formatter) is ScalarFormatter:
            formatter.set_useOffset(False)
            formatter.set_scientific(False)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=MIN_FONT)
    if title:
        ax.set_title(title, fontsize=MIN_FONT + 2)


LINE_STYLES = ("-", "--", ":", "-.")


def _line_style(i: int) -> dict:
    """The i-th series' colour and dash: ten colours, then the same ten dashed, dotted, ..."""
    colours = matplotlib.colormaps["tab10"].colors
    return {"color": colours[i % len(colours)], "ls": LINE_STYLES[(i // len(colours)) % len(LINE_STYLES)]}


def _legend_columns(count: int) -> int:
    return 1 if count <= 5 else 2 if count <= 8 else 3


def _legend_height(count: int) -> float:
    """Inches a legend of `count` entries below the axes takes (none up to 5 entries: inside the axes)."""
    return 0.0 if count <= 5 else 0.3 + 0.16 * math.ceil(count / _legend_columns(count))


def _legend(fig: Figure, ax, count: int) -> None:
    """Up to 5 series: a legend inside the axes; more: below the axes in columns (never over the data or
    the title)."""
    if count == 0:
        return
    if count <= 5:
        ax.legend(fontsize=MIN_FONT)
    else:
        fig.legend(*ax.get_legend_handles_labels(), fontsize=MIN_FONT, loc="outside lower center",
                   ncols=_legend_columns(count))  # fmt: skip


def per_layer_curves(
    series: Mapping[str, Sequence[float]],
    metric: str,
    out_path: str | Path | None = None,
    title: str | None = None,
    bands: Mapping[str, Sequence[float]] | None = None,
) -> Figure:
    """One line per label over the layer index (e.g. gate entropy per layer, as in Chernov 2025); `bands`
    (label -> half-width per layer, e.g. the 95% CI over seeds) shaded around the lines that have one."""
    fig = Figure(figsize=(5.0, 3.5 + _legend_height(len(series))), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, values) in enumerate(series.items()):
        layers = np.arange(len(values))
        style = _line_style(i)
        ax.plot(layers, values, marker="o", markersize=3, label=readable_label(label), **style)
        half = np.asarray((bands or {}).get(label, np.zeros(len(values))), dtype=np.float64)
        if np.any(half > 0):
            mean = np.asarray(values, dtype=np.float64)
            ax.fill_between(layers, mean - half, mean + half, color=style["color"], alpha=0.15, lw=0)
    num_layers = max((len(v) for v in series.values()), default=0)
    ax.set_xticks(range(num_layers))
    _style(ax, "layer", metric_label(metric), title, legend=False)
    _legend(fig, ax, len(series))
    _fraction_axis(ax, metric)
    return _finish(fig, out_path)


def by_construction(metric: str, mean: Sequence[float], half: Sequence[float] | None = None) -> bool:
    """A training-batch purity series that is 1.0 at every point with no spread: a single-domain batch (or
    the oracle's routing) makes every expert's tokens one domain's, so it is 1.0 by construction, not a
    result."""
    if metric_name(metric) != "purity" or not metric.startswith("train/"):
        return False
    mean = np.asarray(mean, dtype=np.float64)
    spread = np.zeros_like(mean) if half is None else np.asarray(half, dtype=np.float64)
    return mean.size > 0 and bool(np.all(np.abs(mean - 1.0) < 1e-6) and np.all(np.abs(spread) < 1e-6))


def training_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    metric: str,
    out_path: str | Path | None = None,
    title: str | None = None,
    x_label: str = "step",
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """One line per series over training steps (or tokens) from (x, mean, half-width): the band is
    mean ± half-width (the report passes the 95% CI over seeds; zero: no band). `labels` renames series in
    the legend (else their keys, written without '='). Training-batch purity series that are 1.0 by
    construction (`by_construction`) are left out, with a footnote counting them. Token axes (an x label
    naming tokens, values past 1e5) are written in millions: 'training tokens (M)'."""
    kept = {k: v for k, v in series.items() if not by_construction(metric, v[1], v[2])}
    omitted = [(labels or {}).get(k) or readable_label(k) for k in series if k not in kept]
    fig = Figure(figsize=(5.5, 3.5 + _legend_height(len(kept))), layout="constrained")
    ax = fig.add_subplot()
    for i, (key, (steps, mean, half)) in enumerate(kept.items()):
        steps, mean, half = (np.asarray(a, dtype=float) for a in (steps, mean, half))
        label = (labels or {}).get(key) or readable_label(key)
        style = _line_style(i)
        ax.plot(steps, mean, marker="o" if len(steps) < 4 else None, markersize=3, label=label, **style)
        if np.any(half > 0):
            ax.fill_between(steps, mean - half, mean + half, color=style["color"], alpha=0.15, lw=0)
    xs = [float(v) for steps, _, _ in series.values() for v in steps]
    if "token" in x_label and xs and max(map(abs, xs)) >= 1e5:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}"))
        x_label = f"{x_label} (M)"
    _style(ax, x_label, metric_label(metric), title, legend=False)
    _legend(fig, ax, len(kept))
    if omitted:
        names = (
            f": {', '.join(omitted)}" if len(omitted) <= 3 else " (single-domain batches or oracle routing)"
        )
        note = f"{len(omitted)} line{'s' if len(omitted) > 1 else ''} omitted, 1.0 by construction{names}"
        if not kept:
            if xs and min(xs) < max(xs):
                ax.set_xlim(min(xs), max(xs))  # the span the omitted lines had
            empty = "every line is 1.0 by construction: nothing to show"
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", fontsize=MIN_FONT + 1)
        ax.annotate(
            note,
            xy=(0.0, 0.0),
            xycoords="axes fraction",
            xytext=(0, -34),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=MIN_FONT,
            style="italic",
            annotation_clip=False,
        )
    _fraction_axis(ax, metric)
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
