"""Figures for the analysis report: domain x expert heatmaps, the utilization-vs-specialization frontier,
per-layer values and training curves. Built on `matplotlib.figure.Figure` directly (Agg canvas, no pyplot
global state).

One style for every figure, set here:
- `STYLE`: the matplotlib settings (fonts of at least MIN_FONT points at the saved size, plain tick
  numbers, print resolution), applied by `styled` while a figure is drawn and saved;
- a colour per router or balancing method (`method_colours`, in registry order: the classes of
  testbed.routing.ROUTERS and testbed.losses.BALANCE carry `label` and `marker`) and a marker per balancing
  scope (`SCOPE_MARKERS`; a method without a scope keeps its class's own marker: the oracle's star, hash's
  x), the same in every figure; configurations that share a method and a scope get shades of its colour
  and, as lines, dashes;
- abbreviations in legends are spelled out (`method_words`, `abbreviation_key`);
- intervals are 95% t intervals over seeds (`t_interval`), never ± 1 SD;
- each figure is saved as a PNG at DPI and as a vector PDF beside it (`save_figure`).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import textwrap
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import EngFormatter, FuncFormatter, MaxNLocator, ScalarFormatter
from scipy import stats

from testbed.layout import block_sizes
from testbed.losses import BALANCE
from testbed.metrics.specialization import purity, reference_assignment, reference_precision
from testbed.registry import label_of
from testbed.routing import ROUTERS
from testbed.scope import SCOPES

DPI = 200  # PNG resolution: print quality (the PDF beside it is vector)
VECTOR = "pdf"  # the vector copy written beside every PNG
MIN_FONT = 7  # points at the saved size: the smallest text of any figure
COLUMN_WIDTH = 3.5  # inches: one column of a two-column paper (heatmap grids of up to 8 panels fit it)
TEXT_WIDTH = 7.0  # inches: both columns (larger heatmap grids)

STYLE = {
    "font.size": MIN_FONT + 1,
    "axes.titlesize": MIN_FONT + 2,
    "axes.labelsize": MIN_FONT + 1,
    "xtick.labelsize": MIN_FONT,
    "ytick.labelsize": MIN_FONT,
    "legend.fontsize": MIN_FONT,
    "legend.title_fontsize": MIN_FONT + 1,
    "figure.titlesize": MIN_FONT + 2,
    "figure.labelsize": MIN_FONT + 1,
    "axes.formatter.useoffset": False,  # no "+4.4" in an axis corner
    "axes.formatter.limits": (-9, 9),  # no "1e6" either: large numbers get `_plain_ticks`' units
    "axes.titlepad": 4.0,
    "lines.linewidth": 1.3,
    "lines.markersize": 4.5,
    "errorbar.capsize": 2.0,
    "legend.borderaxespad": 0.4,
    "legend.handlelength": 1.8,
    "image.cmap": "Blues",
    "savefig.dpi": DPI,
    "savefig.pad_inches": 0.03,
    "pdf.fonttype": 42,  # TrueType in the PDF: its text stays text
    "svg.fonttype": "none",
}
"""Every figure's matplotlib settings, in one place (`styled` applies them)."""


def styled(function):
    """Run a figure function under STYLE (figures are built and saved inside it)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return function(*args, **kwargs)

    return wrapper


@styled
def save_figure(fig: Figure, out_path: str | Path) -> Path:
    """Save `fig` as a PNG at DPI and, beside it, a vector copy (same name, .pdf), creating parent
    directories; the canvas grows to hold legends placed outside the axes. The PDF carries no creation date,
    so a rebuilt figure that did not change is the same file."""
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=STYLE["savefig.pad_inches"])
    fig.savefig(
        path.with_suffix(f".{VECTOR}"),
        bbox_inches="tight",
        pad_inches=STYLE["savefig.pad_inches"],
        metadata={"CreationDate": None},
    )
    return path


def _finish(fig: Figure, out_path: str | Path | None) -> Figure:
    if out_path is not None:
        save_figure(fig, out_path)
    return fig


# ------------------------------------------------------------------------------------------------------
# One look per configuration: a colour per method (router or balancing method), a marker per scope

METHOD_PALETTE = (
    *("#009E73", "#CC79A7", "#999933", "#882255", "#E69F00", "#0072B2"),
    *("#56B4E9", "#D55E00", "#117733", "#332288", "#AA4499", "#44AA99"),
)
"""Colour-blind-safe hues (Okabe-Ito, Tol), handed to the learned methods in registry order."""
REFERENCE_COLOURS = {"upper": "#000000", "floor": "#7F7F7F"}  # Router.reference: the oracle, hash
DENSE = "dense"
DENSE_COLOUR, DENSE_MARKER = "#8C510A", "d"
SCOPE_MARKERS = dict(zip(SCOPES, ("^", "o", "s"), strict=True))
SCOPE_WORDS = {"micro_batch": "micro-batch"}
DEFAULT_MARKER = "P"  # a method without a scope or a marker of its own
SCOPE_DASHES = dict(zip(SCOPES, (":", "-", "--"), strict=True))  # lines: the scope's dash beside its marker
VARIANT_DASHES = ("-.", (0, (5, 1.5, 1, 1.5, 1, 1.5)), (0, (1, 1)), (0, (8, 2)))
METHOD_WORDS = {
    "load_balance": "load-balancing loss",
    "expert_bias": "expert-bias balancing",
    "sinkhorn": "Sinkhorn routing",
    "balanced_assignment": "balanced-assignment routing",
    "expert_choice": "expert-choice routing",
}
"""How a method's registry name reads in a legend where its label is an abbreviation (else: the name with
spaces)."""


def _methods() -> list[type]:
    """The registered routers and balancing methods that have a name in reports (a non-empty label)."""
    return [cls for registry in (ROUTERS, BALANCE) for _, (cls, _) in registry.items() if label_of(cls)]


def method_colours() -> dict[str, str]:
    """Each method's colour, by the name reports give it: references (Router.reference) in black and grey,
    the learned methods METHOD_PALETTE's hues in registry order (routers, then balancing methods), the dense
    baselines brown."""
    colours: dict[str, str] = {}
    learned = 0
    for cls in _methods():
        name = label_of(cls)
        if name in colours:
            continue
        reference = getattr(cls, "reference", None)
        if reference:
            colours[name] = REFERENCE_COLOURS.get(reference, "#4D4D4D")
        else:
            colours[name] = METHOD_PALETTE[learned % len(METHOD_PALETTE)]
            learned += 1
    colours[DENSE] = DENSE_COLOUR
    return colours


def method_colour(method: str) -> str:
    """`method_colours`' colour; a name no registry knows gets a palette hue fixed by the name itself."""
    colours = method_colours()
    if method in colours:
        return colours[method]
    return METHOD_PALETTE[zlib.crc32(method.encode()) % len(METHOD_PALETTE)]


def method_markers() -> dict[str, str]:
    """Each method's own marker, by the name reports give it ("oracle": "*", "hash": "X", "EC": "v"): the
    `marker` class attribute of every registered router and balancing method that has one. A configuration
    with a balancing scope is drawn with its scope's marker instead (SCOPE_MARKERS)."""
    return {label_of(cls): cls.marker for cls in _methods() if cls.marker}


def method_words() -> dict[str, str]:
    """Each abbreviated method's meaning ("LBL": "load-balancing loss", "SH": "Sinkhorn routing"): methods
    whose label is not their registry name."""
    return {
        label_of(cls): METHOD_WORDS.get(cls.registry_name, cls.registry_name.replace("_", " "))
        for cls in _methods()
        if label_of(cls) != cls.registry_name
    }


def method_legend_label(method: str) -> str:
    """A method as a legend names it: "LBL (load-balancing loss)", "oracle"."""
    words = method_words().get(method)
    return f"{method} ({words})" if words else method


def abbreviation_key(texts: Sequence[str]) -> str:
    """The key to the abbreviations `texts` use ("LBL = load-balancing loss, EB = expert-bias balancing"),
    empty if none: the key a legend or caption carries."""
    joined = " ".join(str(t) for t in texts)
    used = [
        (k, v) for k, v in method_words().items() if re.search(rf"(?<![\w-]){re.escape(k)}(?![\w-])", joined)
    ]
    return ", ".join(f"{k} = {v}" for k, v in used)


def legend_key(names: Sequence[str], kinds: Mapping[str, Mapping] | None = None, keys=None) -> str:
    """The key a line plot's legend carries: the abbreviations its names use, and what a hollow marker
    means where some series (`kinds` of `keys`) trained on mixed batches."""
    parts = [abbreviation_key(names)]
    if any((kinds or {}).get(k, {}).get("hollow") for k in (keys or [])):
        parts.append("hollow markers: mixed batches")
    return "; ".join(p for p in parts if p)


def off_scale_methods() -> set[str]:
    """References drawn off the axes' scale (marked at its edge) so that they do not set the axis: the
    routers that are an upper reference (Router.reference "upper": the oracle)."""
    return {label_of(cls) for _, (cls, _) in ROUTERS.items() if cls.reference == "upper"}


def scope_marker(method: str, scope: str) -> str:
    if scope in SCOPE_MARKERS:
        return SCOPE_MARKERS[scope]
    if method == DENSE:
        return DENSE_MARKER
    return method_markers().get(method, DEFAULT_MARKER)


def words(text: str) -> str:
    """Legend text in words: scope names as words (micro_batch -> micro-batch), no underscores."""
    for name, spelled in SCOPE_WORDS.items():
        text = text.replace(name, spelled)
    return str(text).replace("_", " ")


def _shade(colour: str, variant: int) -> tuple[float, float, float]:
    """The variant-th shade of a colour: 0 itself, then alternately darker and lighter, further each pair."""
    rgb = np.array(to_rgb(colour))
    if variant == 0:
        return tuple(rgb)
    amount = min(0.28 * ((variant + 1) // 2), 0.65)
    shaded = rgb * (1 - amount) if variant % 2 else rgb + (1 - rgb) * amount
    return tuple(float(c) for c in shaded)


def looks(kinds: Sequence[Mapping]) -> list[dict]:
    """The look of each configuration (`kinds`: dicts with `method`, `scope`, `hollow` for mixed batches):
    colour (the method's; the n-th configuration sharing a method, a scope and a composition: its n-th
    shade), marker (the scope's, else the method's), dash of a line (the scope's; for n > 0 a dash of its
    own), face colour ("none" = hollow), and `variant` (that n)."""
    seen: dict[tuple, int] = {}
    out = []
    for kind in kinds:
        method, scope = str(kind.get("method") or "none"), str(kind.get("scope") or "")
        key = (method, scope, bool(kind.get("hollow")))
        variant = seen.get(key, 0)
        seen[key] = variant + 1
        colour = _shade(method_colour(method), variant)
        out.append(
            {
                "color": colour,
                "marker": scope_marker(method, scope),
                "ls": SCOPE_DASHES.get(scope, "-") if variant == 0 else VARIANT_DASHES[(variant - 1) % 4],
                "mfc": "none" if kind.get("hollow") else colour,
                "variant": variant,
            }
        )
    return out


def _series_looks(keys: Sequence[str], kinds: Mapping[str, Mapping] | None) -> dict[str, dict]:
    """Looks of line series: from `kinds` (the report's method and scope per series), else from the key
    itself where it names a registered router or method, else a palette hue per series."""
    given = []
    for i, key in enumerate(keys):
        kind = (kinds or {}).get(key)
        if kind is None:
            cls = ROUTERS.find(str(key)) or BALANCE.find(str(key))
            name = label_of(cls) if cls is not None else ""
            kind = {"method": name or str(key) or f"series {i}"}
        given.append(kind)
    return dict(zip(keys, looks(given), strict=True))


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


def expert_probabilities(counts, order: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """(p(expert | domain) with its columns in display order, the expert id of each column) for one count
    table [D, E]: the order the heatmaps use (`order`: reference or id)."""
    n = np.asarray(counts, dtype=np.float64)
    columns = _column_order(n, order)
    return _row_normalize(n)[:, columns], columns


TICK_SPACING = 0.12  # inches between two expert tick labels (a rotated MIN_FONT label is about 0.1 in)


def _heatmap_grid(num_panels: int) -> tuple[int, float]:
    """(panels a row, figure width in inches): one column of a paper (COLUMN_WIDTH) for up to eight panels,
    one or two a row; beyond, four a row across the text width (TEXT_WIDTH), so that the grid stays
    shorter than a page. Either way every text is at least MIN_FONT points at that width."""
    if num_panels <= 8:
        return (1 if num_panels == 1 else 2), COLUMN_WIDTH
    return 4, TEXT_WIDTH


def _layer_words(name: str) -> str:
    """'layer1' -> 'layer 1' (a module name written as words)."""
    return re.sub(r"^layer(\d+)$", r"layer \1", str(name))


@styled
def domain_expert_heatmaps(
    counts,
    domains: Sequence[str],
    layer_names: Sequence[str],
    out_path: str | Path | None = None,
    title: str | None = None,
    order: str = "reference",
) -> Figure:
    """One panel per MoE layer (or configuration) showing p(e | d) from counts[L, D, E], with the oracle's
    block layout outlined, sized for a paper (`_heatmap_grid`: one column for up to eight panels, the text
    width beyond) with every text at least MIN_FONT points at that size: expert ids every k-th column so
    that labels stay TICK_SPACING apart, domain names on the first column, one horizontal colour scale
    below.

    order="reference" reorders each layer's experts by `reference_assignment`, so a router that specializes
    like the oracle (under any expert ids) shows a block-diagonal picture inside the outlines. Each panel's
    column order is kept as `ax.expert_order` (the expert id of each column).
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

    ncols, fig_w = _heatmap_grid(num_layers)
    ncols = min(ncols, num_layers)
    nrows = math.ceil(num_layers / ncols)
    label_w = 0.12 + 0.052 * max((len(str(d)) for d in domains), default=1)
    axis_w = (fig_w - label_w - 0.15 - 0.1 * (ncols - 1)) / ncols
    step = 1
    while axis_w / num_experts * step < TICK_SPACING:
        step *= 2
    axis_h = max(0.5, 0.105 * num_domains)  # a MIN_FONT domain name a row
    names = [words(_layer_words(name)) for name in layer_names]
    scores = []
    for n in n_all:
        if has_layout:
            scores.append(f"purity {purity(n):.2f} · ref. {reference_precision(n):.2f}")
        else:
            scores.append(f"purity {purity(n):.2f}, no oracle layout (D > E)")
    panel_titles = [_wrap(f"{name}\n{score}", axis_w) for name, score in zip(names, scores, strict=True)]
    title_lines = max(t.count("\n") + 1 for t in panel_titles)
    suptitle = ""
    if title:
        suptitle = _wrap(title + ("; ref. = reference precision" if has_layout else ""), fig_w, MIN_FONT + 1)
    scale = "p(expert | domain)"
    if order == "reference" and has_layout:
        scale += "; experts grouped by the oracle's blocks (outlined)"
    key = abbreviation_key(names)
    scale = _wrap(scale + (f". {key}" if key else ""), fig_w - 0.2)
    fig = Figure(
        figsize=(
            fig_w,
            nrows * (axis_h + 0.3 + 0.118 * title_lines)
            + 0.45
            + 0.12 * (scale.count("\n") + 1)
            + (0.16 * (suptitle.count("\n") + 1) if suptitle else 0.0),
        ),
        layout="constrained",
    )
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.04, hspace=0.04)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[num_layers:]:
        fig.delaxes(ax)
    axes = axes[:num_layers]

    image = None
    for layer, ax in enumerate(axes):
        n = n_all[layer]
        cols = _column_order(n, order)
        ax.expert_order = [int(e) for e in cols]
        image = ax.imshow(
            probs[layer][:, cols], cmap="Blues", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest"
        )
        shown = list(range(0, num_experts, step))
        ax.set_xticks(shown, [str(cols[i]) for i in shown], fontsize=MIN_FONT, rotation=90)
        ax.tick_params(length=2, pad=1, width=0.5)
        if layer % ncols == 0:
            ax.set_yticks(range(num_domains), [str(d) for d in domains], fontsize=MIN_FONT)
        else:
            ax.set_yticks(range(num_domains), [])
        if layer >= num_layers - ncols:
            ax.set_xlabel("expert", fontsize=MIN_FONT, labelpad=1)
        for spine in ax.spines.values():
            spine.set_linewidth(0.5)
        if has_layout:
            start = 0
            for d, size in enumerate(block_sizes(num_experts, num_domains)):
                ax.add_patch(
                    Rectangle((start - 0.5, d - 0.5), size, 1, fill=False, edgecolor="#D55E00", lw=0.7)
                )
                start += size
        ax.set_title(panel_titles[layer], fontsize=MIN_FONT, pad=2)
    colorbar = fig.colorbar(image, ax=axes, location="bottom", shrink=0.8, aspect=35, pad=0.02)
    colorbar.set_label(scale, fontsize=MIN_FONT)
    colorbar.ax.tick_params(labelsize=MIN_FONT, length=2, width=0.5)
    colorbar.outline.set_linewidth(0.5)
    if suptitle:
        fig.suptitle(suptitle, fontsize=MIN_FONT + 1)
    return _finish(fig, out_path)


def _wrap(text: str, width_in: float, points: float = MIN_FONT) -> str:
    """`text` broken at spaces into lines that fit `width_in` inches at `points` points (each line of a
    multi-line text on its own)."""
    width = max(10, int(width_in * 72 / (0.53 * points)))
    return "\n".join(
        textwrap.fill(line, width=width, break_long_words=False, break_on_hyphens=False)
        for line in text.split("\n")
    )


AXIS_LABELS = {
    "utilization": "utilization (1 = perfect balance)",
    "purity": "purity (1 = every expert serves one domain)",
    "nmi": "NMI(domain; expert)",
    "reference_precision": "reference precision (agreement with the oracle's blocks)",
    "val/loss": "validation loss (nats/token)",
    "train/loss": "training loss (nats/token)",
    "gate_entropy": "gate entropy (1 = uniform router)",
    "gate_mass": "gate mass (a token's summed gates)",
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


TITLE_WORDS = {
    "val/loss": "validation loss",
    "train/loss": "training loss",
    "train/aux/load_balance": "load-balance loss of the training batches",
}


def metric_label(key: str) -> str:
    """A readable axis label for a metric key (spec/<m>/mean, train/spec/<m>/mean, quiz/<m>)."""
    if key in AXIS_LABELS:
        return AXIS_LABELS[key]
    name = metric_name(key)
    label = AXIS_LABELS.get(name, name.replace("_", " "))
    return f"{label}, training batch" if key.startswith("train/spec/") else label


def metric_title(key: str) -> str:
    """A metric named in words for a title, without its axis note: 'validation loss', 'purity of the
    training batches', 'purity (quiz answer positions)'."""
    if key in TITLE_WORDS:
        return TITLE_WORDS[key]
    if key in AXIS_LABELS:
        return AXIS_LABELS[key].split(" (")[0]
    name = metric_name(key)
    base = AXIS_LABELS.get(name, name.replace("_", " ")).split(" (")[0]
    if key.startswith("train/spec/"):
        return f"{base} of the training batches"
    if key.startswith("quiz/"):
        return f"{base} (quiz answer positions)"
    return base


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


@styled
def frontier_scatter(
    points: Sequence[Mapping],
    out_path: str | Path | None = None,
    x: str = "utilization",
    y: str = "purity",
    title: str | None = None,
) -> Figure:
    """The specialization-vs-utilization frontier: a colour per `method` (router or balancing method,
    `method_colours`) and a marker per `scope` (SCOPE_MARKERS; references such as oracle and hash have scope
    "" and their own marker). Hollow markers: mixed batches (`hollow`). Points that share a method, a scope
    and a composition get shades of the method's colour and a legend naming the settings that tell them
    apart. Error bars: `xerr`/`yerr` (the report: 95% CI half-widths). Legends: methods in words (colours)
    and scopes (markers). The y axis spans the other points; an oracle outside that span is marked at the
    axes' edge with its value ("oracle: 1.00") instead of squashing them into a strip."""
    fig = Figure(figsize=(5.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    off_scale = off_scale_methods()
    point_looks, variants, variant_title = _variants(points)
    limits = _frontier_limits(points, y, off_scale)
    for p, look in zip(points, point_looks, strict=True):
        marker, colour, face = look["marker"], look["color"], look["mfc"]
        px, py = float(p[x]), float(p[y])
        size = 110 if marker == "*" else 40
        if limits and p.get("method") in off_scale and not limits[0] <= py <= limits[1]:
            _mark_off_scale(ax, p.get("method"), px, py, limits, marker, size, face, colour)
            continue
        if p.get("xerr") or p.get("yerr"):
            ax.errorbar(px, py, xerr=p.get("xerr") or 0.0, yerr=p.get("yerr") or 0.0, fmt="none",
                        ecolor=colour, alpha=0.7, elinewidth=0.8, capsize=2, zorder=2)  # fmt: skip
        ax.scatter(
            [px], [py], marker=marker, s=size, facecolors=face, edgecolors=colour, linewidths=1.1, zorder=3
        )
    if limits:
        ax.set_ylim(*limits)
    methods = list(dict.fromkeys(str(p.get("method", "none")) for p in points))
    scoped = {str(p.get("method", "none")) for p in points if p.get("scope") in SCOPE_MARKERS}
    handles = [
        Line2D([], [], ls="", marker=scope_marker(m, ""), ms=7 if scope_marker(m, "") == "*" else 5,
               color=method_colour(m), label=method_legend_label(m))
        if m not in scoped
        else Line2D([], [], ls="-", lw=5, color=method_colour(m), label=method_legend_label(m))
        for m in methods
    ]  # fmt: skip
    first = ax.legend(handles=handles, title="method (colour)", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    first.set_clip_on(False)  # Axes.add_artist below would clip it to the axes: it sits beside them
    scopes = [s for s in SCOPE_MARKERS if any(p.get("scope") == s for p in points)]
    scope_handles = [
        Line2D([], [], ls="", marker=SCOPE_MARKERS[s], color="dimgray", label=words(s)) for s in scopes
    ]
    if any(p.get("hollow") for p in points):
        scope_handles.append(
            Line2D([], [], ls="", marker="o", mfc="none", color="dimgray", label="mixed batches (hollow)")
        )
    if scope_handles:  # a second legend replaces the axes' legend: keep the first as an artist
        ax.add_artist(first)
        ax.legend(handles=scope_handles, title="balancing scope (marker)", loc="lower left",
                  bbox_to_anchor=(1.01, 0.0))  # fmt: skip
    if variants:
        fig.legend(handles=variants, title=variant_title, loc="outside lower center", ncols=2)
    _style(ax, AXIS_LABELS.get(x, x), AXIS_LABELS.get(y, y), title, legend=False)
    if title and limits and any(p.get("method") in off_scale and float(p[y]) > limits[1] for p in points):
        ax.set_title(ax.get_title(), pad=12)  # above the marker on the top edge
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


def _variants(points: Sequence[Mapping]) -> tuple[list[dict], list[Line2D], str]:
    """Each point's look (`looks`) and, where several points share a method, a scope and a batch
    composition (shades of one colour), legend handles naming the settings that tell them apart (the parts
    of their `label`s not common to all of them: comma-separated parts and a trailing "(...)", or words when
    no label has a comma; written without '='; prefixed by method and scope when several such sets exist,
    else named in the legend title that is returned)."""
    point_looks = looks(points)
    key = [(str(p.get("method", "none")), str(p.get("scope", "")), bool(p.get("hollow"))) for p in points]
    clashes = [k for k in dict.fromkeys(key) if key.count(k) > 1]
    handles = []
    for k in clashes:
        members = [i for i, other in enumerate(key) if other == k]
        labels = [str(points[i].get("label", "")) for i in members]
        if any("," in t for t in labels):  # "LBL, micro_batch, mixed batches (x6_dbes)": parts and "(...)"
            parts = [[_unparenthesize(w) for w in re.split(r",|\s(?=\()", t) if w.strip()] for t in labels]
            joiner = ", "
        else:
            parts, joiner = [t.split() for t in labels], " "
        common = set.intersection(*(set(w) for w in parts))
        prefix = f"{k[0]} {words(k[1]) or 'no'} scope: " if len(clashes) > 1 else ""
        for i, w in zip(members, parts, strict=True):
            name = joiner.join(part for part in w if part not in common) or points[i].get("label") or f"#{i}"
            look = point_looks[i]
            handles.append(
                Line2D(
                    [],
                    [],
                    ls="",
                    marker=look["marker"],
                    mfc=look["mfc"],
                    color=look["color"],
                    label=words(readable_label(prefix + name)),
                )  # fmt: skip
            )
    if len(clashes) == 1:
        method, scope, hollow = clashes[0]
        where = f"{words(scope)} scope" if scope else "no scope"
        title = f"{method}, {where}{', mixed batches' if hollow else ''}"
    else:
        title = "same method and scope"
    return point_looks, handles, title


def _unparenthesize(part: str) -> str:
    part = part.strip()
    return part[1:-1] if part.startswith("(") and part.endswith(")") else part


def _style(ax, xlabel: str, ylabel: str, title: str | None, legend: bool) -> None:
    """Shared look of the line and scatter plots: labels and title broken into lines that fit the figure,
    light grid, plain tick numbers (`_plain_ticks`)."""
    width, height = ax.figure.get_size_inches()
    ax.set_xlabel(_wrap(xlabel, width - 0.8, MIN_FONT + 1))
    ax.set_ylabel(_wrap(ylabel, min(height - 0.9, 2.4), MIN_FONT + 1))
    _plain_ticks(ax)
    ax.grid(alpha=0.3, lw=0.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if legend:
        ax.legend()
    if title:
        ax.set_title(_wrap(title, width - 0.5, MIN_FONT + 2))


def _plain_ticks(ax) -> None:
    """No offset such as '+4.4' and no factor such as '1e6' in an axis corner: plain numbers, and
    engineering units ('2 M') on an axis whose numbers reach 10,000."""
    for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        formatter = axis.get_major_formatter()
        if type(formatter) is not ScalarFormatter:
            continue
        if max(abs(v) for v in limits) >= 1e4:
            axis.set_major_formatter(EngFormatter(sep=" "))
        else:
            formatter.set_useOffset(False)
            formatter.set_scientific(False)


def _legend(fig: Figure, ax, count: int, key: str = "") -> None:
    """The series' legend: up to 4 series without abbreviations inside the axes; else below them in
    columns (never over the data or the title), titled with the key to the abbreviations its labels use."""
    if count == 0:
        return
    if count <= 4 and not key:
        ax.legend()
        return
    columns = 1 if count <= 2 else 2 if count <= 8 else 3
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=columns,
               title=_wrap(key, 5.0, MIN_FONT + 1) if key else None)  # fmt: skip


def _legend_height(count: int, key: str = "") -> float:
    """Inches a legend of `count` entries below the axes takes (none when it sits inside them)."""
    if count <= 4 and not key:
        return 0.0
    columns = 1 if count <= 2 else 2 if count <= 8 else 3
    return 0.25 + 0.15 * math.ceil(count / columns) + (0.18 if key else 0.0)


@styled
def per_layer_curves(
    series: Mapping[str, Sequence[float]],
    metric: str,
    out_path: str | Path | None = None,
    title: str | None = None,
    bands: Mapping[str, Sequence[float]] | None = None,
    kinds: Mapping[str, Mapping] | None = None,
) -> Figure:
    """One point per layer and label (e.g. gate entropy per layer, as in Chernov 2025): layers are discrete,
    so points side by side with error bars, never joined lines; `bands` (label -> half-width per layer, e.g.
    the 95% CI over seeds) as error bars where there is one. `kinds` (label -> method, scope, hollow) gives
    each label its look (`looks`): the same colour and marker as in every other figure."""
    key = legend_key(list(series), kinds, list(series))
    fig = Figure(figsize=(4.6, 3.0 + _legend_height(len(series), key)), layout="constrained")
    ax = fig.add_subplot()
    styles = _series_looks(list(series), kinds)
    count = len(series)
    width = min(0.7, 0.12 * count)
    for i, (label, values) in enumerate(series.items()):
        offset = 0.0 if count == 1 else -width / 2 + width * i / (count - 1)
        layers = np.arange(len(values)) + offset
        style = styles[label]
        half = np.asarray((bands or {}).get(label, np.zeros(len(values))), dtype=np.float64)
        ax.errorbar(layers, np.asarray(values, dtype=np.float64), yerr=half if np.any(half > 0) else None,
                    ls="none", marker=style["marker"], mfc=style["mfc"], color=style["color"],
                    ms=7 if style["marker"] == "*" else 4.5,
                    elinewidth=0.9, capsize=2, label=words(readable_label(label)))  # fmt: skip
    num_layers = max((len(v) for v in series.values()), default=0)
    ax.set_xticks(range(num_layers))
    ax.set_xlim(-0.6, num_layers - 0.4)
    _style(ax, "MoE layer", metric_label(metric), title, legend=False)
    ax.grid(False, axis="x")
    _legend(fig, ax, count, key)
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


@styled
def training_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    metric: str,
    out_path: str | Path | None = None,
    title: str | None = None,
    x_label: str = "step",
    labels: Mapping[str, str] | None = None,
    kinds: Mapping[str, Mapping] | None = None,
) -> Figure:
    """One line per series over training steps (or tokens) from (x, mean, half-width): the band is
    mean ± half-width (the report passes the 95% CI over seeds; zero: no band). `labels` renames series in
    the legend (else their keys, written without '='); `kinds` (key -> method, scope, hollow) gives each its
    look (`looks`: colour per method, marker per scope, dashes for configurations that share both).
    Training-batch purity series that are 1.0 by construction (`by_construction`) are left out, with a
    footnote counting them. Token axes (an x label naming tokens, values past 1e5) are written in millions:
    'training tokens (M)'."""
    kept = {k: v for k, v in series.items() if not by_construction(metric, v[1], v[2])}
    names = {k: words((labels or {}).get(k) or readable_label(k)) for k in series}
    omitted = [names[k] for k in series if k not in kept]
    key = legend_key([names[k] for k in kept], kinds, list(kept))
    fig = Figure(figsize=(4.8, 3.0 + _legend_height(len(kept), key)), layout="constrained")
    ax = fig.add_subplot()
    styles = _series_looks(list(series), kinds)
    for k, (steps, mean, half) in kept.items():
        steps, mean, half = (np.asarray(a, dtype=float) for a in (steps, mean, half))
        style = styles[k]
        every = max(1, len(steps) // 6)
        ax.plot(steps, mean, marker=style["marker"], markevery=every, mfc=style["mfc"], ms=4,
                color=style["color"], ls=style["ls"], label=names[k])  # fmt: skip
        if np.any(half > 0):
            ax.fill_between(steps, mean - half, mean + half, color=style["color"], alpha=0.15, lw=0)
    xs = [float(v) for steps, _, _ in series.values() for v in steps]
    if "token" in x_label and xs and max(map(abs, xs)) >= 1e5:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}"))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        x_label = f"{x_label} (M)"
    _style(ax, x_label, metric_label(metric), title, legend=False)
    _legend(fig, ax, len(kept), key)
    if omitted:
        listed = (
            f": {', '.join(omitted)}" if len(omitted) <= 3 else " (single-domain batches or oracle routing)"
        )
        note = f"{len(omitted)} line{'s' if len(omitted) > 1 else ''} omitted, 1.0 by construction{listed}"
        if not kept:
            if xs and min(xs) < max(xs):
                ax.set_xlim(min(xs), max(xs))  # the span the omitted lines had
            empty = "every line is 1.0 by construction: nothing to show"
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center")
        ax.annotate(
            note,
            xy=(0.0, 0.0),
            xycoords="axes fraction",
            xytext=(0, -30),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=MIN_FONT,
            style="italic",
            annotation_clip=False,
        )
    _fraction_axis(ax, metric)
    return _finish(fig, out_path)


@styled
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
