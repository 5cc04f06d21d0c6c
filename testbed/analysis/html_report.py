"""`testbed-report --html`: one self-contained HTML page per report: the report's tables (the Markdown it
prints, the regime check and its notes included), and interactive figures drawn with plotly: the
utilization-vs-specialization frontiers, p(expert | domain) heatmaps (one configuration at a time, picked
from a menu) and training curves. plotly.js is inlined once, so the page works offline and can be mailed or
archived as one file.

This module only draws: testbed.analysis.report gathers the numbers (`Page`) and calls `write_page`.
Colours, markers and words follow the static figures (testbed.plots: a colour per method, a marker per
scope, abbreviations spelled out), so a configuration looks the same on paper and on screen.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from testbed.plots import (
    AXIS_LABELS,
    abbreviation_key,
    looks,
    method_legend_label,
    metric_label,
    metric_title,
    readable_label,
    spread_label,
    words,
)

PLOTLY_SYMBOLS = {
    "o": "circle",
    "s": "square",
    "^": "triangle-up",
    "v": "triangle-down",
    "D": "diamond",
    "d": "diamond-tall",
    "*": "star",
    "X": "x",
    "P": "cross",
}
"""matplotlib markers (testbed.plots) as plotly symbols."""
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"


@dataclass
class Heatmaps:
    """p(expert | domain) of one MoE layer per configuration: `panels` are (name, counts[D][E]) with the
    experts already in display order and `orders` the expert id of each column."""

    layer: str
    domains: list[str]
    panels: list[tuple[str, list[list[float]]]] = field(default_factory=list)
    orders: list[list[int]] = field(default_factory=list)


@dataclass
class Page:
    """What one report page shows: `markdown` is the report's text (tables, regime check, notes);
    `frontiers` per specialization metric the points testbed.plots.frontier_scatter draws; `heatmaps` one
    `Heatmaps` per number of experts; `curves` per metric {label: (x, mean, half-width)} with `kinds`
    (label -> method, scope, hollow) and the x axis' name."""

    title: str
    markdown: str
    frontiers: dict[str, list[dict]] = field(default_factory=dict)
    heatmaps: list[Heatmaps] = field(default_factory=list)
    curves: dict[str, dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]] = field(
        default_factory=dict
    )
    curve_kinds: dict[str, dict] = field(default_factory=dict)
    curve_seeds: dict[str, list[int]] = field(default_factory=dict)
    curve_x: str = "step"
    sources: list[str] = field(default_factory=list)


def _rgb(colour) -> str:
    r, g, b = (int(round(255 * c)) for c in colour[:3])
    return f"rgb({r},{g},{b})"


def _rgba(colour, alpha: float) -> str:
    r, g, b = (int(round(255 * c)) for c in colour[:3])
    return f"rgba({r},{g},{b},{alpha})"


def _symbol(look: Mapping) -> str:
    symbol = PLOTLY_SYMBOLS.get(str(look["marker"]), "circle")
    return f"{symbol}-open" if look["mfc"] == "none" else symbol


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 460) -> go.Figure:
    fig.update_layout(
        template="none",
        title={"text": html.escape(title), "x": 0.0, "xanchor": "left", "font": {"size": 15}},
        font={"family": FONT, "size": 12},
        height=height,
        margin={"l": 70, "r": 20, "t": 60, "b": 60},
        legend={"font": {"size": 11}},
        hoverlabel={"font": {"family": FONT}},
        paper_bgcolor="white",
        plot_bgcolor="white",
    )
    axis = {
        "showgrid": True,
        "gridcolor": "#e6e6e6",
        "zeroline": False,
        "showline": True,
        "linecolor": "#444",
    }
    fig.update_xaxes(title_text=html.escape(x), exponentformat="SI", **axis)
    fig.update_yaxes(title_text=html.escape(y), exponentformat="SI", **axis)
    return fig


def frontier_figure(points: Sequence[Mapping], metric: str) -> go.Figure:
    """Utilization vs `metric`: a trace per configuration (hover: its name, n, values with their 95% CI),
    colour per method and symbol per scope as in the static frontier; a legend group per method, named in
    words."""
    fig = go.Figure()
    point_looks = looks(points)
    seen_methods: set[str] = set()
    for p, look in zip(points, point_looks, strict=True):
        method = str(p.get("method", "none"))
        colour = _rgb(look["color"])
        label = words(readable_label(str(p.get("label", method))))
        fig.add_trace(
            go.Scatter(
                x=[p["utilization"]],
                y=[p[metric]],
                mode="markers",
                name=label,
                legendgroup=method,
                legendgrouptitle_text=None if method in seen_methods else method_legend_label(method),
                marker={
                    "symbol": _symbol(look),
                    "size": 15 if look["marker"] == "*" else 11,
                    "color": colour,
                    "line": {"color": colour, "width": 1.5},
                },
                error_x={"type": "data", "array": [p.get("xerr") or 0.0], "color": colour, "thickness": 1},
                error_y={"type": "data", "array": [p.get("yerr") or 0.0], "color": colour, "thickness": 1},
                hovertemplate=(
                    f"<b>{html.escape(label)}</b><br>n = {p.get('n', 1)}<br>utilization %{{x:.3f}} ± "
                    f"{p.get('xerr') or 0.0:.3f}<br>{html.escape(metric_title(metric))} %{{y:.3f}} ± "
                    f"{p.get('yerr') or 0.0:.3f}<extra></extra>"
                ),
            )
        )
        seen_methods.add(method)
    spread = spread_label([int(p.get("n", 1)) for p in points])
    title = f"{metric_title(metric)} vs utilization ({spread})"
    return _layout(fig, title, AXIS_LABELS["utilization"], AXIS_LABELS.get(metric, metric_label(metric)))


def heatmap_figure(maps: Heatmaps) -> go.Figure:
    """p(expert | domain) of one configuration at a time, chosen from a menu (hover: domain, expert id,
    probability)."""
    fig = go.Figure()
    vmax = max((float(np.max(counts)) for _, counts in maps.panels if np.size(counts)), default=1.0) or 1.0
    for i, ((name, probs), order) in enumerate(zip(maps.panels, maps.orders, strict=True)):
        fig.add_trace(
            go.Heatmap(
                z=probs,
                x=[f"{e}" for e in order],
                y=list(maps.domains),
                zmin=0.0,
                zmax=vmax,
                colorscale="Blues",
                visible=i == 0,
                colorbar={"title": {"text": "p(expert | domain)", "side": "right"}},
                hovertemplate="domain %{y}<br>expert %{x}<br>p = %{z:.3f}<extra></extra>",
                name=name,
            )
        )
    buttons = [
        {
            "label": name,
            "method": "update",
            "args": [
                {"visible": [j == i for j in range(len(maps.panels))]},
                {"title.text": html.escape(f"p(expert | domain), {maps.layer}: {name}")},
            ],
        }
        for i, (name, _) in enumerate(maps.panels)
    ]
    first = maps.panels[0][0] if maps.panels else ""
    _layout(
        fig,
        f"p(expert | domain), {maps.layer}: {first}",
        "expert (grouped by the oracle's blocks)",
        "domain",
        height=140 + 34 * len(maps.domains),
    )
    fig.update_layout(
        updatemenus=[
            {
                "buttons": buttons,
                "direction": "down",
                "x": 1.0,
                "xanchor": "right",
                "y": 1.16,
                "yanchor": "top",
            }
        ],
        margin={"t": 90},
    )
    fig.update_xaxes(type="category", showgrid=False)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    return fig


def curve_figure(page: Page, metric: str) -> go.Figure:
    """`metric` over training: a line per configuration (its look from testbed.plots), the 95% CI over
    seeds as a band."""
    series = page.curves[metric]
    fig = go.Figure()
    keys = list(series)
    styles = dict(zip(keys, looks([page.curve_kinds.get(k, {"method": k}) for k in keys]), strict=True))
    dashes = {":": "dot", "--": "dash", "-": "solid"}
    for key in keys:
        xs, mean, half = (np.asarray(v, dtype=float) for v in series[key])
        look = styles[key]
        colour = look["color"]
        name = words(readable_label(key))
        if np.any(half > 0):
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([xs, xs[::-1]]),
                    y=np.concatenate([mean + half, (mean - half)[::-1]]),
                    fill="toself",
                    fillcolor=_rgba(colour, 0.15),
                    line={"width": 0},
                    hoverinfo="skip",
                    showlegend=False,
                    legendgroup=name,
                )
            )
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=mean,
                mode="lines+markers",
                name=name,
                legendgroup=name,
                line={"color": _rgb(colour), "dash": dashes.get(look["ls"], "dashdot"), "width": 2},
                marker={"symbol": _symbol(look), "size": 6, "color": _rgb(colour), "maxdisplayed": 8},
                hovertemplate=f"<b>{html.escape(name)}</b><br>%{{x}}: %{{y:.4f}}<extra></extra>",
            )
        )
    x_name = "training tokens" if page.curve_x == "tokens" else "step"
    spread = spread_label(page.curve_seeds.get(metric, [1]))
    return _layout(fig, f"{metric_title(metric)} over training ({spread})", x_name, metric_label(metric))


def markdown_html(text: str) -> str:
    """The report's Markdown as HTML: tables (a header row, a rule, rows), paragraphs, '- ' lists, **bold**
    and `code` (everything else escaped: this is the report's own text, not arbitrary Markdown)."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        if line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _table(rows: list[str]) -> str:
    header, body = _cells(rows[0]), [_cells(r) for r in rows[1:] if not re.fullmatch(r"\|(-+\|)+", r.strip())]
    head = "".join(f"<th>{_inline(c)}</th>" for c in header)
    lines = ["".join(f"<td>{_inline(c)}</td>" for c in cells) for cells in body]
    return (
        '<div class="table"><table><thead><tr>'
        + head
        + "</tr></thead><tbody>"
        + "".join(f"<tr>{line}</tr>" for line in lines)
        + "</tbody></table></div>"
    )


def _inline(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


STYLE_SHEET = """
body { font-family: DejaVu Sans, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.sources { color: #666; font-size: 0.85em; }
.table { overflow-x: auto; margin: 0.8em 0; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
code { background: #f3f3f3; padding: 0 0.2em; }
.figure { margin: 1em 0 2em 0; }
.key { color: #444; font-size: 0.85em; }
"""


def _figure_html(fig: go.Figure, div_id: str) -> str:
    config = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "svg"}}
    return (
        '<div class="figure">'
        + fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=config)
        + "</div>"
    )


def render(page: Page) -> str:
    """The page as one HTML document (plotly.js inlined; no request leaves it)."""
    parts = [f"<h1>{html.escape(page.title)}</h1>"]
    if page.sources:
        parts.append(f'<p class="sources">Runs from: {html.escape(", ".join(page.sources))}</p>')
    text = page.markdown
    if "Regime check" in text:
        table, _, rest = text.partition("Regime check")
        parts += ["<h2>Configurations</h2>", markdown_html(table), "<h2>Regime check</h2>"]
        parts.append(markdown_html("Regime check" + rest))
    else:
        parts += ["<h2>Configurations</h2>", markdown_html(text)]
    names = [p.get("label", "") for points in page.frontiers.values() for p in points]
    names += [name for maps in page.heatmaps for name, _ in maps.panels] + list(page.curve_kinds)
    key = abbreviation_key([str(n) for n in names])
    if page.frontiers:
        parts.append("<h2>Specialization vs balance</h2>")
        parts.append(
            '<p class="key">A colour per method, a marker per balancing scope (triangle: sequence, circle: '
            "micro-batch, square: global; hollow: mixed batches); error bars: 95% t intervals over seeds. "
            "Click a legend entry to hide it, double-click to show it alone."
            + (f" {html.escape(key)}." if key else "")
            + "</p>"
        )
        for i, (metric, points) in enumerate(page.frontiers.items()):
            parts.append(_figure_html(frontier_figure(points, metric), f"frontier-{i}"))
    if page.heatmaps:
        parts.append("<h2>Routing: p(expert | domain)</h2>")
        parts.append(
            '<p class="key">One configuration at a time (menu at the top right); each row is a domain, '
            "each column an expert, grouped by the oracle's blocks.</p>"
        )
        for i, maps in enumerate(page.heatmaps):
            parts.append(_figure_html(heatmap_figure(maps), f"heatmap-{i}"))
    if page.curves:
        parts.append("<h2>Over training</h2>")
        for i, metric in enumerate(page.curves):
            parts.append(_figure_html(curve_figure(page, metric), f"curve-{i}"))
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(page.title)}</title>\n<style>{STYLE_SHEET}</style>\n"
        f"<script>{get_plotlyjs()}</script>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_page(page: Page, out_path: Path) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render(page), encoding="utf-8")
    return out_path


def page_summary(page: Page) -> str:
    """A one-line JSON account of what the page holds (for logs and tests)."""
    return json.dumps(
        {
            "frontiers": list(page.frontiers),
            "heatmaps": [len(m.panels) for m in page.heatmaps],
            "curves": list(page.curves),
        }
    )
